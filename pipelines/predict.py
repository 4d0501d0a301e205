"""The batch-inference pipeline: wiring only.

    load_champion → predict_batch

Parameters (``parameters:`` of ``configs/predict.yaml``): ``predict``
(:class:`kdpipe.config.PredictConfig`) and ``tracking`` (which registered model and
tracking URI). The model is the registered model's ``champion`` alias, the same one
``mlflow models serve -m "models:/<name>@champion"`` serves. No ZenML Model is attached:
a predict run must not create versions of the student model.
"""

from __future__ import annotations

from zenml import pipeline

from kdpipe.config import PredictConfig, TrackingConfig
from kdpipe.configfile import load_predict_config
from steps.load_champion import load_champion
from steps.predict_batch import predict_batch

__all__ = ["load_predict_config", "predict_pipeline"]


DEFAULT_TRACKING = TrackingConfig()


@pipeline
def predict_pipeline(predict: PredictConfig, tracking: TrackingConfig = DEFAULT_TRACKING) -> None:
    """Predict with the champion on a dataset split or an image folder."""
    champion = load_champion(tracking_cfg=tracking)
    predict_batch(champion=champion, predict_cfg=predict, tracking_cfg=tracking)
