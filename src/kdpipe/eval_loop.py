"""The evaluation loop: accuracy, mean cross-entropy and the confusion matrix of a model.

:func:`kdpipe.train.fit` calls it after every epoch on the validation split; the stages
that measure models (:mod:`kdpipe.recipes`, :mod:`kdpipe.prune`) call it on the test split.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe import ddp, metrics
from kdpipe.device import Precision, to_device
from kdpipe.runtime import resolve_device

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    """Accuracy, mean cross-entropy, per-class accuracy (NaN for an absent class) and
    the confusion matrix (rows = true class, columns = prediction)."""

    accuracy: float
    loss: float
    per_class: list[float]
    confusion: list[list[int]]

    @property
    def num_samples(self) -> int:
        return sum(map(sum, self.confusion))


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, device: str | torch.device | None = None, *, amp: bool = False
) -> EvalResult:
    """Evaluate ``model`` on batches ``(x, y, ...)``; the model's train/eval mode is restored.

    Args:
        model: a classifier returning logits.
        loader: yields ``(x, y)`` or ``(x, y, index)``.
        device: where to run; None = where the model's parameters are.
        amp: autocast on CUDA (as in training); fp32 otherwise.

    Inside a process group of several processes (DDP) ``loader`` is this rank's shard
    (see :func:`kdpipe.ddp.shard_loader`): the sums are reduced over all ranks and
    every rank returns the result for the whole split.

    Raises:
        ValueError: the loader yields no batch.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = resolve_device(device)
    precision = Precision.create(amp, device)
    was_training = model.training
    model.eval()
    loss_sum, confusion = torch.zeros((), dtype=torch.float64, device=device), None
    for batch in loader:
        x, y = to_device(batch[0], device, device.type == "cuda"), batch[1].to(device)
        with precision.autocast():
            logits = model(x).float()
        k = logits.shape[1]
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        batch_cm = metrics.confusion_matrix(logits.argmax(1), y, k)
        confusion = batch_cm if confusion is None else confusion + batch_cm
    model.train(was_training)
    if confusion is None:
        raise ValueError("evaluate() got an empty loader: the split has no samples")
    totals = ddp.all_reduce_sum(torch.cat([loss_sum.cpu().view(1), confusion.double().flatten()]))
    cm = totals[1:].round().long().view(k, k)
    n = int(cm.sum())
    return EvalResult(float(cm.diag().sum()) / n, float(totals[0]) / n,
                      metrics.per_class_accuracy(cm).tolist(), cm.tolist())
