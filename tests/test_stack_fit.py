"""A cluster config on a local stack: one readable message, and exit 2 when it cannot run."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from zenml.enums import StackComponentType

from pipelines.stack_fit import (
    Finding,
    check_stack_fit,
    format_report,
    silence_reported_zenml_warnings,
)

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "configs" / "cluster" / "kubernetes.yaml"
KUBEFLOW = ROOT / "configs" / "cluster" / "kubeflow.yaml"
TRAINING_STEPS = ["finetune_teacher", "distill_student", "prune_student"]


def fake_stack(name: str = "default", **flavors: str) -> SimpleNamespace:
    """A stack model with one component per given type: ``orchestrator="local"`` etc."""
    components = {
        StackComponentType(kind): [SimpleNamespace(name=f"my-{flavor}", flavor_name=flavor)]
        for kind, flavor in flavors.items()
    }
    return SimpleNamespace(name=name, components=components)


LOCAL = fake_stack(orchestrator="local", artifact_store="local")
LOCAL_WITH_MLFLOW = fake_stack(orchestrator="local", artifact_store="local",
                               experiment_tracker="mlflow")
K8S = fake_stack("cluster", orchestrator="kubernetes", artifact_store="s3",
                 experiment_tracker="mlflow", container_registry="default")


def by_key(findings: list[Finding]) -> dict[str, Finding]:
    return {f.key: f for f in findings}


def test_kubernetes_config_on_a_local_stack_names_every_ignored_setting_and_why() -> None:
    findings = by_key(check_stack_fit(yaml.safe_load(KUBERNETES.read_text()), LOCAL))

    pods = findings["settings.orchestrator.kubernetes"]
    assert not pods.fatal
    assert pods.places == ["pipeline", *TRAINING_STEPS]
    assert "orchestrator is 'my-local' (flavor local), not kubernetes" in pods.why
    assert "no Docker image is built" in findings["settings.docker"].why
    tracker = findings["experiment_tracker: True"]
    assert tracker.fatal and tracker.places == [*TRAINING_STEPS, "evaluate_models"]
    assert "no experiment tracker" in tracker.why


def test_kubeflow_resources_are_reported_as_not_allocated_locally() -> None:
    findings = by_key(check_stack_fit(yaml.safe_load(KUBEFLOW.read_text()), LOCAL_WITH_MLFLOW))

    assert findings["settings.resources"].places == TRAINING_STEPS
    assert "does not allocate CPUs, GPUs or memory" in findings["settings.resources"].why
    assert not any(f.fatal for f in findings.values())  # the tracker is there: it can run
    assert "settings.experiment_tracker.mlflow" not in findings


@pytest.mark.parametrize("path", [ROOT / "configs" / "default.yaml", ROOT / "configs" / "smoke.yaml"])
def test_local_configs_fit_the_local_stack(path: Path) -> None:
    assert check_stack_fit(yaml.safe_load(path.read_text()), LOCAL) == []


def test_kubernetes_config_fits_a_kubernetes_stack() -> None:
    assert check_stack_fit(yaml.safe_load(KUBERNETES.read_text()), K8S) == []


def test_a_named_component_that_is_not_in_the_stack_is_fatal() -> None:
    raw = {"steps": {"distill_student": {"step_operator": "gpu-operator"}}}
    (finding,) = check_stack_fit(raw, K8S)
    assert finding.fatal and finding.key == "step_operator: gpu-operator"
    assert finding.why.startswith("the stack has no step operator")


def test_a_component_setting_by_name_is_checked_against_the_name() -> None:
    raw = {"settings": {"experiment_tracker:other-tracker": {"nested": True}}}
    (finding,) = check_stack_fit(raw, K8S)
    assert not finding.fatal
    assert "is 'my-mlflow' (flavor mlflow), not 'other-tracker'" in finding.why


def test_report_puts_what_cannot_run_first_and_points_to_the_docs() -> None:
    findings = check_stack_fit(yaml.safe_load(KUBERNETES.read_text()), LOCAL)
    report = format_report("k8s.yaml", LOCAL, findings)
    lines = report.splitlines()
    assert lines[0].startswith("k8s.yaml asks for stack components the active stack 'default'")
    assert lines[1].startswith("  cannot run: experiment_tracker: True")
    assert all(line.startswith("  ignored: ") for line in lines[2:-1])
    assert "docs/cluster.md" in lines[-1]

    warning_only = format_report("x.yaml", LOCAL, [Finding("settings.docker", "why")])
    assert "The run goes on without them" in warning_only


def test_zenml_lines_about_reported_settings_are_filtered() -> None:
    handler = logging.StreamHandler()
    logging.getLogger("zenml").addHandler(handler)
    try:
        silence_reported_zenml_warnings()
        silence_reported_zenml_warnings()  # idempotent: one filter per handler
        assert len(handler.filters) == 1

        def passes(msg: str) -> bool:
            record = logging.LogRecord("zenml.x", logging.INFO, __file__, 1, msg, None, None)
            return bool(handler.filter(record))

        assert not passes("Not including stack component settings with key orchestrator.kubernetes")
        assert not passes("Specifying step resources is not supported for the local orchestrator, "
                          "ignoring resource configuration for step distill_student.")
        assert passes("Step distill_student has started.")
    finally:
        logging.getLogger("zenml").removeHandler(handler)


@pytest.mark.slow  # a subprocess importing ZenML
def test_cli_refuses_a_cluster_config_on_the_local_stack_with_one_message(tmp_path: Path) -> None:
    # The test session's isolated ZenML store has only the default (local) stack. The
    # schedule block is dropped so that this check, not the schedule check, answers.
    raw = yaml.safe_load(KUBERNETES.read_text())
    raw.pop("schedule")
    path = tmp_path / "k8s_no_schedule.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "run_pipeline.py", "--config", str(path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot run: experiment_tracker: True" in result.stderr
    assert "ignored: settings.orchestrator.kubernetes" in result.stderr
    assert "Traceback" not in result.stderr
    assert "StackValidationError" not in result.stderr
