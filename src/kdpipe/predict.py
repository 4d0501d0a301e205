"""Batch inference with the promoted student: a dataset split or a folder of images.

The model is the registry's ``champion`` (see :mod:`kdpipe.promotion`): an ONNX file that
takes raw pixels in [0, 1], shaped (N, C, H, W), and returns one logit per class. The
class names and the input shape travel in the registered model's metadata, so inference
needs neither the dataset spec nor PyTorch.

Nothing is resized or converted: an image whose size or channel count differs from the
champion's input is an error naming both shapes, because a silently resized digit is a
wrong prediction nobody notices.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

__all__ = [
    "IMAGE_SUFFIXES",
    "InputShapeError",
    "OnnxClassifier",
    "PredictionError",
    "PredictionRow",
    "Predictions",
    "predict_folder",
    "predict_split",
    "softmax",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm"}


class PredictionError(ValueError):
    """The inputs cannot be predicted by this model (wrong classes, no images...)."""


class InputShapeError(PredictionError):
    """An input's (C, H, W) differs from the model's."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PredictionRow(_Frozen):
    """One prediction: ``key`` is the sample's index in the split, or the image's path."""

    key: str
    predicted: str
    probability: float
    label: str | None = None


class Predictions(_Frozen):
    """The ``predictions`` artifact."""

    model: str
    """What made them, e.g. ``kdpipe-student@champion (version 3)``."""
    source: str
    """What was predicted, e.g. ``digits test split`` or a folder path."""
    classes: list[str]
    rows: list[PredictionRow]
    accuracy: float | None
    """Fraction of rows whose label equals the prediction; None without labels."""

    def metadata(self) -> dict[str, float | int | str]:
        """Flat key -> value summary for the ZenML dashboard."""
        out: dict[str, float | int | str] = {"model": self.model, "source": self.source,
                                             "num_predictions": len(self.rows)}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        return out

    def summary(self) -> str:
        """One line for the terminal: how many, by which model, and the accuracy."""
        acc = "n/a (no labels)" if self.accuracy is None else f"{self.accuracy:.4f}"
        return f"{len(self.rows)} predictions on {self.source} by {self.model}; accuracy {acc}"

    def to_csv(self) -> str:
        """``key,predicted,probability,label`` with a header row."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["key", "predicted", "probability", "label"])
        for r in self.rows:
            writer.writerow([r.key, r.predicted, f"{r.probability:.6f}", r.label or ""])
        return buf.getvalue()

    def write(self, path: str | Path) -> Path:
        """Write the rows as CSV (``.csv``) or the whole artifact as JSON (``.json``)."""
        p = Path(path)
        if p.suffix not in {".csv", ".json"}:
            raise PredictionError(f"cannot write predictions to {p}: use a .csv or .json path")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_csv() if p.suffix == ".csv" else self.model_dump_json(indent=1))
        return p


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class OnnxClassifier:
    """An ONNX classifier with its class names and the input shape it accepts.

    Args:
        onnx_path: the model (raw pixels in [0, 1] in, logits out).
        classes: class names in output order.
        input_shape: (C, H, W) of one image.
    """

    def __init__(self, onnx_path: str | Path, classes: Sequence[str],
                 input_shape: Sequence[int]) -> None:
        import onnxruntime as ort

        self.path = Path(onnx_path)
        self.classes = list(classes)
        self.input_shape = tuple(int(d) for d in input_shape)
        self._session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    @classmethod
    def from_metadata(cls, onnx_path: str | Path, metadata: dict[str, Any]) -> OnnxClassifier:
        """Build from a registered model's metadata (``classes``, ``input_shape``)."""
        missing = [k for k in ("classes", "input_shape") if k not in metadata]
        if missing:
            raise PredictionError(
                f"the registered model's metadata lacks {missing} (has {sorted(metadata)}); "
                "it was not registered by kdpipe's promote_student step — promote a student "
                "with `python run_pipeline.py`")
        # kdpipe.export's ONNX metadata_props hold JSON strings; the registry holds lists.
        classes, shape = (json.loads(v) if isinstance(v, str) else v
                          for v in (metadata["classes"], metadata["input_shape"]))
        return cls(onnx_path, classes, shape)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for a raw-pixel batch (N, C, H, W).

        Raises:
            InputShapeError: the batch's (C, H, W) is not the model's.
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputShapeError(
                f"the model expects images of shape (C, H, W) = {self.input_shape}; "
                f"got a batch of shape {tuple(x.shape)}")
        return self._session.run(None, {self._input: np.ascontiguousarray(x, np.float32)})[0]

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted class index, its softmax probability) per image."""
        probs = softmax(self.logits(x).astype(np.float64))
        pred = probs.argmax(axis=1)
        return pred, probs[np.arange(len(pred)), pred]


def _rows(model: OnnxClassifier, batches: Iterator[tuple[list[str], np.ndarray,
                                                          list[str | None]]]
          ) -> tuple[list[PredictionRow], float | None]:
    rows: list[PredictionRow] = []
    for keys, x, labels in batches:
        pred, prob = model.predict(x)
        rows.extend(PredictionRow(key=k, predicted=model.classes[int(i)], probability=float(p),
                                  label=lab)
                    for k, i, p, lab in zip(keys, pred, prob, labels, strict=True))
    if not rows:
        raise PredictionError("nothing to predict: the input holds no samples")
    labelled = [r for r in rows if r.label is not None]
    accuracy = (sum(r.label == r.predicted for r in labelled) / len(labelled)
                if len(labelled) == len(rows) else None)
    return rows, accuracy


def predict_split(model: OnnxClassifier, dataset: Any, split: str, *, batch_size: int,
                  model_name: str) -> Predictions:
    """Predict every sample of a dataset split (labels known: accuracy is computed).

    Args:
        model: the champion.
        dataset: a :class:`kdpipe.data.DatasetSpec`.
        split: ``train``, ``val`` or ``test``.
        batch_size: images per ONNX Runtime call.
        model_name: recorded in the artifact.

    Raises:
        PredictionError: the dataset's classes are not the model's.
        InputShapeError: the dataset's images are not the model's input shape.
    """
    from kdpipe.data import make_loader

    if list(dataset.classes) != model.classes:
        raise PredictionError(
            f"the dataset's classes {list(dataset.classes)} are not the model's "
            f"{model.classes}: predict on data with the classes the champion was trained on")
    if tuple(dataset.input_shape) != model.input_shape:
        raise InputShapeError(
            f"the model expects images of shape (C, H, W) = {model.input_shape}; the dataset "
            f"{dataset.config.source!r} has {tuple(dataset.input_shape)}")
    loader = make_loader(dataset, split, train=False, batch_size=batch_size, normalize=False)

    def batches() -> Iterator[tuple[list[str], np.ndarray, list[str | None]]]:
        for x, y, index in loader:
            yield ([str(int(i)) for i in index], x.numpy(),
                   [model.classes[int(t)] for t in y])

    rows, accuracy = _rows(model, batches())
    return Predictions(model=model_name, source=f"{dataset.config.source} {split} split",
                       classes=model.classes, rows=rows, accuracy=accuracy)


def load_image(path: Path) -> np.ndarray:
    """An image file as float32 (C, H, W) in [0, 1], channels as stored (no conversion).

    Grayscale gives 1 channel, RGB 3, RGBA 4; palette images are expanded to RGB(A).
    """
    from PIL import Image

    with Image.open(path) as im:
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode == "1":
            im = im.convert("L")
        arr = np.asarray(im)
    scale = 255.0 if arr.dtype == np.uint8 else (65535.0 if arr.dtype == np.uint16 else 1.0)
    x = arr.astype(np.float32) / scale
    return x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)


def _folder_items(folder: Path, classes: Sequence[str]) -> list[tuple[Path, str | None]]:
    """Images directly in ``folder`` (unlabelled) or in sub-folders named after classes."""
    items: list[tuple[Path, str | None]] = [
        (p, None) for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = sub.name if sub.name in classes else None
        items.extend((p, label) for p in sorted(sub.rglob("*"))
                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return items


def predict_folder(model: OnnxClassifier, folder: str | Path, *, batch_size: int,
                   model_name: str) -> Predictions:
    """Predict every image under ``folder``.

    Images directly in the folder are unlabelled; images in a sub-folder named after one
    of the model's classes are labelled with it (the accuracy is computed when every image
    is labelled).

    Raises:
        PredictionError: the folder does not exist or holds no images.
        InputShapeError: an image's (C, H, W) is not the model's (the file is named).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise PredictionError(f"image folder not found: {root} (set predict.image_folder)")
    items = _folder_items(root, model.classes)
    if not items:
        raise PredictionError(
            f"no images in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} files, "
            "directly or one sub-folder level down)")

    def batches() -> Iterator[tuple[list[str], np.ndarray, list[str | None]]]:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            images = []
            for path, _ in chunk:
                img = load_image(path)
                if img.shape != model.input_shape:
                    raise InputShapeError(
                        f"{path}: the model expects images of shape (C, H, W) = "
                        f"{model.input_shape}; this image is {img.shape}. Resize / convert "
                        "the images to the champion's input first")
                images.append(img)
            yield ([str(p.relative_to(root)) for p, _ in chunk], np.stack(images),
                   [lab for _, lab in chunk])

    rows, accuracy = _rows(model, batches())
    return Predictions(model=model_name, source=str(root), classes=model.classes, rows=rows,
                       accuracy=accuracy)

