"""predict_batch: the champion's predictions on a dataset split or an image folder."""

from __future__ import annotations

import tempfile
from typing import Annotated

from zenml import log_metadata, step
from zenml.logger import get_logger

from kdpipe import tracking
from kdpipe.config import PredictConfig, TrackingConfig
from kdpipe.data import build_dataset_spec
from kdpipe.predict import OnnxClassifier, Predictions, predict_folder, predict_split
from kdpipe.promotion import PromotionError, RegisteredVersion, download_version
from steps.tracking_context import stack_tracking_uri

logger = get_logger(__name__)


@step(enable_cache=False)
def predict_batch(champion: RegisteredVersion, predict_cfg: PredictConfig,
                  tracking_cfg: TrackingConfig) -> Annotated[Predictions, "predictions"]:
    """Download the pinned champion version and predict (see :mod:`kdpipe.predict`).

    Never cached: an image folder can change without anything in the config changing.

    Raises:
        PromotionError: the downloaded file is not the one that was promoted (sha256).
        InputShapeError: images of another size / channel count than the champion's.
    """
    uri = tracking.resolve_tracking_uri(tracking_cfg.tracking_uri,
                                        stack_uri=stack_tracking_uri())
    name = f"{champion.name}@champion (version {champion.version})"
    with tempfile.TemporaryDirectory(prefix="kdpipe-champion-") as tmp:
        local = download_version(champion, tmp, tracking_uri=uri)
        _check_sha256(champion, local.sha256)
        model = OnnxClassifier.from_metadata(local.onnx_path, local.metadata)
        if predict_cfg.image_folder is not None:
            predictions = predict_folder(model, predict_cfg.image_folder,
                                         batch_size=predict_cfg.batch_size, model_name=name)
        else:
            assert predict_cfg.data is not None  # PredictConfig guarantees one input
            predictions = predict_split(model, build_dataset_spec(predict_cfg.data),
                                        predict_cfg.split, batch_size=predict_cfg.batch_size,
                                        model_name=name)
    if predict_cfg.output_path is not None:
        written = predictions.write(predict_cfg.output_path)
        logger.info("predictions written to %s", written)
    log_metadata(metadata=dict(predictions.metadata()), artifact_name="predictions",
                 infer_artifact=True)
    accuracy = "n/a (no labels)" if predictions.accuracy is None else f"{predictions.accuracy:.4f}"
    logger.info("%d predictions by %s; accuracy %s", len(predictions.rows), name, accuracy)
    return predictions


def _check_sha256(champion: RegisteredVersion, digest: str) -> None:
    expected = champion.tags.get("onnx_sha256")
    if expected is not None and expected != digest:
        raise PromotionError(
            f"{champion.model_uri} holds an ONNX file with sha256 {digest}, but it was "
            f"promoted with {expected}: the registry's artifact was altered; promote again")


