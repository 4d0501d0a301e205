"""The ZenML side of MLflow tracking: which run and which URI a step logs to.

Every step that logs calls :func:`mlflow_run`; all of them land in the one MLflow run of
the pipeline run (see :func:`kdpipe.tracking.pipeline_run`), found by the ZenML run id.
The URI is ``tracking.tracking_uri`` > ``MLFLOW_TRACKING_URI`` > the active stack's MLflow
experiment tracker > ``sqlite:///mlflow.db`` in the working directory. When a step is
configured with the stack's experiment tracker (``steps.<name>.experiment_tracker``), the
tracker opens the run itself and :func:`mlflow_run` logs into it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from zenml import get_step_context, log_metadata
from zenml.client import Client
from zenml.exceptions import StepContextError
from zenml.logger import get_logger

from kdpipe import tracking
from kdpipe.config import TrackingConfig

logger = get_logger(__name__)


def stack_tracking_uri() -> str | None:
    """The tracking URI of the active stack's MLflow experiment tracker, if it has one."""
    tracker = Client().active_stack.experiment_tracker
    if tracker is None or tracker.flavor != "mlflow":
        return None
    return tracker.get_tracking_uri()


def _step_model(ctx: Any) -> Any | None:
    """The step's ZenML model, or None for a pipeline without one (ZenML raises then)."""
    try:
        return ctx.model
    except StepContextError:
        return None


@contextlib.contextmanager
def mlflow_run(tracking_cfg: TrackingConfig) -> Iterator[str]:
    """Open the pipeline run's MLflow run for the block; yield the tracking URI in use.

    The MLflow run id is recorded in the step's ZenML metadata (``mlflow_run_id``), so
    the dashboard links each step to its MLflow run.
    """
    ctx = get_step_context()
    run = ctx.pipeline_run
    uri = tracking.resolve_tracking_uri(tracking_cfg.tracking_uri, stack_uri=stack_tracking_uri())
    tags = {"zenml.pipeline": ctx.pipeline.name, "zenml.run_name": run.name}
    model = _step_model(ctx)
    if model is not None:
        tags["zenml.model"] = model.name
        tags["zenml.model_version"] = str(model.version)
    with tracking.pipeline_run(experiment=tracking_cfg.experiment, run_key=str(run.id),
                               run_name=run.name, tracking_uri=uri, tags=tags) as active:
        log_metadata(metadata={"mlflow_run_id": active.info.run_id,
                               "mlflow_tracking_uri": tracking.redact_uri(uri),
                               "mlflow_experiment": tracking_cfg.experiment})
        yield uri
