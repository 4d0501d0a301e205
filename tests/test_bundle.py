"""Pickle-free bundles: every registered model round-trips bit-identically; bad files fail."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from kdpipe.bundle import (
    SPEC_FILE,
    WEIGHTS_FILE,
    Bundle,
    BundleError,
    ModelSpec,
    load_bundle,
    save_bundle,
)
from kdpipe.models import create_model, list_models

# Large or slow-to-build models: still tested, under the slow marker.
_SLOW = {"resnet110", "resnet56", "resnet44", "resnet32x4", "wrn_40_2", "cnn_large"}


def _input_shape(arch: str) -> tuple[int, int, int]:
    return (1, 28, 28) if arch.startswith("cnn_") else (3, 32, 32)


def _bundle(arch: str, model: nn.Module | None = None, **extra) -> Bundle:
    shape = _input_shape(arch)
    model = model if model is not None else create_model(arch, 10, shape[0]).eval()
    return Bundle.from_model(
        model, arch=arch, classes=[f"c{i}" for i in range(10)], input_shape=shape,
        mean=[0.5] * shape[0], std=[0.25] * shape[0], extra=extra,
    )


def _assert_same_outputs(a: nn.Module, b: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param(a, marks=pytest.mark.slow) if a in _SLOW or a.startswith("tv_") else a
        for a in list_models()
    ],
)
def test_every_registered_model_round_trips_bit_identically(arch: str, tmp_path: Path) -> None:
    bundle = _bundle(arch, history=[{"epoch": 1, "val_accuracy": 0.5}])
    loaded = load_bundle(save_bundle(bundle, tmp_path / "b"))
    assert loaded.spec.model_dump() == bundle.spec.model_dump()
    assert loaded.spec.layout == {}  # unpruned: nothing to re-apply
    assert not loaded.model.training
    _assert_same_outputs(bundle.model, loaded.model, _input_shape(arch))


def test_bundle_files_and_spec_contents(tmp_path: Path) -> None:
    directory = save_bundle(_bundle("cnn_tiny", source_run="r1"), tmp_path / "b")
    assert sorted(p.name for p in directory.iterdir()) == [SPEC_FILE, WEIGHTS_FILE]
    spec = json.loads((directory / SPEC_FILE).read_text())
    assert spec["arch"] == "cnn_tiny" and spec["num_classes"] == 10 and spec["in_channels"] == 1
    assert spec["input_shape"] == [1, 28, 28] and spec["mean"] == [0.5] and spec["std"] == [0.25]
    assert spec["extra"] == {"source_run": "r1"} and len(spec["weights_sha256"]) == 64
    assert not list(tmp_path.glob(".b.tmp-*"))  # the staging directory is gone


def test_load_bundle_result_unpacks_as_model_and_spec(tmp_path: Path) -> None:
    model, spec = load_bundle(save_bundle(_bundle("cnn_tiny"), tmp_path / "b"))
    assert isinstance(model, nn.Module) and spec.arch == "cnn_tiny"


def test_pruned_layout_is_recorded_and_reapplied(tmp_path: Path) -> None:
    # A hand-made "pruning": shrink stage1's conv and BN (and stage2's conv input) to 5.
    model = create_model("cnn_tiny", 10, 1).eval()
    conv, bn = model.features.stage1.conv1.conv, model.features.stage1.conv1.bn
    nxt = model.features.stage2.conv1.conv
    keep = torch.tensor([0, 1, 3])
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight[keep].clone())
        conv.out_channels = 3
        for name in ("weight", "bias"):
            setattr(bn, name, nn.Parameter(getattr(bn, name)[keep].clone()))
        bn.running_mean, bn.running_var = bn.running_mean[keep].clone(), bn.running_var[keep].clone()
        bn.num_features = 3
        nxt.weight = nn.Parameter(nxt.weight[:, keep].clone())
        nxt.in_channels = 3
    bundle = _bundle("cnn_tiny", model)
    assert bundle.spec.layout["features.stage1.conv1.conv"] == {
        "type": "Conv2d", "attrs": {"out_channels": 3}, "tensors": {"weight": [3, 1, 3, 3]},
    }
    assert set(bundle.spec.layout) == {
        "features.stage1.conv1.conv", "features.stage1.conv1.bn", "features.stage2.conv1.conv",
    }
    loaded = load_bundle(save_bundle(bundle, tmp_path / "b"))
    _assert_same_outputs(model, loaded.model, (1, 28, 28))


def test_torch_save_weights_are_refused_as_pickle(tmp_path: Path) -> None:
    directory = save_bundle(_bundle("cnn_tiny"), tmp_path / "b")
    torch.save(create_model("cnn_tiny", 10, 1).state_dict(), directory / WEIGHTS_FILE)
    with pytest.raises(BundleError, match=r"weights\.safetensors holds a pickle payload.*refusing"):
        load_bundle(directory)


def test_raw_pickle_weights_are_refused(tmp_path: Path) -> None:
    directory = save_bundle(_bundle("cnn_tiny"), tmp_path / "b")
    (directory / WEIGHTS_FILE).write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(BundleError, match="pickle payload"):
        load_bundle(directory)


def test_truncated_safetensors_names_the_file(tmp_path: Path) -> None:
    directory = save_bundle(_bundle("cnn_tiny"), tmp_path / "b")
    weights = directory / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(BundleError, match=r"weights\.safetensors is not a readable safetensors file \(truncated or corrupt"):
        load_bundle(directory)


def test_changed_weights_fail_the_hash_check(tmp_path: Path) -> None:
    directory = save_bundle(_bundle("cnn_tiny"), tmp_path / "b")
    weights = directory / WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # a valid file with one flipped bit in the tensor data
    weights.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="has sha256 .* but bundle.json records"):
        load_bundle(directory)


def test_unknown_arch_lists_valid_names(tmp_path: Path) -> None:
    directory = save_bundle(_bundle("cnn_tiny"), tmp_path / "b")
    spec = json.loads((directory / SPEC_FILE).read_text())
    spec["arch"] = "cnn_huge"
    (directory / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(BundleError, match=r"unknown model 'cnn_huge'; valid names: .*cnn_small"):
        load_bundle(directory)


def test_missing_directory_says_what_a_bundle_is(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="is not a kdpipe bundle"):
        load_bundle(tmp_path / "nothing")


def test_save_refuses_a_directory_with_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="is not a kdpipe bundle .* refusing to overwrite"):
        save_bundle(_bundle("cnn_tiny"), tmp_path / "b")
    assert (tmp_path / "b" / "notes.txt").read_text() == "keep me"


def test_save_replaces_a_previous_bundle(tmp_path: Path) -> None:
    first = save_bundle(_bundle("cnn_tiny"), tmp_path / "b")
    old_sha = json.loads((first / SPEC_FILE).read_text())["weights_sha256"]
    second = _bundle("cnn_tiny", create_model("cnn_tiny", 10, 1).eval())
    loaded = load_bundle(save_bundle(second, tmp_path / "b"))
    assert loaded.spec.weights_sha256 == second.spec.weights_sha256 != old_sha
    _assert_same_outputs(second.model, loaded.model, (1, 28, 28))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging / old copies left


def test_model_not_built_by_the_registry_is_refused() -> None:
    model = create_model("cnn_tiny", 10, 1)
    model.extra_head = nn.Linear(10, 10)
    with pytest.raises(BundleError, match=r"module tree differs .* added \['extra_head'\]"):
        _bundle("cnn_tiny", model)


def test_spec_checks_consistency_and_json() -> None:
    good = _bundle("cnn_tiny").spec.model_dump()
    with pytest.raises(ValidationError, match="9 class names for num_classes=10"):
        ModelSpec.model_validate({**good, "classes": [str(i) for i in range(9)]})
    with pytest.raises(ValidationError, match="mean/std have 3/1 entries for 1 channel"):
        ModelSpec.model_validate({**good, "mean": (0.1, 0.2, 0.3)})
    with pytest.raises(ValidationError, match="extra must be plain JSON"):
        ModelSpec.model_validate({**good, "extra": {"model": object()}})
