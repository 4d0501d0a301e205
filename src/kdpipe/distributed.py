"""Multi-process (DDP) training: launching torchrun workers, and what runs inside them.

Design: a training recipe stays one process (a ZenML step, a notebook). When its
``TrainConfig.num_processes`` is above 1 it writes a *job directory* — the dataset spec,
the train / distill configs (JSON), the initial model and the teacher as kdpipe bundles
(safetensors; no pickle) — and runs::

    python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node N \\
        --max-restarts 0 --log-dir JOBDIR/logs -m kdpipe.distributed JOBDIR

Every worker (:func:`main`) writes its pid, joins the process group (nccl on CUDA, gloo on
the CPU, with ``ddp_timeout_s``), pins its GPU by ``LOCAL_RANK``, and runs the same
in-process code as a single-process run (:func:`kdpipe.recipes.fit_on_dataset` →
:func:`kdpipe.train.fit`, whose DDP path uses the helpers below). Rank 0 alone writes
checkpoints, one JSON line per finished epoch (the parent forwards it to the recipe's
callbacks while the run goes on) and the result: the trained model as a bundle plus the
:class:`~kdpipe.train.TrainResult` as JSON. The parent loads them, so the recipe returns
exactly what it returns single-process.

A worker that raises or is killed makes torchrun tear the others down; the parent then
raises :class:`DistributedTrainingError` naming the failed rank and its cause (exception
message from the worker's error file, or exit code / signal). Surviving ranks blocked in
a collective fail after ``ddp_timeout_s``; the whole run is killed after
``ddp_wall_clock_s``.

Batch semantics: ``data.batch_size`` is the *global* batch; each of N processes loads
``batch_size / N`` samples per step. Because DDP averages gradients over equal per-process
batches, one step sees the same gradient and the schedule the same number of steps as
the single-process run: a config keeps its meaning when ``num_processes`` changes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from kdpipe.config import DistillConfig, TrainConfig

if TYPE_CHECKING:
    from kdpipe.bundle import Bundle
    from kdpipe.data import DatasetSpec
    from kdpipe.train import TrainResult

__all__ = [
    "DistributedConfigError", "DistributedTrainingError", "FitJob", "ShardSampler",
    "all_reduce_sum", "average_gradients", "broadcast_buffers", "check_launch",
    "distribute_loader", "epoch_seed", "is_active", "is_main_process", "launch_fit",
    "local_rank", "main", "process_device", "rank", "shard_loader", "sync_batchnorm",
    "world_size",
]

log = logging.getLogger(__name__)

# Job directory layout (shared by the parent and the workers).
_JOB_FILE, _DATASET_FILE, _TRAIN_FILE, _DISTILL_FILE = "job.json", "dataset.json", "train.json", "distill.json"
_MODEL_DIR, _TEACHER_DIR, _RESULT_DIR = "model", "teacher", "result"
_RESULT_FILE, _EPOCHS_FILE, _LOG_FILE, _PID_DIR = "result.json", "epochs.jsonl", "torchrun.log", "pids"
_POLL_S = 0.2
_TERMINATE_GRACE_S = 30.0


class DistributedConfigError(ValueError):
    """A multi-process run that cannot work as configured (found before launching)."""


class DistributedTrainingError(RuntimeError):
    """A launched multi-process run failed; names the failed rank and its cause.

    Attributes:
        rank: the global rank that failed first (None when unknown, e.g. a wall-clock kill).
        cause: the worker's exception message, or its exit code / signal.
        job_dir: the kept job directory (torchrun log, worker error files).
    """

    def __init__(self, message: str, *, rank: int | None, cause: str, job_dir: Path) -> None:
        super().__init__(message)
        self.rank, self.cause, self.job_dir = rank, cause, job_dir


# ====================================================== inside a process group
def is_active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    """Rank on this node, as torchrun sets it (0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the process that writes checkpoints, logs and results."""
    return rank() == 0


def process_device(name: str | torch.device = "auto") -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` for a CUDA worker, else
    :func:`kdpipe.train.resolve_device` of ``name``."""
    from kdpipe.train import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and is_active():
        return torch.device("cuda", local_rank())
    return device


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum ``values`` over all processes (a copy; identity with one process).

    nccl only reduces CUDA tensors, so the sum is computed on this process's device and
    returned on the input's device.
    """
    if not is_active():
        return values
    device = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else values.device
    total = values.detach().to(device, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(values.device)


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of parameters DDP does not manage (e.g. a FitNet regressor)
    across processes, so every rank applies the same update."""
    if not is_active() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process.

    DDP broadcasts buffers at the start of each forward, so after the last step of an
    epoch each rank holds its own update; evaluating and checkpointing rank 0's exact
    model needs them equal.
    """
    if not is_active():
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def epoch_seed(seed: int, epoch: int, process_rank: int) -> int:
    """Seed of the global RNGs for one (seed, epoch, rank): a pure function, so a resumed
    DDP run draws exactly what the uninterrupted one drew, without per-rank RNG state."""
    return (seed * 1_000_003 + epoch * 7_919 + process_rank * 104_729) % 2**63


def sync_batchnorm(model: nn.Module) -> Callable[[], None]:
    """Replace every BatchNorm layer of ``model`` by a SyncBatchNorm sharing its tensors.

    Returns:
        ``restore()``: puts the original layers back with the trained state, so the model
        keeps its module types (a bundle's layout compares them with a fresh model).
    """
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                replaced.append((parent, name, child))

    def restore() -> None:
        for parent, name, original in replaced:
            synced = getattr(parent, name)
            original.to(next(synced.buffers(), torch.empty(0)).device)
            original.load_state_dict(synced.state_dict())
            original.train(synced.training)
            setattr(parent, name, original)

    return restore


class ShardSampler(Sampler[int]):
    """Positions ``rank, rank + world, ...`` of a dataset: every sample exactly once over
    all ranks, without the padding a DistributedSampler adds (padding would count some
    samples twice in an evaluation whose sums are reduced across ranks)."""

    def __init__(self, length: int, process_rank: int, num_processes: int) -> None:
        if not 0 <= process_rank < num_processes:
            raise ValueError(f"rank {process_rank} outside 0..{num_processes - 1}")
        self.length, self.rank, self.num_processes = length, process_rank, num_processes

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_processes))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_processes))


def _loader_options(loader: DataLoader) -> dict[str, Any]:
    """The DataLoader arguments a re-sharded copy keeps."""
    options: dict[str, Any] = {
        "num_workers": loader.num_workers, "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory, "worker_init_fn": loader.worker_init_fn,
        "generator": loader.generator, "timeout": loader.timeout,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return options


def distribute_loader(loader: DataLoader, *, process_rank: int, num_processes: int, seed: int) -> DataLoader:
    """The train loader of one DDP process: a :class:`~torch.utils.data.DistributedSampler`
    (shuffled with ``seed``; ``set_epoch(epoch)`` gives every epoch its own order, the same
    on every rank) and ``loader.batch_size / num_processes`` samples per step.

    A loader that already has a DistributedSampler is returned unchanged.

    Raises:
        DistributedConfigError: the batch size is not a multiple of ``num_processes``, or
            the loader uses a custom sampler / batch sampler that cannot be sharded.
    """
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if loader.batch_size is None or not isinstance(loader.sampler, RandomSampler | SequentialSampler):
        raise DistributedConfigError(
            f"cannot shard a train loader with {type(loader.sampler).__name__} / batch_size="
            f"{loader.batch_size} across {num_processes} processes; give it a plain batch_size "
            "(shuffle=True/False) or a torch DistributedSampler")
    per_process = _per_process_batch(loader.batch_size, num_processes)
    sampler = DistributedSampler(loader.dataset, num_replicas=num_processes, rank=process_rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
                                 drop_last=False)  # pads so that every rank runs the same steps
    # kdpipe.data.make_loader drops a last batch of exactly one sample (it breaks BatchNorm
    # in train mode): apply that rule per process; keep a drop_last the caller chose otherwise.
    one_sample_rule = len(loader.dataset) % loader.batch_size == 1
    drop_last = len(sampler) % per_process == 1 or (loader.drop_last and not one_sample_rule)
    return DataLoader(loader.dataset, batch_size=per_process, sampler=sampler, drop_last=drop_last,
                      **_loader_options(loader))


def shard_loader(loader: DataLoader, *, process_rank: int, num_processes: int) -> DataLoader:
    """An evaluation loader over this process's :class:`ShardSampler` share (no padding)."""
    if isinstance(loader.sampler, ShardSampler):
        return loader
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise DistributedConfigError(
            "under DDP the validation loader must be a torch DataLoader with a batch_size "
            f"(got {type(loader).__name__}); it is sharded across processes for evaluation")
    return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=False,
                      sampler=ShardSampler(len(loader.dataset), process_rank, num_processes),
                      **_loader_options(loader))


def _per_process_batch(batch_size: int, num_processes: int) -> int:
    if batch_size % num_processes:
        lower = max(num_processes, batch_size // num_processes * num_processes)
        raise DistributedConfigError(
            f"data.batch_size={batch_size} is not divisible by train.num_processes="
            f"{num_processes}: the batch size is the global batch, split evenly across the "
            f"processes; set data.batch_size to a multiple of {num_processes} (e.g. {lower})")
    return batch_size // num_processes


# ================================================================ before launch
def check_launch(cfg: TrainConfig, *, batch_size: int) -> str:
    """Check that ``cfg.num_processes`` workers can run here; cheap, before any launch.

    Returns:
        The process-group backend: ``nccl`` (one process per CUDA device) or ``gloo`` (CPU).

    Raises:
        DistributedConfigError: more processes than CUDA devices; ``device: auto`` on a
            machine without a GPU (gloo on the CPU must be asked for with ``device: cpu``);
            ``mps``; SyncBatchNorm on the CPU; a batch size that does not split evenly.
    """
    n = cfg.num_processes
    if cfg.device == "mps":
        raise DistributedConfigError(
            f"train.num_processes={n} with device: mps: DDP runs on CUDA GPUs (nccl) or on the "
            "CPU (gloo); set train.device: cuda or cpu, or num_processes: 1")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n > visible:
            raise DistributedConfigError(
                f"train.num_processes={n} needs {n} CUDA devices (one per process) but {visible} "
                f"{'is' if visible == 1 else 'are'} visible here (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); set num_processes to at "
                f"most {visible}, request more GPUs for the step, or set train.device: cpu to run "
                f"{n} gloo processes on the CPU")
    elif cfg.device == "auto":
        raise DistributedConfigError(
            f"train.num_processes={n} with device: auto, but there is no GPU here; set "
            f"train.device: cpu to run {n} gloo processes on the CPU (the explicit CPU "
            "fallback), or num_processes: 1")
    if cfg.sync_batchnorm and not cuda:
        raise DistributedConfigError(
            "train.sync_batchnorm: true needs CUDA devices (PyTorch's SyncBatchNorm has no CPU "
            "kernel); set sync_batchnorm: false for gloo processes on the CPU")
    _per_process_batch(batch_size, n)
    return "nccl" if cuda else "gloo"


# ===================================================================== the job
@dataclass
class FitJob:
    """One DDP training run, as written to (and read from) a job directory.

    Attributes:
        dataset: the data to train on (each worker opens it through kdpipe.data).
        train: the train config (``num_processes`` > 1).
        model: the initial model as a bundle (pretrained / pruned layout included).
        teacher: the frozen teacher bundle for distillation; None = classification.
        distill: the distillation config (required with a teacher).
        checkpoint_dir: where rank 0 keeps ``last.pt`` (all ranks resume from it).
        desc: label for logs and errors.
    """

    dataset: DatasetSpec
    train: TrainConfig
    model: Bundle
    teacher: Bundle | None = None
    distill: DistillConfig | None = None
    checkpoint_dir: str | None = None
    desc: str = "train"

    def __post_init__(self) -> None:
        if (self.teacher is None) != (self.distill is None):
            raise ValueError("FitJob: a teacher needs a distill config and vice versa")

    def write(self, job_dir: Path) -> None:
        """Write the job as JSON + bundles into ``job_dir`` (no pickle)."""
        from kdpipe.bundle import save_bundle

        (job_dir / _DATASET_FILE).write_text(self.dataset.model_dump_json())
        (job_dir / _TRAIN_FILE).write_text(self.train.model_dump_json())
        save_bundle(self.model, job_dir / _MODEL_DIR)
        if self.teacher is not None and self.distill is not None:
            save_bundle(self.teacher, job_dir / _TEACHER_DIR)
            (job_dir / _DISTILL_FILE).write_text(self.distill.model_dump_json())
        (job_dir / _JOB_FILE).write_text(json.dumps({"checkpoint_dir": self.checkpoint_dir, "desc": self.desc}))

    @classmethod
    def read(cls, job_dir: Path) -> FitJob:
        """Read a job written by :meth:`write`."""
        from kdpipe.bundle import load_bundle
        from kdpipe.data import DatasetSpec

        meta = json.loads((job_dir / _JOB_FILE).read_text())
        distill = job_dir / _DISTILL_FILE
        return cls(
            dataset=DatasetSpec.model_validate_json((job_dir / _DATASET_FILE).read_text()),
            train=TrainConfig.model_validate_json((job_dir / _TRAIN_FILE).read_text()),
            model=load_bundle(job_dir / _MODEL_DIR),
            teacher=load_bundle(job_dir / _TEACHER_DIR) if distill.is_file() else None,
            distill=DistillConfig.model_validate_json(distill.read_text()) if distill.is_file() else None,
            checkpoint_dir=meta["checkpoint_dir"],
            desc=meta["desc"],
        )


# =================================================================== the parent
def launch_fit(job: FitJob, *, callbacks: Sequence[Callable[[int, dict[str, float]], None]] = ()
               ) -> tuple[Bundle, TrainResult]:
    """Run ``job`` on ``job.train.num_processes`` workers with torchrun; wait for it.

    Epoch rows are forwarded to ``callbacks`` as rank 0 finishes them (after its
    checkpoint). The job directory is created under ``$TMPDIR`` (``kdpipe-ddp-*``),
    removed on success and kept on failure.

    Returns:
        The trained model (best-validation weights, as a bundle) and the training result.

    Raises:
        DistributedConfigError: the run cannot work here (see :func:`check_launch`).
        DistributedTrainingError: a worker failed or the run exceeded ``ddp_wall_clock_s``.
    """
    from kdpipe.bundle import load_bundle
    from kdpipe.train import TrainResult

    cfg = job.train
    check_launch(cfg, batch_size=job.dataset.config.batch_size)
    job_dir = Path(tempfile.mkdtemp(prefix="kdpipe-ddp-"))
    job.write(job_dir)
    log.info("%s: launching %d DDP processes (job directory %s)", job.desc, cfg.num_processes, job_dir)
    with open(job_dir / _LOG_FILE, "wb") as log_file:
        proc = subprocess.Popen(_torchrun_command(cfg.num_processes, job_dir), stdout=log_file,
                                stderr=subprocess.STDOUT, env=_worker_env(cfg.num_processes, job_dir),
                                start_new_session=True)  # its own process group: killable as a whole
        try:
            returncode = _supervise(proc, job_dir, job, callbacks)
        finally:
            _terminate(proc)
    if returncode != 0:
        raise _failure(job, job_dir, returncode)
    result_dir = job_dir / _RESULT_DIR
    if not (result_dir / _RESULT_FILE).is_file():
        raise DistributedTrainingError(
            f"{job.desc}: torchrun exited normally but rank 0 wrote no result to {result_dir}; "
            f"see {job_dir / _LOG_FILE}", rank=0, cause="no result", job_dir=job_dir)
    trained = load_bundle(result_dir / _MODEL_DIR)
    result = TrainResult(**json.loads((result_dir / _RESULT_FILE).read_text()))
    shutil.rmtree(job_dir, ignore_errors=True)
    return trained, result


def _torchrun_command(num_processes: int, job_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(num_processes), "--max-restarts", "0",
            "--log-dir", str(job_dir / "logs"), "-m", "kdpipe.distributed", str(job_dir)]


def _worker_env(num_processes: int, job_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Workers import the same kdpipe as this process, installed or not.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    # torchrun would force 1 thread; share this machine's cores instead (no oversubscription).
    env.setdefault("OMP_NUM_THREADS", str(_threads_per_process(num_processes)))
    # torchrun records the first failed worker's exception here (its main is @record'ed).
    env["TORCHELASTIC_ERROR_FILE"] = str(job_dir / "error.json")
    return env


def _threads_per_process(num_processes: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // num_processes)


def _supervise(proc: subprocess.Popen, job_dir: Path, job: FitJob,
               callbacks: Sequence[Callable[[int, dict[str, float]], None]]) -> int:
    """Wait for torchrun, forwarding epoch rows; kill it past the wall-clock limit."""
    deadline = time.monotonic() + job.train.ddp_wall_clock_s
    rows = _EpochReader(job_dir / _EPOCHS_FILE)
    while True:
        try:
            returncode = proc.wait(timeout=_POLL_S)
        except subprocess.TimeoutExpired:
            returncode = None
        for row in rows.new_rows():
            log.info("%s epoch %d/%d (%d processes): %s", job.desc, int(row["epoch"]),
                     job.train.epochs, job.train.num_processes,
                     ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
            for callback in callbacks:
                callback(int(row["epoch"]), dict(row))
        if returncode is not None:
            return returncode
        if time.monotonic() > deadline:
            _terminate(proc)
            raise DistributedTrainingError(
                f"{job.desc}: the {job.train.num_processes}-process run did not finish within "
                f"train.ddp_wall_clock_s={job.train.ddp_wall_clock_s:g} s and was killed; raise "
                f"the limit for longer runs (torchrun log: {job_dir / _LOG_FILE})",
                rank=None, cause="wall-clock limit", job_dir=job_dir)


class _EpochReader:
    """Reads the complete lines rank 0 has appended to the epochs file so far."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new_rows(self) -> list[dict[str, float]]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def _terminate(proc: subprocess.Popen) -> None:
    """Stop torchrun and its workers (SIGTERM to its process group, then SIGKILL)."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, _TERMINATE_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------- failure report
@dataclass
class _Failure:
    rank: int
    exitcode: int
    error_file: str | None
    traceback: str

    @property
    def cause(self) -> str:
        """The worker's exception message, or how its process ended."""
        if self.error_file:
            try:
                message = json.loads(Path(self.error_file).read_text())["message"]
                return message["message"] if isinstance(message, dict) else str(message)
            except (OSError, ValueError, KeyError, TypeError):
                pass  # fall back to the traceback torchrun printed
        if self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            return f"killed by {name} (exit code {self.exitcode})"
        lines = [line.strip() for line in self.traceback.splitlines() if line.strip()]
        return f"exit code {self.exitcode}" + (f": {lines[-1]}" if lines else "")

    @property
    def secondary(self) -> bool:
        """Torn down by torchrun, or failed only because a peer vanished."""
        if self.exitcode == -signal.SIGTERM:
            return True
        return bool(re.search(r"Connection (closed|reset) by peer|remote worker|timed out|"
                              r"DistBackendError|Socket Timeout|NCCL communicator was aborted",
                              self.cause + self.traceback))


# One block of torchrun's failure summary ("Root Cause" / "Failures"), e.g.
#   rank      : 1 (local_rank: 1)
#   exitcode  : -9 (pid: 2765)  (SIGKILL)
#   error_file: <N/A>
#   traceback : Signal 9 (SIGKILL) received by PID 2765
_FAILURE_BLOCK = re.compile(
    r"rank\s*:\s*(?P<rank>\d+)[^\n]*\n\s*exitcode\s*:\s*(?P<exitcode>-?\d+)[^\n]*\n"
    r"\s*error_file\s*:\s*(?P<error_file>[^\n]*)\n\s*traceback\s*:\s*(?P<traceback>.*?)"
    r"(?=\n\[\d+\]:|\n-{20,}|\n={20,}|\Z)", re.DOTALL)


def _parse_failures(text: str) -> list[_Failure]:
    """Failures from torchrun's summary; torchrun's root cause first, no rank twice."""
    root = text.rfind("Root Cause")
    ordered = text[root:] + "\n" + text[:root] if root >= 0 else text
    failures: dict[int, _Failure] = {}
    for m in _FAILURE_BLOCK.finditer(ordered):
        error_file = m["error_file"].strip()
        failures.setdefault(int(m["rank"]), _Failure(
            int(m["rank"]), int(m["exitcode"]),
            None if error_file in {"", "<N/A>"} else error_file, m["traceback"]))
    return list(failures.values())


def _failure(job: FitJob, job_dir: Path, returncode: int) -> DistributedTrainingError:
    text = (job_dir / _LOG_FILE).read_text(errors="replace")
    failures = _parse_failures(text)
    log_hint = f"torchrun log and worker error files kept in {job_dir}"
    if not failures:
        tail = "\n".join(text.strip().splitlines()[-15:])
        return DistributedTrainingError(
            f"{job.desc}: the {job.train.num_processes}-process run failed (torchrun exit code "
            f"{returncode}) before any worker reported a failure; {log_hint}. Last lines:\n{tail}",
            rank=None, cause=f"torchrun exit code {returncode}", job_dir=job_dir)
    # torchrun's root cause is the failure it observed first; a rank torn down with
    # SIGTERM or broken by its peer's disappearance only follows from another's failure.
    first = next((f for f in failures if not f.secondary), failures[0])
    others = "; ".join(f"rank {f.rank}: {f.cause}" for f in failures if f is not first)
    return DistributedTrainingError(
        f"{job.desc}: DDP worker rank {first.rank} of {job.train.num_processes} failed: "
        f"{first.cause}" + (f" (then {others})" if others else "") + f"; {log_hint}",
        rank=first.rank, cause=first.cause, job_dir=job_dir)


# =================================================================== the worker
class _EpochWriter:
    """Rank 0's ``fit`` callback: one JSON line per finished epoch for the parent."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _write_result(job: FitJob, model: nn.Module, result: TrainResult, job_dir: Path) -> None:
    from dataclasses import asdict

    from kdpipe.bundle import Bundle, save_bundle

    result_dir = job_dir / _RESULT_DIR
    save_bundle(Bundle(model.cpu(), job.model.spec), result_dir / _MODEL_DIR)
    # Written last: its presence tells the parent the bundle is complete.
    (result_dir / _RESULT_FILE).write_text(json.dumps(asdict(result)))


def _run_worker(job_dir: Path) -> None:
    from kdpipe import recipes

    process_rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    (job_dir / _PID_DIR).mkdir(exist_ok=True)
    # First thing: the pid, so that an operator (or a test) can find and signal this worker.
    (job_dir / _PID_DIR / f"rank{process_rank}.pid").write_text(str(os.getpid()))
    logging.basicConfig(level=logging.INFO if process_rank == 0 else logging.WARNING,
                        format=f"[rank {process_rank}] %(levelname)s %(name)s: %(message)s")
    job = FitJob.read(job_dir)
    cfg = job.train
    if world != cfg.num_processes:
        raise DistributedConfigError(
            f"torchrun started {world} processes but train.num_processes={cfg.num_processes}")
    backend = check_launch(cfg, batch_size=job.dataset.config.batch_size)
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    torch.set_num_threads(_threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.ddp_timeout_s))
    try:
        model = job.model.model
        task = recipes.make_task(None if job.teacher is None else job.teacher.model, job.distill)
        result = recipes.fit_on_dataset(
            model, task, job.dataset, cfg, desc=job.desc, checkpoint_dir=job.checkpoint_dir,
            callbacks=[_EpochWriter(job_dir / _EPOCHS_FILE)] if process_rank == 0 else [])
        if process_rank == 0:
            _write_result(job, model, result, job_dir)
        # Nobody exits (and tears the group down) before rank 0 has written the result.
        dist.barrier(device_ids=[local_rank()]) if backend == "nccl" else dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> None:
    """Worker entry point: ``python -m kdpipe.distributed JOB_DIR`` under torchrun."""
    from torch.distributed.elastic.multiprocessing.errors import record

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or "RANK" not in os.environ:
        raise SystemExit("usage: torchrun ... -m kdpipe.distributed JOB_DIR (started by "
                         "kdpipe.distributed.launch_fit, not by hand)")
    # @record writes this worker's exception to torchrun's error file: the parent reports it.
    record(_run_worker)(Path(args[0]))


if __name__ == "__main__":
    main()
