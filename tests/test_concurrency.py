"""Concurrent pipeline runs against one local ZenML store and one MLflow SQLite database.

* fast: the promotion lock (where it lives, that a second holder waits and then fails
  with a message that says what to do) and the stale-production rule,
  :func:`kdpipe.champion.stale_comparison` (a candidate evaluated against a production
  that a concurrent run has replaced is not promoted; what promotion does then is in
  tests/test_promotion_core.py);
* slow: two ``run_pipeline.py`` processes started at once both finish without "database
  is locked", and afterwards exactly one champion remains, the same model in ZenML
  (stage production) and in MLflow (alias ``champion``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import yaml

from kdpipe.champion import stale_comparison
from kdpipe.eval_report import EvaluationReport, ProductionComparison
from kdpipe.gate import GateDecision
from kdpipe.promotion import PromotionError, promotion_lock, promotion_lock_path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
NAME = "kdpipe-test-concurrency"


# ------------------------------------------------------------------- the promotion lock
def test_lock_lives_beside_a_sqlite_database(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    assert promotion_lock_path("my model/v1", uri) == tmp_path / "db" / ".kdpipe-promote-my_model_v1.lock"
    remote = promotion_lock_path("m", "http://mlflow:5000")
    assert remote.name == ".kdpipe-promote-m.lock" and remote.parent.name == "kdpipe-locks"


def test_second_promotion_waits_for_the_first(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Event-based: the second holder is seen waiting (it polls) before the first lets go."""
    from kdpipe import promotion

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    order: list[str] = []
    first_holds, release, second_polls = threading.Event(), threading.Event(), threading.Event()

    def poll(seconds: float) -> None:  # promotion_lock sleeps only when the lock is taken
        second_polls.set()
        time.sleep(seconds)

    monkeypatch.setattr(promotion, "time", types.SimpleNamespace(monotonic=time.monotonic,
                                                                 sleep=poll))

    def first() -> None:
        with promotion_lock("m", tracking_uri=uri):
            first_holds.set()
            assert release.wait(30)
            order.append("first done")

    def second() -> None:
        with promotion_lock("m", tracking_uri=uri, timeout_s=30, poll_s=0.01):
            order.append("second in")

    holder = threading.Thread(target=first)
    holder.start()
    assert first_holds.wait(10)
    waiter = threading.Thread(target=second)
    waiter.start()
    assert second_polls.wait(10), "the second promotion never found the lock taken"
    assert order == []  # still waiting while the first holds the lock
    release.set()
    holder.join(30)
    waiter.join(30)
    assert order == ["first done", "second in"]


def test_lock_held_too_long_fails_naming_the_fix(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with promotion_lock("m", tracking_uri=uri):
        with pytest.raises(PromotionError, match=r"another process has been promoting 'm' for "
                                                 r"more than 0 s .*nothing was promoted\. Wait "
                                                 r"for that pipeline run to finish"):
            with promotion_lock("m", tracking_uri=uri, timeout_s=0.2, poll_s=0.05):
                pass
    with promotion_lock("m", tracking_uri=uri, timeout_s=0.2):  # released on exit
        pass


def test_lock_is_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom kdpipe.promotion import promotion_lock\n"
         f"with promotion_lock('m', tracking_uri={uri!r}):\n"
         "    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(PromotionError, match="another process"):
        with promotion_lock("m", tracking_uri=uri, timeout_s=0.2, poll_s=0.05):
            pass
    holder.kill()
    holder.wait(timeout=30)
    with promotion_lock("m", tracking_uri=uri, timeout_s=5, poll_s=0.05):
        pass


# ------------------------------------------------------- stale comparison with production
def _decision(disabled: list[str]) -> GateDecision:
    return GateDecision(passed=True, checks=[], disabled=disabled)


def _evaluation(production_version: str | None) -> EvaluationReport:
    status = "absent" if production_version is None else "evaluated"
    return EvaluationReport(
        split="test", classes=["0", "1"], input_shape=(1, 8, 8), dataset_fingerprint="f",
        models={}, parity_max_abs_diff=0.0,
        production=ProductionComparison(status=status, reason=status, version=production_version))


@pytest.mark.parametrize(("seen", "now", "disabled", "stale"), [
    (None, None, [], False),            # first promotion, nobody promoted meanwhile
    ("3", "3", [], False),              # production unchanged since evaluation
    (None, "4", [], True),              # a concurrent run promoted the first champion
    ("3", "4", [], True),               # a concurrent run replaced production
    ("3", "4", ["min_gain_vs_production"], False),  # the gate does not compare: no claim
])
def test_stale_production_comparison(seen: str | None, now: str | None, disabled: list[str],
                                     stale: bool) -> None:
    reason = stale_comparison(_decision(disabled), _evaluation(seen), now)
    assert (reason is not None) == stale
    if stale:
        assert reason.startswith(f"production moved from version {seen or '(none)'} to {now} ")
        assert reason.endswith(f"re-run to compare against version {now}")
    assert stale_comparison(_decision(disabled), None, now) is None


# --------------------------------------------------------- slow: two real runs at once
def _config(tmp: Path, name: str, split_seed: int) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    raw["model"]["name"] = NAME
    params = raw["parameters"]
    params["data"]["split_seed"] = split_seed  # different data: nothing shared but the stores
    params["teacher"]["train"]["epochs"] = 1
    params["student"]["train"]["epochs"] = 1
    # Both candidates pass the gate, so both try to promote: the race under test.
    params["gate"].update(min_accuracy=0.0, max_drop_vs_teacher=1.0, min_compression=1.0,
                          min_gain_vs_production=-1.0)
    params["tracking"] = {"experiment": NAME, "registered_model": NAME}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _create_stores() -> None:
    """Create the session's ZenML store and MLflow database before the two runs start.

    Two processes that both find no store race to create it (ZenML's migration fails in
    one of them): creating a store is a one-time setup, not what this test is about.
    """
    from mlflow import MlflowClient
    from zenml.client import Client

    Client().active_stack  # noqa: B018 (creates and migrates the store)
    MlflowClient().search_experiments()


@pytest.mark.slow
@pytest.mark.integration
def test_two_runs_at_once_leave_exactly_one_consistent_champion(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from zenml.client import Client

    from kdpipe.promotion import get_champion

    _create_stores()
    names = ("concurrent-a", "concurrent-b")
    procs = [subprocess.Popen(
        [sys.executable, "run_pipeline.py", "--config", str(_config(tmp_path, name, seed)),
         "--run-name", name], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for seed, name in enumerate(names)]
    outputs = [p.communicate(timeout=1200)[0] for p in procs]
    for name, proc, out in zip(names, procs, outputs, strict=True):
        assert "database is locked" not in out, f"{name}:\n{out[-4000:]}"
        assert proc.returncode == 0, f"{name}:\n{out[-4000:]}"

    versions = Client().list_model_versions(model=NAME, size=100).items
    production = [v for v in versions if v.stage is not None and str(v.stage) == "production"]
    assert len(production) == 1, {v.name: v.stage for v in versions}
    champion = get_champion(NAME)
    assert champion is not None
    assert champion.tags["zenml_model_version"] == production[0].name
    assert MlflowClient().get_registered_model(NAME).aliases == {"champion": int(champion.version)}

    results = {name: Client().get_pipeline_run(name).steps["promote_student"]
               .outputs["promotion"][0].load() for name in names}
    promoted = [r for r in results.values() if r.promoted]
    assert promoted, [r.reasons for r in results.values()]
    # Promotions ran one after the other (lock): the champion is the later registration.
    assert champion.version == str(max(int(r.mlflow_version) for r in promoted))
    # A run that did not promote says why: another run promoted while it was evaluated.
    for name, result in results.items():
        tags = {t.name for t in Client().get_model_version(NAME, result.model_version).tags}
        if not result.promoted:
            assert result.reasons[0].startswith("production moved from version"), result.reasons
            assert "superseded" in tags
        else:
            assert "superseded" not in tags, name


@pytest.mark.slow
@pytest.mark.integration
def test_two_runs_on_a_fresh_machine_both_get_past_store_creation(tmp_path: Path) -> None:
    # No ZenML store and no MLflow database yet. --schedule makes both runs stop right
    # after the store is used (the local orchestrator cannot schedule: exit 2), so the
    # race on creating the store is all this test exercises.
    env = {**os.environ, "ZENML_CONFIG_PATH": str(tmp_path / "zenml"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("ZENML_STORE_URL", None)
    runs = [subprocess.Popen([sys.executable, "run_pipeline.py", "--config", "configs/smoke.yaml",
                              "--schedule", "0 2 * * *"], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    for run, out in zip(runs, outputs, strict=True):
        assert run.returncode == 2, out[-3000:]
        assert "alembic" not in out, out[-3000:]
        assert "cannot" in out.lower() and "schedul" in out.lower(), out[-3000:]
