"""Calibration data for INT8 quantisation (a class-balanced sample of the train split) and
the ``quantize`` section's rules that :mod:`kdpipe.validate` applies.

The sample is drawn round-robin over the classes (each class in a seeded random order),
so every class contributes ``n // classes`` or one more sample, and a class with too few
samples gives all it has while the others fill the rest. Pixels are raw [0, 1], which is
what the exported graph takes (its normalisation is inside).

:func:`calibration_problems` is the one rule for the sample's size; :mod:`kdpipe.validate`
applies it before any work with the sizes a bundled source is known to have
(:func:`known_train_size`), :func:`calibration_sample` with the real split.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from kdpipe.config import ConfigError
from kdpipe.sources import known_class_count, known_train_size  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from kdpipe.data import DatasetSpec

__all__ = ["ArrayReader", "balanced_positions", "calibration_problems", "calibration_sample",
           "known_class_count", "known_train_size", "type_problems"]

def type_problems(activation_type: str, weight_type: str) -> list[str]:
    """Why ONNX Runtime cannot quantise with this activation / weight type pair (or [])."""
    if activation_type == "int8" and weight_type == "uint8":
        return ["activation_type int8 with weight_type uint8 is not supported by ONNX "
                "Runtime; use weight_type int8 (S8S8) or activation_type uint8 (U8U8)"]
    return []


def calibration_problems(size: int, train_size: int | None, num_classes: int | None) -> list[str]:
    """Why ``quantize.calibration_size`` does not fit the data (empty when it does)."""
    found = []
    if train_size is not None and size > train_size:
        found.append(f"the calibration sample ({size}) is larger than the train split "
                     f"({train_size} samples); lower quantize.calibration_size to at most "
                     f"{train_size}")
    if num_classes is not None and size < num_classes:
        found.append(f"the calibration sample ({size}) is smaller than the number of classes "
                     f"({num_classes}), so some classes would not be calibrated; raise "
                     f"quantize.calibration_size to at least {num_classes}")
    return found


def balanced_positions(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Positions of a class-balanced sample of ``n`` from ``labels`` (round-robin, seeded)."""
    rng = np.random.default_rng(seed)
    rank = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        rank[rng.permutation(members)] = np.arange(len(members))
    class_order = rng.permutation(int(labels.max()) + 1)[labels]  # tie-break within a round
    order = np.lexsort((class_order, rank))
    return np.sort(order[:n])


def calibration_sample(spec: DatasetSpec, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced sample of the train split, as raw [0, 1] pixels.

    Args:
        spec: a :class:`kdpipe.data.DatasetSpec`.
        n: sample size (``quantize.calibration_size``).
        seed: which samples (``quantize.calibration_seed``).

    Returns:
        ``(pixels float32 (n, C, H, W), labels int64 (n,))``.

    Raises:
        ConfigError: ``n`` is larger than the train split or smaller than the class count.
    """
    from kdpipe.data import get_split

    problems = calibration_problems(n, spec.split_sizes["train"], spec.num_classes)
    if problems:
        raise ConfigError("quantize.calibration_size: " + "; ".join(problems))
    train = get_split(spec, "train", normalize=False)
    labels = np.asarray(train.source.labels)[train.source_positions]
    chosen = balanced_positions(labels, n, seed)
    pixels = np.stack([train[int(i)][0].numpy() for i in chosen]).astype(np.float32)
    return pixels, labels[chosen].astype(np.int64)


class ArrayReader:
    """ONNX Runtime ``CalibrationDataReader`` over an in-memory array, in batches.

    ONNX Runtime accepts any object with ``get_next`` (its ``CalibrationDataReader``
    checks for the method), so this class needs no ONNX Runtime import.
    """

    def __init__(self, input_name: str, pixels: np.ndarray, max_batch: int = 64) -> None:
        self.input_name, self.pixels = input_name, pixels
        # Equal batches: ONNX Runtime's histogram calibrators (entropy, percentile) stack
        # every batch's outputs into one array and fail on a shorter last batch.
        self.batch_size = max(d for d in range(1, max_batch + 1) if len(pixels) % d == 0)
        self._batches: Iterator[np.ndarray] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._batches is None:
            self._batches = (self.pixels[i:i + self.batch_size]
                             for i in range(0, len(self.pixels), self.batch_size))
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._batches = None

    def __len__(self) -> int:
        return math.ceil(len(self.pixels) / self.batch_size)

    def __iter__(self) -> ArrayReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item
