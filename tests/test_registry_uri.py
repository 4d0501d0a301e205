"""Registration and the champion alias use one store, whatever $MLFLOW_REGISTRY_URI says.

``mlflow.set_registry_uri`` exports ``MLFLOW_REGISTRY_URI`` to every child process, so a
stale value once sent a pipeline's registration to another test's database while the
alias was moved in the right one ("Registered Model ... not found").
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from mlflow import MlflowClient
from onnx import TensorProto, helper

from kdpipe.promotion import register_onnx_model, set_champion


def _tiny_onnx(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.slow  # MLflow creates two SQLite databases
def test_registration_ignores_a_stale_registry_uri(tmp_path: Path, monkeypatch) -> None:
    import mlflow

    right = f"sqlite:///{tmp_path / 'right.db'}"
    stale = f"sqlite:///{tmp_path / 'stale.db'}"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", stale)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", right)
    mlflow.set_tracking_uri(right)
    try:
        version = register_onnx_model(_tiny_onnx(tmp_path / "m.onnx"), "kdpipe-uri-test",
                                      input_shape=(1, 2, 2), metadata={"classes": ["a"] * 4},
                                      experiment="kdpipe-uri-test", tracking_uri=right)
        assert set_champion("kdpipe-uri-test", version.version, tracking_uri=right) is None
        client = MlflowClient(tracking_uri=right, registry_uri=right)
        assert str(client.get_model_version_by_alias("kdpipe-uri-test", "champion").version) == "1"
    finally:
        mlflow.set_registry_uri(None)
        mlflow.set_tracking_uri(None)
