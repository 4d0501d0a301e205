"""MLflow tracking: one MLflow run per pipeline run, shared by every step.

Run model (the choice documented in docs/ARCHITECTURE.md, "Pipeline"):

* A pipeline run owns exactly one MLflow run, found by the tag ``kdpipe.run_key`` (the
  orchestrator's run id). The first step that logs creates it (named after the
  pipeline run); every later step re-opens it by that tag. This is the same scheme as
  ZenML's own MLflow experiment tracker (which keys by run name), so both can coexist.
* When an MLflow run is already active as the step starts (the stack's MLflow
  experiment tracker opened it for the step), that run is used as is and tagged.
* Metric names carry the stage as a prefix: ``teacher/train_loss``, ``student/train_kd``,
  ``recovery/val_accuracy``, ``eval/onnx_accuracy``...; per-epoch values use the epoch
  as the MLflow ``step``.
* Parameters are the flattened configuration (``student.train.lr`` ...). MLflow refuses
  to change a logged parameter, so :func:`log_params` only adds the missing ones.

The tracking URI is resolved by :func:`resolve_tracking_uri`: ``tracking.tracking_uri`` >
``MLFLOW_TRACKING_URI`` > the stack's MLflow experiment tracker > ``sqlite:///mlflow.db``
in the working directory. Anything printed goes through :func:`redact_uri`.

This module is core code: it imports mlflow, never zenml.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kdpipe.uris import redact_uri

__all__ = [
    "DEFAULT_TRACKING_URI",
    "RUN_KEY_TAG",
    "TrackingError",
    "check_sqlite_store",
    "default_artifact_location",
    "epoch_logger",
    "find_run",
    "flatten_params",
    "has_credentials",
    "log_figure",
    "log_history",
    "log_metrics",
    "log_onnx_model",
    "log_params",
    "pipeline_run",
    "redact_uri",
    "resolve_tracking_uri",
    "set_tags",
    "store_error",
]

logger = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RUN_KEY_TAG = "kdpipe.run_key"
"""Tag that identifies the MLflow run of one pipeline run (the orchestrator's run id)."""
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
# MLflow's SQLite store waits this long for a lock (PRAGMA busy_timeout in mlflow.store.db.utils).
_SQLITE_BUSY_TIMEOUT_S = 20


class TrackingError(RuntimeError):
    """MLflow could not be reached or refused an operation; the message says which URI."""


# ------------------------------------------------------------------------ URIs
def resolve_tracking_uri(explicit: str | None = None, *, stack_uri: str | None = None) -> str:
    """The MLflow tracking URI to use.

    Args:
        explicit: ``tracking.tracking_uri`` from the config; wins when set.
        stack_uri: the tracking URI of the active ZenML stack's MLflow experiment tracker
            (looked up by the step, since the core never imports zenml).

    Returns:
        ``explicit``, else ``$MLFLOW_TRACKING_URI``, else ``stack_uri``, else
        ``sqlite:///mlflow.db`` (a SQLite database in the current working directory).
    """
    return (explicit or os.environ.get("MLFLOW_TRACKING_URI") or stack_uri
            or DEFAULT_TRACKING_URI)


def has_credentials(uri: str) -> bool:
    """True when ``uri`` embeds a user/password or a secret query parameter."""
    return redact_uri(uri) != uri


def check_sqlite_store(uri: str) -> None:
    """Fail fast when a ``sqlite:///`` tracking database cannot be written.

    MLflow retries a database it cannot open ten times with exponential back-off
    (about 100 s) before failing; a read-only directory or database file is found here
    in milliseconds instead. SQLite also writes a journal beside the database, so the
    directory itself must be writable. Other URIs are left to MLflow.

    Raises:
        TrackingError: naming the database, the cause and the fix.
    """
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).expanduser()
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        # A real write, not os.access: root without CAP_DAC_OVERRIDE, ACLs and read-only
        # mounts all defeat access()'s answer.
        with tempfile.NamedTemporaryFile(dir=db.parent, prefix=".kdpipe-write-check-"):
            pass
        if db.exists():
            with db.open("r+b"):
                pass
    except OSError as err:
        raise TrackingError(
            f"cannot write the MLflow tracking database {db} ({err.strerror or err}); make "
            f"{db.parent} writable, or point tracking.tracking_uri / MLFLOW_TRACKING_URI at a "
            "writable location"
        ) from err


def store_error(uri: str, err: BaseException) -> TrackingError:
    """A :class:`TrackingError` for an MLflow store failure: redacted URI, cause, fix.

    Only the first line of the cause is kept (SQLAlchemy appends the whole SQL
    statement), and it is redacted too: drivers may quote the URI they failed on.
    """
    cause = redact_uri(str(err).strip().splitlines()[0] if str(err).strip() else "")
    hint = "check tracking.tracking_uri / MLFLOW_TRACKING_URI"
    if "database is locked" in cause:
        hint = (f"another process held a write lock on the SQLite database for more than "
                f"{_SQLITE_BUSY_TIMEOUT_S} s; retry when it finishes, or use an MLflow tracking "
                "server (or PostgreSQL/MySQL) for many concurrent runs")
    elif "database or disk is full" in cause or "File too large" in cause:
        hint = "free disk space where the tracking database lives"
    return TrackingError(f"cannot use the MLflow tracking store {redact_uri(uri)} "
                         f"({type(err).__name__}: {cause}); {hint}")


def default_artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``mlartifacts/`` beside a SQLite database.

    MLflow's own default for a SQLite store is ``./mlruns`` in whatever directory the
    process runs in, which scatters artifacts away from their database (tests, runs from
    other directories). A tracking server (None here) chooses its own location.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
    return (db.parent / "mlartifacts").as_uri()


# ---------------------------------------------------------------------- params
def flatten_params(config: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a (nested) config into ``{"a.b.c": "value"}`` strings for MLflow params.

    Lists and tuples stay one value (``[150, 180]``); ``None`` becomes ``"None"``.
    """
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, BaseModel | Mapping) and value:
            out.update(flatten_params(value, name))
        else:
            out[name] = str(value)[:_MAX_PARAM_CHARS]
    return out


def log_params(params: Mapping[str, str]) -> dict[str, str]:
    """Log the params the active run does not hold yet; return those newly logged.

    A re-opened run may already hold some of them (MLflow refuses to change a value);
    a differing value is skipped rather than failing the run, since one pipeline run
    always logs the same configuration.
    """
    import mlflow

    run = _require_active_run()
    existing = mlflow.get_run(run.info.run_id).data.params
    new = {k: v for k, v in params.items() if k not in existing}
    if new:
        mlflow.log_params(new)
    return new


# --------------------------------------------------------------------- the run
def find_run(experiment_id: str, run_key: str) -> str | None:
    """The id of the (non-deleted) run tagged ``kdpipe.run_key = run_key``, if any."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{_quote(run_key)}'",
        output_format="list",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


@contextlib.contextmanager
def pipeline_run(
    *,
    experiment: str,
    run_key: str,
    run_name: str,
    tracking_uri: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Open (or re-open) the MLflow run of one pipeline run for the duration of a block.

    Args:
        experiment: MLflow experiment name (created when missing).
        run_key: identifies the pipeline run (the orchestrator's run id); stored in the
            ``kdpipe.run_key`` tag, so every step of the run finds the same MLflow run.
        run_name: display name of a newly created run (the pipeline run's name).
        tracking_uri: the URI to use, already resolved by :func:`resolve_tracking_uri`;
            None resolves it here without a stack URI.
        tags: extra tags set on the run.

    Yields:
        The active ``mlflow.ActiveRun``. An MLflow run already active when the block
        starts (opened by the stack's experiment tracker) is used and left open.

    Raises:
        TrackingError: the tracking server / database cannot be used.
    """
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    all_tags = {RUN_KEY_TAG: run_key, **(tags or {})}
    active = mlflow.active_run()
    if active is not None:
        mlflow.set_tags(all_tags)
        yield active
        return
    check_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    try:
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=default_artifact_location(uri))
        exp = mlflow.set_experiment(experiment)
        run_id = find_run(exp.experiment_id, run_key)
        if run_id is None:
            run = mlflow.start_run(experiment_id=exp.experiment_id, run_name=run_name,
                                   tags=all_tags)
        else:
            run = mlflow.start_run(run_id=run_id)
    except Exception as err:  # re-raised with the (redacted) URI and the fix
        raise store_error(uri, err) from err
    # ActiveRun's __exit__ ends the run as FINISHED, or FAILED when the block raised.
    with _no_raw_url_printing(uri), run:
        yield run


@contextlib.contextmanager
def _no_raw_url_printing(uri: str) -> Iterator[None]:
    """Stop MLflow from printing ``View run ... at: <tracking URI>`` with its credentials.

    MLflow prints that link to stdout when a run on a tracking server ends, built from
    the raw URI, password included. For a URI with credentials the link is suppressed
    (MLflow's own switch) and a redacted one is logged instead.
    """
    if not has_credentials(uri):
        yield
        return
    key = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    before = os.environ.get(key)
    os.environ[key] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
        logger.info("MLflow run logged to %s", redact_uri(uri))


def _require_active_run() -> Any:
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise TrackingError("no active MLflow run: call this inside `with pipeline_run(...)`")
    return run


# ---------------------------------------------------------------------- metrics
def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Numeric, finite values only (MLflow rejects NaN in some stores; strings are not metrics)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


def log_metrics(metrics: Mapping[str, Any], prefix: str, step: int | None = None) -> None:
    """Log ``{prefix}/{name}`` for every numeric, finite value of ``metrics``."""
    import mlflow

    _require_active_run()
    values = {f"{prefix}/{k}": v for k, v in _finite(metrics).items()}
    if values:
        mlflow.log_metrics(values, step=step)


def epoch_logger(prefix: str) -> Callable[[int, dict[str, float]], None]:
    """A :func:`kdpipe.train.fit` callback logging each epoch's metrics under ``prefix/``.

    The epoch becomes the MLflow step, so the UI draws one curve per metric.
    """

    def callback(epoch: int, metrics: dict[str, float]) -> None:
        log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, prefix, step=epoch)

    return callback


def log_history(history: Sequence[Mapping[str, Any]], prefix: str) -> None:
    """Log a finished training history (one dict per epoch, 1-based ``epoch`` key)."""
    callback = epoch_logger(prefix)
    for i, row in enumerate(history, start=1):
        callback(int(row.get("epoch", i)), dict(row))


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags on the active run (values become strings)."""
    import mlflow

    _require_active_run()
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_figure(figure: Any, artifact_file: str) -> None:
    """Log a matplotlib figure as an image artifact of the active run (e.g. ``plots/x.png``)."""
    import mlflow

    _require_active_run()
    mlflow.log_figure(figure, artifact_file)


# ------------------------------------------------------------------------ ONNX
def log_onnx_model(
    onnx_path: str | Path,
    *,
    name: str,
    input_example: Any,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Log an ONNX file with MLflow's ONNX flavor, its signature and an input example.

    The signature is inferred from ``input_example`` and ONNX Runtime's output on it,
    so it describes exactly what the served model answers.

    Args:
        onnx_path: the self-contained ``.onnx`` file.
        name: the logged model's name within the run (e.g. ``student_onnx``).
        input_example: a float32 array of raw pixels shaped like the model's input.
        metadata: free-form metadata stored in the MLmodel file.

    Returns:
        The logged model's URI (``models:/<model_id>``), usable for registration.
    """
    import mlflow
    import mlflow.onnx
    import numpy as np
    import onnx
    import onnxruntime as ort
    from mlflow.models import infer_signature

    _require_active_run()
    example = np.ascontiguousarray(input_example, dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    output = session.run(None, {session.get_inputs()[0].name: example})[0]
    info = mlflow.onnx.log_model(
        onnx.load(str(onnx_path)),
        name=name,
        signature=infer_signature(example, output),
        input_example=example,
        metadata=dict(metadata or {}),
        # One self-contained file is the artifact contract; never split weights out.
        save_as_external_data=False,
        # A small CPU-targeted student: declaring CUDA would only warn on CPU-only hosts.
        onnx_execution_providers=["CPUExecutionProvider"],
    )
    return info.model_uri
