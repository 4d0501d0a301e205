"""Multi-process (DDP) training: kdpipe.ddp (rank side), kdpipe.launch and its worker
(launcher side), the DDP path of kdpipe.train.fit and the recipes' torchrun launch (2 gloo
processes on the CPU)."""

from __future__ import annotations

import tempfile
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from kdpipe import ddp, launch, recipes
from kdpipe._worker import KILL_AT_ENV, parse_kill_at
from kdpipe.bundle import load_bundle, save_bundle
from kdpipe.config import (
    DataConfig,
    DistillConfig,
    ModelConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from kdpipe.data import build_dataset_spec, make_loader
from kdpipe.ddp import (
    DistributedConfigError,
    ShardSampler,
    check_launch,
    distribute_loader,
    shard_loader,
)
from kdpipe.launch import DistributedTrainingError, JobDir
from kdpipe.runtime import epoch_seed
from kdpipe.train import evaluate

# Global batch 64 → 32 per process; digits: 1,257 train / 180 val / 360 test samples.
DATA = DataConfig(source="digits", batch_size=64, eval_batch_size=256)
STUDENT_EPOCHS = 8
DISTILL = DistillConfig(kd_weight=0.5, temperature=4.0)
# Accuracy tolerance DDP vs single process, in points of test accuracy (360 test samples:
# one sample = 0.28 points). Both runs take the same optimiser steps on the same global
# batch from the same initial weights; what differs is the shuffling permutation
# (DistributedSampler vs RandomSampler), the dropout draws and BatchNorm statistics over 32
# instead of 64 samples per step (no SyncBatchNorm on the CPU) -- seed-level noise. Measured
# here with seeds 0, 1, 2: one process 93.3 / 93.1 / 93.9 %, two processes 95.0 / 91.4 / 96.7 %,
# i.e. |difference| 1.7 / 1.7 / 2.8 points. The test uses seed 0 and is deterministic on a
# given CPU (a resumed run repeats the weights bit for bit); 3 points covers the measured
# seed-to-seed noise, while a student that did not learn (< 80 %) fails outright.
ACCURACY_TOLERANCE = 0.03


def student_cfg(num_processes: int, seed: int = 0) -> StudentConfig:
    return StudentConfig(
        model=ModelConfig(arch="cnn_tiny", kwargs={"width": 4}),
        train=TrainConfig(epochs=STUDENT_EPOCHS, lr=0.01, device="cpu", seed=seed,
                          num_processes=num_processes, ddp_timeout_s=60, ddp_wall_clock_s=300))


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-process runs here use one intra-op thread, like each DDP worker (cores / 2):
    on a shared 2-core machine two OpenMP threads on these tiny models ran 30x slower
    (40 s vs 1 s for two epochs), with identical results."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset():
    return build_dataset_spec(DATA)


@pytest.fixture(scope="module")
def teacher(dataset):
    return recipes.train_teacher(dataset, TeacherConfig(
        model=ModelConfig(arch="cnn_tiny"), train=TrainConfig(epochs=3, lr=0.01, device="cpu")))


@pytest.fixture(scope="module")
def ddp_run(dataset, teacher, tmp_path_factory):
    """One uninterrupted 2-process distillation, with checkpoints (compared by several tests)."""
    ckpt = tmp_path_factory.mktemp("ddp-ckpt")
    epochs: list[int] = []
    start = time.monotonic()
    bundle = recipes.distill_student(dataset, teacher, student_cfg(2), DISTILL,
                                     callbacks=[lambda e, m: epochs.append(e)], checkpoint_dir=ckpt)
    return bundle, epochs, time.monotonic() - start


# ------------------------------------------------------------------ bad input, no launch
@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_auto_device_without_gpu_asks_for_explicit_cpu_fallback(no_gpu) -> None:
    with pytest.raises(DistributedConfigError,
                       match=r"num_processes=2 with device: auto, but there is no GPU.*"
                             r"train\.device: cpu to run 2 gloo processes on the CPU"):
        check_launch(TrainConfig(num_processes=2), batch_size=64)


def test_more_processes_than_cuda_devices_names_both_numbers(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in ("cuda", "auto"):
        with pytest.raises(DistributedConfigError,
                           match=r"num_processes=3 needs 3 CUDA devices .* but 1 is visible.*"
                                 r"at most 1.*device: cpu"):
            check_launch(TrainConfig(num_processes=3, device=device), batch_size=60)


def test_cuda_device_on_a_machine_without_cuda_is_refused(no_gpu) -> None:
    with pytest.raises(DistributedConfigError, match=r"needs 2 CUDA devices .* but 0 are visible"):
        check_launch(TrainConfig(num_processes=2, device="cuda"), batch_size=64)


def test_cpu_gloo_fallback_is_allowed_and_cuda_picks_nccl(no_gpu, monkeypatch) -> None:
    assert check_launch(TrainConfig(num_processes=2, device="cpu"), batch_size=64) == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_launch(TrainConfig(num_processes=2, device="auto"), batch_size=64) == "nccl"


@pytest.mark.parametrize("cfg, batch, match", [
    (TrainConfig(num_processes=2, device="cpu", sync_batchnorm=True), 64,
     r"sync_batchnorm: true needs CUDA.*set sync_batchnorm: false"),
    (TrainConfig(num_processes=2, device="cpu"), 65,
     r"batch_size=65 is not divisible by train.num_processes=2.*multiple of 2 \(e\.g\. 64\)"),
    (TrainConfig(num_processes=2, device="mps"), 64, r"device: mps.*set train.device: cuda or cpu"),
])
def test_other_bad_multi_process_configs(no_gpu, cfg, batch, match) -> None:
    with pytest.raises(DistributedConfigError, match=match):
        check_launch(cfg, batch_size=batch)


def test_recipe_fails_before_launching(no_gpu, dataset, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = TeacherConfig(model=ModelConfig(arch="cnn_tiny"), train=TrainConfig(epochs=1, num_processes=2))
    with pytest.raises(DistributedConfigError, match="device: cpu to run 2 gloo processes"):
        recipes.train_teacher(dataset, cfg)
    assert not list(tmp_path.glob("kdpipe-ddp-*")), "nothing may be launched"


# --------------------------------------------------------------------- unit: samplers
def _epoch_order(loader: DataLoader, epoch: int) -> list[int]:
    loader.sampler.set_epoch(epoch)
    return [int(i) for _, _, index in loader for i in index]


def test_distributed_sampler_is_seeded_per_epoch_and_splits_the_global_batch(dataset) -> None:
    base = make_loader(dataset, "train", train=True, seed=0)
    ranks = [distribute_loader(base, process_rank=r, num_processes=2, seed=7) for r in (0, 1)]
    assert all(isinstance(r.sampler, DistributedSampler) for r in ranks)
    assert [r.batch_size for r in ranks] == [32, 32]  # global batch 64 split over 2
    first = [_epoch_order(r, 1) for r in ranks]
    # Together the ranks see every sample; DistributedSampler pads 1,257 to 1,258 (one repeat).
    assert set(first[0]) | set(first[1]) == set(range(1257))
    assert len(first[0]) == len(first[1]) == 629
    assert len(set(first[0]) & set(first[1])) <= 1
    assert _epoch_order(ranks[0], 1) == first[0]  # same seed + epoch → same order
    assert _epoch_order(ranks[0], 2) != first[0]  # a new order every epoch
    again = distribute_loader(base, process_rank=0, num_processes=2, seed=7)
    assert _epoch_order(again, 1) == first[0]  # the order depends on (seed, epoch) only
    other_seed = distribute_loader(base, process_rank=0, num_processes=2, seed=8)
    assert _epoch_order(other_seed, 1) != first[0]


def test_distribute_loader_refuses_an_uneven_global_batch() -> None:
    data = TensorDataset(torch.zeros(10, 1), torch.zeros(10, dtype=torch.long), torch.arange(10))
    with pytest.raises(DistributedConfigError, match=r"batch_size=5 is not divisible .*=2"):
        distribute_loader(DataLoader(data, batch_size=5, shuffle=True), process_rank=0,
                          num_processes=2, seed=0)


def test_shard_sampler_covers_every_sample_once_without_padding() -> None:
    data = TensorDataset(torch.arange(11.0).view(11, 1), torch.zeros(11, dtype=torch.long))
    shards = [shard_loader(DataLoader(data, batch_size=4), process_rank=r, num_processes=3)
              for r in range(3)]
    seen = [int(v) for s in shards for x, _ in s for v in x.flatten()]
    assert sorted(seen) == list(range(11))
    assert [len(s.sampler) for s in shards] == [4, 4, 3]
    assert isinstance(shards[0].sampler, ShardSampler)
    with pytest.raises(ValueError, match="rank 3 outside 0..2"):
        ShardSampler(11, 3, 3)


def test_reductions_are_identity_without_a_process_group() -> None:
    values = torch.tensor([1.5, 2.0], dtype=torch.float64)
    assert torch.equal(ddp.all_reduce_sum(values), values)
    assert ddp.world_size() == 1 and ddp.rank() == 0
    assert ddp.is_main_process() and not ddp.is_active()


def test_sync_batchnorm_round_trip_keeps_types_and_state() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(3)))
    original = [type(m) for m in model.modules()]
    restore = ddp.sync_batchnorm(model)
    assert isinstance(model[1], nn.SyncBatchNorm) and isinstance(model[2][0], nn.SyncBatchNorm)
    with torch.no_grad():
        model[1].running_mean.fill_(0.25)
        model[1].weight.fill_(3.0)
    restore()
    assert [type(m) for m in model.modules()] == original
    assert torch.allclose(model[1].running_mean, torch.full((4,), 0.25))
    assert torch.allclose(model[1].weight, torch.full((4,), 3.0))


def test_epoch_seed_keeps_the_single_process_stream_and_separates_ranks_and_streams() -> None:
    # Recorded: rank 0's data stream is what a single process always drew (seed * 1_000_003
    # + epoch); other ranks are 7,919 apart; the global stream sits 2**40 above the data one.
    assert epoch_seed(3, 1) == 3_000_010
    assert epoch_seed(3, 2, 1) == 3_000_011 + 7_919
    assert epoch_seed(3, 2, 1, stream="global") == 3_000_011 + 7_919 + 2**40
    seeds = {epoch_seed(0, e, r, stream=s) for e in range(1, 51) for r in range(8)
             for s in ("data", "global")}
    assert len(seeds) == 50 * 8 * 2  # no (epoch, rank, stream) shares a seed
    assert 0 <= epoch_seed(2**62, 5, 3, stream="global") < 2**63
    with pytest.raises(ValueError, match="unknown seed stream 'dropout'; valid: data, global"):
        epoch_seed(0, 1, stream="dropout")  # type: ignore[arg-type]


def test_fault_switch_parses_rank_and_epoch_and_refuses_anything_else() -> None:
    assert parse_kill_at("rank=1,epoch=2", world=2) == (1, 2)
    assert parse_kill_at(" rank = 0 , epoch = 7 ", world=2) == (0, 7)
    with pytest.raises(ValueError, match=r"expected 'rank=R,epoch=E'.*unset it outside tests"):
        parse_kill_at("1:2", world=2)
    with pytest.raises(ValueError, match=r"rank 2 does not exist in a run of 2 processes; use a rank in 0..1"):
        parse_kill_at("rank=2,epoch=1", world=2)


# Blocks of torchrun 2.14's failure summary, recorded after SIGKILL-ing rank 1: rank 0,
# blocked in an all-reduce, fails too (its peer is gone).
PEER_FAILURE = """\
  time      : 2026-11-28_04:09:25
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 2764)
  error_file: <N/A>
  traceback : Traceback (most recent call last):
    RuntimeError: [pair.cc:545] Read error [127.0.0.1]:53432: Connection reset by peer."""
KILLED = """\
  time      : 2026-11-28_04:09:25
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 2765)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 2765"""


def torchrun_summary(other: str, root_cause: str) -> str:
    return (f"Failures:\n[1]:\n{other}\n{'-' * 60}\n"
            f"Root Cause (first observed failure):\n[0]:\n{root_cause}\n{'=' * 60}\n")


def test_failure_summary_names_the_rank_that_died_not_its_peer() -> None:
    failures = launch._parse_failures(torchrun_summary(PEER_FAILURE, KILLED))
    assert [(f.rank, f.exitcode) for f in failures] == [(1, -9), (0, 1)]  # root cause first
    assert failures[0].cause == "killed by SIGKILL (exit code -9)"
    assert not failures[0].secondary and failures[1].secondary
    # torchrun may observe the peer's failure first: the dead rank is still the one blamed.
    swapped = launch._parse_failures(torchrun_summary(KILLED, PEER_FAILURE))
    assert [f.rank for f in swapped] == [0, 1]
    first = next(f for f in swapped if not f.secondary)
    assert (first.rank, first.exitcode) == (1, -9)


def test_worker_exception_is_reported_from_its_error_file(tmp_path) -> None:
    from types import SimpleNamespace

    error_file = tmp_path / "error.json"
    error_file.write_text('{"message": {"message": "ValueError: bad batch in rank 1", '
                          '"extraInfo": {"py_callstack": "...", "timestamp": "0"}}}')
    block = KILLED.replace("-9 (pid: 2765)  (SIGKILL)", "1 (pid: 2765)").replace(
        "<N/A>", str(error_file)).replace("Signal 9 (SIGKILL) received by PID 2765",
                                          "Traceback ...\n    ValueError: bad batch in rank 1")
    (tmp_path / "torchrun.log").write_text("worker output\n" + torchrun_summary(PEER_FAILURE, block))
    job = SimpleNamespace(desc="student", train=TrainConfig(num_processes=2, device="cpu"))
    err = launch._failure(job, JobDir(tmp_path), 1)
    assert isinstance(err, DistributedTrainingError)
    assert (err.rank, err.cause) == (1, "ValueError: bad batch in rank 1")
    assert str(err).startswith("student: DDP worker rank 1 of 2 failed: ValueError: bad batch in "
                               "rank 1 (then rank 0: exit code 1: RuntimeError: [pair.cc:545]")
    (tmp_path / "torchrun.log").write_text("ImportError: no module named kdpipe\n")
    err = launch._failure(job, JobDir(tmp_path), 1)
    assert err.rank is None and "torchrun exit code 1" in str(err) and "ImportError" in str(err)


# -------------------------------------------------------------- real 2-process gloo runs
@pytest.mark.slow
def test_two_gloo_processes_match_single_process_accuracy(dataset, teacher, ddp_run, tmp_path) -> None:
    bundle, epochs, seconds = ddp_run
    assert epochs == list(range(1, STUDENT_EPOCHS + 1))  # callbacks got every epoch, in order
    single = recipes.distill_student(dataset, teacher, student_cfg(1), DISTILL)
    ddp_acc = bundle.spec.extra["metrics"]["test_accuracy"]
    single_acc = single.spec.extra["metrics"]["test_accuracy"]
    print(f"test accuracy: 2 processes {ddp_acc:.4f} ({seconds:.1f} s), 1 process {single_acc:.4f}")
    assert ddp_acc > 0.8, "the 2-process student did not learn"
    assert abs(ddp_acc - single_acc) <= ACCURACY_TOLERANCE
    # Same optimiser steps per epoch as one process (global batch 64 = 2 x 32).
    assert len(bundle.spec.extra["history"]) == len(single.spec.extra["history"]) == STUDENT_EPOCHS
    # Validation was reduced across ranks without double counting: the history's best
    # val accuracy / loss is exactly what one process measures on the returned weights.
    history = bundle.spec.extra["history"]
    best = history[bundle.spec.extra["best_epoch"] - 1]
    val = evaluate(bundle.model, make_loader(dataset, "val", train=False))
    assert best["val_accuracy"] == pytest.approx(val.accuracy, abs=1e-9)
    assert best["val_loss"] == pytest.approx(val.loss, rel=1e-5)
    # The result is a normal bundle: it saves, loads and reproduces its outputs.
    loaded = load_bundle(save_bundle(bundle, tmp_path / "student"))
    x = torch.randn(5, *dataset.input_shape)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), bundle.model.eval()(x))


@pytest.mark.slow
def test_killed_worker_fails_with_its_rank_then_resume_repeats_the_run(
        dataset, teacher, ddp_run, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # job directories land here
    ckpt = tmp_path / "ckpt"
    # The worker's test-only fault switch: rank 1 SIGKILLs itself once every rank has
    # finished epoch 2 (rank 0's checkpoint and epoch row written): a fixed death point.
    monkeypatch.setenv(KILL_AT_ENV, "rank=1,epoch=2")
    seen: list[int] = []
    start = time.monotonic()
    with pytest.raises(DistributedTrainingError,
                       match=r"student: DDP worker rank 1 of 2 failed: killed by SIGKILL") as err:
        recipes.distill_student(dataset, teacher, student_cfg(2), DISTILL,
                                callbacks=[lambda e, m: seen.append(e)], checkpoint_dir=ckpt)
    elapsed = time.monotonic() - start
    print(f"killed rank 1 → DistributedTrainingError after {elapsed:.1f} s (launch included)")
    assert seen == [1, 2], "the parent forwards every epoch rank 0 finished before the kill"
    assert err.value.rank == 1 and "SIGKILL" in err.value.cause
    assert elapsed < 120, f"the failure took {elapsed:.0f} s to surface"
    assert (err.value.job_dir / "torchrun.log").is_file()  # kept for debugging
    assert JobDir(err.value.job_dir).pid_file(1).is_file()

    # The checkpoint rank 0 wrote after epoch 2 resumes on both ranks and repeats the
    # uninterrupted run.
    monkeypatch.delenv(KILL_AT_ENV)
    resumed_epochs: list[int] = []
    bundle = recipes.distill_student(dataset, teacher, student_cfg(2), DISTILL,
                                     callbacks=[lambda e, m: resumed_epochs.append(e)],
                                     checkpoint_dir=ckpt)
    assert resumed_epochs == list(range(3, STUDENT_EPOCHS + 1))
    reference = without_time(ddp_run[0].spec.extra["history"])
    resumed = without_time(bundle.spec.extra["history"])
    assert len(resumed) == len(reference)
    for got, want in zip(resumed, reference, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (got["epoch"], key)
    assert bundle.spec.weights_sha256 == ddp_run[0].spec.weights_sha256


@pytest.mark.slow
def test_bad_fault_switch_fails_the_run_with_the_workers_message(dataset, teacher, tmp_path,
                                                                  monkeypatch) -> None:
    """The worker's own exception (read from torchrun's error file) reaches the caller."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv(KILL_AT_ENV, "rank=5,epoch=1")
    with pytest.raises(DistributedTrainingError,
                       match=r"student: DDP worker rank \d of 2 failed: .*rank 5 does not exist"):
        recipes.distill_student(dataset, teacher, student_cfg(2), DISTILL)
