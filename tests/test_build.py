"""Building a model from its config: pretrained weights, start checkpoints and their errors."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kdpipe.build import build_model, check_checkpoint, load_state_dict_checked
from kdpipe.bundle import Bundle, save_bundle
from kdpipe.config import ModelConfig
from kdpipe.configfile import parse_config
from kdpipe.models import WeightsUnavailableError, create_model
from kdpipe.state_dicts import STATE_DICT_KEYS, load_weights_only
from kdpipe.validate import find_problems


def test_offline_pretrained_weights_raise_a_clear_error(monkeypatch):
    from torchvision.models import WeightsEnum

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    cfg = ModelConfig(arch="tv_resnet18", weights="DEFAULT")
    with pytest.raises(
        WeightsUnavailableError, match=r"ResNet18_Weights\.IMAGENET1K_V1.*need a download"
    ) as err:
        build_model(cfg, num_classes=10, in_channels=3)
    assert "model.weights: null" in str(err.value)
    assert "name resolution" in str(err.value)


# ------------------------------------------------------------------------ checkpoints
def _eval_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _trained_like(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """A model whose BN statistics differ from a fresh one, so a failed load shows."""
    torch.manual_seed(3)
    model = create_model(arch, num_classes, 1, **kwargs)
    with torch.no_grad():
        model.train()(torch.randn(8, 1, 28, 28) * 2 + 1)
    return model


def test_build_model_safetensors_round_trip(tmp_path):
    source = _trained_like("cnn_small", 10)
    path = tmp_path / "student.safetensors"
    save_file(source.state_dict(), str(path))
    torch.manual_seed(99)  # a different random init, overwritten by the checkpoint
    loaded = build_model(ModelConfig(arch="cnn_small", checkpoint=str(path)), 10, 1)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(_eval_outputs(loaded, x), _eval_outputs(source, x))
    fresh = build_model(ModelConfig(arch="cnn_small"), 10, 1)
    assert not torch.allclose(_eval_outputs(fresh, x), _eval_outputs(source, x))


def test_checkpoint_with_other_class_count_names_both_numbers(tmp_path):
    path = tmp_path / "ten.safetensors"
    save_file(create_model("cnn_small", 10, 1).state_dict(), str(path))
    with pytest.raises(ValueError, match=r"classifier for 10 classes .* num_classes=100") as err:
        build_model(ModelConfig(arch="cnn_small", checkpoint=str(path)), 100, 1)
    assert "'fc.weight': checkpoint shape (10, 32) vs model shape (100, 32)" in str(err.value)
    assert "set model.reset_classifier: true" in str(err.value)
    assert "strip_prefix" not in str(err.value) and "different architecture" not in str(err.value)


def test_checkpoint_shape_mismatch_names_key_and_shapes(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file(create_model("cnn_small", 10, 1, width=16).state_dict(), str(path))
    pattern = r"'features\.stage1\.conv1\.conv\.weight': checkpoint shape \(16, 1, 3, 3\) vs model shape \(8, 1, 3, 3\)"
    with pytest.raises(ValueError, match=pattern):
        build_model(ModelConfig(arch="cnn_small", checkpoint=str(path)), 10, 1)


def test_checkpoint_from_other_architecture_lists_keys(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file(create_model("resnet8", 10, 1).state_dict(), str(path))
    with pytest.raises(
        ValueError, match=r"missing key\(s\) \['features\.stage1.*different architecture"
    ) as err:
        build_model(ModelConfig(arch="cnn_small", checkpoint=str(path)), 10, 1)
    # Unrelated key sets get no rename suggestion, and an equal class count no head reset.
    assert "look renamed" not in str(err.value) and "reset_classifier" not in str(err.value)


def test_checkpoint_errors_for_missing_file_and_both_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="model checkpoint not found: .*nope.safetensors"):
        build_model(
            ModelConfig(arch="cnn_small", checkpoint=str(tmp_path / "nope.safetensors")), 10, 1
        )
    with pytest.raises(ValueError, match="sets both weights='DEFAULT' and checkpoint="):
        build_model(ModelConfig(arch="tv_resnet18", weights="DEFAULT", checkpoint="x.pt"), 10, 3)


def test_checkpoint_bundle_directory_is_loaded_with_its_arch_checked(tmp_path):
    source = _trained_like("cnn_small", 10)
    bundle = Bundle.from_model(
        source,
        arch="cnn_small",
        classes=[str(i) for i in range(10)],
        input_shape=(1, 28, 28),
        mean=(0.5,),
        std=(0.25,),
    )
    directory = save_bundle(bundle, tmp_path / "teacher")
    loaded = build_model(ModelConfig(arch="cnn_small", checkpoint=str(directory)), 10, 1)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(_eval_outputs(loaded, x), _eval_outputs(source, x))
    with pytest.raises(
        ValueError, match=r"holds a 'cnn_small' model but model.arch is 'cnn_large'"
    ):
        build_model(ModelConfig(arch="cnn_large", checkpoint=str(directory)), 10, 1)


# ---------------------------------------------------------- checkpoints as people have them
def _same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(3, 1, 28, 28)
    return torch.equal(_eval_outputs(a, x), _eval_outputs(b, x))


def test_ddp_prefix_is_named_then_stripped_by_strip_prefix(tmp_path):
    source = _trained_like("resnet8", 10)
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    with pytest.raises(
        ValueError, match=r"the keys look renamed: set model.strip_prefix: 'module\.'$"
    ) as err:
        build_model(ModelConfig(arch="resnet8", checkpoint=str(path)), 10, 1)
    assert "missing key(s) ['conv1.weight'" in str(err.value)
    assert "unexpected key(s) ['module.conv1.weight'" in str(err.value)
    loaded = build_model(
        ModelConfig(arch="resnet8", checkpoint=str(path), strip_prefix="module."), 10, 1
    )
    assert _same_outputs(loaded, source)


def _lightning_checkpoint(model: nn.Module, path) -> None:
    """What ``Trainer.save_checkpoint`` writes for ``self.model = model`` plus a loss buffer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()  # real momentum buffers in the optimizer state
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["criterion.class_weights"] = torch.ones(10)
    checkpoint = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state,
        "loops": {"fit_loop": {"epoch_progress": {"current": 3}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}": {"best_score": torch.tensor(0.9)}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "hyper_parameters": {"lr": 0.1, "num_classes": 10, "arch": "cnn_small"},
    }
    torch.save(checkpoint, path)


def test_lightning_checkpoint_loads_with_strip_prefix_model(tmp_path):
    source = _trained_like("cnn_small", 10)
    path = tmp_path / "epoch=3-step=120.ckpt"
    _lightning_checkpoint(source, path)
    with pytest.raises(ValueError, match=r"set model.strip_prefix: 'model\.'$") as err:
        build_model(ModelConfig(arch="cnn_small", checkpoint=str(path)), 10, 1)
    assert "33 unexpected key(s) ['model.features.stage1.conv1.conv.weight'" in str(err.value)
    # strip_prefix keeps only the keys under it: the loss buffer is left out.
    cfg = ModelConfig(arch="cnn_small", checkpoint=str(path), strip_prefix="model.")
    assert _same_outputs(build_model(cfg, 10, 1), source)


@pytest.mark.parametrize("key", STATE_DICT_KEYS)
def test_state_dict_is_found_under_each_common_key(tmp_path, key):
    source = _trained_like("cnn_tiny", 10)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 7, key: source.state_dict(), "best_acc": 0.91}, path)
    loaded = build_model(ModelConfig(arch="cnn_tiny", checkpoint=str(path)), 10, 1)
    assert _same_outputs(loaded, source)


def test_checkpoint_key_picks_an_entry_and_names_the_ones_present(tmp_path):
    plain, ema = _trained_like("cnn_tiny", 10), create_model("cnn_tiny", 10, 1)
    path = tmp_path / "timm.pt"
    torch.save(
        {"state_dict": plain.state_dict(), "state_dict_ema": ema.state_dict(), "epoch": 9}, path
    )
    auto = build_model(ModelConfig(arch="cnn_tiny", checkpoint=str(path)), 10, 1)
    assert _same_outputs(auto, plain)
    cfg = ModelConfig(arch="cnn_tiny", checkpoint=str(path), checkpoint_key="state_dict_ema")
    assert _same_outputs(build_model(cfg, 10, 1), ema)
    absent = r"has no entry model.checkpoint_key='ema_model'; its entries: 'state_dict' \(dict "
    absent += r"of 32 tensors\), 'state_dict_ema' \(dict of 32 tensors\), 'epoch' \(int\)$"
    with pytest.raises(ValueError, match=absent):
        cfg = ModelConfig(arch="cnn_tiny", checkpoint=str(path), checkpoint_key="ema_model")
        build_model(cfg, 10, 1)
    with pytest.raises(
        ValueError, match=r"\['epoch'\] is not a dict of tensors; .* set model.checkpoint_key"
    ):
        build_model(ModelConfig(arch="cnn_tiny", checkpoint=str(path), checkpoint_key="epoch"), 10, 1)


def test_nested_state_dict_under_another_key_suggests_checkpoint_key(tmp_path):
    path = tmp_path / "kd.pt"
    torch.save({"student": create_model("cnn_tiny", 10, 1).state_dict(), "epoch": 3}, path)
    nested = (
        r"holds no state dict at its top level or under state_dict, model, model_state_dict, "
        r"ema; its entries: 'student' \(dict of 32 tensors\), 'epoch' \(int\); set "
        r"model.checkpoint_key to 'student'$"
    )
    with pytest.raises(ValueError, match=nested):
        build_model(ModelConfig(arch="cnn_tiny", checkpoint=str(path)), 10, 1)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match=r"holds a list, not a dict; save model.state_dict\(\)"):
        build_model(ModelConfig(arch="cnn_tiny", checkpoint=str(path)), 10, 1)


def test_checkpoint_key_on_a_safetensors_file_is_an_error(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(create_model("cnn_tiny", 10, 1).state_dict(), str(path))
    with pytest.raises(ValueError, match=(
        r"checkpoint_key='model' only applies to torch.save files, but .*w.safetensors is a "
        r".safetensors file holding one flat state dict; remove checkpoint_key"
    )):
        build_model(ModelConfig(arch="cnn_tiny", checkpoint=str(path), checkpoint_key="model"), 10, 1)


def test_key_map_renames_prefixes_and_is_suggested(tmp_path):
    source = _trained_like("cnn_small", 10)
    renamed = {k.replace("features.", "backbone.").replace("fc.", "head."): v
               for k, v in source.state_dict().items()}
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    with pytest.raises(
        ValueError, match=r"the keys look renamed: set model.key_map: \{'backbone\.': 'features\.'\}"
    ):
        build_model(ModelConfig(arch="cnn_small", checkpoint=str(path)), 10, 1)
    # The head keeps its name: a class-count change is named with the rename.
    kept_head = {k.replace("features.", "backbone."): v for k, v in source.state_dict().items()}
    save_file(kept_head, str(path))
    with pytest.raises(ValueError, match=(
        r"set model.key_map: \{'backbone\.': 'features\.'\}; the checkpoint has a classifier "
        r"for 10 classes but the model was built for num_classes=4"
    )):
        build_model(ModelConfig(arch="cnn_small", checkpoint=str(path)), 4, 1)
    save_file(renamed, str(path))
    key_map = {"backbone.": "features.", "head.": "fc."}
    loaded = build_model(ModelConfig(arch="cnn_small", checkpoint=str(path), key_map=key_map), 10, 1)
    assert _same_outputs(loaded, source)
    # "" matches every key the longer entries do not: here it puts "features." back.
    bare = tmp_path / "bare.safetensors"
    save_file({k.removeprefix("features."): v for k, v in source.state_dict().items()}, str(bare))
    with pytest.raises(ValueError, match=r"set model.key_map: \{'': 'features\.'\}$"):
        build_model(ModelConfig(arch="cnn_small", checkpoint=str(bare)), 10, 1)
    cfg = ModelConfig(arch="cnn_small", checkpoint=str(bare), key_map={"": "features.", "fc.": "fc."})
    assert _same_outputs(build_model(cfg, 10, 1), source)


def test_renames_that_match_nothing_or_collide_are_errors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(create_model("cnn_tiny", 10, 1).state_dict(), str(path))
    with pytest.raises(ValueError, match=(
        r"model.strip_prefix='module.' matches none of the 32 keys of checkpoint .*w.safetensors "
        r"\(first: \['fc.bias', 'fc.weight', 'features.stage1.conv1.bn.bias'\]\); fix it or remove it$"
    )):
        build_model(ModelConfig(arch="cnn_tiny", checkpoint=str(path), strip_prefix="module."), 10, 1)
    with pytest.raises(
        ValueError, match=r"model.key_map entry 'head.': 'fc.' matches none of the keys of checkpoint"
    ):
        build_model(ModelConfig(arch="cnn_tiny", checkpoint=str(path), key_map={"head.": "fc."}), 10, 1)
    with pytest.raises(
        ValueError, match=r"model.key_map renames two keys of checkpoint .* to 'fc.weight'"
    ):
        cfg = ModelConfig(
            arch="cnn_tiny", checkpoint=str(path), key_map={"features.stage1.conv1.conv.": "fc."}
        )
        build_model(cfg, 10, 1)


def test_reset_classifier_loads_all_but_the_head(tmp_path):
    source = _trained_like("cnn_small", 10)
    path = tmp_path / "ten_classes.pt"
    torch.save({"model": source.state_dict()}, path)
    cfg = ModelConfig(arch="cnn_small", checkpoint=str(path), reset_classifier=True)
    torch.manual_seed(5)
    loaded = build_model(cfg, 4, 1)
    torch.manual_seed(5)
    fresh = build_model(ModelConfig(arch="cnn_small"), 4, 1)
    for key, tensor in loaded.state_dict().items():
        expected = fresh.state_dict()[key] if key.startswith("fc.") else source.state_dict()[key]
        assert torch.equal(tensor, expected), key
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded.eval().features(x), source.eval().features(x))
    assert _eval_outputs(loaded, x).shape == (2, 4)


def test_reset_classifier_still_reports_other_differences(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file(create_model("cnn_small", 10, 1, width=16).state_dict(), str(path))
    cfg = ModelConfig(arch="cnn_small", checkpoint=str(path), reset_classifier=True)
    with pytest.raises(
        ValueError, match=r"shape difference\(s\): 'features.stage1.conv1.conv.weight'"
    ) as err:
        build_model(cfg, 4, 1)
    assert "fc.weight" not in str(err.value)
    assert "different architecture, in_channels" in str(err.value)


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears if it runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".pth.tar", ".bin"])
def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, suffix):
    marker = tmp_path / "payload_ran"
    path = tmp_path / f"malicious{suffix}"
    torch.save(
        {"state_dict": create_model("cnn_tiny", 10, 1).state_dict(),
         "hyper_parameters": _Payload(marker)},
        path,
    )
    # The control: an unsafe load does run it (tests only; kdpipe never loads like this).
    torch.load(path, weights_only=False)["hyper_parameters"].close()
    assert marker.exists()
    marker.unlink()
    refused = (
        rf"malicious\{suffix} holds a pickled _?io\.open, and kdpipe loads torch.save files "
        r"with torch.load\(weights_only=True\) only \(a pickle can run any code\); save a plain "
        r"state dict, torch.save\(model.state_dict\(\), path\), or better a .safetensors file, "
        r"safetensors.torch.save_file\(model.state_dict\(\), path\)$"
    )
    with pytest.raises(ValueError, match=refused) as err:
        build_model(ModelConfig(arch="cnn_tiny", checkpoint=str(path)), 10, 1)
    assert not marker.exists()
    assert "set to `False`" not in str(err.value)  # torch's unsafe advice is not passed on


def test_a_truncated_pt_file_says_it_cannot_be_read(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(create_model("cnn_tiny", 10, 1).state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(
        ValueError, match=r"cut.pt cannot be read by torch.load \(.*\); is it a complete file"
    ):
        build_model(ModelConfig(arch="cnn_tiny", checkpoint=str(path)), 10, 1)
    onnx = tmp_path / "student.onnx"
    onnx.write_bytes(b"onnx")
    with pytest.raises(ValueError, match=(
        r"unsupported checkpoint .*student.onnx: use a .safetensors file, a torch.save file "
        r"\(.pt, .pth, .ckpt, .pth.tar, .bin\) or a kdpipe bundle directory"
    )):
        build_model(ModelConfig(arch="cnn_tiny", checkpoint=str(onnx)), 10, 1)


@pytest.mark.parametrize(("model", "key", "message"), [
    ({"strip_prefix": "module."}, "strip_prefix", "strip_prefix only applies when loading "
     "model.checkpoint; set checkpoint or remove strip_prefix"),
    ({"key_map": {"a.": "b."}}, "key_map", "key_map only applies when loading model.checkpoint"),
    ({"reset_classifier": True}, "reset_classifier", "reset_classifier only applies when loading"),
    ({"checkpoint_key": "ema"}, "checkpoint_key", "checkpoint_key only applies when loading"),
    ({"checkpoint": "w.safetensors", "checkpoint_key": "ema"}, "checkpoint_key",
     "a .safetensors file holds one flat state dict; remove checkpoint_key"),
    ({"checkpoint": "w.pt", "strip_prefix": ""}, "strip_prefix", "an empty prefix strips nothing"),
])
def test_checkpoint_options_that_cannot_apply_are_config_problems(model, key, message):
    section = {"student": {"model": {"arch": "cnn_small", **model}}}
    (problem,) = find_problems(parse_config(section))
    assert problem.path == f"parameters.student.model.{key}"
    assert problem.message.startswith(message)


def test_checkpoint_options_with_a_checkpoint_are_no_problem():
    model = {"arch": "resnet8", "checkpoint": "t.pth", "checkpoint_key": "ema",
             "strip_prefix": "module.", "key_map": {"head.": "fc."}, "reset_classifier": True}
    assert find_problems(parse_config({"teacher": {"model": model}})) == []


def test_a_renamed_checkpoint_for_other_classes_gets_both_fixes_at_once(tmp_path):
    path = tmp_path / "ddp_ten.pt"
    sd = create_model("cnn_small", 10, 1).state_dict()
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    with pytest.raises(ValueError, match=(
        r"set model.strip_prefix: 'module\.'; the checkpoint has a classifier for 10 classes but "
        r"the model was built for num_classes=3: set model.reset_classifier: true"
    )):
        build_model(ModelConfig(arch="cnn_small", checkpoint=str(path)), 3, 1)
    cfg = ModelConfig(arch="cnn_small", checkpoint=str(path), strip_prefix="module.",
                      reset_classifier=True)
    assert build_model(cfg, 3, 1).fc.out_features == 3


def test_reset_classifier_without_a_linear_head_says_so():
    conv_head = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=(
        r"model.reset_classifier: Sequential has no nn.Linear classifier, so there is no head "
        r"to reset; remove reset_classifier"
    )):
        load_state_dict_checked(conv_head, conv_head.state_dict(), reset_classifier=True)


def test_timm_training_checkpoint_with_argparse_args_and_ema(tmp_path):
    """What timm's CheckpointSaver writes: argparse args, optimizer, weights and EMA weights."""
    import argparse

    plain, ema = _trained_like("cnn_tiny", 10), create_model("cnn_tiny", 10, 1)
    path = tmp_path / "model_best.pth.tar"
    args = argparse.Namespace(model="cnn_tiny", lr=0.05, sched="cosine", aa=None, epochs=[1, 2])
    torch.save({
        "epoch": 41, "arch": "cnn_tiny", "version": 2, "args": args, "metric": 71.3,
        "optimizer": torch.optim.SGD(plain.parameters(), lr=0.05).state_dict(),
        "state_dict": plain.state_dict(), "state_dict_ema": ema.state_dict(),
    }, path)
    loaded = build_model(ModelConfig(arch="cnn_tiny", checkpoint=str(path)), 10, 1)
    assert _same_outputs(loaded, plain)
    cfg = ModelConfig(arch="cnn_tiny", checkpoint=str(path), checkpoint_key="state_dict_ema")
    assert _same_outputs(build_model(cfg, 10, 1), ema)


def test_check_checkpoint_raises_what_build_model_would_on_the_meta_device(tmp_path):
    source = create_model("tv_resnet18", 10, 3)
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    cfg = ModelConfig(arch="tv_resnet18", checkpoint=str(path))
    with pytest.raises(ValueError) as built:
        build_model(cfg, 5, 3)
    with pytest.raises(ValueError) as checked:
        check_checkpoint(cfg, 5, 3)
    assert str(checked.value) == str(built.value)
    assert "set model.strip_prefix: 'module.'; the checkpoint has a classifier for 10" in str(built.value)
    fixed = cfg.model_copy(update={"strip_prefix": "module.", "reset_classifier": True})
    assert check_checkpoint(fixed, 5, 3) is None
    assert check_checkpoint(ModelConfig(arch="tv_resnet18"), 5, 3) is None


def test_load_weights_only_memory_mapped_refuses_the_payload_too(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(3), "x": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"m.pt holds a pickled _?io\.open"):
        load_weights_only(path, mmap=True)
    assert not marker.exists()
    torch.save({"w": torch.arange(3.0)}, path)
    assert torch.equal(load_weights_only(path, mmap=True)["w"], torch.arange(3.0))
