"""load_champion: resolve ``<registered model>@champion`` to a pinned version; never cached."""

from __future__ import annotations

from typing import Annotated

from zenml import log_metadata, step
from zenml.logger import get_logger

from kdpipe import tracking
from kdpipe.config import TrackingConfig
from kdpipe.promotion import RegisteredVersion, require_champion
from steps.tracking_context import stack_tracking_uri

logger = get_logger(__name__)


@step(enable_cache=False)
def load_champion(tracking_cfg: TrackingConfig) -> Annotated[RegisteredVersion, "champion"]:
    """The MLflow version the ``champion`` alias points at *now*.

    The MLflow alias is the serving contract (``mlflow models serve`` resolves the same
    alias, and promotion moves it together with the ZenML production stage). Resolving it
    once, here, pins the version for the rest of the run: a promotion that lands while
    predictions are being made cannot swap the model half-way. Never cached, since the
    alias moves.

    Raises:
        NoChampionError: nothing has been promoted yet (the message says how to get one).
    """
    uri = tracking.resolve_tracking_uri(tracking_cfg.tracking_uri,
                                        stack_uri=stack_tracking_uri())
    champion = require_champion(tracking_cfg.registered_model, tracking_uri=uri)
    log_metadata(metadata={"registered_model": champion.name, "mlflow_version": champion.version,
                           "zenml_model_version": champion.tags.get("zenml_model_version", ""),
                           "mlflow_tracking_uri": tracking.redact_uri(uri)})
    logger.info("champion: %s version %s (ZenML model version %s)", champion.name,
                champion.version, champion.tags.get("zenml_model_version", "?"))
    return champion
