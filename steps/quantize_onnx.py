"""quantize_onnx: the exported FP32 student quantised to INT8 (the second candidate).

In the pipeline only when ``quantize.enabled`` (decided when the pipeline is compiled).
A quantiser failure does not fail the run: the artifact says that there is no INT8
candidate and why, and the FP32 candidate is gated and can be promoted alone.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
from zenml import step
from zenml.logger import get_logger

from kdpipe import tracking
from kdpipe.config import QuantizeConfig, TrackingConfig
from kdpipe.data import DatasetSpec
from kdpipe.export import ExportResult
from kdpipe.quantize_candidate import QuantizeOutcome, quantize_export
from steps.materializers import QuantizedOnnxMaterializer
from steps.tracking_context import mlflow_run

logger = get_logger(__name__)
MLFLOW_MODEL_NAME = "student_onnx_int8"


@step(output_materializers=QuantizedOnnxMaterializer)
def quantize_onnx(
    dataset: DatasetSpec, student_onnx: ExportResult, quantize_cfg: QuantizeConfig,
    tracking_cfg: TrackingConfig,
) -> Annotated[QuantizeOutcome, "student_onnx_int8"]:
    """Static INT8 quantisation with accuracy control (see :mod:`kdpipe.quantize`).

    Calibration: a class-balanced sample of the train split; accuracy control: the
    validation split. The INT8 file (``<model>.int8.onnx``) keeps the FP32 file's metadata
    plus ``precision``, the settings and the nodes kept in FP32; it is logged to MLflow
    as the run's model ``student_onnx_int8`` beside ``student_onnx``.
    """
    # The materializer copies the file after the step returns; the OS cleans the folder.
    out = Path(tempfile.mkdtemp(prefix="kdpipe-int8-")) / student_onnx.filename.replace(
        ".onnx", ".int8.onnx")
    outcome = quantize_export(dataset, student_onnx, out, quantize_cfg)
    with mlflow_run(tracking_cfg):
        tracking.set_tags({"quantize.int8_candidate": outcome.reason[:4000]})
        if outcome.result is not None:
            result = outcome.result
            tracking.log_metrics({k: v for k, v in result.summary().items()
                                  if isinstance(v, int | float) and not isinstance(v, bool)},
                                 "quantize")
            example = np.random.default_rng(0).random((1, *dataset.input_shape),
                                                      dtype=np.float32)
            tracking.log_onnx_model(result.path, name=MLFLOW_MODEL_NAME, input_example=example,
                                    metadata=result.metadata)
    (logger.info if outcome.available else logger.warning)("%s", outcome.reason)
    return outcome
