"""ONNX export: preprocessing in the graph, one file, metadata, dynamic batch, parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from kdpipe.bundle import Bundle
from kdpipe.config import ExportConfig, PruneConfig
from kdpipe.export import (
    ExportError,
    ParityError,
    check_parity,
    export_onnx,
    read_metadata,
    with_preprocessing,
)
from kdpipe.models import create_model
from kdpipe.prune import prune_model

MEAN, STD = 0.1307, 0.3081


def _bundle(arch: str, *, pruned: bool = False, model: nn.Module | None = None) -> Bundle:
    shape = (1, 28, 28) if arch.startswith("cnn_") else (3, 32, 32)
    torch.manual_seed(0)
    model = model if model is not None else create_model(arch, 10, shape[0]).eval()
    if pruned:
        prune_model(model, torch.zeros(1, *shape), PruneConfig(ratio=0.5), latency_repeats=3)
    return Bundle.from_model(model.eval(), arch=arch, classes=[f"digit{i}" for i in range(10)],
                             input_shape=shape, mean=[MEAN] * shape[0], std=[STD] * shape[0])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, object]:
    """cnn_small exported once with the default (dynamo) exporter, shared by the tests."""
    bundle = _bundle("cnn_small")
    path = tmp_path_factory.mktemp("onnx") / "student.onnx"
    return bundle, export_onnx(bundle, path, ExportConfig(), source_run="run-42")


def test_export_writes_one_checked_self_contained_file(exported) -> None:
    _, result = exported
    path = Path(result.path)
    assert [p.name for p in path.parent.iterdir()] == ["student.onnx"]  # no external data
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 18 and result.opset == 18
    assert result.exporter == "dynamo" and result.filename == "student.onnx"
    assert result.size_bytes == path.stat().st_size
    import hashlib
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_metadata_describes_the_model(exported) -> None:
    bundle, result = exported
    meta = read_metadata(result.path)
    assert meta["classes"] == [f"digit{i}" for i in range(10)]
    assert meta["input_shape"] == [1, 28, 28]
    assert meta["mean"] == [MEAN] and meta["std"] == [STD]
    assert meta["weights_sha256"] == bundle.spec.weights_sha256
    assert meta["source_run"] == "run-42" and meta["kdpipe_version"]
    assert result.metadata["arch"] == "cnn_small"
    assert meta["precision"] == "fp32"  # an INT8 version says "int8" (kdpipe.quantize)


@pytest.mark.parametrize("batch", [1, 16])
def test_dynamic_batch_and_raw_pixel_input(exported, batch: int) -> None:
    bundle, result = exported
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "pixels" and out.name == "logits"
    assert inp.shape[1:] == [1, 28, 28] and not isinstance(inp.shape[0], int)
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
    (logits,) = session.run(None, {"pixels": x.numpy()})
    # Normalization is inside the graph: the ONNX model on raw pixels equals the
    # PyTorch model on (x - mean) / std.
    with torch.no_grad():
        expected = bundle.model.eval()((x - MEAN) / STD).numpy()
    assert logits.shape == (batch, 10)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-4)


def test_parity_is_reported_per_batch_size(exported) -> None:
    _, result = exported
    parity = result.parity
    assert parity.passed and [b.batch_size for b in parity.batches] == [1, 16]
    assert parity.seed != 0  # not the export example's seed
    assert all(b.max_abs_error < 1e-4 for b in parity.batches)


def test_perturbed_graph_fails_parity(exported, tmp_path: Path) -> None:
    bundle, result = exported
    model = onnx.load(result.path)
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # a conv weight
    values = numpy_helper.to_array(init).copy()
    values.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    bad = tmp_path / "perturbed.onnx"
    onnx.save(model, str(bad))
    parity = check_parity(bundle, bad, ExportConfig())
    assert not parity.passed
    assert parity.max_abs_error > 1e-4
    assert "FAILED" in parity.describe()


def test_perturbed_model_fails_parity(exported) -> None:
    bundle, result = exported
    other = create_model("cnn_small", 10, 1).eval()
    other.load_state_dict(bundle.model.state_dict())
    with torch.no_grad():
        other.fc.bias.add_(1e-2)
    parity = check_parity(Bundle(other, bundle.spec), result.path, ExportConfig())
    assert not parity.passed
    assert parity.max_abs_error == pytest.approx(1e-2, rel=1e-3)


def test_parity_inputs_must_match_the_spec(exported) -> None:
    bundle, result = exported
    with pytest.raises(ValueError, match=r"parity inputs must have shape \(>= 16, 1, 28, 28\); got \(4, 1, 28, 28\)"):
        check_parity(bundle, result.path, ExportConfig(), inputs=torch.rand(4, 1, 28, 28))


class _ExportOnlyShift(nn.Module):
    """Behaves differently while being exported: the exported graph is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.net = create_model("cnn_tiny", 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y + 1.0 if torch.onnx.is_in_onnx_export() else y


def test_parity_failure_raises_and_removes_the_file(tmp_path: Path) -> None:
    spec = _bundle("cnn_tiny").spec
    bundle = Bundle(_ExportOnlyShift().eval(), spec)
    path = tmp_path / "bad.onnx"
    with pytest.raises(ParityError, match=r"disagrees with PyTorch .*batch 1: max abs 1, .*FAILED.* was removed") as info:
        export_onnx(bundle, path, ExportConfig(exporter="torchscript"))
    assert not info.value.report.passed
    assert not path.exists()


def test_parity_failure_is_recorded_when_the_check_is_disabled(tmp_path: Path) -> None:
    spec = _bundle("cnn_tiny").spec
    result = export_onnx(Bundle(_ExportOnlyShift().eval(), spec), tmp_path / "bad.onnx",
                         ExportConfig(exporter="torchscript", check_parity=False))
    assert not result.parity.passed
    assert result.parity.max_abs_error == pytest.approx(1.0, abs=1e-5)
    assert Path(result.path).exists()


class _Untranslatable(nn.Module):
    """eigvals has no ONNX translation: the dynamo exporter's conversion fails."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(x[:, 0, :4, :4]).real.flatten(1)[:, :10]


def test_exporter_failure_names_the_exporter(tmp_path: Path) -> None:
    bundle = Bundle(_Untranslatable().eval(), _bundle("cnn_tiny").spec)
    with pytest.raises(ExportError, match=r"(?s)the dynamo ONNX exporter failed on 'cnn_tiny' \(opset 18\): .*No ONNX function found for .*linalg_eig.*Fix: .*export\.exporter: torchscript"):
        export_onnx(bundle, tmp_path / "x.onnx", ExportConfig())
    assert not (tmp_path / "x.onnx").exists()


def test_with_preprocessing_matches_manual_normalization() -> None:
    bundle = _bundle("cnn_tiny")
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(with_preprocessing(bundle)(x), bundle.model((x - MEAN) / STD))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "pruned"),
    [("cnn_small", True), ("resnet20", False), ("resnet20", True),
     ("tv_mobilenet_v2", False), ("tv_mobilenet_v2", True)],
)
def test_export_and_parity_for_residual_and_depthwise_models(arch: str, pruned: bool, tmp_path: Path) -> None:
    bundle = _bundle(arch, pruned=pruned)
    result = export_onnx(bundle, tmp_path / f"{arch}.onnx", ExportConfig())
    assert result.parity.passed, result.parity.describe()
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    for batch in (1, 16):
        (out,) = session.run(None, {"pixels": np.random.rand(batch, *bundle.spec.input_shape).astype(np.float32)})
        assert out.shape == (batch, 10)
