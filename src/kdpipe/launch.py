"""DDP, the launcher side: one training run on N torchrun workers, started from this process.

Design: a training recipe stays one process (a ZenML step, a notebook). When its
``TrainConfig.num_processes`` is above 1 it hands a :class:`FitJob` to :func:`launch_fit`,
which writes a *job directory* (the dataset spec, the train / distill configs as JSON, the
initial model and the teacher as kdpipe bundles: safetensors, no pickle) and runs::

    python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node N \\
        --max-restarts 0 --log-dir JOBDIR/logs -m kdpipe._worker JOBDIR

Every worker (:mod:`kdpipe._worker`) joins the process group and runs the same in-process
code as a single-process run (:func:`kdpipe.fitting.fit_on_dataset` →
:func:`kdpipe.train.fit`, whose DDP path uses :mod:`kdpipe.ddp`). Rank 0 alone writes
checkpoints, one JSON line per finished epoch (:func:`launch_fit` forwards it to the
recipe's callbacks while the run goes on) and the result: the trained model as a bundle
plus the :class:`~kdpipe.train.TrainResult` as JSON (:class:`JobDir`). The parent loads
them, so the recipe returns exactly what it returns single-process.

A worker that raises or is killed makes torchrun tear the others down; the parent then
raises :class:`DistributedTrainingError` naming the failed rank and its cause (exception
message from the worker's error file, or exit code / signal), read from torchrun's failure
summary. Surviving ranks blocked in a collective fail after ``ddp_timeout_s``; the whole
run is killed after ``ddp_wall_clock_s``.
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kdpipe.bundle import Bundle, load_bundle, save_bundle
from kdpipe.config import DistillConfig, TrainConfig
from kdpipe.data import DatasetSpec
from kdpipe.ddp import check_launch
from kdpipe.train import TrainResult

__all__ = ["DistributedTrainingError", "FitJob", "JobDir", "launch_fit", "threads_per_process"]

log = logging.getLogger(__name__)

WORKER_MODULE = "kdpipe._worker"
_POLL_S = 0.2
_TERMINATE_GRACE_S = 30.0
EpochCallback = Callable[[int, dict[str, float]], None]


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


# ================================================================== the job files
@dataclass(frozen=True)
class JobDir:
    """The files of one job directory: the layout the parent and the workers share."""

    path: Path

    @property
    def epochs(self) -> Path:
        """Rank 0 appends one JSON line per finished epoch."""
        return self.path / "epochs.jsonl"

    @property
    def log(self) -> Path:
        """torchrun's own output (its failure summary included)."""
        return self.path / "torchrun.log"

    @property
    def error_file(self) -> Path:
        """Where torchrun records the first failed worker's exception."""
        return self.path / "error.json"

    def pid_file(self, process_rank: int) -> Path:
        """``pids/rank<r>.pid``: written first by each worker, for an operator to signal it."""
        return self.path / "pids" / f"rank{process_rank}.pid"

    def write_result(self, trained: Bundle, result: TrainResult) -> None:
        """Rank 0's output: the trained bundle, then the result (its presence marks both done)."""
        save_bundle(trained, self.path / "result" / "model")
        (self.path / "result" / "result.json").write_text(json.dumps(asdict(result)))

    def read_result(self) -> tuple[Bundle, TrainResult] | None:
        """What :meth:`write_result` wrote; None when rank 0 wrote no result."""
        if not (self.path / "result" / "result.json").is_file():
            return None
        result = TrainResult(**json.loads((self.path / "result" / "result.json").read_text()))
        return load_bundle(self.path / "result" / "model"), result


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
        (job_dir / "dataset.json").write_text(self.dataset.model_dump_json())
        (job_dir / "train.json").write_text(self.train.model_dump_json())
        save_bundle(self.model, job_dir / "model")
        if self.teacher is not None and self.distill is not None:
            save_bundle(self.teacher, job_dir / "teacher")
            (job_dir / "distill.json").write_text(self.distill.model_dump_json())
        (job_dir / "job.json").write_text(json.dumps({"checkpoint_dir": self.checkpoint_dir, "desc": self.desc}))

    @classmethod
    def read(cls, job_dir: Path) -> FitJob:
        """Read a job written by :meth:`write`."""
        meta = json.loads((job_dir / "job.json").read_text())
        distill = job_dir / "distill.json"
        return cls(
            dataset=DatasetSpec.model_validate_json((job_dir / "dataset.json").read_text()),
            train=TrainConfig.model_validate_json((job_dir / "train.json").read_text()),
            model=load_bundle(job_dir / "model"),
            teacher=load_bundle(job_dir / "teacher") if distill.is_file() else None,
            distill=DistillConfig.model_validate_json(distill.read_text()) if distill.is_file() else None,
            checkpoint_dir=meta["checkpoint_dir"],
            desc=meta["desc"],
        )



# =================================================================== the parent
def launch_fit(job: FitJob, *, callbacks: Sequence[EpochCallback] = ()) -> tuple[Bundle, TrainResult]:
    """Run ``job`` on ``job.train.num_processes`` workers with torchrun; wait for it.

    Epoch rows are forwarded to ``callbacks`` as rank 0 finishes them (after its
    checkpoint). The job directory is created under ``$TMPDIR`` (``kdpipe-ddp-*``),
    removed on success and kept on failure.

    Returns:
        The trained model (best-validation weights, as a bundle) and the training result.

    Raises:
        kdpipe.ddp.DistributedConfigError: the run cannot work here (see
            :func:`kdpipe.ddp.check_launch`).
        DistributedTrainingError: a worker failed or the run exceeded ``ddp_wall_clock_s``.
    """
    cfg = job.train
    check_launch(cfg, batch_size=job.dataset.config.batch_size)
    files = JobDir(Path(tempfile.mkdtemp(prefix="kdpipe-ddp-")))
    job.write(files.path)
    log.info("%s: launching %d DDP processes (job directory %s)", job.desc, cfg.num_processes, files.path)
    with open(files.log, "wb") as log_file:
        proc = subprocess.Popen(torchrun_command(cfg.num_processes, files.path), stdout=log_file,
                                stderr=subprocess.STDOUT, env=worker_env(cfg.num_processes, files),
                                start_new_session=True)  # its own process group: killable as a whole
        try:
            returncode = _supervise(proc, files, job, callbacks)
        finally:
            _terminate(proc)
    if returncode != 0:
        raise _failure(job, files, returncode)
    output = files.read_result()
    if output is None:
        raise DistributedTrainingError(
            f"{job.desc}: torchrun exited normally but rank 0 wrote no result to "
            f"{files.path / 'result'}; see {files.log}", rank=0, cause="no result", job_dir=files.path)
    shutil.rmtree(files.path, ignore_errors=True)
    return output


def torchrun_command(num_processes: int, job_dir: Path) -> list[str]:
    """The torchrun command line that starts ``num_processes`` workers on ``job_dir``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(num_processes), "--max-restarts", "0",
            "--log-dir", str(job_dir / "logs"), "-m", WORKER_MODULE, str(job_dir)]


def worker_env(num_processes: int, files: JobDir) -> dict[str, str]:
    """This process's environment, plus what the workers need (their kdpipe, threads,
    torchrun's error file)."""
    env = dict(os.environ)
    # Workers import the same kdpipe as this process, installed or not.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    # torchrun would force 1 thread; share this machine's cores instead (no oversubscription).
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(num_processes)))
    # torchrun records the first failed worker's exception here (its main is @record'ed).
    env["TORCHELASTIC_ERROR_FILE"] = str(files.error_file)
    return env


def threads_per_process(num_processes: int) -> int:
    """This machine's cores shared by ``num_processes`` workers (at least 1 each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // num_processes)


def _supervise(proc: subprocess.Popen, files: JobDir, job: FitJob,
               callbacks: Sequence[EpochCallback]) -> int:
    """Wait for torchrun, forwarding epoch rows; kill it past the wall-clock limit."""
    deadline = time.monotonic() + job.train.ddp_wall_clock_s
    rows = _EpochReader(files.epochs)
    while True:
        try:
            returncode = proc.wait(timeout=_POLL_S)
        except subprocess.TimeoutExpired:
            returncode = None
        for row in rows.new_rows():  # also after the exit: rows written just before it
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
                f"the limit for longer runs (torchrun log: {files.log})",
                rank=None, cause="wall-clock limit", job_dir=files.path)


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


def _failure(job: FitJob, files: JobDir, returncode: int) -> DistributedTrainingError:
    """The error for a torchrun that exited with ``returncode``, from its failure summary."""
    text = files.log.read_text(errors="replace")
    failures = _parse_failures(text)
    log_hint = f"torchrun log and worker error files kept in {files.path}"
    if not failures:
        tail = "\n".join(text.strip().splitlines()[-15:])
        return DistributedTrainingError(
            f"{job.desc}: the {job.train.num_processes}-process run failed (torchrun exit code "
            f"{returncode}) before any worker reported a failure; {log_hint}. Last lines:\n{tail}",
            rank=None, cause=f"torchrun exit code {returncode}", job_dir=files.path)
    # torchrun's root cause is the failure it observed first; a rank torn down with
    # SIGTERM or broken by its peer's disappearance only follows from another's failure.
    first = next((f for f in failures if not f.secondary), failures[0])
    others = "; ".join(f"rank {f.rank}: {f.cause}" for f in failures if f is not first)
    return DistributedTrainingError(
        f"{job.desc}: DDP worker rank {first.rank} of {job.train.num_processes} failed: "
        f"{first.cause}" + (f" (then {others})" if others else "") + f"; {log_hint}",
        rank=first.rank, cause=first.cause, job_dir=files.path)
