"""Where and with which random numbers a process trains: device choice and seeds.

The low layer under :mod:`kdpipe.train`, :mod:`kdpipe.ddp` and the recipes; it imports
no other kdpipe module.

Seeds: :func:`seed_everything` seeds the global generators once from a config's ``seed``;
:func:`epoch_seed` is the one formula for the per-epoch seeds derived from it (a
dataset's augmentation stream, and under DDP the global generators of each rank). Being a
pure function of (seed, epoch, rank), it lets a resumed run draw exactly what the
uninterrupted one drew without keeping per-rank RNG state in a checkpoint.
"""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch

__all__ = ["SeedStream", "epoch_seed", "resolve_device", "seed_everything"]

SeedStream = Literal["data", "global"]
# Streams sit 2**40 apart: far beyond any epoch + rank term, so the dataset's augmentation
# generator and the global generators (also torch's Mersenne Twister) never share a seed.
_STREAM_OFFSET: dict[str, int] = {"data": 0, "global": 2**40}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Map ``auto`` to cuda → mps → cpu; check that an explicit device is usable.

    Raises:
        RuntimeError: an explicit ``cuda``/``mps`` device is not available here.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {name!r} requested but MPS is not available; use device: auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, process_rank: int = 0, *, stream: SeedStream = "data") -> int:
    """The seed of one random stream for one (config seed, epoch, rank).

    Args:
        seed: the train config's ``seed``.
        epoch: the epoch about to run (1-based).
        process_rank: the DDP rank (0 for a single process).
        stream: ``data`` for a dataset's own augmentation generator (``dataset.reseed``),
            ``global`` for python / numpy / torch's global generators (DDP re-seeds them
            every epoch: dropout and the like).

    Returns:
        A non-negative int below 2**63. ``data`` with rank 0 is ``seed * 1_000_003 +
        epoch``, so a single process keeps the augmentation stream it always had; ranks
        differ by 7,919 per rank, epochs by one.
    """
    if stream not in _STREAM_OFFSET:
        raise ValueError(f"unknown seed stream {stream!r}; valid: {', '.join(_STREAM_OFFSET)}")
    return (seed * 1_000_003 + epoch + 7_919 * process_rank + _STREAM_OFFSET[stream]) % 2**63
