"""A class-balanced subset of Fashion-MNIST's training split as a kdpipe data source.

kdpipe's ``fashion_mnist`` source always holds the 60,000 official training images. The
Fashion-MNIST benchmark trains about twenty models and must fit in 25 minutes on a 2-core
CPU, so it trains on a stated subset while keeping the **whole** official 10,000-image test
split. Registering the subset as a source (``fashion_subset:<images per class>``) rather
than trimming a loader means every kdpipe recipe (``train_teacher``, ``distill_student``)
opens exactly this data through its own ``make_loader``: the validation split, the
normalisation statistics, augmentation and the teacher-logit cache all follow as they do
in the pipeline.

The subset is a pure function of the per-class count and :data:`SUBSET_SEED`: the same
images in every process and every run. The validation split is then carved out of it by
kdpipe (``data.val_fraction``, stratified), as for any source with an official test split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch

from kdpipe.config import DataConfig
from kdpipe.sources import SOURCES, DataError, Source

KIND = "fashion_subset"
SUBSET_SEED = 0  # which training images are drawn; fixed, so every seed sees the same data


class SubsetSource:
    """``base`` restricted to ``positions`` (a view: no pixels are copied)."""

    def __init__(self, base: Source, positions: np.ndarray, fixed_test: np.ndarray) -> None:
        self.base, self.positions = base, np.asarray(positions, dtype=np.int64)
        self.labels = np.asarray(base.labels)[self.positions]
        self.classes, self.input_shape = list(base.classes), tuple(base.input_shape)
        self.fixed_test = fixed_test

    def __len__(self) -> int:
        return len(self.positions)

    def image(self, i: int) -> torch.Tensor:
        return self.base.image(int(self.positions[i]))

    def chunks(self, positions: np.ndarray) -> Iterator[np.ndarray]:
        return self.base.chunks(self.positions[np.asarray(positions, dtype=np.int64)])

    def content_digest(self) -> bytes:
        h = hashlib.sha256(self.base.content_digest())
        h.update(self.positions.astype("<i8").tobytes())
        return h.digest()


def balanced_positions(labels: np.ndarray, candidates: np.ndarray, per_class: int,
                       seed: int = SUBSET_SEED) -> np.ndarray:
    """``per_class`` positions of every class drawn from ``candidates`` (sorted).

    Raises:
        DataError: a class has fewer than ``per_class`` candidates.
    """
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels[candidates]):
        pool = candidates[labels[candidates] == c]
        if len(pool) < per_class:
            raise DataError(f"{KIND}: class {c} has only {len(pool)} training images, fewer than "
                            f"the {per_class} asked for; use a smaller count")
        picked.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


def subset_of(base: Source, per_class: int, test_per_class: int | None = None) -> SubsetSource:
    """``per_class`` training images per class of a source with an official test split,
    followed by its whole test split (or ``test_per_class`` per class: smoke tests only)."""
    if base.fixed_test is None:
        raise DataError(f"{KIND} needs a source with an official test split")
    labels = np.asarray(base.labels)
    test = np.asarray(base.fixed_test, dtype=np.int64)
    keep = balanced_positions(labels, np.setdiff1d(np.arange(len(labels)), test), per_class)
    if test_per_class is not None:
        test = balanced_positions(labels, test, test_per_class)
    positions = np.concatenate([keep, test])
    return SubsetSource(base, positions, fixed_test=np.arange(len(keep), len(positions)))


def parse_counts(arg: str) -> tuple[int, int | None]:
    """``"1300"`` -> (1300, None): full test split; ``"50,20"`` -> (50, 20)."""
    parts = arg.split(",")
    if len(parts) > 2 or not all(p.isdigit() and int(p) >= 2 for p in parts):
        raise DataError(f"{KIND} needs training images per class (>= 2), optionally a test count "
                        f"per class after a comma, e.g. {KIND}:1300 or {KIND}:50,20 (got {arg!r})")
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else None


@SOURCES.register(KIND)
def _fashion_subset(arg: str, cfg: DataConfig, channels: int | None) -> Source:
    """``fashion_subset:<train images per class>[,<test images per class>]``: Fashion-MNIST
    (found as ``fashion_mnist`` finds it) with a class-balanced part of the training split
    and the full test split (unless a test count is given)."""
    per_class, test_per_class = parse_counts(arg)
    base = SOURCES.get("fashion_mnist")("", cfg, channels)
    return subset_of(base, per_class, test_per_class)


def data_config(recipe: DataConfig, per_class: int, test_per_class: int | None = None) -> DataConfig:
    """The recipe's data section (batch size, augmentation, val fraction...) on the subset."""
    arg = str(per_class) if test_per_class is None else f"{per_class},{test_per_class}"
    return DataConfig(**{**recipe.model_dump(), "source": f"{KIND}:{arg}"})
