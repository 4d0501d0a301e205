"""INT8 static quantisation of an exported student with ONNX Runtime, with accuracy control.

Pipeline of :func:`quantize_model` (ONNX Runtime 1.32, ``onnxruntime.quantization``):

1. ``quant_pre_process`` (graph optimisation + ONNX and symbolic shape inference), as ONNX
   Runtime recommends before quantising; node names below are the pre-processed graph's.
2. ``quantize_static`` with a class-balanced calibration sample of the train split
   (:mod:`kdpipe.quantize_calib`), calibrated once (minmax, entropy or percentile) and the
   ranges cached, so later rounds only rewrite the graph.
3. Accuracy control: when ``evaluate`` shows the INT8 model more than ``max_drop`` below
   FP32, every quantisable operator is quantised *alone* and its logits' relative error
   against FP32 on the calibration data is measured; the most sensitive operators are then
   kept in FP32 one at a time until the drop is within the limit or none is left.

Types follow the CPU (:func:`default_types`). Measured with ONNX Runtime 1.32, one thread,
on an AVX-512 VNNI Xeon (issue 16): for resnet20, QDQ with signed INT8 activations (S8S8,
ONNX Runtime's default) is slower than FP32 (0.61x at batch 1), unsigned activations with
signed weights (U8S8) 2.27x faster; hence U8S8 on x86. The file keeps the FP32 model's
metadata and adds ``precision``, ``quantization`` (settings) and ``quantization_excluded``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.config import ConfigError, QuantizeConfig
from kdpipe.cpu import CpuFeatures, cpu_features
from kdpipe.quantize_calib import ArrayReader, calibration_sample, type_problems
from kdpipe.quantize_report import (
    ControlStep,
    NodeError,
    QuantizeError,
    QuantizeResult,
    QuantSettings,
    quantiser_failure,
)

__all__ = ["ControlStep", "NodeError", "QuantSettings", "QuantizeError", "QuantizeResult",
           "calibration_sample", "default_types", "onnx_accuracy", "quantize_model",
           "resolve_settings", "vnni_warning"]

log = logging.getLogger(__name__)

# Ops ONNX Runtime quantises only when their input already is: alone they change nothing.
_FOLLOWERS = frozenset({"Relu", "Clip", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                        "Flatten", "MaxPool", "Slice", "Split", "TopK", "Pad"})
_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}
_FORMATS = {"qdq": "QDQ", "qoperator": "QOperator"}


# ------------------------------------------------------------------- settings
def default_types(features: CpuFeatures) -> dict[str, Any]:
    """Format, activation / weight types and ``reduce_range`` for a CPU, with the reason."""
    if features.is_arm:
        return {"format": "qdq", "activation_type": "int8", "weight_type": "int8",
                "reduce_range": False, "reason": "ARM: signed INT8 activations and weights"}
    if features.has_vnni:
        return {"format": "qdq", "activation_type": "uint8", "weight_type": "int8",
                "reduce_range": False,
                "reason": "x86 with VNNI: U8S8 (measured 1.9x faster than FP32 on "
                          "resnet20, 1 thread; S8S8 0.6x, slower than FP32)"}
    return {"format": "qdq", "activation_type": "uint8", "weight_type": "int8",
            "reduce_range": True,
            "reason": "x86 without VNNI: U8S8 with 7-bit weights (avoids 16-bit saturation)"}


def vnni_warning(features: CpuFeatures) -> str | None:
    """The one warning for a CPU without INT8 dot-product instructions, else None."""
    if features.has_vnni or (features.is_arm and "asimddp" in features.flags):
        return None
    return (f"this CPU ({features.describe()}) has no INT8 dot-product instructions (VNNI): "
            "the INT8 model may not be faster than FP32 here; the gate's latency check decides")


def resolve_settings(cfg: QuantizeConfig, features: CpuFeatures,
                     class_counts: dict[str, int] | None = None,
                     calibration_size: int | None = None) -> QuantSettings:
    """The configured settings with every ``auto`` / ``None`` replaced for this CPU, and
    the calibration sample actually used (its size and per-class counts, when known)."""
    auto = default_types(features)
    chosen = {key: auto[key] if getattr(cfg, key) in ("auto", None) else getattr(cfg, key)
              for key in ("format", "activation_type", "weight_type", "reduce_range")}
    problems = type_problems(chosen["activation_type"], chosen["weight_type"])
    if problems:
        raise ConfigError(f"quantize: {problems[0]}")
    configured = [k for k in chosen if getattr(cfg, k) not in ("auto", None)]
    reason = auto["reason"] if not configured else (
        f"configured ({', '.join(configured)}); CPU default: {auto['reason']}")
    return QuantSettings(
        **chosen, per_channel=cfg.per_channel, calibration_method=cfg.calibration_method,
        calibration_size=calibration_size or sum((class_counts or {}).values())
        or cfg.calibration_size,
        calibration_seed=cfg.calibration_seed,
        calibration_classes=dict(class_counts or {}), preprocess=cfg.preprocess,
        percentile=cfg.percentile if cfg.calibration_method == "percentile" else None,
        reason=reason)


# ------------------------------------------------------------------ quantiser
@dataclass
class _Quantiser:
    """One prepared FP32 graph, quantised with fixed settings and cached ranges."""

    prepared: Path
    settings: QuantSettings
    calibration: np.ndarray
    workdir: Path
    graph: Any = field(init=False)
    input_name: str = field(init=False)
    _files: Iterator[int] = field(init=False, default_factory=itertools.count)

    def __post_init__(self) -> None:
        import onnx

        self.graph = onnx.load(str(self.prepared)).graph
        self.input_name = self.graph.input[0].name

    def quantize(self, *, exclude: Sequence[str] = (), only: list[str] | None = None) -> Path:
        """Quantise (all nodes but ``exclude``, or ``only`` these) to a file in workdir."""
        from onnxruntime import quantization as q

        s = self.settings
        out = self.workdir / f"int8-{next(self._files)}.onnx"
        extra = {"CalibPercentile": s.percentile} if s.percentile is not None else {}
        try:
            q.quantize_static(
                str(self.prepared), str(out), ArrayReader(self.input_name, self.calibration),
                quant_format=getattr(q.QuantFormat, _FORMATS[s.format]),
                activation_type=getattr(q.QuantType, _TYPES[s.activation_type]),
                weight_type=getattr(q.QuantType, _TYPES[s.weight_type]),
                per_channel=s.per_channel, reduce_range=s.reduce_range,
                nodes_to_exclude=list(exclude), nodes_to_quantize=only,
                calibrate_method=getattr(q.CalibrationMethod, _METHODS[s.calibration_method]),
                calibration_cache_path=self.workdir / "ranges.json", extra_options=extra)
        except Exception as err:  # ORT raises many types; all mean "cannot quantise this"
            raise quantiser_failure("quantiser", self.prepared, self.graph, err) from err
        return out

    def logits(self, path: Path) -> np.ndarray:
        session = _session(path)
        return np.concatenate([session.run(None, batch)[0]
                               for batch in ArrayReader(self.input_name, self.calibration)])

    def candidates(self, exclude: list[str]) -> list[Any]:
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        kinds = (set(QDQRegistry) | set(QLinearOpsRegistry)) - _FOLLOWERS
        return [n for n in self.graph.node if n.name and n.op_type in kinds
                and n.name not in exclude]

    def sensitivity(self, exclude: list[str]) -> list[NodeError]:
        """Each candidate quantised alone: relative logit error vs FP32, largest first."""
        reference = self.logits(self.prepared)
        scale = float(np.linalg.norm(reference)) or 1.0
        found = []
        for node in self.candidates(exclude):
            alone = self.quantize(only=[node.name])
            err = float(np.linalg.norm(self.logits(alone) - reference))
            alone.unlink()  # one file per candidate: do not let a large model fill the disk
            if err > 0.0:  # 0: nothing was quantised for this node on its own
                found.append(NodeError(node=node.name, op_type=node.op_type,
                                       relative_error=err / scale))
        return sorted(found, key=lambda e: -e.relative_error)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's own warnings about QDQ fusion are not news here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_accuracy(pixels: np.ndarray, labels: np.ndarray, batch_size: int = 256
                  ) -> Callable[[Path], float]:
    """An ``evaluate`` for :func:`quantize_model`: top-1 accuracy on raw-pixel arrays."""
    def evaluate(path: Path) -> float:
        session = _session(path)
        name = session.get_inputs()[0].name
        preds = np.concatenate([session.run(None, {name: pixels[i:i + batch_size]})[0]
                                .argmax(axis=1) for i in range(0, len(pixels), batch_size)])
        return float((preds == labels).mean())

    return evaluate


def _prepare(fp32: Path, workdir: Path, preprocess: bool) -> Path:
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not preprocess:
        return fp32
    out = workdir / "prepared.onnx"
    try:
        # On a failed inference ORT's symbolic_shape_infer.py saves its partial model
        # ("sym_shape_infer_temp.onnx" + a uuid-named .data file) into the current
        # directory: let that be the temporary folder, not the caller's.
        with contextlib.chdir(workdir):
            quant_pre_process(str(fp32.resolve()), str(out.resolve()))
    except Exception as err:  # optimiser / shape inference errors of many types
        raise quantiser_failure("pre-processing (quant_pre_process)", fp32,
                                onnx.load(str(fp32)).graph, err) from err
    return out


# ------------------------------------------------------------ accuracy control
@dataclass
class _Control:
    """Accuracy control's record: measured errors, rounds, and the final file."""

    path: Path
    accuracy: float | None
    sensitivity: list[NodeError] = field(default_factory=list)
    steps: list[ControlStep] = field(default_factory=list)
    fp32_accuracy: float | None = None
    first_accuracy: float | None = None


def _control(quantiser: _Quantiser, first: Path, first_acc: float, fp32_acc: float,
             evaluate: Callable[[Path], float], max_drop: float, base: list[str]) -> _Control:
    """Keep the most sensitive operators in FP32 until the drop is within ``max_drop``."""
    result = _Control(first, first_acc)
    if fp32_acc - first_acc <= max_drop:
        return result
    log.info("INT8 accuracy %.4f is %.4f below FP32 %.4f (limit %g): measuring each "
             "operator's error on the calibration data", first_acc, fp32_acc - first_acc,
             fp32_acc, max_drop)
    result.sensitivity = quantiser.sensitivity(base)
    excluded = list(base)
    for node in result.sensitivity:
        excluded.append(node.node)
        result.path = quantiser.quantize(exclude=excluded)
        result.accuracy = evaluate(result.path)
        result.steps.append(ControlStep(excluded=node, accuracy=result.accuracy))
        log.info("kept %s (%s, relative logit error %.3g when quantised alone) in FP32: "
                 "INT8 accuracy %.4f", node.node, node.op_type, node.relative_error,
                 result.accuracy)
        if fp32_acc - result.accuracy <= max_drop:
            break
    return result


# ------------------------------------------------------------------ the whole
def _write(source: Path, target: Path, metadata: dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load(str(source))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    data = proto.SerializeToString()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return data


def _metadata(fp32: Path, settings: QuantSettings, control: _Control,
              configured: list[str], features: CpuFeatures) -> dict[str, str]:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
    excluded = [{"node": n, "reason": "quantize.nodes_to_exclude"} for n in configured] + [
        {"node": s.excluded.node, "op_type": s.excluded.op_type,
         "relative_error": s.excluded.relative_error, "accuracy_after": s.accuracy,
         "reason": "accuracy control: most sensitive remaining operator"}
        for s in control.steps]
    return {**props, "precision": "int8", "quantization": settings.model_dump_json(),
            "quantization_excluded": json.dumps(excluded), **features.as_metadata(),
            "fp32_sha256": hashlib.sha256(fp32.read_bytes()).hexdigest()}


def _quantize_and_control(fp32: Path, workdir: Path, settings: QuantSettings,
                          calibration: np.ndarray, cfg: QuantizeConfig,
                          evaluate: Callable[[Path], float] | None,
                          fp32_accuracy: float | None) -> _Control:
    quantiser = _Quantiser(_prepare(fp32, workdir, cfg.preprocess), settings,
                           np.ascontiguousarray(calibration, dtype=np.float32), workdir)
    _check_nodes(quantiser, cfg.nodes_to_exclude)
    configured = list(cfg.nodes_to_exclude)
    first = quantiser.quantize(exclude=configured)
    if evaluate is None:
        return _Control(first, None)
    fp32_accuracy = evaluate(fp32) if fp32_accuracy is None else fp32_accuracy
    first_acc = evaluate(first)
    control = _Control(first, first_acc)
    if cfg.max_drop is not None:
        control = _control(quantiser, first, first_acc, fp32_accuracy, evaluate,
                           cfg.max_drop, configured)
    control.fp32_accuracy, control.first_accuracy = fp32_accuracy, first_acc
    return control


def _check_nodes(quantiser: _Quantiser, names: tuple[str, ...]) -> None:
    known = {n.name for n in quantiser.graph.node}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise QuantizeError(
            f"quantize.nodes_to_exclude names nodes the (pre-processed) graph does not have: "
            f"{unknown}; its nodes are: {', '.join(sorted(known)[:40])}")


def quantize_model(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    calibration: np.ndarray,
    cfg: QuantizeConfig,
    *,
    calibration_labels: np.ndarray | None = None,
    evaluate: Callable[[Path], float] | None = None,
    fp32_accuracy: float | None = None,
    features: CpuFeatures | None = None,
) -> QuantizeResult:
    """Quantise an exported FP32 model to INT8 and keep it within ``cfg.max_drop``.

    Args:
        fp32_path: the exported ``.onnx`` (raw-pixel input).
        out_path: the INT8 ``.onnx`` to write (parent directories are created).
        calibration: raw [0, 1] pixels ``(N, C, H, W)``, e.g. :func:`calibration_sample`.
        cfg: the ``quantize`` section.
        calibration_labels: the sample's labels, recorded as per-class counts.
        evaluate: accuracy of an ONNX file (e.g. :func:`onnx_accuracy` on the test split);
            None skips accuracy control.
        fp32_accuracy: the FP32 model's accuracy; None computes it with ``evaluate``.
        features: the CPU to choose types for (default: this machine's).

    Returns:
        The INT8 file's path, sha256, size, settings, what was kept in FP32 and why.

    Raises:
        QuantizeError: ONNX Runtime could not pre-process or quantise the model (the
            operator is named), or ``nodes_to_exclude`` names unknown nodes.
    """
    fp32, target = Path(fp32_path), Path(out_path)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ValueError(f"calibration must be raw pixels (N >= 1, C, H, W); got shape "
                         f"{calibration.shape}")
    features = features or cpu_features()
    warnings = [w for w in [vnni_warning(features)] if w]
    for text in warnings:  # once, before any work: the gate's latency check decides
        log.warning(text)
    settings = resolve_settings(cfg, features, _class_counts(calibration_labels),
                                len(calibration))
    configured = list(cfg.nodes_to_exclude)
    with tempfile.TemporaryDirectory(prefix="kdpipe-quant-") as tmp:
        control = _quantize_and_control(fp32, Path(tmp), settings, calibration, cfg,
                                        evaluate, fp32_accuracy)
        metadata = _metadata(fp32, settings, control, configured, features)
        data = _write(control.path, target, metadata)
    fp32_accuracy, first_acc = control.fp32_accuracy, control.first_accuracy
    within = None if control.accuracy is None or cfg.max_drop is None else bool(
        fp32_accuracy - control.accuracy <= cfg.max_drop)
    result = QuantizeResult(
        path=str(target), filename=target.name, sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data), fp32_sha256=metadata["fp32_sha256"],
        fp32_size_bytes=fp32.stat().st_size, settings=settings,
        nodes_excluded_by_config=configured, fp32_accuracy=fp32_accuracy,
        int8_accuracy_before_control=first_acc, int8_accuracy=control.accuracy,
        max_drop=cfg.max_drop, sensitivity=control.sensitivity, control_steps=control.steps,
        within_limit=within, metadata=metadata, warnings=warnings)
    (log.warning if within is False else log.info)("%s", result.describe())
    return result


def _class_counts(labels: np.ndarray | None) -> dict[str, int]:
    if labels is None:
        return {}
    return {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True), strict=True)}
