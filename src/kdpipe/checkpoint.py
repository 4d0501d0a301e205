"""Checkpoints of :func:`kdpipe.train.fit`: the run state, every RNG state, atomic files.

``checkpoint_dir/last.pt`` is written after every finished epoch and holds the trained
module (the student together with any training-only part, such as a FitNets regressor),
the optimiser, the grad scaler, the history, the best student weights and every RNG
state, so resuming from it reproduces the uninterrupted run. It is a plain container of
tensors, lists and numbers, loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdpipe.config import TrainConfig

__all__ = [
    "CHECKPOINT_NAME", "RunState", "load_checkpoint", "loader_generators", "restore",
    "rng_state", "run_signature", "save_checkpoint", "set_rng_state", "to_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
_CHECKPOINT_FORMAT = 1


@dataclass
class RunState:
    """What a run has done so far: the history and the best validation epoch."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_accuracy: float | None = None
    best_weights: dict[str, Tensor] | None = None
    stopped_early: bool = False

    @property
    def epoch(self) -> int:
        return len(self.history)


# ------------------------------------------------------------------------- RNGs
def loader_generators(loader: DataLoader) -> list[torch.Generator]:
    """The distinct torch generators that drive a loader's shuffling (may be none)."""
    found: list[torch.Generator] = []
    for g in (getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)):
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def rng_state(loader: DataLoader) -> dict[str, Any]:
    """All RNG states as tensors, lists and numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "loader": [g.get_state() for g in loader_generators(loader)],
    }


def set_rng_state(state: dict[str, Any], loader: DataLoader) -> None:
    """Put back what :func:`rng_state` captured (the loader's generators included)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    generators = loader_generators(loader)
    if len(generators) != len(state["loader"]):
        log.warning("the train loader has %d shuffling generator(s), the checkpoint %d: the "
                    "resumed run will not repeat the uninterrupted one's batch order",
                    len(generators), len(state["loader"]))
    for g, s in zip(generators, state["loader"], strict=False):
        g.set_state(s)


# ------------------------------------------------------------------------ files
def run_signature(cfg: TrainConfig, task: str, module: nn.Module, steps_per_epoch: int) -> str:
    """Hash of everything a checkpoint must agree with to be resumed: the train config,
    the task's description, the trained module's tensor names and shapes, the epoch length."""
    shapes = [(k, tuple(v.shape)) for k, v in module.state_dict().items()]
    text = f"{cfg.model_dump_json()}|{task}|{shapes}|{steps_per_epoch}"
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, signature: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists and matches ``signature``, else None.

    Raises:
        RuntimeError: the file exists but is no weights-only checkpoint (names the fix).
    """
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # re-raised with the fix; never silently ignored
        raise RuntimeError(
            f"cannot read checkpoint {path}: not a weights-only checkpoint written by kdpipe.train "
            f"({type(err).__name__}); delete it or pass resume=False") from err
    if ckpt.get("format") != _CHECKPOINT_FORMAT or ckpt.get("signature") != signature:
        log.warning("checkpoint %s was written for a different configuration (train config, task, "
                    "model or data size changed); starting from scratch and overwriting it", path)
        return None
    return ckpt


def to_checkpoint(
    signature: str, module: nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, state: RunState, loader: DataLoader,
) -> dict[str, Any]:
    """The checkpoint of a run after its latest epoch (``module``: what the optimiser trains)."""
    return {
        "format": _CHECKPOINT_FORMAT,
        "signature": signature,
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "history": state.history,
        "best": {"epoch": state.best_epoch, "accuracy": state.best_accuracy, "weights": state.best_weights},
        "stopped_early": state.stopped_early,
        "rng": rng_state(loader),
    }


def restore(
    ckpt: dict[str, Any], module: nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, loader: DataLoader,
) -> RunState:
    """Load a checkpoint from :func:`to_checkpoint` into the run; returns its state."""
    module.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"]:  # empty when the saving run used no fp16 scaler
        scaler.load_state_dict(ckpt["scaler"])
    best = ckpt["best"]
    set_rng_state(ckpt["rng"], loader)
    return RunState(list(ckpt["history"]), best["epoch"], best["accuracy"], best["weights"],
                    ckpt["stopped_early"])
