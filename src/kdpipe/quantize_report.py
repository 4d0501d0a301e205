"""What an INT8 quantisation produced: :class:`QuantizeResult` and its parts.

Computed by :mod:`kdpipe.quantize` (which re-exports these names); JSON-serialisable so
that a step can hand it on as an artifact and log it, without importing ONNX Runtime;
:func:`quantiser_failure` turns an ONNX Runtime exception into a :class:`QuantizeError`
that names the operator.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["ControlStep", "NodeError", "QuantSettings", "QuantizeError", "QuantizeOutcome",
           "QuantizeResult", "quantiser_failure"]


class QuantizeError(RuntimeError):
    """ONNX Runtime's quantiser could not process the model (the operator is named)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class QuantSettings(_Frozen):
    """The resolved settings a model was quantised with (no ``auto`` left)."""

    format: str
    """``qdq`` or ``qoperator``."""
    activation_type: str
    """``uint8`` or ``int8``."""
    weight_type: str
    per_channel: bool
    reduce_range: bool
    calibration_method: str
    calibration_size: int
    calibration_seed: int
    calibration_classes: dict[str, int]
    """Samples per class in the calibration set (class-balanced)."""
    percentile: float | None
    preprocess: bool
    reason: str
    """Why these types: the CPU features they were chosen for, or "configured"."""

    @property
    def short(self) -> str:
        """e.g. ``QDQ U8S8 per-channel``."""
        letter = {"uint8": "U8", "int8": "S8"}
        return (f"{self.format.upper()} {letter[self.activation_type]}"
                f"{letter[self.weight_type]} {'per-channel' if self.per_channel else 'per-tensor'}")


class NodeError(_Frozen):
    """How much quantising one operator alone changes the logits on calibration data."""

    node: str
    op_type: str
    relative_error: float
    """||logits_int8 - logits_fp32|| / ||logits_fp32|| with only this node quantised."""


class ControlStep(_Frozen):
    """One round of accuracy control: a node kept in FP32 and the accuracy after it."""

    excluded: NodeError
    accuracy: float


class QuantizeResult(_Frozen):
    """The INT8 file, its identity, settings and accuracy control."""

    path: str
    filename: str
    sha256: str
    size_bytes: int
    fp32_sha256: str
    fp32_size_bytes: int
    settings: QuantSettings
    nodes_excluded_by_config: list[str]
    fp32_accuracy: float | None
    """None when no evaluation was given (no accuracy control)."""
    int8_accuracy_before_control: float | None
    int8_accuracy: float | None
    max_drop: float | None
    sensitivity: list[NodeError]
    """Every candidate's measured error, most sensitive first (empty if not needed)."""
    control_steps: list[ControlStep]
    """What accuracy control kept in FP32, in order, and why (its measured error)."""
    within_limit: bool | None
    """Accuracy drop <= max_drop after control; None without an evaluation or max_drop."""
    metadata: dict[str, str]
    """The ONNX file's metadata: the FP32 model's plus the quantisation keys."""
    warnings: list[str]

    @property
    def excluded_nodes(self) -> list[str]:
        """Every node kept in FP32: configured first, then accuracy control's."""
        return self.nodes_excluded_by_config + [s.excluded.node for s in self.control_steps]

    @property
    def accuracy_drop(self) -> float | None:
        if self.fp32_accuracy is None or self.int8_accuracy is None:
            return None
        return self.fp32_accuracy - self.int8_accuracy

    def summary(self) -> dict[str, str | int | float | bool | None]:
        """Flat values for experiment trackers (ZenML metadata, MLflow params / metrics)."""
        s = self.settings
        return {"precision": "int8", "quant_format": s.format,
                "quant_activation_type": s.activation_type, "quant_weight_type": s.weight_type,
                "quant_per_channel": s.per_channel, "quant_reduce_range": s.reduce_range,
                "calibration_method": s.calibration_method, "calibration_size": s.calibration_size,
                "int8_onnx_bytes": self.size_bytes, "fp32_onnx_bytes": self.fp32_size_bytes,
                "fp32_accuracy": self.fp32_accuracy, "int8_accuracy": self.int8_accuracy,
                "int8_accuracy_before_control": self.int8_accuracy_before_control,
                "accuracy_drop": self.accuracy_drop, "within_limit": self.within_limit,
                "excluded_nodes": ",".join(self.excluded_nodes), "int8_sha256": self.sha256}

    def describe(self) -> str:
        """One line for logs: settings, accuracy, exclusions."""
        text = f"INT8 {self.settings.short}, {self.size_bytes / 1e6:.2f} MB"
        if self.accuracy_drop is not None:
            text += (f"; accuracy {self.int8_accuracy:.4f} vs FP32 {self.fp32_accuracy:.4f} "
                     f"(drop {self.accuracy_drop:+.4f}")
            text += f", limit {self.max_drop:g})" if self.max_drop is not None else ")"
        if self.control_steps:
            kept = ", ".join(f"{s.excluded.node} ({s.excluded.op_type}, error "
                             f"{s.excluded.relative_error:.3g})" for s in self.control_steps)
            text += f"; kept in FP32 by accuracy control: {kept}"
        if self.within_limit is False:
            text += "; still above the limit with nothing left to exclude"
        return text


class QuantizeOutcome(_Frozen):
    """The ``quantize_onnx`` step's artifact: the INT8 candidate, or why there is none.

    A quantiser failure is not a failed run: the FP32 candidate is still gated and can be
    promoted, so the outcome records the reason instead (``result`` None).
    """

    result: QuantizeResult | None
    reason: str
    """``INT8 candidate: ...`` (its one-line description), or why there is no INT8 candidate."""
    fp32_sha256: str
    fp32_metadata: dict[str, str]
    """The FP32 export's ONNX metadata (the INT8 file carries it too, plus its settings)."""

    @property
    def available(self) -> bool:
        return self.result is not None

    def metadata(self) -> dict[str, str | int | float | bool]:
        """Flat values for the ZenML dashboard (settings and exclusions when available)."""
        out: dict[str, str | int | float | bool] = {"int8_available": self.available,
                                                     "reason": self.reason,
                                                     "fp32_sha256": self.fp32_sha256}
        if self.result is not None:
            out |= {k: v for k, v in self.result.summary().items() if v is not None}
            out["settings"] = self.result.settings.short
        return out


# ------------------------------------------------------------------ failures
def _culprit(graph: Any, err: BaseException) -> str:
    """The operator an ONNX Runtime error is about, as ``OpType (node name)``."""
    text = str(err)
    for node in sorted(graph.node, key=lambda n: -len(n.name)):
        if node.name and node.name in text:
            return f"{node.op_type} (node {node.name!r})"
    for node in graph.node:
        if re.search(rf"\b{re.escape(node.op_type)}\b", text):
            return f"{node.op_type} (node {node.name!r})"
    import onnx

    unknown = [n for n in graph.node if not onnx.defs.has(n.op_type, n.domain)]
    if unknown:  # the usual cause when the message names nothing: an op outside ONNX
        return (f"{unknown[0].op_type} (node {unknown[0].name!r}, domain "
                f"{unknown[0].domain!r}: not a standard ONNX operator)")
    kinds = sorted({n.op_type for n in graph.node})
    return f"an operator it does not name (the graph's operators: {', '.join(kinds)})"


def quantiser_failure(stage: str, path: Path, graph: Any, err: BaseException) -> QuantizeError:
    """The error for a failed ONNX Runtime ``stage``, naming the operator it failed on."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return QuantizeError(
        f"ONNX Runtime's {stage} failed on {path.name} at {_culprit(graph, err)}: "
        f"{type(err).__name__}: {first[:500]}. The FP32 model is unaffected and can still be "
        "gated; fix: keep that node in FP32 (quantize.nodes_to_exclude), change "
        "quantize.format / types, or set quantize.enabled: false")
