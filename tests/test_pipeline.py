"""The distillation pipeline end to end on the real ZenML local orchestrator.

Runs share one isolated ZenML store and MLflow database (tests/conftest.py) and are made
once per module, in this order:

1. ``first``: configs/smoke.yaml through ``python run_pipeline.py`` (the real CLI; the
   later runs call the same CLI code in this process);
2. ``gate_changed``: only the gate thresholds differ (min_accuracy 0.99 → rejected);
3. ``unchanged``: the same configuration as (2) again;
4. ``data_changed``: another ``data.split_seed`` (new split, new fingerprint), with one
   teacher assistant and ``quantize.enabled`` (the INT8 candidate; the runs before it
   are the FP32 pipeline, step for step).

The caching contract is read from ZenML's own run records (step status).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdpipe import tracking

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
TRAINING_STEPS = ("finetune_teacher", "distill_student", "prune_student", "export_onnx")
ALWAYS_RUN = {"ingest_data", "gate_student", "promote_student", "publish_model_card"}
ASSISTANT = {"model": {"arch": "cnn_tiny", "kwargs": {"width": 6}},
             "train": {"epochs": 1, "lr": 0.01, "scheduler": "none"}}


# ------------------------------------------------------------- fast unit tests
def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_tracking_uri("http://cfg:5000", stack_uri="http://stack") == "http://cfg:5000"
    assert tracking.resolve_tracking_uri(None, stack_uri="http://stack") == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.resolve_tracking_uri(None, stack_uri="http://stack") == "http://stack"
    assert tracking.resolve_tracking_uri(None) == "sqlite:///mlflow.db"


def test_artifacts_live_beside_a_sqlite_database(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.default_artifact_location(uri) == (tmp_path / "mlartifacts").as_uri()
    assert tracking.default_artifact_location("http://mlflow:5000") is None


def test_flatten_params_uses_dotted_keys() -> None:
    from kdpipe.config import PipelineConfig

    params = tracking.flatten_params(PipelineConfig())
    assert params["student.train.lr"] == "0.001"
    assert params["teacher.model.arch"] == "cnn_large"
    assert params["prune.recovery.epochs"] == "2"
    assert all(isinstance(v, str) for v in params.values())


def test_metric_logging_outside_a_run_says_how_to_fix() -> None:
    with pytest.raises(tracking.TrackingError, match="inside `with pipeline_run"):
        tracking.log_metrics({"a": 1.0}, "teacher")


# ------------------------------------------------------------------- pipeline runs
def _write_config(tmp: Path, name: str, **changes: dict[str, Any]) -> Path:
    data = yaml.safe_load(SMOKE.read_text())
    for section, values in changes.items():
        data["parameters"].setdefault(section, {}).update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_cli(config: Path, run_name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "run_pipeline.py", "--config", str(config), "--run-name", run_name],
        cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory,
         run_in_process: Callable[..., tuple[int, str, str]]) -> dict[str, Any]:
    from zenml.client import Client

    stdout: dict[str, str] = {}

    def run(config: Path, run_name: str, *, subprocess_: bool = False) -> Any:
        args = ("--config", str(config), "--run-name", run_name)
        if subprocess_:
            result = _run_cli(config, run_name)
            code, out, err = result.returncode, result.stdout, result.stderr
        else:
            code, out, err = run_in_process(*args)
        assert code == 0, out[-3000:] + err[-3000:]
        stdout[run_name] = out
        return Client().get_pipeline_run(run_name)

    tmp = tmp_path_factory.mktemp("configs")
    # The first run goes through a real `python run_pipeline.py`; the others through the
    # same CLI code in this process (no interpreter and ZenML start-up per run).
    out: dict[str, Any] = {"stdout": stdout, "first": run(SMOKE, "kd-first", subprocess_=True)}
    strict_gate = _write_config(tmp, "strict_gate", gate={"min_accuracy": 0.99})
    out["gate_changed"] = run(strict_gate, "kd-gate-changed")
    out["unchanged"] = run(strict_gate, "kd-unchanged")
    # New data retrains everything; this run also puts one teacher assistant in the chain
    # and adds the INT8 candidate.
    new_split = _write_config(tmp, "new_split", data={"split_seed": 1}, gate={"min_accuracy": 0.99},
                              distill={"assistants": [ASSISTANT]},
                              quantize={"enabled": True, "calibration_size": 100})
    out["data_changed"] = run(new_split, "kd-data-changed")
    return out


def _statuses(run: Any) -> dict[str, str]:
    return {name: str(getattr(step.status, "value", step.status)) for name, step in run.steps.items()}


def _output(run: Any, step: str, name: str) -> Any:
    return run.steps[step].outputs[name][0]


@pytest.mark.slow
@pytest.mark.integration
def test_first_run_completes_every_step(runs: dict[str, Any]) -> None:
    statuses = _statuses(runs["first"])
    assert set(statuses) == ALWAYS_RUN | set(TRAINING_STEPS) | {"evaluate_models"}
    assert set(statuses.values()) == {"completed"}, statuses


@pytest.mark.slow
@pytest.mark.integration
def test_artifacts_have_kdpipe_types_and_metadata(runs: dict[str, Any]) -> None:
    from kdpipe.bundle import Bundle
    from kdpipe.data import DatasetSpec, make_loader
    from kdpipe.eval_loop import evaluate
    from kdpipe.evaluation import EvaluationReport
    from kdpipe.export import ExportResult
    from kdpipe.gate import GateDecision
    from kdpipe.metrics import count_macs, count_params, serialized_size_bytes

    run = runs["first"]
    dataset = _output(run, "ingest_data", "dataset")
    spec = dataset.load()
    assert isinstance(spec, DatasetSpec)
    assert dataset.run_metadata["fingerprint"] == spec.fingerprint
    assert dataset.content_hash and len(dataset.content_hash) == 64
    for step, name in (("finetune_teacher", "teacher"), ("distill_student", "student"),
                       ("prune_student", "pruned_student")):
        artifact = _output(run, step, name)
        bundle = artifact.load()
        assert isinstance(bundle, Bundle)
        assert "zenml.integrations.pytorch" not in str(artifact.materializer)
        meta = artifact.run_metadata
        assert meta["role"] == name
        # The metadata is the bundle's own record, and that record is of the stored model.
        metrics = bundle.spec.extra["metrics"]
        assert {k: meta[k] for k in ("test_accuracy", "params", "macs", "size_bytes")} == {
            k: metrics[k] for k in ("test_accuracy", "params", "macs", "size_bytes")}, name
        assert meta["params"] == count_params(bundle.model), name
        assert meta["macs"] == count_macs(bundle.model, spec.input_shape), name
        assert meta["size_bytes"] == serialized_size_bytes(bundle.model), name
        test_accuracy = evaluate(bundle.model, make_loader(spec, "test", train=False)).accuracy
        assert meta["test_accuracy"] == pytest.approx(test_accuracy, abs=1e-12), name
        # training curves + confusion matrix
        assert sorted(Path(v.uri).name for v in artifact.visualizations) == \
            ["confusion_matrix.png", "training_curves.png"]
    teacher_meta = _output(run, "finetune_teacher", "teacher").run_metadata
    pruned_meta = _output(run, "prune_student", "pruned_student").run_metadata
    assert pruned_meta["pruned"] is True and teacher_meta["pruned"] is False
    assert teacher_meta["params"] / pruned_meta["params"] > 2.0

    onnx_artifact = _output(run, "export_onnx", "student_onnx")
    onnx = onnx_artifact.load()
    assert isinstance(onnx, ExportResult)
    assert Path(onnx.path).name == "kdpipe-smoke-student.onnx" and Path(onnx.path).is_file()
    assert (Path(onnx_artifact.uri) / "kdpipe-smoke-student.onnx").is_file()
    assert onnx_artifact.run_metadata["parity_passed"] is True

    evaluation = _output(run, "evaluate_models", "evaluation").load()
    assert isinstance(evaluation, EvaluationReport)
    assert set(evaluation.models) >= {"teacher", "student", "pruned_student", "onnx"}
    assert isinstance(_output(run, "gate_student", "gate_decision").load(), GateDecision)


@pytest.mark.slow
@pytest.mark.integration
def test_model_version_links_the_artifacts(runs: dict[str, Any]) -> None:
    from zenml.client import Client

    run = runs["first"]
    assert run.model_version is not None
    version = Client().get_model_version("kdpipe-smoke-student", run.model_version.id)
    for name in ("dataset", "teacher", "student", "pruned_student", "student_onnx", "evaluation"):
        assert version.get_artifact(name) is not None, name


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_run_holds_params_curves_and_the_onnx_model(runs: dict[str, Any]) -> None:
    import mlflow

    run = runs["first"]
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("kdpipe-smoke")
    run_id = tracking.find_run(experiment.experiment_id, str(run.id))
    assert run_id is not None
    data = client.get_run(run_id).data
    assert data.params["student.model.arch"] == "cnn_tiny"
    spec = _output(run, "ingest_data", "dataset").load()
    assert data.tags["data.fingerprint"] == spec.fingerprint
    # constants are params, not metrics: the run page opens on the training curves
    assert {k: data.params[f"data.{k}_samples"] for k in spec.split_sizes} == {
        k: str(v) for k, v in spec.split_sizes.items()}
    assert not [k for k in data.metrics if k.startswith("data/")], data.metrics
    # gate thresholds are the config's (params), not metrics; measured values are metrics
    assert not [k for k in data.metrics if k.endswith("_threshold")], data.metrics
    assert float(data.params["gate.min_accuracy"]) == pytest.approx(0.2)  # configs/smoke.yaml
    assert data.metrics["gate/gate_passed"] in (0.0, 1.0)
    assert 0.0 <= data.metrics["gate/gate_min_accuracy_value"] <= 1.0
    epochs = {"teacher/train_loss": 2, "student/train_kd": 2, "student/train_ce": 2,
              "recovery/train_kd": 1}
    for key, n in epochs.items():
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == list(range(1, n + 1)), key
    for key in ("teacher/test_accuracy", "pruned_student/test_accuracy", "prune/params_ratio",
                "export/parity_max_abs_error", "eval/onnx_accuracy"):
        assert key in data.metrics, key
    assert experiment.artifact_location == tracking.default_artifact_location(
        tracking.resolve_tracking_uri())
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/teacher_curves.png", "plots/student_curves.png"} <= artifacts
    models = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'",
                                         output_format="list")
    onnx_models = [m for m in models if m.name == "student_onnx"]
    assert onnx_models, [m.name for m in models]
    info = mlflow.models.get_model_info(onnx_models[0].model_uri)
    assert "onnx" in info.flavors
    assert info.signature is not None and info.saved_input_example_info is not None


@pytest.mark.slow
@pytest.mark.integration
def test_cli_prints_the_summary(runs: dict[str, Any]) -> None:
    out = runs["stdout"]["kd-first"]
    for text in ("teacher", "pruned_student", "student (ONNX)", "MACs", "gate: ", "Model version:",
                 "mlflow ui --backend-store-uri", "zenml login --local",
                 "Accuracy vs latency (frontier", "yes (promoted)", "Model card: "):
        assert text in out, text


@pytest.mark.slow
@pytest.mark.integration
def test_gate_change_retrains_nothing(runs: dict[str, Any]) -> None:
    statuses = _statuses(runs["gate_changed"])
    assert {s: statuses[s] for s in TRAINING_STEPS} == dict.fromkeys(TRAINING_STEPS, "cached")
    assert {s: statuses[s] for s in ALWAYS_RUN} == dict.fromkeys(ALWAYS_RUN, "completed")
    promotion = _output(runs["gate_changed"], "promote_student", "promotion").load()
    assert promotion.promoted is False


@pytest.mark.slow
@pytest.mark.integration
def test_unchanged_rerun_executes_only_ingest_gate_and_promotion(runs: dict[str, Any]) -> None:
    statuses = _statuses(runs["unchanged"])
    executed = {name for name, status in statuses.items() if status == "completed"}
    assert executed == ALWAYS_RUN, statuses
    assert set(statuses.values()) == {"completed", "cached"}


@pytest.mark.slow
@pytest.mark.integration
def test_data_change_retrains_everything_downstream(runs: dict[str, Any]) -> None:
    statuses = _statuses(runs["data_changed"])
    assert set(statuses.values()) == {"completed"}, statuses
    before = _output(runs["unchanged"], "ingest_data", "dataset").load().fingerprint
    after = _output(runs["data_changed"], "ingest_data", "dataset").load().fingerprint
    assert before != after


@pytest.mark.slow
@pytest.mark.integration
def test_an_assistant_is_its_own_tracked_step_and_teaches_the_student(runs: dict[str, Any]) -> None:
    import mlflow

    run = runs["data_changed"]
    output = run.steps["distill_assistant_1"].outputs["assistant_1"][0]
    assistant = output.load()
    assert assistant.spec.arch == "cnn_tiny" and assistant.spec.kwargs == {"width": 6}
    assert assistant.spec.extra["role"] == "assistant_1"
    # The student (and its pruning recovery) learned from the assistant, not the teacher.
    assert run.steps["distill_student"].inputs["teacher"][0].id == output.id
    assert run.steps["prune_student"].inputs["teacher"][0].id == output.id
    assert run.steps["evaluate_models"].inputs["teacher"][0].id == \
        run.steps["finetune_teacher"].outputs["teacher"][0].id
    experiment = yaml.safe_load(SMOKE.read_text())["parameters"]["tracking"]["experiment"]
    (mlflow_run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list",
                                       filter_string="attributes.run_name = 'kd-data-changed'")
    curve = mlflow.MlflowClient().get_metric_history(mlflow_run.info.run_id,
                                                     "assistant_1/train_loss")
    assert [m.step for m in curve] == [1]


@pytest.mark.slow
@pytest.mark.integration
def test_model_card_states_the_runs_numbers_and_describes_the_version(runs: dict[str, Any]
                                                                      ) -> None:
    import mlflow

    from kdpipe.card_publish import CARD_TAG
    from kdpipe.model_card import ModelCard
    from kdpipe.model_card_view import card_markdown

    run = runs["first"]
    artifact = _output(run, "publish_model_card", "model_card")
    card = artifact.load()
    assert isinstance(card, ModelCard)
    evaluation = _output(run, "evaluate_models", "evaluation").load()
    spec = _output(run, "ingest_data", "dataset").load()
    promotion = _output(run, "promote_student", "promotion").load()
    assert card.promoted is promotion.promoted is True
    assert card.candidate_eval.accuracy == pytest.approx(evaluation.candidate.accuracy, abs=1e-12)
    assert card.candidate_eval.per_class_accuracy == evaluation.candidate.per_class_accuracy
    assert card.data.fingerprint == spec.fingerprint and card.data.split_sizes == spec.split_sizes
    assert card.data.classes == spec.classes
    model_section = yaml.safe_load(SMOKE.read_text())["model"]
    assert card.intended_use.model_dump() == {k: model_section[k] for k in
                                              ("license", "use_cases", "limitations")}
    assert card.lineage.zenml_model_version == run.model_version.name
    assert card.lineage.mlflow_version == promotion.mlflow_version
    md = card_markdown(card)
    assert f"| onnx (candidate) | onnxruntime | {evaluation.candidate.accuracy:.4f} |" in md
    assert [p.name for p in card.frontier if p.promoted] == ["onnx"]
    assert sorted(Path(v.uri).name for v in artifact.visualizations) == [
        "model_card.html", "model_card.md"]
    eval_vis = _output(run, "evaluate_models", "evaluation").visualizations
    assert "frontier.png" in {Path(v.uri).name for v in eval_vis}
    # MLflow: the card in the run, its summary as the registered version's description
    client = mlflow.MlflowClient()
    assert card.lineage.mlflow_run_id is not None
    files = {a.path for a in client.list_artifacts(card.lineage.mlflow_run_id, "model_card")}
    assert files == {"model_card/model_card.md", "model_card/model_card.html",
                     "model_card/frontier.png"}
    logged = mlflow.artifacts.load_text(
        f"runs:/{card.lineage.mlflow_run_id}/model_card/model_card.md")
    assert f"{evaluation.candidate.accuracy:.4f}" in logged
    version = client.get_model_version(promotion.registered_model, promotion.mlflow_version)
    assert version.description == card.summary() and len(version.description) > 100
    assert version.tags[CARD_TAG].endswith("/model_card/model_card.md")


@pytest.mark.slow
@pytest.mark.integration
def test_a_rejected_candidate_gets_a_card_too(runs: dict[str, Any]) -> None:
    card = _output(runs["gate_changed"], "publish_model_card", "model_card").load()
    assert card.promoted is False and card.gate_passed is False
    assert "Not promoted" in card.summary() and "min_accuracy" in card.summary()
    assert card.lineage.mlflow_version is None
    assert not any(p.promoted for p in card.frontier)
    with_assistant = _output(runs["data_changed"], "publish_model_card", "model_card").load()
    assert with_assistant.lineage.assistants == ["cnn_tiny {'width': 6}"]


@pytest.mark.slow
@pytest.mark.integration
def test_the_int8_candidate_is_a_tracked_step_evaluated_gated_and_logged(runs: dict[str, Any]) -> None:
    import mlflow

    from kdpipe.quantize_report import QuantizeOutcome

    assert "quantize_onnx" not in runs["first"].steps  # quantize.enabled: false: FP32 only
    run = runs["data_changed"]
    output = _output(run, "quantize_onnx", "student_onnx_int8")
    outcome = output.load()
    assert isinstance(outcome, QuantizeOutcome) and outcome.available, outcome.reason
    assert output.run_metadata["int8_available"] is True
    assert outcome.fp32_sha256 == _output(run, "export_onnx", "student_onnx").load().sha256
    assert run.steps["evaluate_models"].inputs["student_onnx_int8"][0].id == output.id
    assert run.steps["promote_student"].inputs["student_onnx_int8"][0].id == output.id
    evaluation = _output(run, "evaluate_models", "evaluation").load()
    int8 = evaluation.models["onnx_int8"]
    assert int8.precision == "int8" and 0.0 <= int8.agreement <= 1.0
    assert int8.size_bytes == outcome.result.size_bytes
    decision = _output(run, "gate_student", "gate_decision").load()
    assert [v.name for v in decision.candidates] == ["onnx", "onnx_int8"]
    out = runs["stdout"]["kd-data-changed"]
    for text in ("student (ONNX INT8)", " candidate onnx (FP32):", " candidate onnx_int8 (INT8):",
                 "INT8 vs FP32 ONNX: argmax agreement", "INT8 candidate (accuracy control"):
        assert text in out, text
    # Both candidates are models of the run's one MLflow run.
    experiment = yaml.safe_load(SMOKE.read_text())["parameters"]["tracking"]["experiment"]
    (mlflow_run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list",
                                       filter_string="attributes.run_name = 'kd-data-changed'")
    models = mlflow.search_logged_models(
        experiment_ids=[mlflow_run.info.experiment_id], output_format="list",
        filter_string=f"source_run_id = '{mlflow_run.info.run_id}'")
    assert {"student_onnx", "student_onnx_int8"} <= {m.name for m in models}
    assert mlflow_run.data.tags["quantize.int8_candidate"] == outcome.reason[:4000]
    assert "quantize/int8_onnx_bytes" in mlflow_run.data.metrics
