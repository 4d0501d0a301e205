"""Retraining: ``teacher.init: production`` warm-starts from the production version's teacher.

Three runs of the smoke pipeline through the CLI's code (in this process), on the test session's isolated
ZenML store and MLflow database, under a model name of their own:

1. ``cold``: no production version yet → the teacher trains from scratch (and says so),
   the candidate is promoted (first production version);
2. ``warm``: production now exists → the teacher step re-runs (the production version is
   part of its cache key) and starts from exactly the production teacher's weights;
3. ``again``: run 2's config once more (its strict gate rejected run 2, so production is
   still version 1) → unchanged data, config and production: the teacher is cached.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
NAME = "kdpipe-test-retrain"


def _config(tmp: Path, name: str, *, strict_gate: bool) -> Path:
    data = yaml.safe_load(SMOKE.read_text())
    data["model"]["name"] = NAME
    data["parameters"]["teacher"]["init"] = "production"
    data["parameters"]["tracking"].update(experiment=NAME, registered_model=NAME)
    # Every candidate passes: this module is about the teacher, not the gate.
    # The first candidate passes; with strict_gate every candidate is rejected, so
    # production stays where it is.
    data["parameters"]["gate"].update(min_gain_vs_production=None,
                                      min_accuracy=1.0 if strict_gate else None)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory,
         run_in_process: Callable[..., tuple[int, str, str]]) -> dict[str, Any]:
    from zenml.client import Client

    def run(config: Path, run_name: str) -> Any:
        code, out, err = run_in_process("--config", str(config), "--run-name", run_name)
        assert code == 0, out[-3000:] + err[-3000:]
        return Client().get_pipeline_run(run_name)

    tmp = tmp_path_factory.mktemp("retrain")
    strict = _config(tmp, "strict", strict_gate=True)
    return {"cold": run(_config(tmp, "cold", strict_gate=False), "retrain-cold"),
            "warm": run(strict, "retrain-warm"), "again": run(strict, "retrain-again")}


def _teacher_step(run: Any) -> Any:
    return run.steps["finetune_teacher"]


def _teacher(run: Any) -> Any:
    return _teacher_step(run).outputs["teacher"][0].load()


def _status(step: Any) -> str:
    return str(getattr(step.status, "value", step.status))


def test_first_run_without_production_trains_from_scratch_and_says_so(runs: dict[str, Any]) -> None:
    step = _teacher_step(runs["cold"])
    assert _status(step) == "completed"
    assert step.config.parameters["warm_start_version"] is None
    assert step.run_metadata["warm_start"] == "none: no production version"
    promotion = runs["cold"].steps["promote_student"].outputs["promotion"][0].load()
    assert promotion.promoted, promotion


def test_next_run_starts_from_the_production_teacher(runs: dict[str, Any]) -> None:
    from zenml.client import Client
    from zenml.enums import ModelStages

    step = _teacher_step(runs["warm"])
    assert _status(step) == "completed"  # re-ran: production is part of the cache key
    production_v1 = Client().get_model_version(NAME, 1)
    assert step.config.parameters["warm_start_version"] == str(production_v1.id)
    warm = step.run_metadata["warm_start"]
    assert warm["model_version"] == 1
    # The weights it started from are exactly the teacher of run 1 (production version 1).
    assert warm["teacher_weights_sha256"] == _teacher(runs["cold"]).spec.weights_sha256
    # ... and it trained on: its result differs from where it started.
    assert _teacher(runs["warm"]).spec.weights_sha256 != warm["teacher_weights_sha256"]
    assert Client().get_model_version(NAME, ModelStages.PRODUCTION).number == 1


def test_unchanged_data_config_and_production_reuse_the_cached_teacher(
        runs: dict[str, Any]) -> None:
    step = _teacher_step(runs["again"])
    assert _status(step) == "cached"
    assert step.config.parameters["warm_start_version"] == \
        _teacher_step(runs["warm"]).config.parameters["warm_start_version"]
    assert _teacher(runs["again"]).spec.weights_sha256 == _teacher(runs["warm"]).spec.weights_sha256
