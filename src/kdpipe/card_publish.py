"""The model card in MLflow: files in the pipeline's run, a description on the version.

:func:`log_card` writes ``model_card/model_card.md`` (with ``frontier.png`` beside it, which
the Markdown shows), ``model_card/model_card.html`` and ``plots/frontier.png`` into the
active run. :func:`describe_version` puts the card's summary paragraph in the registered
version's description (empty before) and a ``model_card`` tag pointing at the Markdown.
Core code: mlflow, never zenml.
"""

from __future__ import annotations

from typing import Any

from kdpipe.frontier import frontier_figure
from kdpipe.model_card import ModelCard
from kdpipe.model_card_view import FIGURE_FILE, card_html, card_markdown

__all__ = ["CARD_DIR", "CARD_FILE", "CARD_TAG", "describe_version", "log_card"]

CARD_DIR = "model_card"
CARD_FILE = f"{CARD_DIR}/model_card.md"
CARD_TAG = "model_card"
"""Tag on the registered version: ``runs:/<run id>/model_card/model_card.md``."""


def log_card(card: ModelCard) -> str:
    """Log the card and its figure into the active MLflow run; return the Markdown's URI.

    Raises:
        kdpipe.tracking.TrackingError: no MLflow run is active.
    """
    import mlflow

    from kdpipe.tracking import TrackingError

    run = mlflow.active_run()
    if run is None:
        raise TrackingError("no active MLflow run: log the model card inside "
                            "`with pipeline_run(...)`")
    figure = frontier_figure(card.frontier, title=f"{card.model_name}: accuracy vs latency")
    mlflow.log_figure(figure, f"{CARD_DIR}/{FIGURE_FILE}")
    mlflow.log_figure(figure, "plots/frontier.png")
    mlflow.log_text(card_markdown(card), CARD_FILE)
    mlflow.log_text(card_html(card), f"{CARD_DIR}/model_card.html")
    return f"runs:/{run.info.run_id}/{CARD_FILE}"


def describe_version(registered_model: str, version: str, description: str, *,
                     card_uri: str | None = None, tracking_uri: str | None = None) -> Any:
    """Set a registered version's description (and its ``model_card`` tag); return it.

    Raises:
        kdpipe.tracking.TrackingError: the registry refused (names the version and the cause).
    """
    from mlflow import MlflowClient

    from kdpipe.tracking import TrackingError, redact_uri

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.update_model_version(registered_model, str(version), description=description)
        if card_uri:
            client.set_model_version_tag(registered_model, str(version), CARD_TAG, card_uri)
    except Exception as err:  # MlflowException, SQLAlchemy and HTTP errors alike
        raise TrackingError(
            f"could not describe version {version} of registered model {registered_model!r}: "
            f"{redact_uri(str(err))}; the promotion itself stands (the card is in the run's "
            f"{CARD_DIR}/ folder)") from err
    return mv
