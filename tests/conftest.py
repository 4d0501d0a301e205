"""Test isolation: every test session gets its own ZenML store and MLflow database.

The environment must be set before anything imports zenml or creates an MLflow
client, so it is done at conftest import time, not in a fixture.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="kdpipe-tests-"))
# Remove the store, database and artifacts when the interpreter exits (KDPIPE_KEEP_TEST_DIR=1 keeps them).
if not os.environ.get("KDPIPE_KEEP_TEST_DIR"):
    atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)
os.environ["KDPIPE_TEST_DIR"] = str(_SESSION_DIR)
os.environ["ZENML_CONFIG_PATH"] = str(_SESSION_DIR / "zenml-config")
os.environ["ZENML_LOCAL_STORES_PATH"] = str(_SESSION_DIR / "zenml-stores")
os.environ["ZENML_ANALYTICS_OPT_IN"] = "false"
os.environ["ZENML_LOGGING_VERBOSITY"] = "WARN"
os.environ["ZENML_ENABLE_RICH_TRACEBACK"] = "false"
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlflow.db'}"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

# ZenML's console log handler holds the sys.stdout it found at import: import it now, while
# pytest's session-wide capture is active, not first inside a test whose capsys streams are
# closed afterwards (later ZenML log lines would then fail with "--- Logging error ---").
import zenml.logger  # noqa: E402,F401


@pytest.fixture(scope="session")
def session_dir() -> Path:
    """A temporary folder shared by the whole test session (ZenML store, MLflow DB)."""
    return _SESSION_DIR


@pytest.fixture(scope="session")
def run_in_process() -> Callable[..., tuple[int, str, str]]:
    """``run_pipeline.main(args)`` in this process: exit code, stdout and stderr.

    The same CLI code as ``python run_pipeline.py`` without a fresh interpreter (and
    ZenML, torch and the ONNX exporter warming up again) per run; steps run on the local
    orchestrator in this process, against the session's store and database. Tests that
    are about the process itself (exit codes, a clean environment, kills) start one.
    """
    import contextlib
    import io

    import run_pipeline

    def run(*args: str) -> tuple[int, str, str]:
        out, err, cwd = io.StringIO(), io.StringIO(), Path.cwd()
        os.chdir(Path(__file__).resolve().parents[1])  # configs/ paths are relative to the root
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = run_pipeline.main(list(args))
        finally:
            os.chdir(cwd)
        return code, out.getvalue(), err.getvalue()

    return run
