"""What a pruning run cost and saved: :class:`PruneReport` and :func:`measure_model`.

Kept apart from :mod:`kdpipe.prune` (which re-exports them) so that readers of a report
(steps, evaluation, materializers) need not import Torch-Pruning.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from kdpipe.metrics import count_macs, count_params, latency_stats, serialized_size_bytes

__all__ = ["ModelStats", "PruneReport", "PruneStep", "measure_model"]


# ---------------------------------------------------------------------- reports
class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelStats(_Frozen):
    """Cost and quality of a model at one point of the pruning run."""

    params: int
    macs: int
    """Multiply-accumulates for one sample (``kdpipe.metrics.count_macs``)."""
    size_bytes: int
    """The state dict serialised as safetensors."""
    latency_ms: float
    """p50 of a batch-1 forward pass in PyTorch eager on the CPU."""
    accuracy: float | None = None
    """From ``evaluate_fn`` (None when none was given)."""


class PruneStep(_Frozen):
    """One iterative pruning step."""

    step: int
    """1-based."""
    target_ratio: float
    """Fraction of each layer's (or, globally, all) channels removed after this step."""
    params: int
    macs: int
    accuracy_after_pruning: float | None = None
    accuracy_after_recovery: float | None = None


class PruneReport(_Frozen):
    """What pruning did: stats before / after pruning / after recovery, per step and layer."""

    config: dict[str, Any]
    before: ModelStats
    after_pruning: ModelStats
    """After the last pruning step, before the last recovery."""
    after_recovery: ModelStats | None = None
    """After the last recovery fine-tune; None when no ``recover`` was given."""
    steps: list[PruneStep]
    channels: dict[str, tuple[int, int]]
    """Output channels (before, after) of every conv / linear layer that lost some."""

    @property
    def final(self) -> ModelStats:
        """The stats of the model handed on."""
        return self.after_recovery or self.after_pruning

    @property
    def macs_ratio(self) -> float:
        """MACs before / MACs after (2.0 = half the compute)."""
        return self.before.macs / max(self.final.macs, 1)

    @property
    def params_ratio(self) -> float:
        return self.before.params / max(self.final.params, 1)

    @property
    def latency_speedup(self) -> float:
        """CPU eager latency before / after (batch 1)."""
        return self.before.latency_ms / max(self.final.latency_ms, 1e-9)


# -------------------------------------------------------------------- measuring
def measure_model(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    evaluate_fn: Callable[[nn.Module], float] | None = None,
    latency_repeats: int = 20,
) -> ModelStats:
    """Params, MACs, safetensors size, CPU batch-1 latency (p50) and optional accuracy.

    Cost metrics are taken on an eval-mode CPU copy, so the model's device, mode and
    BatchNorm statistics are untouched.
    """
    cpu = copy.deepcopy(model).cpu().eval()
    x = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        latency = latency_stats(lambda: cpu(x), repeats=latency_repeats, warmup=3)["p50_ms"]
    accuracy = None
    if evaluate_fn is not None:
        was_training = model.training
        accuracy = float(evaluate_fn(model))
        model.train(was_training)
    return ModelStats(
        params=count_params(cpu),
        macs=count_macs(cpu, tuple(input_shape)),
        size_bytes=serialized_size_bytes(cpu),
        latency_ms=latency,
        accuracy=accuracy,
    )
