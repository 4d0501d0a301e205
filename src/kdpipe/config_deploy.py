"""Config sections of the deployment side: export, INT8 quantisation, evaluation, gate.

Part of the bottom layer with :mod:`kdpipe.config` (which re-exports these classes and
puts them into ``PipelineConfig``); imports no other kdpipe module. Cross-section rules
(e.g. ``gate.prefer: fastest`` needs a batch-1 latency) are :mod:`kdpipe.validate`'s.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EvalConfig", "ExportConfig", "GateConfig", "QuantizeConfig"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -------------------------------------------------------------------------- export
class ExportConfig(_Frozen):
    opset: int = Field(18, ge=13, le=23)
    """ONNX opset; the dynamo exporter emits 18+ natively (lower opsets go through ONNX's
    version converter, which may fail for some ops)."""
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    """``dynamo`` (torch.export-based, the default since PyTorch 2.9) or the deprecated
    TorchScript exporter, for a model the dynamo exporter cannot handle."""
    atol: float = Field(1e-4, gt=0.0)
    rtol: float = Field(1e-3, gt=0.0)
    check_parity: bool = True
    """When False, a parity failure is recorded but the model is still handed on."""
    parity_batch_sizes: tuple[int, int] = (1, 16)


class QuantizeConfig(_Frozen):
    """INT8 static quantisation with ONNX Runtime; ``auto`` / None: chosen for the CPU
    (``kdpipe.quantize.default_types``: QDQ U8S8 on x86, 7-bit weights without VNNI)."""

    enabled: bool = False  # False keeps the FP32 pipeline unchanged
    format: Literal["auto", "qdq", "qoperator"] = "auto"
    activation_type: Literal["auto", "uint8", "int8"] = "auto"
    weight_type: Literal["auto", "int8", "uint8"] = "auto"
    per_channel: bool = True  # one weight scale per output channel
    reduce_range: bool | None = None  # 7-bit weights
    calibration_size: int = Field(512, ge=1)  # class-balanced sample of the train split
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = Field(99.999, gt=90.0, le=100.0)  # calibration_method: percentile
    calibration_seed: int = 0
    preprocess: bool = True  # ONNX Runtime's quant_pre_process (optimisation + shapes) first
    nodes_to_exclude: tuple[str, ...] = ()  # node names of the pre-processed graph kept FP32
    max_drop: float | None = Field(0.01, ge=0.0)
    """Accuracy control (on the validation split): INT8 more than this below FP32 keeps the
    most sensitive operators in FP32, one by one, until it is not. None disables it. (Type
    pairs: kdpipe.validate.)"""


# ---------------------------------------------------------------------- evaluation
class EvalConfig(_Frozen):
    latency_batch_sizes: tuple[int, int] = (1, 64)
    latency_repeats: int = Field(50, ge=3)
    latency_warmup: int = Field(5, ge=0)


# ---------------------------------------------------------------------------- gate
class GateConfig(_Frozen):
    """Promotion thresholds (``None`` disables a check), applied to every candidate (the
    FP32 ONNX student and, with ``quantize.enabled``, its INT8 version), and which of the
    passing candidates is promoted."""

    min_accuracy: float | None = Field(0.9, ge=0.0, le=1.0)
    max_drop_vs_teacher: float | None = Field(0.03, ge=0.0)
    min_gain_vs_production: float | None = -0.005
    """Negative = tolerance: the candidate may be this much worse than production."""
    max_latency_ms: float | None = Field(None, gt=0.0)
    max_onnx_mb: float | None = Field(None, gt=0.0)
    max_parity_error: float | None = Field(1e-3, gt=0.0)
    """ONNX Runtime vs PyTorch of the FP32 export (an INT8 candidate inherits its source's)."""
    min_agreement: float | None = Field(0.99, ge=0.0, le=1.0)
    """INT8 candidates only: the fraction of samples whose argmax equals the FP32 model's."""
    min_compression: float | None = Field(5.0, ge=1.0)
    compression_metric: Literal["params", "macs"] = "params"
    prefer: Literal["fastest", "smallest", "most_accurate"] = "fastest"
    """Among the candidates that pass: ``fastest`` = lowest p50 latency at batch 1 among those
    within ``prefer_tolerance`` of the most accurate; ``smallest`` = smallest .onnx file;
    ``most_accurate``. Ties go to the FP32 candidate."""
    prefer_tolerance: float = Field(0.003, ge=0.0, le=1.0)
    """``prefer: fastest``: accuracy (fraction) a faster candidate may lose to the most
    accurate passing one (0.003 = 0.3 points)."""
    fail_run_on_reject: bool = False
