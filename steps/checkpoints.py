"""Where a training step keeps its resume checkpoint, and when it retries.

A training step that dies (SIGKILL, a lost node, an exception) and is run again, by its
own retry (:func:`run_with_retries`) or by re-running the pipeline, must continue from
its last finished epoch. :func:`kdpipe.train.fit` writes ``last.pt`` every epoch into
the directory it is given; this module gives each step a directory that is *stable
across processes*:

    <root>/<step name>/<sha256 of everything that determines the step's result>

``root`` is ``$KDPIPE_CHECKPOINT_DIR``, else ``kdpipe-checkpoints`` under ZenML's local
stores folder (next to the local SQLite store). The key hashes the step's configs, the
dataset spec (fingerprint and loader settings), the input bundles' weight hashes, the
content of any start checkpoint and the kdpipe version; the same inputs find the same
directory, different inputs never share one. The directory is deleted when the step
succeeds and kept when it fails.

Only one process trains into a directory at a time (an exclusive ``flock`` on
``<key>.lock``, released by the kernel even on SIGKILL): a second run of the very same
training, started while the first is still going, trains into a private directory
instead of mixing its checkpoints with the first's.

On a remote orchestrator the directory lives on the step's pod: a retry inside the pod
resumes, a fresh pod starts over (correct, only slower).

Retries happen inside the step, not through ZenML's ``retry=``: ZenML retries every
exception, so a missing file, offline pretrained weights or a diverged loss would cost
two more attempts and 30 s of back-off before the user saw the message.
:func:`run_with_retries` retries only what :func:`kdpipe.faults.is_transient` calls
transient (a killed process, a locked database, a dropped connection) and re-raises
everything else at once.

For tests, ``KDPIPE_TEST_KILL_AFTER_EPOCH=<step name>:<epoch>`` makes that step SIGKILL
its own process right after the checkpoint of that epoch is written
(:func:`kill_switch`): a crash at an exact point, without racing a poller against the
training.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from zenml.logger import get_logger

import kdpipe
from kdpipe.config import ModelConfig
from kdpipe.faults import is_transient
from kdpipe.train import CHECKPOINT_NAME

logger = get_logger(__name__)

CHECKPOINT_ROOT_ENV = "KDPIPE_CHECKPOINT_DIR"
"""Environment variable that overrides where training checkpoints are kept."""

KILL_AFTER_EPOCH_ENV = "KDPIPE_TEST_KILL_AFTER_EPOCH"
"""Test-only: ``<step name>:<epoch>`` makes that step SIGKILL itself after that epoch."""

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often a training step retries a transient failure, and how long it waits.

    Attributes:
        max_retries: attempts after the first one.
        delay_s: wait before the first retry.
        backoff: factor on the wait for each further retry.
    """

    max_retries: int = 2
    delay_s: float = 10.0
    backoff: float = 2.0

    def wait_s(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        return self.delay_s * self.backoff ** (retry - 1)


TRAINING_RETRY = RetryPolicy()
"""Retries of the training steps: a transient failure (a killed DDP rank or DataLoader
worker, a busy database, a dropped connection) costs one lost epoch at most, because the
retry resumes from the step's checkpoint. Waits 10 s, then 20 s."""


def run_with_retries(body: Callable[[], T], *, step_name: str, policy: RetryPolicy | None = None,
                     sleep: Callable[[float], object] | None = None) -> T:
    """Run ``body``; run it again after a transient failure, up to ``policy.max_retries`` times.

    ``body`` is the whole step body, :func:`training_checkpoint` included: a failed
    attempt leaves its checkpoint behind, so the next one resumes from its last finished
    epoch. A permanent failure (see :func:`kdpipe.faults.is_transient`), or a transient
    one after the last retry, propagates at once, without waiting.

    Args:
        body: the work of one attempt; its result is returned.
        step_name: for the log lines.
        policy: attempts and waits; None = :data:`TRAINING_RETRY` (read at call time).
        sleep: how to wait (``time.sleep`` when None; tests pass a recorder).
    """
    policy = TRAINING_RETRY if policy is None else policy
    sleep = time.sleep if sleep is None else sleep
    retry = 0
    while True:
        try:
            return body()
        except Exception as err:
            retry += 1
            if retry > policy.max_retries or not is_transient(err):
                raise
            wait = policy.wait_s(retry)
            logger.warning("%s: attempt %d of %d failed with a transient error (%s: %s); "
                           "retrying in %g s from the last checkpoint", step_name, retry,
                           policy.max_retries + 1, type(err).__name__, err, wait)
            sleep(wait)


def kill_switch(step_name: str) -> list[Callable[[int, dict[str, float]], None]]:
    """Epoch callbacks for ``$KDPIPE_TEST_KILL_AFTER_EPOCH`` (none when it is unset).

    With ``<step_name>:<N>`` the callback SIGKILLs this process after epoch ``N``: the
    training loop calls its callbacks once the epoch's checkpoint is written, so a test
    gets a crash exactly between two epochs (SIGKILL: no handler, no cleanup runs). With
    ``train.num_processes`` > 1 the callbacks run in the step's process, which supervises
    torchrun: that process is killed, not the workers.

    Raises:
        ValueError: the variable is set but not ``<step name>:<positive epoch>``.
    """
    value = os.environ.get(KILL_AFTER_EPOCH_ENV, "")
    if not value:
        return []
    name, _, epoch = value.rpartition(":")
    if not name or not epoch.isdigit() or int(epoch) < 1:
        raise ValueError(f"{KILL_AFTER_EPOCH_ENV}={value!r}: expected <step name>:<epoch>, "
                         f"e.g. finetune_teacher:2 (a test-only switch; unset it otherwise)")
    if name != step_name:
        return []
    kill_at = int(epoch)

    def kill(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == kill_at:
            logger.warning("%s: %s=%s: killing this process after epoch %d", step_name,
                           KILL_AFTER_EPOCH_ENV, value, epoch)
            os.kill(os.getpid(), signal.SIGKILL)
    return [kill]


def checkpoint_root() -> Path:
    """``$KDPIPE_CHECKPOINT_DIR``, else ``<ZenML local stores>/kdpipe-checkpoints``."""
    explicit = os.environ.get(CHECKPOINT_ROOT_ENV)
    if explicit:
        return Path(explicit).expanduser()
    from zenml.config.global_config import GlobalConfiguration

    return Path(GlobalConfiguration().local_stores_path) / "kdpipe-checkpoints"


def path_digest(path: str | Path) -> str:
    """sha256 over a file's bytes, or over every file of a directory (names included).

    Used for start checkpoints: a warm start from production is copied to a fresh temp
    directory on every run, so its *path* changes while its content does not.
    """
    p = Path(path)
    digest = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        digest.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


def model_identity(cfg: ModelConfig) -> dict[str, Any]:
    """A model config as JSON, with a start checkpoint's path replaced by its content hash."""
    data = cfg.model_dump(mode="json")
    if cfg.checkpoint is not None:
        data["checkpoint"] = f"sha256:{path_digest(cfg.checkpoint)}"
    return data


def checkpoint_key(step_name: str, identity: dict[str, Any]) -> str:
    """sha256 of the step name, ``identity`` (JSON-serialisable) and the kdpipe version."""
    text = json.dumps({"step": step_name, "kdpipe": kdpipe.__version__, **identity},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class TrainingCheckpoint:
    """The directory a step hands to a recipe as ``checkpoint_dir``.

    Attributes:
        directory: where ``last.pt`` is written (by prune_student, in ``step<k>/`` below it).
        resuming: a ``last.pt`` from an interrupted attempt was there when the step began
            (``fit`` still checks that it matches before resuming from it).
        shared: False when another live process held the stable directory and this one
            trains in a private one.
    """

    directory: Path
    resuming: bool
    shared: bool

    def metadata(self) -> dict[str, Any]:
        """For the step's ZenML metadata: where it checkpointed and whether it resumed."""
        return {"checkpoint_dir": str(self.directory), "resumed_from_checkpoint": self.resuming}


@contextlib.contextmanager
def training_checkpoint(step_name: str, identity: dict[str, Any]) -> Iterator[TrainingCheckpoint]:
    """The step's stable checkpoint directory for the block; deleted when the block succeeds.

    Args:
        step_name: the step's name (first path component under the root).
        identity: everything that determines the step's result (configs as JSON, the
            dataset spec, input weight hashes); see :func:`checkpoint_key`.

    Yields:
        The checkpoint to pass on as ``checkpoint_dir=ckpt.directory``.
    """
    base = checkpoint_root() / step_name
    key = checkpoint_key(step_name, identity)
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{key}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            directory, shared = base / key, True
        except BlockingIOError:
            directory, shared = base / f"{key}-pid{os.getpid()}", False
            logger.warning("%s: another process is training the same inputs into %s; this one "
                           "checkpoints into %s instead", step_name, base / key, directory)
        # prune_student keeps one sub-directory per recovery: look below the top level too.
        resuming = directory.is_dir() and any(directory.rglob(CHECKPOINT_NAME))
        ckpt = TrainingCheckpoint(directory, resuming, shared)
        if ckpt.resuming:
            logger.info("%s: found the checkpoint of an interrupted attempt in %s; training "
                        "resumes from it", step_name, directory)
        yield ckpt  # an exception propagates and keeps the directory for the next attempt
        _remove(directory)
        # The lock file stays: deleting it could let two processes lock two different inodes.


def _remove(directory: Path) -> None:
    """Delete a finished step's checkpoints; a failure only costs disk space, so it warns."""
    try:
        shutil.rmtree(directory)
    except FileNotFoundError:
        pass  # nothing was written (no epoch finished): nothing to delete
    except OSError as err:
        logger.warning("could not delete the finished training checkpoint %s (%s); delete it "
                       "by hand to free the space", directory, err)
