"""Resume after a crash: stable checkpoint directories, step retries, SIGKILL mid-training.

* fast: what keys a step's checkpoint directory (steps/checkpoints.py), its life cycle
  (kept on failure, removed on success, private when another process holds it), and the
  retry settings the training steps carry;
* fast: ``recipes.prune_student`` interrupted in its second recovery resumes it and ends
  bit-identical to an uninterrupted run;
* slow: a retried ``finetune_teacher`` resumes from its checkpoint in the same process;
  a real ``run_pipeline.py`` killed with SIGKILL during the teacher's training and run
  again resumes from the last finished epoch and produces a teacher bit-identical (CPU,
  one seed) to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kdpipe.config import ModelConfig
from kdpipe.train import CHECKPOINT_NAME
from steps.checkpoints import (
    CHECKPOINT_ROOT_ENV,
    TRAINING_RETRY,
    checkpoint_key,
    checkpoint_root,
    model_identity,
    training_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
TRAINING_STEPS = ("finetune_teacher", "distill_student", "prune_student")


@pytest.fixture()
def ckpt_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "checkpoints"
    monkeypatch.setenv(CHECKPOINT_ROOT_ENV, str(root))
    return root


# ------------------------------------------------------------------ fast: the directory
def test_checkpoint_key_changes_with_every_input_and_only_then() -> None:
    base = {"dataset": {"fingerprint": "aa", "batch_size": 64}, "train": {"lr": 0.01}}
    key = checkpoint_key("finetune_teacher", base)
    assert key == checkpoint_key("finetune_teacher", json.loads(json.dumps(base)))
    assert len(key) == 64
    changed = [
        checkpoint_key("distill_student", base),
        checkpoint_key("finetune_teacher", {**base, "dataset": {"fingerprint": "ab", "batch_size": 64}}),
        checkpoint_key("finetune_teacher", {**base, "train": {"lr": 0.02}}),
        checkpoint_key("finetune_teacher", {**base, "teacher_weights": "ff"}),
    ]
    assert len({key, *changed}) == 5


def test_start_checkpoint_is_keyed_by_content_not_path(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    for d, payload in ((a, b"w1"), (b, b"w1"), (c, b"w2")):
        d.mkdir()
        (d / "weights.safetensors").write_bytes(payload)
    ident = {p: model_identity(ModelConfig(arch="cnn_tiny", checkpoint=str(p))) for p in (a, b, c)}
    assert ident[a] == ident[b]  # a warm start copied to a fresh temp dir keeps its key
    assert ident[a] != ident[c]
    assert ident[a]["checkpoint"].startswith("sha256:")
    assert model_identity(ModelConfig(arch="cnn_tiny"))["checkpoint"] is None


def test_root_defaults_to_the_zenml_local_stores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHECKPOINT_ROOT_ENV, raising=False)
    assert checkpoint_root() == Path(os.environ["ZENML_LOCAL_STORES_PATH"]) / "kdpipe-checkpoints"
    monkeypatch.setenv(CHECKPOINT_ROOT_ENV, "/somewhere/else")
    assert checkpoint_root() == Path("/somewhere/else")


def test_directory_is_kept_on_failure_and_removed_on_success(ckpt_root: Path) -> None:
    identity = {"train": {"epochs": 3}}
    with pytest.raises(RuntimeError, match="killed in epoch 2"):
        with training_checkpoint("finetune_teacher", identity) as ckpt:
            assert ckpt.resuming is False and ckpt.shared is True
            assert ckpt.directory.parent == ckpt_root / "finetune_teacher"
            ckpt.directory.mkdir(parents=True)
            (ckpt.directory / CHECKPOINT_NAME).write_bytes(b"epoch 1")
            raise RuntimeError("killed in epoch 2")
    with training_checkpoint("finetune_teacher", identity) as again:
        assert again.directory == ckpt.directory
        assert again.resuming is True
        assert again.metadata() == {"checkpoint_dir": str(ckpt.directory),
                                    "resumed_from_checkpoint": True}
    assert not ckpt.directory.exists()


def test_a_recovery_checkpoint_below_the_directory_counts_as_resuming(ckpt_root: Path) -> None:
    identity = {"prune": {"iterative_steps": 2}}
    with pytest.raises(RuntimeError, match="killed"):
        with training_checkpoint("prune_student", identity) as ckpt:
            (ckpt.directory / "step2").mkdir(parents=True)
            (ckpt.directory / "step2" / CHECKPOINT_NAME).write_bytes(b"epoch 1")
            raise RuntimeError("killed in recovery 2")
    with training_checkpoint("prune_student", identity) as again:
        assert again.resuming is True
    with training_checkpoint("prune_student", identity) as fresh:  # removed on success
        assert fresh.resuming is False


def test_a_concurrent_holder_gets_a_private_directory(ckpt_root: Path) -> None:
    identity = {"train": {"epochs": 3}}
    with training_checkpoint("distill_student", identity) as first:
        # flock conflicts between two open files even within one process.
        with training_checkpoint("distill_student", identity) as second:
            assert first.shared is True and second.shared is False
            assert second.directory != first.directory
            assert second.directory.name == f"{first.directory.name}-pid{os.getpid()}"


# --------------------------------------------------------------------- retry settings
def test_training_steps_are_retried_with_backoff() -> None:
    from steps.distill_student import distill_student
    from steps.finetune_teacher import finetune_teacher
    from steps.prune_student import prune_student

    assert (TRAINING_RETRY.max_retries, TRAINING_RETRY.delay, TRAINING_RETRY.backoff) == (2, 10, 2)
    for step in (finetune_teacher, distill_student, prune_student):
        assert step.configuration.retry == TRAINING_RETRY, step.name


@pytest.mark.slow
@pytest.mark.integration
def test_compiled_pipeline_carries_the_retry_settings(tmp_path: Path) -> None:
    from zenml.client import Client
    from zenml.config.compiler import Compiler
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    from pipelines.distillation import distillation_pipeline

    raw = yaml.safe_load(SMOKE.read_text())
    # A YAML override of one step wins over the decorator's default, the others keep it.
    raw["steps"] = {"prune_student": {"retry": {"max_retries": 5, "delay": 1, "backoff": 3}}}
    path = tmp_path / "retry.yaml"
    path.write_text(yaml.safe_dump(raw))
    pipeline = distillation_pipeline.with_options(config_path=str(path))
    pipeline.prepare()
    snapshot = Compiler().compile(pipeline=pipeline, stack=Client().active_stack,
                                  run_configuration=PipelineRunConfiguration.model_validate(raw))
    retries = {name: snapshot.step_configurations[name].config.retry for name in TRAINING_STEPS}
    assert retries["finetune_teacher"] == TRAINING_RETRY
    assert retries["distill_student"] == TRAINING_RETRY
    assert (retries["prune_student"].max_retries, retries["prune_student"].delay,
            retries["prune_student"].backoff) == (5, 1, 3)
    for name in ("ingest_data", "export_onnx", "gate_student", "promote_student"):
        assert snapshot.step_configurations[name].config.retry is None, name


# ------------------------------------------------------- slow: a retry in the same process
@pytest.mark.slow
@pytest.mark.integration
def test_retried_teacher_step_resumes_from_its_checkpoint(
        ckpt_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zenml import pipeline
    from zenml.client import Client
    from zenml.config.retry_config import StepRetryConfig

    from kdpipe import tracking
    from kdpipe.config import (
        DataConfig,
        PipelineConfig,
        TeacherConfig,
        TrackingConfig,
        TrainConfig,
    )
    from steps.finetune_teacher import finetune_teacher
    from steps.ingest_data import ingest_data

    seen: list[tuple[int, int]] = []  # (attempt, epoch) of every epoch the callback saw
    attempts = {"n": 0}

    def failing_once_logger(prefix: str):  # stands in for tracking.epoch_logger
        attempts["n"] += 1
        attempt = attempts["n"]

        def callback(epoch: int, metrics: dict[str, float]) -> None:
            seen.append((attempt, epoch))
            if attempt == 1 and epoch == 2:
                raise RuntimeError("injected failure after epoch 2")
        return callback

    monkeypatch.setattr(tracking, "epoch_logger", failing_once_logger)
    teacher_cfg = TeacherConfig(model=ModelConfig(arch="cnn_tiny"),
                                train=TrainConfig(epochs=3, lr=0.01, scheduler="none"))
    config = PipelineConfig(data=DataConfig(source="digits"), teacher=teacher_cfg,
                            tracking=TrackingConfig(experiment="kdpipe-test-retry"))
    retried = finetune_teacher.with_options(retry=StepRetryConfig(max_retries=1, delay=0),
                                            enable_cache=False)

    @pipeline(enable_cache=False)
    def retry_pipeline() -> None:
        dataset = ingest_data(config=config)
        retried(dataset=dataset, teacher_cfg=teacher_cfg, tracking_cfg=config.tracking)

    retry_pipeline()
    run = Client().get_pipeline("retry_pipeline").last_run
    assert str(getattr(run.status, "value", run.status)) == "completed"
    # Attempt 1 finished epochs 1 and 2 (checkpoint written before the callback raised);
    # attempt 2 resumed after epoch 2 and trained epoch 3 only.
    assert seen == [(1, 1), (1, 2), (2, 3)]
    step = run.steps["finetune_teacher"]
    teacher = step.outputs["teacher"][0].load()
    assert [row["epoch"] for row in teacher.spec.extra["history"]] == [1, 2, 3]
    assert step.run_metadata["resumed_from_checkpoint"] is True
    # Finished: the checkpoint directory is gone (the lock file stays).
    assert [p.suffix for p in (ckpt_root / "finetune_teacher").iterdir()] == [".lock"]


def test_interrupted_pruning_recovery_resumes_bit_identically(tmp_path: Path) -> None:
    """recipes.prune_student with a checkpoint_dir: a failure in recovery 2 of 2 loses nothing.

    The second call prunes the same channels again, finds recovery 1 complete, resumes
    recovery 2 after its first epoch, and ends with the weights and history of a run that
    was never interrupted.
    """
    from kdpipe.bundle import Bundle
    from kdpipe.config import DataConfig, DistillConfig, PruneConfig, TrainConfig
    from kdpipe.data import build_dataset_spec
    from kdpipe.models import create_model
    from kdpipe.recipes import prune_student

    spec = build_dataset_spec(DataConfig(source="digits", batch_size=128))

    def bundle(arch: str, seed: int) -> Bundle:
        torch.manual_seed(seed)
        return Bundle.from_model(create_model(arch, 10, spec.input_shape[0]).eval(), arch=arch,
                                 classes=spec.classes, input_shape=spec.input_shape,
                                 mean=spec.mean, std=spec.std)

    student, teacher = bundle("cnn_tiny", 0), bundle("cnn_tiny", 1)
    cfg = PruneConfig(ratio=0.5, iterative_steps=2,
                      recovery=TrainConfig(epochs=2, lr=0.01, scheduler="none", device="cpu", seed=4))
    seen: list[tuple[int, int]] = []

    def failing(epoch: int, row: dict[str, float]) -> None:  # recovery epochs run 1..4
        seen.append((1, epoch))
        if epoch == 3:
            raise RuntimeError("injected failure in recovery 2, epoch 1")

    ckpt = tmp_path / "prune"
    with pytest.raises(RuntimeError, match="injected failure"):
        prune_student(student, teacher, spec, cfg, DistillConfig(), callbacks=[failing], checkpoint_dir=ckpt)
    assert sorted(p.parent.name for p in ckpt.rglob(CHECKPOINT_NAME)) == ["step1", "step2"]
    resumed, _ = prune_student(student, teacher, spec, cfg, DistillConfig(), checkpoint_dir=ckpt,
                               callbacks=[lambda epoch, row: seen.append((2, epoch))])
    assert seen == [(1, 1), (1, 2), (1, 3), (2, 4)]  # attempt 2 trained only the last epoch
    reference, _ = prune_student(student, teacher, spec, cfg, DistillConfig())
    assert resumed.spec.weights_sha256 == reference.spec.weights_sha256

    def history(b: Bundle) -> list[tuple[int, int, float]]:
        return [(r["epoch"], r["prune_step"], r["train_loss"]) for r in b.spec.extra["history"]]
    assert history(resumed) == history(reference)
    assert [e for e, _, _ in history(resumed)] == [1, 2, 3, 4]


# ------------------------------------------------------ slow: SIGKILL of a real pipeline
TEACHER_EPOCHS = 4


def _resume_config(tmp: Path) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    raw["model"]["name"] = "kdpipe-test-resume"
    params = raw["parameters"]
    params["teacher"]["train"]["epochs"] = TEACHER_EPOCHS
    params["student"]["train"]["epochs"] = 1
    params["tracking"] = {"experiment": "kdpipe-test-resume", "registered_model": "kdpipe-test-resume"}
    path = tmp / "resume.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _checkpoint_epoch(root: Path) -> int:
    """Epochs finished in the teacher's last.pt (0 while there is none)."""
    for path in root.glob(f"finetune_teacher/*/{CHECKPOINT_NAME}"):
        try:
            return len(torch.load(path, map_location="cpu", weights_only=True)["history"])
        except (OSError, RuntimeError, EOFError, KeyError):
            return 0  # replaced while being read: ask again
    return 0


def _run_cli(config: Path, name: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "run_pipeline.py", "--config", str(config),
                             "--run-name", name], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


_REFERENCE = """
import json, sys
from kdpipe.configfile import load_config
from kdpipe.data import build_dataset_spec
from kdpipe.recipes import train_teacher
cfg = load_config(sys.argv[1])
bundle = train_teacher(build_dataset_spec(cfg.data), cfg.teacher)
print(json.dumps({"weights_sha256": bundle.spec.weights_sha256, "metrics": bundle.spec.extra["metrics"],
                  "history": bundle.spec.extra["history"]}))
"""


def _without_seconds(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_killed_mid_training_resumes_bit_identically(tmp_path: Path) -> None:
    import mlflow
    from zenml.client import Client

    from kdpipe import tracking

    config = _resume_config(tmp_path)
    root = tmp_path / "checkpoints"
    env = {**os.environ, CHECKPOINT_ROOT_ENV: str(root)}
    # The uninterrupted reference: the same recipe the step runs, in a fresh process.
    reference = subprocess.Popen([sys.executable, "-c", _REFERENCE, str(config)], cwd=ROOT,
                                 env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    killed = _run_cli(config, "resume-killed", env)
    deadline = time.monotonic() + 300
    while (epoch := _checkpoint_epoch(root)) < 1:
        assert killed.poll() is None, f"run ended before a checkpoint was seen:\n{killed.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    epoch = _checkpoint_epoch(root)  # may have advanced between the poll and the kill
    assert 1 <= epoch < TEACHER_EPOCHS, "the kill must land mid-training"

    resumed = _run_cli(config, "resume-again", env)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-4000:]
    ref_out, ref_err = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_err[-3000:]
    ref = json.loads(ref_out.strip().splitlines()[-1])

    run = Client().get_pipeline_run("resume-again")
    step = run.steps["finetune_teacher"]
    assert step.run_metadata["resumed_from_checkpoint"] is True
    # MLflow got only the epochs trained after the resume: the run continued, not restarted.
    experiment = mlflow.MlflowClient().get_experiment_by_name("kdpipe-test-resume")
    run_id = tracking.find_run(experiment.experiment_id, str(run.id))
    logged = mlflow.MlflowClient().get_metric_history(run_id, "teacher/train_loss")
    assert sorted(m.step for m in logged) == list(range(epoch + 1, TEACHER_EPOCHS + 1))
    # Bit-identical to the uninterrupted run (CPU, one seed): weights, metrics, curves.
    teacher = step.outputs["teacher"][0].load()
    assert teacher.spec.weights_sha256 == ref["weights_sha256"]
    assert teacher.spec.extra["metrics"] == ref["metrics"]
    assert _without_seconds(teacher.spec.extra["history"]) == _without_seconds(ref["history"])
    # Finished: the checkpoint directory is gone (the lock file stays).
    assert [p.suffix for p in (root / "finetune_teacher").iterdir()] == [".lock"]
