"""Promotion on the real local ZenML store and MLflow database (isolated by conftest).

One scenario, run once per module through a tiny pipeline that uses the real
evaluate / gate / promote steps (the Model Control Plane needs a pipeline run):

    A  untrained candidate, no production yet       -> promoted (first)
    B  trained candidate, better than A             -> promoted, A archived, alias moved
    C  untrained candidate, worse than B            -> rejected, nothing moves
    D  passing candidate, MLflow alias call fails   -> step fails, nothing moves
    F  rejected with gate.fail_run_on_reject        -> step fails after recording
    Q  B's model again, with its INT8 version (the real quantize_onnx step); the gate
       prefers the smallest passing candidate   -> the INT8 file is promoted

then the predict pipeline, which must use exactly Q's INT8 weights. Each test asserts one
phase's snapshot. A ZenML failure *after* the alias moved is driven through
:func:`kdpipe.champion.promote_candidate` directly (the real MLflow registry, the real
ZenML store with a failing stage change); every path on in-memory stores:
tests/test_promotion_core.py.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from zenml import Model, pipeline, step
from zenml.client import Client

from kdpipe.bundle import Bundle
from kdpipe.champion import Candidate, MlflowChampionStore, promote_candidate
from kdpipe.config import (
    DataConfig,
    EvalConfig,
    ExportConfig,
    GateConfig,
    ModelConfig,
    PredictConfig,
    QuantizeConfig,
    TeacherConfig,
    TrackingConfig,
    TrainConfig,
)
from kdpipe.data import DatasetSpec, build_dataset_spec, make_loader
from kdpipe.export import ExportResult, export_onnx
from kdpipe.models import create_model
from kdpipe.predict import softmax
from kdpipe.promotion import (
    NoChampionError,
    PromotionError,
    get_champion,
)
from kdpipe.recipes import train_teacher
from pipelines.predict import predict_pipeline
from steps.evaluate_models import evaluate_models
from steps.gate_student import gate_student
from steps.load_champion import load_champion
from steps.materializers import BundleMaterializer, DatasetSpecMaterializer, OnnxExportMaterializer
from steps.promote_student import promote_student
from steps.quantize_onnx import quantize_onnx
from steps.zenml_stage_store import ZenmlStageStore

pytestmark = [pytest.mark.slow, pytest.mark.integration]

NAME = "kdpipe-test-promotion"
DATA = DataConfig(source="digits", eval_batch_size=256)
TRACKING = TrackingConfig(experiment=NAME, registered_model=NAME)
EVAL = EvalConfig(latency_batch_sizes=(1, 8), latency_repeats=3, latency_warmup=0)
# Only the production comparison and parity decide: the scenario is about "better / worse".
GATE = GateConfig(min_accuracy=None, max_drop_vs_teacher=None, min_compression=None,
                  min_gain_vs_production=-0.005, max_parity_error=1e-3)
QUANTIZE = QuantizeConfig(enabled=True, calibration_size=100)


# ------------------------------------------------------------------ the pipeline
@step(enable_cache=False, output_materializers={
    "dataset": DatasetSpecMaterializer, "teacher": BundleMaterializer,
    "student": BundleMaterializer, "pruned_student": BundleMaterializer,
    "student_onnx": OnnxExportMaterializer})
def make_candidate(trained: bool, seed: int) -> tuple[
    Annotated[DatasetSpec, "dataset"], Annotated[Bundle, "teacher"],
    Annotated[Bundle, "student"], Annotated[Bundle, "pruned_student"],
    Annotated[ExportResult, "student_onnx"]]:
    """A cnn_tiny on digits, trained for 3 epochs or left at its random init."""
    spec = build_dataset_spec(DATA)
    if trained:
        bundle = train_teacher(spec, TeacherConfig(
            model=ModelConfig(arch="cnn_tiny"),
            train=TrainConfig(epochs=3, lr=0.02, scheduler="none", seed=seed)))
    else:
        torch.manual_seed(seed)
        bundle = Bundle.from_model(create_model("cnn_tiny", 10, 1).eval(), arch="cnn_tiny",
                                   classes=spec.classes, input_shape=spec.input_shape,
                                   mean=spec.mean, std=spec.std)
    path = Path(tempfile.mkdtemp(prefix="kdpipe-test-onnx-")) / f"{NAME}.onnx"
    onnx = export_onnx(bundle, path, ExportConfig(exporter="torchscript"))
    return spec, bundle, bundle, bundle, onnx


@pipeline(enable_cache=False)
def promotion_pipeline(trained: bool, seed: int, gate: GateConfig, quantize: bool = False) -> None:
    dataset, teacher, student, pruned, onnx = make_candidate(trained=trained, seed=seed)
    int8 = ({"student_onnx_int8": quantize_onnx(dataset=dataset, student_onnx=onnx,
                                                quantize_cfg=QUANTIZE, tracking_cfg=TRACKING)}
            if quantize else {})
    evaluation = evaluate_models(dataset=dataset, teacher=teacher, student=student,
                                 pruned_student=pruned, student_onnx=onnx, evaluate_cfg=EVAL,
                                 tracking_cfg=TRACKING, **int8)
    decision = gate_student(evaluation=evaluation, gate_cfg=gate)
    promote_student(gate_decision=decision, student_onnx=onnx, pruned_student=pruned,
                    teacher=teacher, tracking_cfg=TRACKING, gate_cfg=gate, **int8)


# ------------------------------------------------------------------- the scenario
def _stages() -> dict[str, str | None]:
    versions = Client().list_model_versions(model=NAME, size=100).items
    return {v.name: (str(v.stage) if v.stage else None) for v in versions}


def _champion() -> str | None:
    champion = get_champion(NAME)
    return None if champion is None else champion.version


def _latest_run(name: str = "promotion_pipeline") -> Any:
    return Client().get_pipeline(name).last_run


def _phase(trained: bool, seed: int, gate: GateConfig = GATE, quantize: bool = False
           ) -> dict[str, Any]:
    """Run the pipeline once; snapshot the registries and the step's outcome."""
    before = {"stages": _stages(), "champion": _champion()}
    error = None
    try:
        promotion_pipeline.with_options(model=Model(name=NAME))(trained=trained, seed=seed,
                                                                gate=gate, quantize=quantize)
    except Exception as err:  # the scenario records failures; tests assert them
        error = err
    run = _latest_run()
    steps = run.steps
    version = run.model_version.name
    out = {"before": before, "stages": _stages(), "champion": _champion(), "error": error,
           "version": version, "run": run,
           "evaluation": steps["evaluate_models"].outputs["evaluation"][0].load(),
           "decision": steps["gate_student"].outputs["gate_decision"][0].load()}
    promote = steps["promote_student"]
    out["result"] = (promote.outputs["promotion"][0].load() if "promotion" in promote.outputs
                     else None)
    out["onnx"] = steps["make_candidate"].outputs["student_onnx"][0].load()
    out["int8"] = (steps["quantize_onnx"].outputs["student_onnx_int8"][0].load()
                   if "quantize_onnx" in steps else None)
    failed = promote.exception_info
    out["step_error"] = failed.traceback.strip().splitlines()[-1] if failed else None
    out["tags"] = [t.name for t in Client().get_model_version(NAME, version).tags]
    out["metadata"] = Client().get_model_version(NAME, version).run_metadata
    return out


def _raise_on_alias(*args: Any, **kwargs: Any) -> None:
    raise MlflowException("injected: the model registry is locked")


@pytest.fixture(scope="module")
def scenario(session_dir: Path) -> dict[str, dict[str, Any]]:
    # The experiment's artifacts go to the session folder, not to ./mlruns of the repo.
    client = MlflowClient()
    if client.get_experiment_by_name(NAME) is None:
        client.create_experiment(NAME, artifact_location=str(session_dir / "mlartifacts"))
    mp = pytest.MonkeyPatch()
    phases = {"A": _phase(trained=False, seed=0), "B": _phase(trained=True, seed=0),
              "C": _phase(trained=False, seed=1)}
    always = GATE.model_copy(update={"min_gain_vs_production": -1.0})
    with mp.context() as m:
        m.setattr(MlflowClient, "set_registered_model_alias", _raise_on_alias)
        phases["D"] = _phase(trained=False, seed=2, gate=always)
    strict = GATE.model_copy(update={"fail_run_on_reject": True})
    phases["F"] = _phase(trained=False, seed=4, gate=strict)
    smallest = always.model_copy(update={"prefer": "smallest", "min_agreement": 0.9})
    phases["Q"] = _phase(trained=True, seed=0, gate=smallest, quantize=True)
    return phases


# ----------------------------------------------------------------------- the tests
def test_first_candidate_without_production_is_promoted(scenario: dict) -> None:
    a = scenario["A"]
    assert a["error"] is None
    assert a["before"] == {"stages": {}, "champion": None}
    assert a["evaluation"].production.status == "absent"
    gain = [c for c in a["decision"].checks if c.name == "min_gain_vs_production"][0]
    assert gain.verdict == "skipped"
    assert a["result"].promoted is True
    assert a["stages"] == {a["version"]: "production"}
    assert a["champion"] == a["result"].mlflow_version
    tags = MlflowClient().get_model_version(NAME, a["champion"]).tags
    assert tags["zenml_model_version"] == a["version"]
    assert tags["onnx_sha256"] == a["onnx"].sha256


def test_better_candidate_is_promoted_and_the_previous_archived(scenario: dict) -> None:
    a, b = scenario["A"], scenario["B"]
    assert b["error"] is None
    # The premise: B really is better than A, measured against A as production.
    assert b["evaluation"].production.status == "evaluated"
    assert b["evaluation"].production.version == a["version"]
    assert b["evaluation"].production.evaluation.accuracy == pytest.approx(
        a["evaluation"].candidate.accuracy, abs=1e-12)
    assert b["evaluation"].candidate.accuracy > a["evaluation"].candidate.accuracy + 0.2
    assert b["result"].promoted is True
    assert b["result"].previous_production == a["version"]
    assert b["result"].previous_champion == a["champion"]
    assert b["stages"] == {a["version"]: "archived", b["version"]: "production"}
    assert b["champion"] == b["result"].mlflow_version != a["champion"]


def test_worse_candidate_is_rejected_and_nothing_moves(scenario: dict) -> None:
    b, c = scenario["B"], scenario["C"]
    assert c["error"] is None  # a rejection is a normal outcome: the run succeeds
    assert c["evaluation"].candidate.accuracy < b["evaluation"].candidate.accuracy - 0.2
    assert c["decision"].passed is False
    assert c["decision"].reasons[0].startswith("min_gain_vs_production: ")
    assert c["result"].promoted is False
    assert c["result"].reasons == c["decision"].reasons
    assert c["champion"] == b["champion"]
    assert c["stages"] == {**b["stages"], c["version"]: None}
    assert "rejected" in c["tags"]
    assert c["metadata"]["gate_decision"]["gate_verdict"] == "rejected"
    assert c["metadata"]["promotion"]["promoted"] == 0


def test_registry_failure_at_the_alias_changes_nothing(scenario: dict) -> None:
    c, d = scenario["C"], scenario["D"]
    assert d["decision"].passed is True
    assert d["error"] is not None
    assert "registry is locked" in d["step_error"]
    assert d["champion"] == c["champion"]
    assert d["stages"] == {**c["stages"], d["version"]: None}
    assert d["result"] is None  # the step failed: no promotion artifact


class _StageFails(ZenmlStageStore):
    """The real ZenML store, whose stage change fails (the store went away mid-promotion)."""

    def set_production(self, version: str) -> None:
        raise RuntimeError("injected: the ZenML store is unreachable")


def _candidate_of(phase: dict[str, Any]) -> Candidate:
    onnx, evaluation = phase["onnx"], phase["evaluation"]
    return Candidate(version=phase["version"], onnx_path=Path(onnx.path), sha256=onnx.sha256,
                     input_shape=tuple(evaluation.input_shape),
                     metadata={"classes": evaluation.classes,
                               "input_shape": list(evaluation.input_shape),
                               "onnx_sha256": onnx.sha256, "zenml_model": NAME,
                               "zenml_model_version": phase["version"]})


def _versions(name: str) -> list[Any]:
    return MlflowClient().search_model_versions(f"name='{name}'")


def test_zenml_failure_after_the_alias_moved_restores_the_alias(scenario: dict) -> None:
    last = scenario["Q"]  # the scenario's last phase: its champion and stages are current
    champion, stages = last["champion"], last["stages"]
    d = scenario["D"]  # its ONNX differs from the champion's, so it is registered again
    champions = MlflowChampionStore(NAME, tracking_uri=os.environ["MLFLOW_TRACKING_URI"],
                                    experiment=NAME)
    registered = {str(mv.version) for mv in _versions(NAME)}
    with pytest.raises(PromotionError, match=r"ZenML store is unreachable\. "
                       rf"{NAME}@champion was moved back to {champion}; nothing changed"):
        promote_candidate(_candidate_of(d), d["decision"], _StageFails(NAME), champions)
    assert get_champion(NAME).version == champion
    assert _stages() == stages
    (new,) = [mv for mv in _versions(NAME) if str(mv.version) not in registered]  # registered, then the alias went back
    assert new.tags["zenml_model_version"] == d["version"]


def test_zenml_failure_without_a_previous_champion_deletes_the_alias(scenario: dict) -> None:
    other = "kdpipe-test-promotion-solo"
    champions = MlflowChampionStore(other, tracking_uri=os.environ["MLFLOW_TRACKING_URI"],
                                    experiment=NAME)
    d = scenario["D"]
    with pytest.raises(PromotionError, match=r"moved back to \(none: the alias was deleted\)"):
        promote_candidate(_candidate_of(d), d["decision"], _StageFails(NAME), champions)
    assert get_champion(other) is None
    assert [str(mv.version) for mv in _versions(other)] == ["1"]
    assert MlflowClient().get_registered_model(other).aliases == {}


def test_fail_run_on_reject_fails_after_recording(scenario: dict) -> None:
    d, f = scenario["D"], scenario["F"]
    assert f["decision"].passed is False
    assert f["error"] is not None
    assert "GateRejectedError: not promoted" in f["step_error"]
    assert "fail_run_on_reject" in f["step_error"]
    assert "rejected" in f["tags"]
    assert f["champion"] == d["champion"]
    assert f["stages"] == {**d["stages"], f["version"]: None}


def test_the_chosen_int8_candidate_is_promoted_with_its_precision(scenario: dict) -> None:
    q, f = scenario["Q"], scenario["F"]
    assert q["error"] is None and q["int8"] is not None and q["int8"].available
    assert q["decision"].chosen == "onnx_int8", q["decision"].summary()
    assert q["result"].promoted and q["result"].precision == "int8"
    assert "promoted onnx_int8: smallest .onnx file" in q["result"].reasons[0]
    assert q["champion"] == q["result"].mlflow_version != f["champion"]
    assert q["stages"][q["version"]] == "production"
    version = MlflowClient().get_model_version(NAME, q["champion"])
    assert version.tags["precision"] == "int8"
    assert version.tags["onnx_sha256"] == q["int8"].result.sha256 != q["onnx"].sha256


def test_predict_uses_exactly_the_champions_weights(scenario: dict, tmp_path: Path) -> None:
    # The champion is Q's INT8 file: predict serves it as it serves an FP32 one.
    q = scenario["Q"]
    out = tmp_path / "predictions.csv"
    cfg = PredictConfig(data=DATA, split="test", batch_size=64, output_path=str(out))
    predict_pipeline(predict=cfg, tracking=TRACKING)
    run = _latest_run("predict_pipeline")
    champion = run.steps["load_champion"].outputs["champion"][0].load()
    assert champion.version == q["champion"] and champion.tags["precision"] == "int8"
    predictions = run.steps["predict_batch"].outputs["predictions"][0].load()
    # Expected: Q's own INT8 ONNX file (its artifact) on the same raw pixels.
    import onnxruntime as ort

    session = ort.InferenceSession(q["int8"].result.path, providers=["CPUExecutionProvider"])
    spec = build_dataset_spec(DATA)
    x = torch.cat([x for x, *_ in make_loader(spec, "test", train=False, normalize=False)])
    probs = softmax(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
                    .astype(np.float64))
    assert [r.predicted for r in predictions.rows] == [spec.classes[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([r.probability for r in predictions.rows], probs.max(1),
                               atol=1e-6)
    assert predictions.accuracy == pytest.approx(
        q["evaluation"].models["onnx_int8"].accuracy, abs=1e-12)
    assert out.read_text().splitlines()[0] == "key,predicted,probability,label"
    assert len(out.read_text().splitlines()) == len(predictions.rows) + 1


def test_predict_without_a_champion_says_how_to_get_one() -> None:
    with pytest.raises(NoChampionError,
                       match=r"no student has been promoted yet; run `python run_pipeline.py`"):
        load_champion.entrypoint(
            tracking_cfg=TrackingConfig(registered_model="kdpipe-never-promoted"))

