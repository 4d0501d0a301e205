"""Where a training step keeps its resume checkpoint, and how often it is retried.

A training step that dies (SIGKILL, a lost node, an exception) and is run again, by a
ZenML step retry or by re-running the pipeline, must continue from its last finished
epoch. :func:`kdpipe.train.fit` writes ``last.pt`` every epoch into the directory it is
given; this module gives each step a directory that is *stable across processes*:

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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zenml.config.retry_config import StepRetryConfig
from zenml.logger import get_logger

import kdpipe
from kdpipe.config import ModelConfig
from kdpipe.train import CHECKPOINT_NAME

logger = get_logger(__name__)

CHECKPOINT_ROOT_ENV = "KDPIPE_CHECKPOINT_DIR"
"""Environment variable that overrides where training checkpoints are kept."""

TRAINING_RETRY = StepRetryConfig(max_retries=2, delay=10, backoff=2)
"""Retries of the training steps: a transient failure (a preempted GPU, a busy database, a
killed DataLoader worker) costs one lost epoch at most, because the retry resumes from
the step's checkpoint. Waits 10 s, then 20 s. Override per run in the YAML with
``steps.<name>.retry``."""


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
