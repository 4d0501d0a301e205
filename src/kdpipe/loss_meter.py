"""Loss bookkeeping of the training loop, on the device: sums, read-backs, divergence.

A read-back (``.item()``, ``float(tensor)``) waits for the accelerator to finish its
queue; once per step it stalls every step. :class:`LossMeter` keeps the sample-weighted sums
of the loss and its parts on the device and reads them back once per
:data:`LOG_INTERVAL` steps (nanoGPT's train.py reads its loss once per log interval for
this reason), and still names the exact step of a divergence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["LOG_INTERVAL", "LossMeter", "TrainingDivergedError"]

LOG_INTERVAL = 25
"""Steps between read-backs of the loss (progress bar, divergence check)."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf or exceeded ``TrainConfig.max_loss``."""

    def __init__(self, desc: str, epoch: int, step: int, value: float, max_loss: float) -> None:
        self.epoch, self.step, self.value = epoch, step, value
        super().__init__(
            f"{desc}: training diverged at epoch {epoch}, step {step} (loss = {value:.4g}, "
            f"limit max_loss = {max_loss:g}); lower the learning rate (train.lr) or set "
            "train.grad_clip (e.g. 1.0). The checkpoint of the last finished epoch is kept."
        )


class LossMeter:
    """One epoch's sample-weighted sums of the loss and its parts, kept on the device.

    Each step's loss also goes into a window on the device; :meth:`check` tests the window
    there (non-finite or above ``max_loss``) and reads back one flag and the window's sum,
    so a divergence is caught at the exact step without a read-back per step. Sums are in
    float64, as exact as the per-step Python floats they replace (float32 on MPS, which has
    no float64).
    """

    def __init__(self, device: torch.device, desc: str, epoch: int, max_loss: float) -> None:
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.window = torch.zeros(LOG_INTERVAL, dtype=self.dtype, device=device)
        self.desc, self.epoch, self.max_loss = desc, epoch, max_loss
        self.names: list[str] = []
        self.sums: Tensor | None = None
        self.n = self.steps = self.unchecked = 0

    def add(self, loss: Tensor, parts: dict[str, Tensor], n: int) -> None:
        if self.sums is None:
            self.names = sorted(parts)
            self.sums = torch.zeros(len(self.names) + 1, dtype=self.dtype, device=self.window.device)
        elif sorted(parts) != self.names:
            raise ValueError(f"{self.desc}: the task's loss parts changed within an epoch "
                             f"({self.names} -> {sorted(parts)}); return the same parts every step")
        if self.unchecked == LOG_INTERVAL:  # only if the caller did not check in time
            self.check()
        value = loss.detach().to(self.dtype)
        self.window[self.unchecked] = value
        self.sums += torch.stack([value, *(parts[k].to(self.dtype) for k in self.names)]) * n
        self.n, self.steps, self.unchecked = self.n + n, self.steps + 1, self.unchecked + 1

    def check(self) -> float:
        """Read back the steps since the last check; their mean loss (for the progress bar).

        Raises:
            TrainingDivergedError: naming the first of them with a non-finite loss or one
                above ``max_loss``.
        """
        window = self.window[:self.unchecked]
        bad = ~torch.isfinite(window) | (window > self.max_loss)
        flag, total = torch.stack([bad.any().to(self.dtype), window.sum()]).tolist()
        if flag:
            first = int(bad.nonzero()[0])
            step = self.steps - self.unchecked + first + 1
            raise TrainingDivergedError(self.desc, self.epoch, step, float(window[first]), self.max_loss)
        mean, self.unchecked = total / max(1, self.unchecked), 0
        return mean

    def means(self, reduce: Callable[[Tensor], Tensor] = lambda sums: sums) -> dict[str, float]:
        """``train_loss`` and ``train_<part>``: means over all samples; ``reduce`` sums the
        totals over processes (DDP: ``all_reduce``)."""
        if self.sums is None:
            raise ValueError(f"{self.desc}: the train loader yielded no batch in epoch {self.epoch}")
        if self.unchecked:
            self.check()
        n = torch.tensor([self.n], dtype=self.dtype, device=self.sums.device)
        *sums, total = reduce(torch.cat([self.sums, n])).tolist()
        return {f"train_{k}": v / total for k, v in zip(["loss", *self.names], sums, strict=True)}
