"""Read MNIST-style IDX files (``*-idx3-ubyte`` images, ``*-idx1-ubyte`` labels), gzipped or not.

The format (LeCun's MNIST page): a big-endian header of two zero bytes, a type code
(``0x08`` = unsigned byte), the number of dimensions, then one 32-bit size per
dimension, then the data. Fashion-MNIST uses the same files and names; Debian's
``dataset-fashion-mnist`` package installs them, gzipped, under
``/usr/share/datasets/fashion-mnist`` (recompressed: their checksums differ from the
ones torchvision pins, the bytes inside are the same).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

__all__ = ["IdxError", "find_idx_pair", "read_idx", "read_idx_split"]

_UBYTE = 0x08
SPLIT_PREFIX = {"train": "train", "test": "t10k"}


class IdxError(ValueError):
    """An IDX file that is truncated or not what its name says; the message names it."""


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file with ``ndim`` dimensions (3: images, 1: labels)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # a truncated .gz ends in EOFError
        raise IdxError(f"cannot read IDX file {path}: {err}; download it again") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != _UBYTE or raw[3] != ndim:
        raise IdxError(f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s) "
                       f"(magic number {raw[:4].hex() or 'missing'}); is it the right file?")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise IdxError(f"{path} is truncated or padded: its header says {shape} "
                       f"({expected} bytes) but the file holds {len(raw)}; download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_idx_pair(directory: Path, split: str) -> tuple[Path, Path] | None:
    """``(images, labels)`` of ``split`` in ``directory`` (``.gz`` or plain), or None."""
    prefix = SPLIT_PREFIX[split]
    found = []
    for kind, dims in (("images", 3), ("labels", 1)):
        names = [f"{prefix}-{kind}-idx{dims}-ubyte{ext}" for ext in ("", ".gz")]
        hit = next((directory / n for n in names if (directory / n).is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def read_idx_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 1, H, W)`` and labels ``(N,)`` of one split, counts cross-checked."""
    pair = find_idx_pair(directory, split)
    if pair is None:
        raise IdxError(f"no {split} IDX files in {directory}")
    images, labels = read_idx(pair[0], 3), read_idx(pair[1], 1)
    if len(images) != len(labels):
        raise IdxError(f"{pair[0]} holds {len(images)} images but {pair[1]} holds "
                       f"{len(labels)} labels; the files do not belong together")
    return images[:, None], labels.astype(np.int64)
