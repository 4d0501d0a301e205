"""The DDP worker: ``python -m kdpipe._worker JOB_DIR``, one per rank, started by torchrun
for :func:`kdpipe.launch.launch_fit` (not by hand).

Each worker writes its pid, reads the :class:`~kdpipe.launch.FitJob`, joins the process
group (nccl on CUDA, gloo on the CPU, with ``ddp_timeout_s``), pins its GPU by
``LOCAL_RANK`` and trains with :func:`kdpipe.fitting.fit_on_dataset`: the training loop,
never the recipes. Rank 0 appends one JSON line per finished epoch for the parent and
writes the result.

Test-only fault switch: ``KDPIPE_TEST_KILL_AT="rank=R,epoch=E"`` makes rank R SIGKILL
itself right after epoch E, once every rank has finished that epoch's checkpoint and
callbacks (a barrier), so a test sees a worker die at a known point instead of racing a
timer. Never set it outside tests.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from kdpipe import ddp
from kdpipe.bundle import Bundle
from kdpipe.fitting import fit_on_dataset, make_task
from kdpipe.launch import WORKER_MODULE, FitJob, JobDir, threads_per_process
from kdpipe.train import Callback

__all__ = ["KILL_AT_ENV", "main", "parse_kill_at"]

log = logging.getLogger(__name__)

KILL_AT_ENV = "KDPIPE_TEST_KILL_AT"


def parse_kill_at(value: str, world: int) -> tuple[int, int]:
    """``"rank=R,epoch=E"`` → ``(R, E)``.

    Raises:
        ValueError: another format, or a rank outside ``0..world-1``.
    """
    m = re.fullmatch(r"\s*rank\s*=\s*(\d+)\s*,\s*epoch\s*=\s*(\d+)\s*", value)
    if m is None:
        raise ValueError(f"{KILL_AT_ENV}={value!r}: expected 'rank=R,epoch=E' (e.g. 'rank=1,epoch=2'); "
                         "it is a test-only fault switch: unset it outside tests")
    rank, epoch = int(m[1]), int(m[2])
    if rank >= world:
        raise ValueError(f"{KILL_AT_ENV}={value!r}: rank {rank} does not exist in a run of {world} "
                         f"processes; use a rank in 0..{world - 1}")
    return rank, epoch


class _EpochWriter:
    """Rank 0's ``fit`` callback: one JSON line per finished epoch for the parent."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())


class _KillAt:
    """The test-only fault of :data:`KILL_AT_ENV`, as a ``fit`` callback on every rank."""

    def __init__(self, victim: int, epoch: int, backend: str) -> None:
        self.victim, self.epoch, self.backend = victim, epoch, backend

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch != self.epoch:
            return
        # fit calls callbacks after the checkpoint: past this barrier rank 0 has written
        # this epoch's checkpoint and epoch row, so the death point is exact.
        _barrier(self.backend)
        if ddp.rank() == self.victim:
            log.warning("%s: rank %d kills itself after epoch %d", KILL_AT_ENV, self.victim, epoch)
            os.kill(os.getpid(), signal.SIGKILL)


def _barrier(backend: str) -> None:
    dist.barrier(device_ids=[ddp.local_rank()]) if backend == "nccl" else dist.barrier()


def _callbacks(files: JobDir, process_rank: int, world: int, backend: str) -> list[Callback]:
    callbacks: list[Callback] = [_EpochWriter(files.epochs)] if process_rank == 0 else []
    if kill_at := os.environ.get(KILL_AT_ENV):
        callbacks.append(_KillAt(*parse_kill_at(kill_at, world), backend))
    return callbacks


def _run(files: JobDir) -> None:
    process_rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # First thing: the pid, so that an operator can find and signal this worker.
    files.pid_file(process_rank).parent.mkdir(exist_ok=True)
    files.pid_file(process_rank).write_text(str(os.getpid()))
    logging.basicConfig(level=logging.INFO if process_rank == 0 else logging.WARNING,
                        format=f"[rank {process_rank}] %(levelname)s %(name)s: %(message)s")
    job = FitJob.read(files.path)
    cfg = job.train
    if world != cfg.num_processes:
        raise ddp.DistributedConfigError(
            f"torchrun started {world} processes but train.num_processes={cfg.num_processes}")
    backend = ddp.check_launch(cfg, batch_size=job.dataset.config.batch_size)
    callbacks = _callbacks(files, process_rank, world, backend)  # a bad fault switch fails here
    if backend == "nccl":
        torch.cuda.set_device(ddp.local_rank())
    torch.set_num_threads(threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.ddp_timeout_s))
    try:
        model = job.model.model
        task = make_task(None if job.teacher is None else job.teacher.model, job.distill)
        result = fit_on_dataset(model, task, job.dataset, cfg, desc=job.desc,
                                checkpoint_dir=job.checkpoint_dir, callbacks=callbacks)
        if process_rank == 0:
            files.write_result(Bundle(model.cpu(), job.model.spec), result)
        # Nobody exits (and tears the group down) before rank 0 has written the result.
        _barrier(backend)
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> None:
    """Worker entry point: ``python -m kdpipe._worker JOB_DIR`` under torchrun."""
    from torch.distributed.elastic.multiprocessing.errors import record

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or "RANK" not in os.environ:
        raise SystemExit(f"usage: torchrun ... -m {WORKER_MODULE} JOB_DIR (started by "
                         "kdpipe.launch.launch_fit, not by hand)")
    # @record writes this worker's exception to torchrun's error file: the parent reports it.
    record(_run)(JobDir(Path(args[0])))


if __name__ == "__main__":
    main()
