"""promote_student: act on the gate — both registries move, or neither; never cached.

On a passed gate:

1. the ONNX student is registered as a new version of the MLflow registered model
   (``tracking.registered_model``); a registry that is down fails here, before anything
   visible changed;
2. the MLflow alias ``champion`` moves to it (one call; the previous target is kept);
3. this run's ZenML model version moves to stage ``production`` (``force=True``
   archives the previous production version).

If step 3 fails, the alias is moved back (or deleted when there was none) and the step
fails with the cause: the ZenML stage and the MLflow alias always agree.

On a rejected gate, production does not move: this run's model version is kept, tagged
``rejected`` with the decision in its metadata, and the log says "not promoted". That is
a normal outcome of scheduled retraining, so the run succeeds unless
``gate.fail_run_on_reject`` is true (then the step fails after recording the rejection).

A candidate whose ONNX file is byte-identical to the current champion (a re-run with
nothing changed) is not registered again: nothing is promoted, nothing moves.

Concurrent runs: steps 1-3 run under :func:`kdpipe.promotion.promotion_lock`, so two
runs promoting at once cannot interleave (one's alias with the other's stage). Inside the
lock the production version is read again: when it is no longer the one the candidate
was evaluated against (another run promoted meanwhile) and the gate compares against
production (``gate.min_gain_vs_production`` set), the candidate is not promoted: its
model version is tagged ``superseded`` with the reason; a re-run compares it against the
new production.
"""

from __future__ import annotations

from typing import Annotated, Any

from zenml import get_step_context, step
from zenml.client import Client
from zenml.enums import ModelStages
from zenml.logger import get_logger

from kdpipe.bundle import Bundle
from kdpipe.config import GateConfig, TrackingConfig
from kdpipe.evaluation import EvaluationReport
from kdpipe.export import ExportResult
from kdpipe.gate import GateDecision
from kdpipe.promotion import (
    CHAMPION_ALIAS,
    PromotionError,
    PromotionResult,
    RegisteredVersion,
    get_champion,
    promotion_lock,
    register_onnx_model,
    restore_champion,
    set_champion,
)
from kdpipe.tracking import log_metrics
from steps.materializers import PromotionResultMaterializer
from steps.tracking_context import mlflow_run

logger = get_logger(__name__)
REJECTED_TAG = "rejected"
SUPERSEDED_TAG = "superseded"
"""Tag of a model version not promoted because a concurrent run moved production first."""


class GateRejectedError(RuntimeError):
    """The gate rejected the candidate and ``gate.fail_run_on_reject`` is true."""


@step(enable_cache=False, output_materializers=PromotionResultMaterializer)
def promote_student(
    gate_decision: GateDecision,
    student_onnx: ExportResult,
    pruned_student: Bundle,
    teacher: Bundle,
    tracking_cfg: TrackingConfig,
    gate_cfg: GateConfig,
    evaluation: EvaluationReport | None = None,
) -> Annotated[PromotionResult, "promotion"]:
    """Promote this run's student when the gate passed; record the rejection otherwise.

    Args:
        evaluation: the report the gate decided on; its ``production.version`` is checked
            against the production version at promotion time (None: not checked).

    Raises:
        PromotionError: a registry failed; the message says what was restored.
        GateRejectedError: rejected and ``gate_cfg.fail_run_on_reject`` is true.
    """
    model = get_step_context().model
    # The decision is attached to the model version first: it is true whatever follows.
    model.log_metadata({"gate_decision": dict(gate_decision.metadata())})
    with mlflow_run(tracking_cfg) as uri:
        log_metrics(gate_decision.metadata(), "gate")
        if gate_decision.passed:
            with promotion_lock(tracking_cfg.registered_model, tracking_uri=uri):
                stale = _stale_comparison(model, evaluation, gate_decision)
                result = (_superseded(model, tracking_cfg, stale) if stale else
                          _promote(model, student_onnx, pruned_student, teacher, tracking_cfg, uri))
        else:
            result = _reject(model, gate_decision, tracking_cfg)
        log_metrics(result.metadata(), "promotion")
    model.log_metadata({"promotion": dict(result.metadata())})
    if result.promoted:
        logger.info(result.summary())
    else:  # "not promoted: ..." must stand out in the run's log
        logger.warning(result.summary())
    if not gate_decision.passed and gate_cfg.fail_run_on_reject:
        raise GateRejectedError(
            f"{result.summary()}; failing the run because gate.fail_run_on_reject is true")
    return result


def _reject(model: Any, decision: GateDecision, tracking_cfg: TrackingConfig
            ) -> PromotionResult:
    """Keep the candidate's model version, tagged ``rejected``; production does not move."""
    Client().update_model_version(model_name_or_id=model.model_id,
                                  version_name_or_id=model.id, add_tags=[REJECTED_TAG])
    return PromotionResult(promoted=False, model_version=str(model.version),
                           registered_model=tracking_cfg.registered_model,
                           reasons=decision.reasons or ["the gate rejected the candidate"])


def _stale_comparison(model: Any, evaluation: EvaluationReport | None,
                      decision: GateDecision) -> str | None:
    """Why the gate's comparison with production no longer holds (None: it holds).

    Called under the promotion lock, so the production version read here cannot move
    before this run's promotion finishes.
    """
    if evaluation is None or "min_gain_vs_production" in decision.disabled:
        return None
    current = _current_production(model)
    now = None if current is None else str(current.name)
    seen = evaluation.production.version
    if now == seen:
        return None
    return (f"production moved from version {seen or '(none)'} to {now} while this run was "
            f"being evaluated (a concurrent run promoted); the gate compared against "
            f"{seen or 'no production'}, so nothing was promoted: re-run to compare against "
            f"version {now}")


def _superseded(model: Any, tracking_cfg: TrackingConfig, reason: str) -> PromotionResult:
    """Keep the candidate's model version, tagged ``superseded``; production does not move."""
    Client().update_model_version(model_name_or_id=model.model_id,
                                  version_name_or_id=model.id, add_tags=[SUPERSEDED_TAG])
    return PromotionResult(promoted=False, model_version=str(model.version),
                           registered_model=tracking_cfg.registered_model, reasons=[reason])


def _current_production(model: Any) -> Any | None:
    """The model version now in production, or None."""
    try:
        return Client().get_model_version(model.model_id, ModelStages.PRODUCTION)
    except KeyError:
        return None


def _registration_metadata(onnx: ExportResult, pruned: Bundle, teacher: Bundle,
                           model: Any) -> dict[str, Any]:
    """What the predict pipeline and a person reading the registry need to know."""
    spec = pruned.spec
    return {"classes": list(spec.classes), "input_shape": list(spec.input_shape),
            "mean": list(spec.mean), "std": list(spec.std), "arch": spec.arch,
            "teacher_arch": teacher.spec.arch, "onnx_sha256": onnx.sha256,
            "zenml_model": model.name, "zenml_model_version": str(model.version)}


def _promote(model: Any, onnx: ExportResult, pruned: Bundle, teacher: Bundle,
             tracking_cfg: TrackingConfig, uri: str) -> PromotionResult:
    name = tracking_cfg.registered_model
    current = get_champion(name, tracking_uri=uri)
    if current is not None and current.tags.get("onnx_sha256") == onnx.sha256:
        return PromotionResult(
            promoted=False, model_version=str(model.version), registered_model=name,
            previous_champion=current.version,
            reasons=[f"identical to the champion (MLflow version {current.version}, same ONNX "
                     "sha256): nothing to promote"])
    meta = _registration_metadata(onnx, pruned, teacher, model)
    version = register_onnx_model(
        onnx.path, name, input_shape=pruned.spec.input_shape, metadata=meta,
        tags={k: meta[k] for k in ("onnx_sha256", "zenml_model", "zenml_model_version")},
        experiment=tracking_cfg.experiment, tracking_uri=uri)
    previous_production = _current_production(model)
    try:
        previous_champion = set_champion(name, version.version, tracking_uri=uri)
    except Exception as err:  # the alias did not move: nothing to undo
        raise PromotionError(
            f"moving {name}@{CHAMPION_ALIAS} to version {version.version} failed: {err}. "
            f"Nothing changed: the alias and the ZenML production stage are as before "
            f"(version {version.version} stays registered without the alias)") from err
    _move_stage(model, version, previous_champion, uri)
    return PromotionResult(
        promoted=True, model_version=str(model.version), registered_model=name,
        mlflow_version=version.version, previous_champion=previous_champion,
        previous_production=None if previous_production is None else previous_production.name,
        reasons=["the gate passed"])


def _move_stage(model: Any, version: RegisteredVersion, previous_champion: str | None,
                uri: str) -> None:
    """ZenML stage -> production; on failure move the MLflow alias back, then raise."""
    try:
        model.set_stage(ModelStages.PRODUCTION, force=True)
    except Exception as err:
        try:
            restore_champion(version.name, previous_champion, tracking_uri=uri)
        except Exception as undo_err:
            raise PromotionError(
                f"setting ZenML model version {model.version} to production failed ({err}), "
                f"and moving {version.name}@{CHAMPION_ALIAS} back to "
                f"{previous_champion or '(none)'} failed too ({undo_err}). The registries "
                f"disagree: fix by hand with MlflowClient().set_registered_model_alias("
                f"{version.name!r}, {CHAMPION_ALIAS!r}, {previous_champion!r})") from err
        raise PromotionError(
            f"setting ZenML model version {model.version} to production failed: {err}. "
            f"{version.name}@{CHAMPION_ALIAS} was moved back to "
            f"{previous_champion or '(none: the alias was deleted)'}; nothing changed") from err
