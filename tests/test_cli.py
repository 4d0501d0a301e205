"""run_pipeline.py: configuration errors exit with 2 and name the key, before any step runs.

Most cases call ``run_pipeline.main`` in this process (the CLI's own code, without paying
for a fresh interpreter each time); the cases that must see a real exit code, a clean
environment or a real pipeline run start ``python run_pipeline.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> Callable[..., Result]:
    """``main(args)`` in-process from the repository root, with its exit code and output."""
    monkeypatch.chdir(ROOT)

    def run(*args: str) -> Result:
        try:
            code = run_pipeline.main(list(args))
        except SystemExit as exit_:  # argparse exits on a malformed command line
            code = int(exit_.code or 0)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # The environment (isolated ZenML store and MLflow DB from conftest) is inherited.
    return subprocess.run([sys.executable, "run_pipeline.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


def write_config(tmp_path: Path, mutate) -> Path:  # noqa: ANN001 - a small test helper
    data = yaml.safe_load(SMOKE.read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_value_exits_2_naming_the_key(tmp_path: Path, cli: Callable[..., Result]) -> None:
    path = write_config(tmp_path, lambda d: d["parameters"]["student"]["train"].update(lr=-1))
    result = cli("--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "parameters.student.train.lr" in result.stderr
    assert "greater than 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_exits_2_naming_the_key(tmp_path: Path, cli: Callable[..., Result]) -> None:
    path = write_config(tmp_path, lambda d: d["parameters"]["distill"].update(temprature=2.0))
    result = cli("--config", str(path))
    assert result.returncode == 2
    assert "parameters.distill.temprature: unknown key" in result.stderr


def test_unknown_model_exits_2_listing_valid_names(tmp_path: Path, cli: Callable[..., Result]) -> None:
    path = write_config(tmp_path, lambda d: d["parameters"]["student"]["model"].update(arch="cnn_smal"))
    result = cli("--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "parameters.student.model.arch: unknown model 'cnn_smal'" in result.stderr
    assert "cnn_small" in result.stderr and "resnet20" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path, cli: Callable[..., Result]) -> None:
    result = cli("--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "config file not found" in result.stderr and "nope.yaml" in result.stderr


def test_top_level_enable_cache_is_refused(tmp_path: Path, cli: Callable[..., Result]) -> None:
    path = write_config(tmp_path, lambda d: d.update(enable_cache=False))
    result = cli("--config", str(path))
    assert result.returncode == 2
    assert "steps.<name>.enable_cache" in result.stderr


def test_unknown_top_level_key_is_refused(tmp_path: Path, cli: Callable[..., Result]) -> None:
    path = write_config(tmp_path, lambda d: d.update(paramters={}))
    result = cli("--config", str(path))
    assert result.returncode == 2
    assert "unknown top-level key(s) paramters" in result.stderr


def test_unknown_pipeline_is_an_argument_error(cli: Callable[..., Result]) -> None:
    result = cli("--pipeline", "train")
    assert result.returncode == 2
    assert "invalid choice: 'train'" in result.stderr


@pytest.mark.slow
def test_schedule_on_the_local_orchestrator_exits_2(cli: Callable[..., Result]) -> None:
    result = cli("--config", str(SMOKE), "--schedule", "0 2 * * *")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "schedul" in result.stderr.lower()
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_malformed_cron_exits_2(cli: Callable[..., Result]) -> None:
    result = cli("--config", str(SMOKE), "--schedule", "61 2 * * *")
    assert result.returncode == 2
    assert "minute" in result.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_failing_step_is_named_without_a_traceback_wall(tmp_path: Path) -> None:
    # The folder exists (pre-flight passes), but its class folder holds no images: the
    # problem is found only when ingest_data reads the data.
    missing = tmp_path / "photos" / "cats"
    missing.mkdir(parents=True)
    path = write_config(tmp_path, lambda d: d["parameters"]["data"].update(
        source=f"imagefolder:{missing.parent}", image_size=8))
    result = run_cli("--config", str(path), "--run-name", "kd-cli-failing-step")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "ERROR: step 'ingest_data' failed:" in result.stderr
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    debug = run_cli("--config", str(path), "--run-name", "kd-cli-failing-step-debug", "--debug")
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "build_dataset_spec" in debug.stderr


def test_three_mistakes_exit_2_together_before_anything_is_created(tmp_path: Path) -> None:
    """An unknown student option, a misspelt feature layer and an unknown importance: one
    run of the CLI names all three, exits 2, and leaves no ZenML store or MLflow database."""
    def mistakes(d: dict) -> None:
        p = d["parameters"]
        p["student"]["model"].update(arch="cnn_small", kwargs={"widht": 8})
        p["distill"].update(feature_loss="attention", student_layer="features.stage9",
                            teacher_layer="features.stage3")
        p["prune"].update(importance="l3")

    path = write_config(tmp_path, mistakes)
    env = dict(os.environ, ZENML_CONFIG_PATH=str(tmp_path / "zenml-config"),
               ZENML_LOCAL_STORES_PATH=str(tmp_path / "zenml-stores"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = run_cli("--config", str(path), env=env)
    assert result.returncode == 2, result.stderr
    assert "(3 problems)" in result.stderr
    assert "parameters.student.model.kwargs.widht: 'cnn_small' takes no option 'widht'" \
        in result.stderr
    assert "parameters.distill.student_layer: no module 'features.stage9'" in result.stderr
    assert "features.stage3" in result.stderr  # the nearby paths are suggested
    assert "parameters.prune.importance: unknown pruning importance 'l3'" in result.stderr
    assert "Traceback" not in result.stderr
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["bad.yaml"], f"validation created {left}"
