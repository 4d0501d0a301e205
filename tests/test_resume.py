"""Resume after a crash: stable checkpoint directories, in-step retries, SIGKILL mid-training.

* fast: what keys a step's checkpoint directory (steps/checkpoints.py), its life cycle
  (kept on failure, removed on success, private when another process holds it);
* fast: ``run_with_retries`` around a real ``fit``: a transient failure is retried after
  the policy's wait and resumes from the checkpoint; a permanent one (a refused pickle
  checkpoint, a missing start checkpoint, a diverged loss) fails at once, without waiting;
  the training steps carry no ZenML ``retry=``;
* fast: the test-only kill switch SIGKILLs a training process right after a given epoch;
* fast: ``recipes.prune_student`` interrupted in its second recovery resumes it and ends
  bit-identical to an uninterrupted run;
* slow: ``finetune_teacher`` in a real pipeline retries a transient failure in the same
  process and resumes, and fails a permanent one on the first attempt; a real
  ``run_pipeline.py`` that SIGKILLs itself after the teacher's second epoch and is run
  again resumes from there and produces a teacher bit-identical (CPU, one seed) to an
  uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kdpipe.config import ModelConfig
from kdpipe.train import CHECKPOINT_NAME
from steps import checkpoints
from steps.checkpoints import (
    CHECKPOINT_ROOT_ENV,
    KILL_AFTER_EPOCH_ENV,
    TRAINING_RETRY,
    RetryPolicy,
    checkpoint_key,
    checkpoint_root,
    kill_switch,
    model_identity,
    run_with_retries,
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


# ------------------------------------------------------------ fast: retries inside the step
IDENTITY = {"train": {"epochs": 3, "lr": 0.01}}


def _fit(checkpoint_dir: Path | None, callbacks: list, **train: Any) -> tuple[Any, Any]:
    """A real ``fit`` of a tiny classifier (3 epochs, CPU, fixed seed): (model, result)."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from kdpipe.config import TrainConfig
    from kdpipe.train import ClassificationTask, fit

    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, torch.arange(48) % 3, torch.arange(48)), batch_size=16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    cfg = TrainConfig(**{"epochs": 3, "lr": 0.01, "scheduler": "none", "device": "cpu", **train})
    return model, fit(model, ClassificationTask(), loader, None, cfg,
                      checkpoint_dir=checkpoint_dir, callbacks=callbacks)


@pytest.fixture()
def retry_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The retry warnings of steps.checkpoints (ZenML's loggers may not reach the root)."""
    checkpoints.logger.addHandler(caplog.handler)
    yield caplog
    checkpoints.logger.removeHandler(caplog.handler)


def test_a_transient_failure_is_retried_and_resumes_from_the_checkpoint(
        ckpt_root: Path, retry_log: pytest.LogCaptureFixture) -> None:
    sleeps: list[float] = []
    seen: list[tuple[int, int]] = []  # (attempt, epoch)
    resuming: list[bool] = []

    def attempt() -> tuple[Any, Any]:  # shaped like a training step's body
        number = len(resuming) + 1
        with training_checkpoint("finetune_teacher", IDENTITY) as ckpt:
            resuming.append(ckpt.resuming)

            def callback(epoch: int, row: dict[str, float]) -> None:
                seen.append((number, epoch))
                if number == 1 and epoch == 2:  # after epoch 2's checkpoint is written
                    raise ConnectionResetError(104, "Connection reset by peer")
            return _fit(ckpt.directory, [callback])

    with retry_log.at_level(logging.WARNING):
        model, result = run_with_retries(attempt, step_name="finetune_teacher", sleep=sleeps.append)
    assert sleeps == [10.0]  # TRAINING_RETRY's first wait, not slept here
    assert resuming == [False, True]
    assert seen == [(1, 1), (1, 2), (2, 3)]  # attempt 2 trained epoch 3 only
    assert result.resumed_from_epoch == 2
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert ("finetune_teacher: attempt 1 of 3 failed with a transient error (ConnectionResetError: "
            "[Errno 104] Connection reset by peer); retrying in 10 s from the last checkpoint"
            ) in retry_log.text
    reference, _ = _fit(None, [])  # never interrupted
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert list(ckpt_root.glob(f"finetune_teacher/*/{CHECKPOINT_NAME}")) == []  # removed on success


def _pickled_resume_checkpoint(root: Path, tmp_path: Path) -> None:
    """A ``last.pt`` in the step's stable directory that only full pickle could load."""
    directory = root / "finetune_teacher" / checkpoint_key("finetune_teacher", IDENTITY)
    directory.mkdir(parents=True)
    torch.save({"format": 1, "model": tmp_path}, directory / CHECKPOINT_NAME)  # a Path object


def _missing_start_checkpoint(root: Path, tmp_path: Path) -> None:
    """Nothing to prepare: the attempt asks for a start checkpoint that does not exist."""


@pytest.mark.parametrize(("prepare", "train", "error", "match"), [
    (_pickled_resume_checkpoint, {}, RuntimeError,
     r"cannot read checkpoint .*last\.pt: not a weights-only checkpoint .*delete it"),
    (_missing_start_checkpoint, {}, FileNotFoundError,
     r"model checkpoint not found: .*missing\.safetensors \(set model\.checkpoint"),
    (None, {"max_loss": 1e-6}, RuntimeError, r"training diverged at epoch 1, step 1"),
], ids=["refused-pickle-checkpoint", "missing-start-checkpoint", "diverged-loss"])
def test_a_permanent_failure_fails_at_once_without_waiting(
        ckpt_root: Path, tmp_path: Path, retry_log: pytest.LogCaptureFixture,
        prepare, train: dict[str, Any], error: type[Exception], match: str) -> None:
    from kdpipe.build import load_checkpoint_state_dict

    if prepare is not None:
        prepare(ckpt_root, tmp_path)
    sleeps: list[float] = []
    attempts: list[int] = []

    def attempt() -> None:
        attempts.append(1)
        with training_checkpoint("finetune_teacher", IDENTITY) as ckpt:
            if prepare is _missing_start_checkpoint:
                load_checkpoint_state_dict(tmp_path / "missing.safetensors")
            _fit(ckpt.directory, [], **train)

    with retry_log.at_level(logging.WARNING), pytest.raises(error, match=match):
        run_with_retries(attempt, step_name="finetune_teacher", sleep=sleeps.append)
    assert attempts == [1] and sleeps == []
    assert "transient" not in retry_log.text


def test_a_persisting_transient_failure_gives_up_after_the_last_retry() -> None:
    sleeps: list[float] = []
    attempts: list[int] = []

    def attempt() -> None:
        attempts.append(1)
        raise TimeoutError(f"the store timed out (attempt {len(attempts)})")

    with pytest.raises(TimeoutError, match=r"attempt 3\)"):  # the last attempt's error
        run_with_retries(attempt, step_name="distill_student", sleep=sleeps.append)
    assert len(attempts) == 3 and sleeps == [10.0, 20.0]
    with pytest.raises(TimeoutError, match=r"attempt 4\)"):
        run_with_retries(attempt, step_name="distill_student", sleep=sleeps.append,
                         policy=RetryPolicy(max_retries=0))
    assert len(attempts) == 4 and sleeps == [10.0, 20.0]


def test_training_steps_retry_themselves_not_through_zenml() -> None:
    """ZenML's retry= would retry every error, a missing file or a diverged loss too."""
    from steps.distill_student import distill_student
    from steps.finetune_teacher import finetune_teacher
    from steps.prune_student import prune_student

    assert TRAINING_RETRY == RetryPolicy(max_retries=2, delay_s=10, backoff=2)
    assert [TRAINING_RETRY.wait_s(k) for k in (1, 2)] == [10, 20]
    for step in (finetune_teacher, distill_student, prune_student):
        assert step.configuration.retry is None, step.name


@pytest.mark.slow
@pytest.mark.integration
def test_compiled_pipeline_has_no_zenml_retries() -> None:
    from zenml.client import Client
    from zenml.config.compiler import Compiler
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    from pipelines.distillation import distillation_pipeline

    raw = yaml.safe_load(SMOKE.read_text())
    pipeline = distillation_pipeline.with_options(config_path=str(SMOKE))
    pipeline.prepare()
    snapshot = Compiler().compile(pipeline=pipeline, stack=Client().active_stack,
                                  run_configuration=PipelineRunConfiguration.model_validate(raw))
    for name in (*TRAINING_STEPS, "ingest_data", "export_onnx", "gate_student", "promote_student"):
        assert snapshot.step_configurations[name].config.retry is None, name


# ---------------------------------------------------------------- fast: the kill switch
def test_kill_switch_is_off_unless_set_for_this_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KILL_AFTER_EPOCH_ENV, raising=False)
    assert kill_switch("finetune_teacher") == []
    monkeypatch.setenv(KILL_AFTER_EPOCH_ENV, "distill_student:1")
    assert kill_switch("finetune_teacher") == []
    assert len(kill_switch("distill_student")) == 1
    for bad in ("2", "finetune_teacher:", "finetune_teacher:0", "finetune_teacher:two"):
        monkeypatch.setenv(KILL_AFTER_EPOCH_ENV, bad)
        with pytest.raises(ValueError, match=rf"{KILL_AFTER_EPOCH_ENV}='{bad}': expected "
                                             r"<step name>:<epoch>, e\.g\. finetune_teacher:2"):
            kill_switch("finetune_teacher")


_KILLED_FIT = """
import sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from kdpipe.config import TrainConfig
from kdpipe.train import ClassificationTask, fit
from steps.checkpoints import kill_switch

x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(0))
loader = DataLoader(TensorDataset(x, torch.arange(48) % 3, torch.arange(48)), batch_size=16)
printed = lambda epoch, row: print(f"epoch {epoch} done", flush=True)
fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), ClassificationTask(), loader, None,
    TrainConfig(epochs=4, lr=0.01, scheduler="none", device="cpu"), checkpoint_dir=sys.argv[1],
    callbacks=[printed, *kill_switch("finetune_teacher"), printed])
print("finished", flush=True)
"""


def test_kill_switch_kills_right_after_the_epochs_checkpoint(tmp_path: Path) -> None:
    env = {**os.environ, KILL_AFTER_EPOCH_ENV: "finetune_teacher:2"}
    proc = subprocess.run([sys.executable, "-c", _KILLED_FIT, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # Epoch 2: the callback before the switch ran, the one after it (and epoch 3) never did.
    lines = proc.stdout.splitlines()
    assert [line for line in lines if line.startswith("epoch ")] == [
        "epoch 1 done", "epoch 1 done", "epoch 2 done"]
    assert "finished" not in lines
    assert "KDPIPE_TEST_KILL_AFTER_EPOCH=finetune_teacher:2: killing this process after epoch 2" \
        in proc.stdout
    saved = torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert [row["epoch"] for row in saved["history"]] == [1, 2]

# ------------------------------------------------------- slow: a retry in the same process
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize(("failure", "completed"), [
    (ConnectionResetError(104, "Connection reset by peer"), True),
    (FileNotFoundError("injected: a file the attempt needs is missing"), False),
], ids=["transient", "permanent"])
def test_teacher_step_retries_a_transient_failure_only(
        ckpt_root: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception,
        completed: bool) -> None:
    from zenml import pipeline
    from zenml.client import Client

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
                raise failure
        return callback

    monkeypatch.setattr(tracking, "epoch_logger", failing_once_logger)
    # The step reads its policy at call time: keep the retry count, drop the waits.
    monkeypatch.setattr(checkpoints, "TRAINING_RETRY", RetryPolicy(max_retries=2, delay_s=0))
    teacher_cfg = TeacherConfig(model=ModelConfig(arch="cnn_tiny"),
                                train=TrainConfig(epochs=3, lr=0.01, scheduler="none"))
    config = PipelineConfig(data=DataConfig(source="digits"), teacher=teacher_cfg,
                            tracking=TrackingConfig(experiment="kdpipe-test-retry"))
    uncached = finetune_teacher.with_options(enable_cache=False)

    @pipeline(enable_cache=False)
    def retry_pipeline() -> None:
        dataset = ingest_data(config=config)
        uncached(dataset=dataset, teacher_cfg=teacher_cfg, tracking_cfg=config.tracking)

    if completed:
        retry_pipeline()
    else:
        # The local orchestrator reports the failed step; the step's own error is in its log.
        with pytest.raises(RuntimeError, match=r"failure in step\(s\): finetune_teacher"):
            retry_pipeline()
    run = Client().get_pipeline("retry_pipeline").last_run
    assert str(getattr(run.status, "value", run.status)) == ("completed" if completed else "failed")
    step = run.steps["finetune_teacher"]
    assert str(getattr(step.status, "value", step.status)) == run.status.value
    if not completed:
        # Failed on the first attempt: no retry, and the checkpoint is kept for a re-run.
        assert seen == [(1, 1), (1, 2)] and attempts["n"] == 1
        assert len(list(ckpt_root.glob(f"finetune_teacher/*/{CHECKPOINT_NAME}"))) == 1
        return
    # Attempt 1 finished epochs 1 and 2 (checkpoint written before the callback raised);
    # attempt 2 resumed after epoch 2 and trained epoch 3 only.
    assert seen == [(1, 1), (1, 2), (2, 3)]
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
KILL_AFTER = 2


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
    """Epochs finished in the teacher's one ``last.pt``."""
    paths = list(root.glob(f"finetune_teacher/*/{CHECKPOINT_NAME}"))
    assert len(paths) == 1, paths
    return len(torch.load(paths[0], map_location="cpu", weights_only=True)["history"])


def _run_cli(config: Path, name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "run_pipeline.py", "--config", str(config),
                           "--run-name", name], cwd=ROOT, env=env, text=True, timeout=900,
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
    env = {k: v for k, v in os.environ.items() if k != KILL_AFTER_EPOCH_ENV}
    env[CHECKPOINT_ROOT_ENV] = str(root)
    # The uninterrupted reference: the same recipe the step runs, in a fresh process.
    reference = subprocess.Popen([sys.executable, "-c", _REFERENCE, str(config)], cwd=ROOT,
                                 env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # The kill switch SIGKILLs the run right after the teacher's epoch-2 checkpoint.
    kill = {KILL_AFTER_EPOCH_ENV: f"finetune_teacher:{KILL_AFTER}"}
    killed = _run_cli(config, "resume-killed", {**env, **kill})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert _checkpoint_epoch(root) == KILL_AFTER

    resumed = _run_cli(config, "resume-again", env)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
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
    assert sorted(m.step for m in logged) == list(range(KILL_AFTER + 1, TEACHER_EPOCHS + 1))
    # Bit-identical to the uninterrupted run (CPU, one seed): weights, metrics, curves.
    teacher = step.outputs["teacher"][0].load()
    assert teacher.spec.weights_sha256 == ref["weights_sha256"]
    assert teacher.spec.extra["metrics"] == ref["metrics"]
    assert _without_seconds(teacher.spec.extra["history"]) == _without_seconds(ref["history"])
    # Finished: the checkpoint directory is gone (the lock file stays).
    assert [p.suffix for p in (root / "finetune_teacher").iterdir()] == [".lock"]
