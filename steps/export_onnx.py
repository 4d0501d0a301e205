"""export_onnx: the pruned student as one self-contained ONNX file; cached on its input."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
from zenml import get_step_context, step
from zenml.logger import get_logger

from kdpipe import tracking
from kdpipe.bundle import Bundle
from kdpipe.config import ExportConfig, TrackingConfig
from kdpipe.export import ExportResult
from kdpipe.export import export_onnx as export
from steps.materializers import OnnxExportMaterializer
from steps.tracking_context import mlflow_run

logger = get_logger(__name__)
MLFLOW_MODEL_NAME = "student_onnx"


@step(output_materializers=OnnxExportMaterializer)
def export_onnx(
    pruned_student: Bundle, export_cfg: ExportConfig, tracking_cfg: TrackingConfig
) -> Annotated[ExportResult, "student_onnx"]:
    """Export with normalisation inside the graph and check ONNX Runtime parity.

    The file is named after the ZenML model (``<model>.onnx``) and logged to MLflow with
    the ONNX flavor, its signature and a raw-pixel input example.
    """
    ctx = get_step_context()
    name = ctx.model.name if ctx.model is not None else "student"
    # The materializer copies the file into the artifact store after the step returns,
    # so it must outlive this function; the OS cleans the temporary folder.
    path = Path(tempfile.mkdtemp(prefix="kdpipe-onnx-")) / f"{name}.onnx"
    result = export(pruned_student, path, export_cfg, source_run=f"zenml:{ctx.pipeline_run.id}")
    example = np.random.default_rng(0).random((1, *pruned_student.spec.input_shape), dtype=np.float32)
    with mlflow_run(tracking_cfg):
        tracking.log_metrics({"size_bytes": result.size_bytes,
                              "parity_max_abs_error": result.parity.max_abs_error,
                              "parity_max_rel_error": result.parity.max_rel_error}, "export")
        tracking.log_onnx_model(result.path, name=MLFLOW_MODEL_NAME, input_example=example,
                                metadata=result.metadata)
    logger.info("exported %s (%.3f MB); parity %s", result.filename, result.size_bytes / 1e6,
                result.parity.describe())
    return result
