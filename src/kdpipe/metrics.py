"""Model quality and cost metrics: accuracy, confusion, params, MACs, size, latency.

Conventions:

* A confusion matrix has one row per *true* class and one column per *predicted*
  class: ``cm[i, j]`` counts samples of class ``i`` predicted as ``j``.
* Per-class accuracy is the recall of each class (diagonal / row sum). A class with no
  samples has no accuracy: its entry is ``nan`` (never 0, which would read as "always
  wrong"); use ``torch.nanmean`` to average.
* MACs are multiply-accumulates for one sample, as counted by Torch-Pruning's
  ``count_ops_and_params`` (convolutions and linear layers dominate; BN, pooling and
  activations add their element counts).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "accuracy",
    "confusion_matrix",
    "count_macs",
    "count_params",
    "latency_stats",
    "per_class_accuracy",
    "serialized_size_bytes",
]

ArrayLike = torch.Tensor | np.ndarray | Sequence[int]


def _as_predictions(logits_or_preds: ArrayLike) -> torch.Tensor:
    """(N,) int64 predictions from (N, C) logits/probabilities or (N,) labels."""
    t = torch.as_tensor(logits_or_preds).detach().cpu()
    if t.dim() == 2:
        return t.argmax(dim=1)
    if t.dim() == 1:
        return t.long()
    raise ValueError(f"expected (N, C) logits or (N,) predictions, got shape {tuple(t.shape)}")


def _as_targets(targets: ArrayLike, n: int) -> torch.Tensor:
    t = torch.as_tensor(targets).detach().cpu().long()
    if t.shape != (n,):
        raise ValueError(
            f"targets must have shape ({n},) to match the predictions; got {tuple(t.shape)}"
        )
    return t


def accuracy(logits_or_preds: ArrayLike, targets: ArrayLike) -> float:
    """Fraction of correct predictions.

    Args:
        logits_or_preds: (N, C) logits (argmax is taken) or (N,) predicted labels.
        targets: (N,) true labels.

    Returns:
        Accuracy in [0, 1].
    """
    preds = _as_predictions(logits_or_preds)
    if preds.numel() == 0:
        raise ValueError("accuracy of an empty batch is undefined")
    return (preds == _as_targets(targets, preds.numel())).double().mean().item()


def confusion_matrix(preds: ArrayLike, targets: ArrayLike, num_classes: int) -> torch.Tensor:
    """Confusion counts, rows = true class, columns = predicted class.

    Args:
        preds: (N,) predicted labels or (N, C) logits.
        targets: (N,) true labels.
        num_classes: C; labels must lie in [0, C).

    Returns:
        (C, C) int64 tensor (``.numpy()`` for an ndarray).
    """
    p = _as_predictions(preds)
    t = _as_targets(targets, p.numel())
    for name, labels in (("predictions", p), ("targets", t)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{name} hold labels outside [0, {num_classes}): "
                f"min {labels.min().item()}, max {labels.max().item()}"
            )
    flat = t * num_classes + p
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Recall per true class from a confusion matrix; ``nan`` for classes with no samples.

    Returns:
        (C,) float64 tensor.
    """
    cm = torch.as_tensor(confusion).double()
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C); got {tuple(cm.shape)}")
    support = cm.sum(dim=1)
    correct = cm.diagonal()
    # 0/0 would also give nan, but say so explicitly rather than rely on it.
    return torch.where(support > 0, correct / support.clamp(min=1), torch.nan)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on a single (C, H, W) input.

    Uses ``torch_pruning.utils.count_ops_and_params``, which works on a deep copy of the
    model (the original's mode and hooks are untouched).
    """
    from torch_pruning.utils import count_ops_and_params

    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W); got {tuple(input_shape)}")
    device, dtype = _model_device_dtype(model)
    example = torch.zeros(1, *input_shape, device=device, dtype=dtype)
    macs, _params = count_ops_and_params(model, example)
    return int(macs)


def serialized_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict serialised as safetensors (weights + buffers)."""
    from safetensors.torch import save

    # Contiguous copies: safetensors refuses views and tensors that share storage.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return len(save(tensors))


def latency_stats(
    fn: Callable[[], Any],
    repeats: int = 50,
    warmup: int = 5,
    synchronize: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Wall-clock latency of ``fn()`` in milliseconds.

    Args:
        fn: the call to time (e.g. ``lambda: model(x)`` under ``torch.inference_mode()``).
        repeats: timed calls.
        warmup: untimed calls first (allocator, caches, lazy init).
        synchronize: called after each call before the clock stops; pass
            ``torch.cuda.synchronize`` when ``fn`` launches GPU work, which is asynchronous.

    Returns:
        ``{"p50_ms", "p95_ms", "mean_ms"}`` (percentiles with linear interpolation).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times[i] = time.perf_counter() - start
    ms = times * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": float(ms.mean()),
    }
