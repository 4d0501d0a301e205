"""kdpipe.faults.is_transient: which failures a training step retries.

Each error is made by the real thing where that is cheap (a real SQLite lock, a real
refused pickle, a real missing file, kdpipe's own error classes and wrappers); torch's
DataLoader and torchrun failures are built with the exact text and attributes those
components produce.
"""

from __future__ import annotations

import importlib
import sqlite3
from pathlib import Path

import pytest
import torch

from kdpipe import tracking
from kdpipe.config import ConfigError
from kdpipe.faults import is_transient
from kdpipe.model_registry import WeightsUnavailableError
from kdpipe.train import TrainingDivergedError


def _raised(make) -> BaseException:
    """The exception ``make()`` raises (with its real __cause__ / __context__)."""
    try:
        make()
    except BaseException as err:  # noqa: B036 - SystemExit and friends are tested too
        return err
    raise AssertionError("nothing was raised")


def _locked_sqlite_error(tmp_path: Path) -> sqlite3.OperationalError:
    """A real 'database is locked': a second connection writes while the first holds the lock."""
    db = tmp_path / "busy.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    writer = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        err = _raised(lambda: writer.execute("INSERT INTO t VALUES (1)"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        writer.close()
    assert isinstance(err, sqlite3.OperationalError) and "database is locked" in str(err)
    return err


def _distributed_training_error_class() -> type[Exception]:
    """kdpipe's DDP launch failure, wherever it lives (distributed.py is being split)."""
    for module in ("kdpipe.launch", "kdpipe.ddp", "kdpipe.distributed"):
        try:
            cls = getattr(importlib.import_module(module), "DistributedTrainingError", None)
        except ImportError:
            continue
        if cls is not None:
            return cls
    pytest.fail("DistributedTrainingError not found in kdpipe.launch / ddp / distributed")


# --------------------------------------------------------------------- transient
def test_a_locked_sqlite_database_is_transient(tmp_path: Path) -> None:
    err = _locked_sqlite_error(tmp_path)
    assert is_transient(err)
    # As the training step meets it: kdpipe.tracking's wrapper around MLflow's error.
    wrapped = tracking.store_error("sqlite:///mlflow.db", err)
    assert "database is locked" in str(wrapped)
    assert is_transient(wrapped)

    def reraise() -> None:
        raise RuntimeError("could not log the epoch") from err
    assert is_transient(_raised(reraise))  # an unrecognised wrapper: its cause decides


@pytest.mark.parametrize("err", [
    ConnectionResetError(104, "Connection reset by peer"),
    ConnectionRefusedError(111, "Connection refused"),
    BrokenPipeError(32, "Broken pipe"),
    TimeoutError("timed out"),
], ids=lambda e: type(e).__name__)
def test_dropped_connections_and_timeouts_are_transient(err: Exception) -> None:
    assert is_transient(err)


def test_a_killed_dataloader_worker_is_transient() -> None:
    # torch.utils.data's text for a worker the OOM killer (or an operator) ended.
    assert is_transient(RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. "))
    assert is_transient(RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly"))


def test_a_ddp_rank_killed_by_a_signal_is_transient(tmp_path: Path) -> None:
    cls = _distributed_training_error_class()
    killed = cls("teacher: DDP worker rank 1 of 2 failed: killed by SIGKILL (exit code -9)",
                 rank=1, cause="killed by SIGKILL (exit code -9)", job_dir=tmp_path)
    torchrun_killed = cls("teacher: the 2-process run failed (torchrun exit code -9) ...",
                          rank=None, cause="torchrun exit code -9", job_dir=tmp_path)
    assert is_transient(killed)
    assert is_transient(torchrun_killed)


def test_torch_distributed_network_errors_are_transient() -> None:
    assert is_transient(torch.distributed.DistNetworkError("Connection reset by peer"))
    assert is_transient(torch.distributed.DistStoreError("Socket Timeout"))


# --------------------------------------------------------------------- permanent
def test_a_missing_file_is_permanent(tmp_path: Path) -> None:
    from kdpipe.build import load_checkpoint_state_dict

    err = _raised(lambda: load_checkpoint_state_dict(tmp_path / "nope.safetensors"))
    assert isinstance(err, FileNotFoundError)
    assert not is_transient(err)


def test_a_refused_pickle_checkpoint_is_permanent(tmp_path: Path) -> None:
    from kdpipe.build import load_checkpoint_state_dict

    path = tmp_path / "pickled.pt"
    torch.save({"model": Path("/etc")}, path)  # any non-tensor object needs full pickle
    refused = _raised(lambda: torch.load(path, weights_only=True))
    assert type(refused).__name__ == "UnpicklingError"
    assert not is_transient(refused)
    wrapped = _raised(lambda: load_checkpoint_state_dict(path))  # ValueError from it
    assert isinstance(wrapped, ValueError) and wrapped.__cause__ is not None
    assert not is_transient(wrapped)

    def resume_reraise() -> None:  # how kdpipe.train words an unreadable last.pt
        try:
            torch.load(path, weights_only=True)
        except Exception as err:
            raise RuntimeError(f"cannot read checkpoint {path}") from err
    assert not is_transient(_raised(resume_reraise))


def test_missing_pretrained_weights_offline_are_permanent() -> None:
    def offline() -> None:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as err:  # models_tv: a failed download becomes this error
            raise WeightsUnavailableError("pretrained weights need a download") from err
    err = _raised(offline)
    assert isinstance(err.__cause__, ConnectionError)  # the cause alone would be transient
    assert not is_transient(err)


def test_config_errors_bad_data_and_divergence_are_permanent(tmp_path: Path) -> None:
    from kdpipe.configfile import parse_config
    from kdpipe.data import DataError

    assert not is_transient(_raised(lambda: parse_config({"distill": {"temperature": 0}})))
    assert not is_transient(ConfigError("parameters.x: unknown key"))
    assert not is_transient(DataError("labels out of range"))
    assert not is_transient(ValueError("bad value"))
    assert not is_transient(TrainingDivergedError("teacher", 2, 5, float("nan"), 1e4))


def test_a_ddp_rank_that_raised_is_permanent(tmp_path: Path) -> None:
    cls = _distributed_training_error_class()
    diverged = "teacher: training diverged at epoch 1, step 3 (loss = nan, limit max_loss = 1e+04)"
    assert not is_transient(cls(f"rank 0 failed: {diverged}", rank=0, cause=diverged,
                                job_dir=tmp_path))
    assert not is_transient(cls("did not finish within train.ddp_wall_clock_s", rank=None,
                                cause="wall-clock limit", job_dir=tmp_path))


def test_unknown_errors_and_interrupts_are_permanent() -> None:
    assert not is_transient(RuntimeError("something else"))
    assert not is_transient(OSError(28, "No space left on device"))
    assert not is_transient(KeyboardInterrupt())
    assert not is_transient(SystemExit(1))


def test_the_outermost_known_kind_decides() -> None:
    """A permanent error raised while handling a transient one stays permanent, and back."""
    def permanent_over_transient() -> None:
        try:
            raise TimeoutError("timed out")
        except TimeoutError:
            raise FileNotFoundError("missing.pt") from None  # context suppressed
    assert not is_transient(_raised(permanent_over_transient))

    def transient_over_unknown() -> None:
        try:
            raise RuntimeError("unknown")
        except RuntimeError:
            raise ConnectionResetError(104, "reset")  # noqa: B904 - the implicit context is the point
    assert is_transient(_raised(transient_over_unknown))

    loop = RuntimeError("a")
    loop.__cause__ = RuntimeError("b")
    loop.__cause__.__cause__ = loop  # a cycle in the chain ends the walk
    assert not is_transient(loop)
