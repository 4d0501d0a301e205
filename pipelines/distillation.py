"""The distillation pipeline: wiring only (every step lives in steps/, all logic in kdpipe).

    ingest_data → finetune_teacher → [distill_assistant × N] → distill_student
                → prune_student → export_onnx → [quantize_onnx] → evaluate_models
                → gate_student → promote_student → publish_model_card

``quantize_onnx`` (the INT8 candidate) is in the pipeline only when ``quantize.enabled``;
without it the pipeline is the FP32 one, step for step.

Parameters are the sections of :class:`kdpipe.config.PipelineConfig`, given under
``parameters:`` of a run-configuration YAML (``configs/*.yaml``); their defaults are
those of kdpipe.config. Each run is a version of the ZenML Model named in the YAML's
``model:`` section (Model Control Plane); every artifact is linked to that version.
"""

from __future__ import annotations

from zenml import Model, pipeline

from kdpipe.config import (
    DataConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    GateConfig,
    PipelineConfig,
    PruneConfig,
    QuantizeConfig,
    StudentConfig,
    TeacherConfig,
    TrackingConfig,
)
from kdpipe.validate import validate
from steps.distill_assistant import distill_assistant
from steps.distill_student import distill_student
from steps.evaluate_models import evaluate_models
from steps.export_onnx import export_onnx
from steps.finetune_teacher import (
    finetune_teacher,
    onnx_teacher_digest,
    production_teacher_version,
)
from steps.gate_student import gate_student
from steps.ingest_data import ingest_data
from steps.promote_student import promote_student
from steps.prune_student import prune_student
from steps.publish_model_card import publish_model_card
from steps.quantize_onnx import quantize_onnx

DEFAULT_MODEL_NAME = "kdpipe-student"
"""ZenML model name when the YAML has no ``model:`` section."""
_DEFAULTS = PipelineConfig()  # frozen: safe to share as parameter defaults


@pipeline(model=Model(name=DEFAULT_MODEL_NAME,
                      description="A student distilled, pruned and exported by kdpipe."))
def distillation_pipeline(
    data: DataConfig = _DEFAULTS.data,
    teacher: TeacherConfig = _DEFAULTS.teacher,
    student: StudentConfig = _DEFAULTS.student,
    distill: DistillConfig = _DEFAULTS.distill,
    prune: PruneConfig = _DEFAULTS.prune,
    export: ExportConfig = _DEFAULTS.export,
    evaluate: EvalConfig = _DEFAULTS.evaluate,
    quantize: QuantizeConfig = _DEFAULTS.quantize,
    gate: GateConfig = _DEFAULTS.gate,
    tracking: TrackingConfig = _DEFAULTS.tracking,
) -> None:
    """Teacher → distilled student → pruned student → ONNX [→ INT8] → evaluation → gate
    → promotion."""
    config = PipelineConfig(data=data, teacher=teacher, student=student, distill=distill,
                            prune=prune, export=export, evaluate=evaluate, quantize=quantize,
                            gate=gate, tracking=tracking)
    validate(config)  # at compile time: a bad config fails before any step starts
    dataset = ingest_data(config=config)
    teacher_model = finetune_teacher(dataset=dataset, teacher_cfg=teacher, tracking_cfg=tracking,
                                     warm_start_version=production_teacher_version(teacher),
                                     onnx_sha256=onnx_teacher_digest(teacher))
    # Teacher assistants, if any: each learns from the model before it; the last one
    # teaches the student (and its pruning recovery).
    teacher_of_student = teacher_model
    for index, assistant in enumerate(distill.assistants, start=1):
        teacher_of_student = distill_assistant.with_options(substitutions={"index": str(index)})(
            dataset=dataset, teacher=teacher_of_student, assistant_cfg=assistant,
            distill_cfg=distill, tracking_cfg=tracking, index=index,
            id=f"distill_assistant_{index}")
    student_model = distill_student(dataset=dataset, teacher=teacher_of_student,
                                    student_cfg=student, distill_cfg=distill,
                                    tracking_cfg=tracking)
    pruned = prune_student(dataset=dataset, student=student_model, teacher=teacher_of_student,
                           prune_cfg=prune, distill_cfg=distill, tracking_cfg=tracking)
    onnx = export_onnx(pruned_student=pruned, export_cfg=export, tracking_cfg=tracking)
    # The INT8 candidate exists only when enabled: the FP32 pipeline stays as it was.
    int8 = ({"student_onnx_int8": quantize_onnx(dataset=dataset, student_onnx=onnx,
                                                quantize_cfg=quantize, tracking_cfg=tracking)}
            if quantize.enabled else {})
    evaluation = evaluate_models(dataset=dataset, teacher=teacher_model, student=student_model,
                                 pruned_student=pruned, student_onnx=onnx, evaluate_cfg=evaluate,
                                 tracking_cfg=tracking, **int8)
    decision = gate_student(evaluation=evaluation, gate_cfg=gate)
    promotion = promote_student(gate_decision=decision, student_onnx=onnx,
                                pruned_student=pruned, teacher=teacher_model,
                                evaluation=evaluation, tracking_cfg=tracking, gate_cfg=gate,
                                **int8)
    publish_model_card(dataset=dataset, evaluation=evaluation, gate_decision=decision,
                       promotion=promotion, teacher_cfg=teacher, student_cfg=student,
                       distill_cfg=distill, prune_cfg=prune, tracking_cfg=tracking,
                       quantize_cfg=quantize)
