"""examples/byo_project end to end: the project's own teacher class (imported from the
config's folder, never installed), its checkpoint saved with a ``module.`` prefix, a
registered student; ``python run_pipeline.py --config config.yaml`` gates and promotes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdpipe import user_code
from kdpipe.bundle import BundleError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "byo_project"


def _copy_project(tmp_path: Path) -> Path:
    project = tmp_path / "byo_project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    return project


@pytest.mark.slow
@pytest.mark.integration
def test_example_project_distils_its_own_teacher_and_promotes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = _copy_project(tmp_path)
    made = subprocess.run([sys.executable, "make_teacher_checkpoint.py"], cwd=project,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    assert "keys like 'module." in made.stdout
    # The CLI from elsewhere, the project folder as the working directory (as in its README);
    # nothing of the project is installed or on PYTHONPATH.
    run = subprocess.run(
        [sys.executable, str(ROOT / "run_pipeline.py"), "--config", "config.yaml",
         "--run-name", "byo-example"],
        cwd=project, capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "gate: PASSED" in out, out[-3000:]

    from zenml.client import Client

    pipeline_run = Client().get_pipeline_run("byo-example")
    artifact = pipeline_run.steps["finetune_teacher"].outputs["teacher"][0]
    # This process runs no config naming the class: the teacher bundle is refused, unimported.
    with pytest.raises(BundleError, match="'byo_models:DigitNet'.*it was not imported"):
        artifact.load()
    assert "byo_models" not in sys.modules
    monkeypatch.setenv(user_code.CODE_DIRS_ENV, str(project))
    with user_code.trusting(["byo_models:DigitNet"]):
        teacher = artifact.load()
    assert teacher.spec.arch == "byo_models:DigitNet"
    assert teacher.spec.kwargs == {"width": 16}
    student = pipeline_run.steps["prune_student"].outputs["pruned_student"][0].load()
    assert student.spec.arch == "cnn_tiny" and student.spec.layout  # pruned
    promotion = pipeline_run.steps["promote_student"].outputs["promotion"][0].load()
    assert promotion.promoted, promotion.summary()
    assert pipeline_run.model_version.stage == "production"


def test_unresolvable_import_paths_exit_2_before_anything_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_in_process) -> None:
    """The CLI runs from the repository root here: byo_models is found through the config's
    folder only. A missing attribute and a missing module are both named, with the folders."""
    project = _copy_project(tmp_path)
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["parameters"]["teacher"]["model"].update(arch="byo_models:DigitNett", checkpoint=None)
    config["parameters"]["student"]["model"] = {"arch": "byo_student_models:Student"}
    (project / "bad.yaml").write_text(yaml.safe_dump(config))
    for var in (user_code.TRUST_ENV, user_code.CODE_DIRS_ENV):
        monkeypatch.setenv(var, "")  # what the CLI sets in this process is undone afterwards
        monkeypatch.delenv(var)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        code, _out, err = run_in_process("--config", str(project / "bad.yaml"))
    finally:
        sys.modules.pop("byo_models", None)
    assert code == 2, err
    assert "parameters.teacher.model.arch: cannot import 'byo_models:DigitNett': module " \
           "'byo_models'" in err and "has no attribute 'DigitNett'; its callables: DigitNet" in err
    assert "parameters.student.model.arch: cannot import 'byo_student_models:Student': module " \
           "'byo_student_models' not found" in err
    assert str(project.resolve()) in err and str(ROOT) in err  # the folders searched


@pytest.mark.integration
def test_wrong_output_width_on_an_image_folder_fails_before_any_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_in_process) -> None:
    """An image folder's class count is known only once it is read: ingest_data checks the
    user's model against it, so the teacher never trains."""
    import numpy as np
    from PIL import Image

    project = _copy_project(tmp_path)
    (project / "fixed_heads.py").write_text(
        "from byo_models import DigitNet\n\n\ndef ten_way(in_channels):\n"
        "    return DigitNet(10, in_channels, width=4)\n")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "owl"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "photos" / name / f"{i}.png")
    config = yaml.safe_load((project / "config.yaml").read_text())
    params = config["parameters"]
    params["data"] = {"source": f"imagefolder:{tmp_path / 'photos'}", "image_size": 8,
                      "batch_size": 16}
    params["teacher"]["model"] = {"arch": "cnn_tiny"}
    params["student"]["model"] = {"arch": "fixed_heads:ten_way"}
    (project / "folder.yaml").write_text(yaml.safe_dump(config))
    for var in (user_code.TRUST_ENV, user_code.CODE_DIRS_ENV):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        code, _out, err = run_in_process("--config", str(project / "folder.yaml"),
                                         "--run-name", "byo-wrong-width")
    finally:
        for name in ("byo_models", "fixed_heads"):
            sys.modules.pop(name, None)
    assert code == 1, err
    assert "step 'ingest_data' failed" in err
    assert "'fixed_heads:ten_way' returned a DigitNet with 10 outputs (its classifier 'head') " \
           "but the dataset has 3 classes" in err

    from zenml.client import Client

    steps = Client().get_pipeline_run("byo-wrong-width").steps
    assert "finetune_teacher" not in steps or \
        str(steps["finetune_teacher"].status.value) != "completed"
