"""distill_assistant: one teacher assistant of ``distill.assistants``; cached like the student.

The pipeline calls it once per assistant, ``index`` 1, 2, ...: each learns from the model
before it (the teacher, then the previous assistant) and is its own named artifact
(``assistant_<index>``) with its own MLflow curves (``assistant_<index>/...``).
"""

from __future__ import annotations

from typing import Annotated

from zenml import ArtifactConfig, step

from kdpipe.bundle import Bundle
from kdpipe.config import DistillConfig, StudentConfig, TrackingConfig
from kdpipe.data import DatasetSpec
from steps.distill_student import distil_and_track
from steps.materializers import BundleMaterializer


@step(output_materializers=BundleMaterializer)
def distill_assistant(
    dataset: DatasetSpec,
    teacher: Bundle,
    assistant_cfg: StudentConfig,
    distill_cfg: DistillConfig,
    tracking_cfg: TrackingConfig,
    index: int,
) -> Annotated[Bundle, ArtifactConfig(name="assistant_{index}")]:
    """Distil ``teacher`` (the model before it in the chain) into assistant ``index``."""
    return distil_and_track(f"assistant_{index}", dataset, teacher, assistant_cfg, distill_cfg,
                            tracking_cfg)
