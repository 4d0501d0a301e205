"""The INT8 candidate of a pipeline run: the exported FP32 student, quantised for this CPU.

What the ``quantize_onnx`` step calls. :func:`quantize_export` draws the class-balanced
calibration sample from the train split, runs :func:`kdpipe.quantize.quantize_model`
with accuracy control measured on the *validation* split (the test split stays unseen
until the evaluation, so the INT8 model's reported test accuracy is not tuned on it), and
turns a quantiser failure into a :class:`QuantizeOutcome` without a model: the run goes
on, and the FP32 candidate is still gated and can be promoted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kdpipe.config import QuantizeConfig
from kdpipe.cpu import CpuFeatures
from kdpipe.quantize import QuantizeError, calibration_sample, onnx_accuracy, quantize_model
from kdpipe.quantize_report import QuantizeOutcome

if TYPE_CHECKING:
    from kdpipe.data import DatasetSpec
    from kdpipe.export_report import ExportResult

__all__ = ["CONTROL_SPLIT", "QuantizeOutcome", "quantize_export", "raw_split"]

log = logging.getLogger(__name__)

CONTROL_SPLIT = "val"
"""The split accuracy control measures on."""


def raw_split(spec: DatasetSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as raw [0, 1] pixels ``(N, C, H, W)`` float32 and int64 labels."""
    from kdpipe.data import make_loader

    xs, ys = [], []
    for x, y, *_ in make_loader(spec, split, train=False, normalize=False):
        xs.append(x.numpy())
        ys.append(y.numpy())
    return (np.concatenate(xs).astype(np.float32, copy=False),
            np.concatenate(ys).astype(np.int64, copy=False))


def quantize_export(spec: DatasetSpec, export: ExportResult, out_path: str | os.PathLike[str],
                    cfg: QuantizeConfig, *, features: CpuFeatures | None = None
                    ) -> QuantizeOutcome:
    """Quantise the exported student to INT8, or say why there is no INT8 candidate.

    Args:
        spec: the run's dataset (calibration: train split; accuracy control: val split).
        export: the FP32 export (``export.path`` is the local .onnx file).
        out_path: where the INT8 .onnx is written.
        cfg: the ``quantize`` section.
        features: the CPU to choose types for (default: this machine's).

    Returns:
        The outcome: ``result`` with the INT8 file, its settings and what accuracy control
        kept in FP32; or ``result`` None with the quantiser's error as ``reason``.

    Raises:
        ConfigError: ``quantize.calibration_size`` does not fit the train split.
    """
    pixels, labels = calibration_sample(spec, cfg.calibration_size, cfg.calibration_seed)
    evaluate = None
    if cfg.max_drop is not None:
        evaluate = onnx_accuracy(*raw_split(spec, CONTROL_SPLIT))
    base = {"fp32_sha256": export.sha256, "fp32_metadata": dict(export.metadata)}
    try:
        result = quantize_model(export.path, out_path, pixels, cfg, calibration_labels=labels,
                                evaluate=evaluate, features=features)
    except QuantizeError as err:
        log.warning("no INT8 candidate: %s", err)
        return QuantizeOutcome(result=None, reason=f"no INT8 candidate: {err}", **base)
    return QuantizeOutcome(result=result.model_copy(update={"path": str(Path(out_path))}),
                           reason=(f"INT8 candidate (accuracy control on the {CONTROL_SPLIT} "
                                   f"split): {result.describe()}"), **base)
