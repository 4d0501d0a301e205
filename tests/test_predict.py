"""kdpipe.predict: batch inference with an ONNX classifier on a split or an image folder."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluation import export_raw, make_bundle

from kdpipe.config import DataConfig, PredictConfig
from kdpipe.data import build_dataset_spec, make_loader
from kdpipe.predict import (
    InputShapeError,
    OnnxClassifier,
    PredictionError,
    Predictions,
    load_image,
    predict_folder,
    predict_split,
    softmax,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    spec = build_dataset_spec(DataConfig(source="digits"))
    bundle = make_bundle("cnn_tiny", spec, 0)
    tmp = tmp_path_factory.mktemp("predict")
    path = export_raw(bundle, tmp / "m.onnx")
    return {"spec": spec, "bundle": bundle, "tmp": tmp,
            "model": OnnxClassifier(path, spec.classes, spec.input_shape)}


def test_softmax_is_stable_and_normalised() -> None:
    p = softmax(np.array([[1000.0, 1000.0, 0.0], [1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(p[1], np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum(), atol=1e-12)


def test_split_predictions_match_pytorch_and_report_accuracy(world: dict) -> None:
    preds = predict_split(world["model"], world["spec"], "test", batch_size=64,
                          model_name="m@champion")
    n = world["spec"].split_sizes["test"]
    assert len(preds.rows) == n
    assert [r.key for r in preds.rows] == [str(i) for i in range(n)]
    # The same predictions as the PyTorch model on normalised input.
    batches = list(make_loader(world["spec"], "test", train=False))
    with torch.no_grad():
        logits = torch.cat([world["bundle"].model(x) for x, *_ in batches])
    probs = torch.softmax(logits.double(), dim=1)
    expected = [world["spec"].classes[i] for i in probs.argmax(1).tolist()]
    assert [r.predicted for r in preds.rows] == expected
    np.testing.assert_allclose([r.probability for r in preds.rows],
                               probs.max(1).values.numpy(), atol=1e-5)
    # Labels and accuracy against the split's own labels, not read back from the rows.
    truth = [world["spec"].classes[i] for i in torch.cat([y for _, y, *_ in batches]).tolist()]
    assert [r.label for r in preds.rows] == truth
    assert preds.accuracy == pytest.approx(
        np.mean([p == t for p, t in zip(expected, truth, strict=True)]), abs=1e-12)
    assert preds.metadata()["num_predictions"] == n


def test_split_with_other_classes_is_refused(world: dict) -> None:
    other = OnnxClassifier(world["model"].path, [f"c{i}" for i in range(10)],
                           world["spec"].input_shape)
    with pytest.raises(PredictionError, match=r"dataset's classes \['0', '1'.*are not the model's"):
        predict_split(other, world["spec"], "test", batch_size=64, model_name="m")


def test_wrong_batch_shape_names_expected_and_given(world: dict) -> None:
    with pytest.raises(InputShapeError,
                       match=r"expects images of shape \(C, H, W\) = \(1, 8, 8\); got a batch "
                             r"of shape \(2, 3, 8, 8\)"):
        world["model"].logits(np.zeros((2, 3, 8, 8), np.float32))


def _save_png(path: Path, array: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_folder_with_class_subfolders_is_labelled(world: dict) -> None:
    root = world["tmp"] / "labelled"
    rng = np.random.default_rng(0)
    images = {}
    for cls in ("3", "7"):
        for i in range(3):
            img = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            images[f"{cls}/{i}.png"] = img
            _save_png(root / cls / f"{i}.png", img, "L")
    preds = predict_folder(world["model"], root, batch_size=4, model_name="m")
    assert [r.key for r in preds.rows] == sorted(images)
    assert [r.label for r in preds.rows] == ["3"] * 3 + ["7"] * 3
    # Each file's prediction equals the model's on the raw pixels / 255.
    batch = np.stack([images[k][None].astype(np.float32) / 255 for k in sorted(images)])
    pred, prob = world["model"].predict(batch)
    assert [r.predicted for r in preds.rows] == [world["spec"].classes[i] for i in pred]
    np.testing.assert_allclose([r.probability for r in preds.rows], prob, atol=1e-7)
    correct = sum(r.label == r.predicted for r in preds.rows)
    assert preds.accuracy == pytest.approx(correct / 6, abs=1e-12)


def test_flat_folder_has_no_accuracy(world: dict) -> None:
    root = world["tmp"] / "flat"
    _save_png(root / "a.png", np.zeros((8, 8), np.uint8), "L")
    _save_png(root / "b.png", np.full((8, 8), 255, np.uint8), "L")
    (root / "notes.txt").write_text("not an image")
    preds = predict_folder(world["model"], root, batch_size=8, model_name="m")
    assert [r.key for r in preds.rows] == ["a.png", "b.png"]
    assert preds.accuracy is None
    assert all(r.label is None for r in preds.rows)
    assert "accuracy" not in preds.metadata()


def test_image_of_wrong_size_is_named_with_both_shapes(world: dict) -> None:
    root = world["tmp"] / "big"
    _save_png(root / "big.png", np.zeros((28, 28), np.uint8), "L")
    with pytest.raises(InputShapeError,
                       match=r"big.png: the model expects images of shape \(C, H, W\) = "
                             r"\(1, 8, 8\); this image is \(1, 28, 28\)"):
        predict_folder(world["model"], root, batch_size=8, model_name="m")


def test_rgb_image_for_a_grayscale_model_is_refused(world: dict) -> None:
    root = world["tmp"] / "rgb"
    _save_png(root / "rgb.png", np.zeros((8, 8, 3), np.uint8), "RGB")
    with pytest.raises(InputShapeError, match=r"\(1, 8, 8\); this image is \(3, 8, 8\)"):
        predict_folder(world["model"], root, batch_size=8, model_name="m")


def test_missing_or_empty_folder_is_an_error(world: dict) -> None:
    with pytest.raises(PredictionError, match="image folder not found: .*nowhere"):
        predict_folder(world["model"], world["tmp"] / "nowhere", batch_size=8, model_name="m")
    (world["tmp"] / "empty").mkdir()
    with pytest.raises(PredictionError, match="no images in"):
        predict_folder(world["model"], world["tmp"] / "empty", batch_size=8, model_name="m")


def test_load_image_scales_to_unit_range(tmp_path: Path) -> None:
    _save_png(tmp_path / "g.png", np.array([[0, 255]], np.uint8), "L")
    np.testing.assert_allclose(load_image(tmp_path / "g.png"), [[[0.0, 1.0]]])
    _save_png(tmp_path / "c.png", np.zeros((2, 3, 3), np.uint8) + 51, "RGB")
    img = load_image(tmp_path / "c.png")
    assert img.shape == (3, 2, 3)
    np.testing.assert_allclose(img, 0.2, atol=1e-7)


def test_from_metadata_requires_classes_and_shape(world: dict) -> None:
    with pytest.raises(PredictionError, match=r"lacks \['input_shape'\]"):
        OnnxClassifier.from_metadata(world["model"].path, {"classes": ["0"]})
    # The export's metadata_props style (JSON strings) reads the same as lists.
    model = OnnxClassifier.from_metadata(world["model"].path, {
        "classes": json.dumps(world["spec"].classes), "input_shape": "[1, 8, 8]"})
    assert model.classes == world["spec"].classes and model.input_shape == (1, 8, 8)


def test_predictions_write_csv_and_json(world: dict, tmp_path: Path) -> None:
    preds = predict_split(world["model"], world["spec"], "val", batch_size=64, model_name="m")
    rows = list(csv.DictReader(io.StringIO(preds.write(tmp_path / "p.csv").read_text())))
    assert len(rows) == len(preds.rows)
    assert rows[0]["key"] == "0" and rows[0]["predicted"] == preds.rows[0].predicted
    assert float(rows[0]["probability"]) == pytest.approx(preds.rows[0].probability, abs=1e-6)
    again = Predictions.model_validate(json.loads((preds.write(tmp_path / "p.json")).read_text()))
    assert again == preds
    with pytest.raises(PredictionError, match=r"use a \.csv or \.json path"):
        preds.write(tmp_path / "p.txt")


def test_predict_config_needs_exactly_one_input() -> None:
    with pytest.raises(ValueError, match="set exactly one of predict.data"):
        PredictConfig()
    with pytest.raises(ValueError, match="set exactly one of predict.data"):
        PredictConfig(data=DataConfig(source="digits"), image_folder="x")
    with pytest.raises(ValueError, match=r"must end in \.csv or \.json"):
        PredictConfig(image_folder="x", output_path="out.txt")


def test_shipped_predict_config_loads() -> None:
    from kdpipe.configfile import load_predict_config

    predict, tracking = load_predict_config(
        Path(__file__).resolve().parents[1] / "configs" / "predict.yaml")
    assert predict.data is not None and predict.split == "test"
    assert tracking.registered_model == "kdpipe-mnist-student"  # configs/default.yaml's


def test_predict_config_file_errors_name_every_key(tmp_path: Path) -> None:
    from kdpipe.config import ConfigError
    from kdpipe.configfile import load_predict_config

    path = tmp_path / "p.yaml"
    path.write_text("parameters:\n  data: {source: digits}\n  tracking: {registered: x}\n")
    with pytest.raises(ConfigError, match=r"(?s)parameters\.data: unknown key for the predict "
                       r"pipeline.*parameters\.predict: required"):
        load_predict_config(path)
    path.write_text("parameters:\n  predict: {image_folder: x}\n  tracking: {registered: x}\n")
    with pytest.raises(ConfigError, match=r"parameters\.tracking\.registered: unknown key"):
        load_predict_config(path)
