"""Structural pruning: real size/MAC reductions, bundles that reload, errors that name layers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from kdpipe.bundle import Bundle, load_bundle, save_bundle
from kdpipe.config import ConfigError, PruneConfig, TrainConfig
from kdpipe.metrics import count_macs, count_params
from kdpipe.models import classifier_module, create_model
from kdpipe.prune import PruningError, prune_model


def _shape(arch: str) -> tuple[int, int, int]:
    return (1, 28, 28) if arch.startswith("cnn_") else (3, 32, 32)


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(arch, 10, _shape(arch)[0]).eval()


def _prune(model: nn.Module, shape: tuple[int, ...], **cfg) -> object:
    return prune_model(model, torch.zeros(1, *shape), PruneConfig(**cfg), latency_repeats=3)


def _layer_costs(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[str, dict]]:
    """Per conv / linear layer: channels, groups, kernel and output pixels (one sample)."""
    rows: list[tuple[str, dict]] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda mod, _i, out, n=name: rows.append((n, {
                "cin": mod.in_channels, "cout": mod.out_channels, "groups": mod.groups,
                "k": mod.kernel_size[0] * mod.kernel_size[1], "pixels": out.shape[2] * out.shape[3]}))))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lambda mod, _i, _o, n=name: rows.append((n, {
                "cin": mod.in_features, "cout": mod.out_features, "groups": 1, "k": 1, "pixels": 1}))))
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return rows


def _conv_linear_macs(rows: list[tuple[str, dict]]) -> int:
    return sum(r["k"] * r["cin"] // r["groups"] * r["cout"] * r["pixels"] for _, r in rows)


def _expected_uniform(model: nn.Module, shape: tuple[int, ...], ratio: float) -> tuple[int, int]:
    """Conv+linear MACs and weights after uniform per-layer pruning at ``ratio``.

    Every layer keeps int(n * (1 - ratio)) output channels (Torch-Pruning's rounding);
    the input layer keeps the image channels and the classifier its classes.
    """
    keep = lambda n: int(n * (1 - ratio))  # noqa: E731
    head = classifier_module(model)
    names = {m: n for n, m in model.named_modules()}
    rows = _layer_costs(model, shape)
    macs = weights = 0
    for i, (name, r) in enumerate(rows):
        cin = r["cin"] if i == 0 else keep(r["cin"])
        cout = r["cout"] if name == names[head] else keep(r["cout"])
        macs += r["k"] * cin * cout * r["pixels"]
        weights += r["k"] * cin * cout
    return macs, weights


# ------------------------------------------------------------------- config
@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_unit_interval_is_a_config_error(ratio: float) -> None:
    with pytest.raises(ValidationError, match="ratio"):
        PruneConfig(ratio=ratio)


def test_ratio_that_would_empty_a_layer_fails_before_pruning() -> None:
    model = _model("cnn_tiny")  # stage1 has 4 channels: int(4 * (1 - 0.8)) = 0
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"ratio=0.8 would remove every channel of: features\.stage1\.conv1\.conv \(4 channels\)"):
        _prune(model, _shape("cnn_tiny"), ratio=0.8, round_to=4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(("arch", "ratio", "round_to", "expected"), [
    # 8 * 0.5 = 4 would round down to 0: a layer of round_to channels is kept whole.
    ("cnn_small", 0.5, 8, {"features.stage1.conv1.conv": 8, "features.stage2.conv1.conv": 8,
                           "features.stage3.conv2.conv": 16}),
    # int(16 * 0.7) = 11 -> 8, int(32 * 0.7) = 22 -> 16 (Torch-Pruning's floor to a multiple).
    ("cnn_small", 0.3, 8, {"features.stage1.conv1.conv": 8, "features.stage2.conv2.conv": 8,
                           "features.stage3.conv1.conv": 16}),
    ("cnn_small", 0.3, 4, {"features.stage1.conv1.conv": 4, "features.stage2.conv1.conv": 8,
                           "features.stage3.conv1.conv": 20}),
    # Residual groups: int(64 * 0.7) = 44 -> 40.
    ("resnet20", 0.3, 8, {"conv1": 8, "layer2.0.conv2": 16, "layer3.2.conv1": 40}),
])
def test_round_to_keeps_multiples_and_never_empties_a_layer(
    arch: str, ratio: float, round_to: int, expected: dict[str, int]
) -> None:
    model = _model(arch)
    _prune(model, _shape(arch), ratio=ratio, round_to=round_to)
    modules = dict(model.named_modules())
    assert {k: modules[k].out_channels for k in expected} == expected
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c % round_to == 0 for c in convs), convs


def test_default_config_prunes_the_default_student_onto_cpu_blocks(caplog: pytest.LogCaptureFixture) -> None:
    """configs/default.yaml's prune section on its student: whole 16-channel blocks, >= 1.8x MACs.

    Counts off a multiple of 16 fall out of ONNX Runtime's AVX-512 conv layout and the
    pruned model is then barely faster (benchmarks/bench_prune.py): this guards the default.
    """
    from kdpipe.configfile import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    arch = cfg.student.model.arch
    model = create_model(arch, 10, 1, **cfg.student.model.kwargs).eval()
    dense_macs = count_macs(model, (1, 28, 28))
    with caplog.at_level("WARNING", logger="kdpipe.prune"):
        prune_model(model, torch.zeros(1, 1, 28, 28), cfg.prune, latency_repeats=3)
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c % 16 == 0 for c in convs), convs
    assert dense_macs / count_macs(model, (1, 28, 28)) >= 1.8
    assert "not multiples of 8" not in caplog.text


def test_channel_counts_off_the_cpu_block_warn(caplog: pytest.LogCaptureFixture) -> None:
    model = _model("cnn_medium")
    with caplog.at_level("WARNING", logger="kdpipe.prune"):
        _prune(model, _shape("cnn_medium"), ratio=0.3)  # 16/32/64 -> 11/22/44
    assert "not multiples of 8" in caplog.text and "prune.round_to: 16" in caplog.text
    assert "features.stage2.conv1.conv=22" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="kdpipe.prune"):
        _prune(_model("cnn_medium"), _shape("cnn_medium"), ratio=0.5, round_to=16)
    assert "not multiples of 8" not in caplog.text


def test_round_to_with_iterative_steps_reaches_the_same_layout() -> None:
    one, two = _model("resnet20"), _model("resnet20")
    single = _prune(one, _shape("resnet20"), ratio=0.3, round_to=8)
    stepped = _prune(two, _shape("resnet20"), ratio=0.3, round_to=8, iterative_steps=2)
    assert [s.target_ratio for s in single.steps] == pytest.approx([0.3])
    assert [(s.step, s.target_ratio) for s in stepped.steps] == [(1, pytest.approx(0.15)),
                                                                  (2, pytest.approx(0.3))]
    assert stepped.steps[0].macs > stepped.steps[1].macs  # the first step pruned less
    channels = lambda m: [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    # 16 -> 8, 32 -> 16, 64 -> 40 (int(64 * 0.7) = 44 floored to a multiple of 8); the
    # 7 convs per stage are the stem / shortcut plus 6 in three blocks.
    assert channels(two) == [8] * 7 + [16] * 7 + [40] * 7
    assert channels(one) == channels(two)
    assert stepped.channels == single.channels


def test_unknown_ignored_layer_lists_nearby_paths() -> None:
    with pytest.raises(ConfigError, match=r"no module 'features\.stage2\.conv9' .* nearby module paths: .*features\.stage2\.conv1"):
        _prune(_model("cnn_small"), _shape("cnn_small"), ignored_layers=("features.stage2.conv9",))


def test_taylor_importance_needs_a_loss() -> None:
    with pytest.raises(ConfigError, match="importance=taylor .* pass taylor_loss_fn"):
        _prune(_model("cnn_tiny"), _shape("cnn_tiny"), importance="taylor")


# ------------------------------------------------------------------- pruning
def test_uniform_pruning_cuts_macs_and_params_as_expected() -> None:
    shape = _shape("cnn_small")
    model = _model("cnn_small")
    conv_before = _conv_linear_macs(_layer_costs(model, shape))
    exp_macs, exp_weights = _expected_uniform(model, shape, 0.5)
    report = _prune(model, shape, ratio=0.5)
    # Conv/linear MACs of the pruned model match the uniform-pruning formula exactly.
    assert _conv_linear_macs(_layer_costs(model, shape)) == exp_macs
    # Totals also count BN / pooling / activations, which shrink only by (1 - ratio):
    # the measured ratio lies within 10 % below the conv+linear prediction.
    expected_ratio = conv_before / exp_macs
    assert 0.9 * expected_ratio <= report.macs_ratio <= expected_ratio
    assert 3.3 < report.macs_ratio < 4.0  # ~1/(1-0.5)^2 minus the input layer and head
    weights_after = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1)
    assert weights_after == exp_weights
    # Params add BN affine terms and biases (~(1 - ratio) scaling) to the weights.
    conv_weights_before = sum(
        p.numel() for n, p in _model("cnn_small").named_parameters() if n.endswith("weight") and p.dim() > 1)
    assert 0.9 * conv_weights_before / exp_weights <= report.params_ratio <= conv_weights_before / exp_weights
    assert report.after_pruning.size_bytes < report.before.size_bytes / 3
    assert classifier_module(model).out_features == 10
    assert report.channels["features.stage3.conv2.conv"] == (32, 16)
    assert report.after_recovery is None and len(report.steps) == 1


@pytest.mark.slow
def test_residual_resnet20_pruning_ratio() -> None:
    shape = _shape("resnet20")
    model = _model("resnet20")
    conv_before = _conv_linear_macs(_layer_costs(model, shape))
    exp_macs, _ = _expected_uniform(model, shape, 0.5)
    report = _prune(model, shape, ratio=0.5)
    assert _conv_linear_macs(_layer_costs(model, shape)) == exp_macs
    assert 0.9 * conv_before / exp_macs <= report.macs_ratio <= conv_before / exp_macs
    assert report.macs_ratio > 3.5 and report.params_ratio > 3.5


def test_ignored_layers_and_classifier_keep_their_channels() -> None:
    model = _model("cnn_small")
    report = _prune(model, _shape("cnn_small"), ignored_layers=("features.stage2.conv2.conv",))
    assert model.features.stage2.conv2.conv.out_channels == 16
    assert "features.stage2.conv2.conv" not in report.channels
    assert model.fc.out_features == 10


def _conv_channels(model: nn.Module) -> list[int]:
    return [c.out_channels for c in model.modules() if isinstance(c, nn.Conv2d)]


def test_global_pruning_ranks_channels_across_layers() -> None:
    model = _model("cnn_small")
    assert _conv_channels(model) == [8, 16, 16, 32, 32]
    _prune(model, _shape("cnn_small"), ratio=0.6, global_pruning=True, max_layer_ratio=0.7)
    # Measured: one ranking over all layers prunes them unevenly. (A cap of 0.7, 0.75 or
    # 0.8 gives the same layout: no layer reaches it, so this does not exercise the cap.)
    assert _conv_channels(model) == [3, 7, 8, 12, 11]
    uniform = _model("cnn_small")
    _prune(uniform, _shape("cnn_small"), ratio=0.6)
    assert _conv_channels(uniform) == [3, 6, 6, 12, 12]  # local pruning at 0.6 instead
    assert count_params(model) < count_params(_model("cnn_small")) * 0.6


@pytest.mark.xfail(
    strict=True, raises=PruningError,
    reason="kdpipe.prune._capped_indices calls Torch-Pruning's estimate_importance on the "
    "partial group that an interactive global step yields; its reduction scatters by channel "
    "index into a tensor of the group's length (IndexError) whenever the cap has to trim a "
    "layer. Passing = fixed.",
)
def test_global_pruning_caps_each_layer_at_max_layer_ratio() -> None:
    model = _model("cnn_small")
    before = _conv_channels(model)
    # Uncapped, ratio 0.6 keeps 11 of stage3.conv2's 32 channels (above): a cap of 0.6
    # must stop it at ceil(32 * 0.4) = 13.
    _prune(model, _shape("cnn_small"), ratio=0.6, global_pruning=True, max_layer_ratio=0.6)
    after = _conv_channels(model)
    assert all(c >= math.ceil(b * 0.4) for c, b in zip(after, before, strict=True)), after
    assert after[-1] == 13


def _kept_by(importance: str) -> tuple[float, dict[str, list[int]]]:
    """Prune cnn_tiny at the default ratio: its MACs ratio and the channels each BN kept.

    Every BN's scale is set to distinct values first (1.00, 1.01, ... in a seeded random
    order), which tells the kept channels apart and gives ``bn_scale`` a ranking.
    """
    model = _model("cnn_tiny")
    gammas = {}
    with torch.no_grad():
        for name, bn in model.named_modules():
            if isinstance(bn, nn.BatchNorm2d):
                order = torch.randperm(bn.num_features, generator=torch.Generator().manual_seed(5))
                bn.weight.copy_(1.0 + 0.01 * order.float())
                gammas[name] = bn.weight.tolist()
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    loss = lambda m: nn.functional.cross_entropy(m(x), y)  # noqa: E731
    report = prune_model(model, torch.zeros(1, 1, 28, 28), PruneConfig(importance=importance),
                         taylor_loss_fn=loss, latency_repeats=3)
    kept = {name: [gammas[name].index(g) for g in bn.weight.tolist()]
            for name, bn in model.named_modules() if isinstance(bn, nn.BatchNorm2d)}
    return report.macs_ratio, kept


@pytest.fixture(scope="module")
def l1_kept() -> dict[str, list[int]]:
    return _kept_by("l1")[1]


@pytest.mark.parametrize("importance", ["l1", "bn_scale", "random", "taylor"])
def test_every_importance_prunes(importance: str, l1_kept: dict[str, list[int]]) -> None:
    macs_ratio, kept = _kept_by(importance)
    assert macs_ratio > 3.0
    assert all(k == sorted(set(k)) for k in kept.values())  # distinct, in the original order
    if importance == "l1":
        assert kept == l1_kept  # the same ranking twice: the choice is deterministic
        assert any(k != list(range(len(k))) for k in kept.values())  # not just the first ones
    elif importance == "bn_scale":
        # Keeps exactly the channels with the largest BN scales (half of each layer).
        gammas = {}
        for name, k in kept.items():
            order = torch.randperm(2 * len(k), generator=torch.Generator().manual_seed(5))
            gammas[name] = sorted(torch.argsort(order, descending=True)[:len(k)].tolist())
        assert kept == gammas
    else:
        assert kept != l1_kept  # another ranking keeps other channels


def test_iterative_steps_call_recovery_and_report_accuracy() -> None:
    model = _model("cnn_tiny")
    calls: list[int] = []
    accs = iter([0.9, 0.5, 0.8, 0.6, 0.85, 0.85])

    def recover(m: nn.Module, step: int) -> None:
        calls.append(step)

    report = prune_model(
        model, torch.zeros(1, 1, 28, 28), PruneConfig(iterative_steps=2, ratio=0.5),
        recover=recover, evaluate_fn=lambda m: next(accs), latency_repeats=3,
    )
    assert calls == [0, 1]
    assert [s.target_ratio for s in report.steps] == pytest.approx([0.25, 0.5])
    assert report.before.accuracy == 0.9
    assert [(s.accuracy_after_pruning, s.accuracy_after_recovery) for s in report.steps] == [(0.5, 0.8), (0.6, 0.85)]
    assert report.after_pruning.accuracy == 0.6 and report.after_recovery.accuracy == 0.85
    assert report.steps[0].macs > report.steps[1].macs
    assert report.final == report.after_recovery


def test_pruning_does_not_touch_batchnorm_statistics() -> None:
    """Kept channels keep their own running mean / var (in order) and the batch counter."""
    model = _model("cnn_tiny").train()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    with torch.no_grad():  # statistics a reset or a re-estimate could not reproduce
        for bn in bns.values():
            bn.running_mean.copy_(torch.arange(bn.num_features, dtype=torch.float32))
            bn.running_var.copy_(1.0 + torch.arange(bn.num_features, dtype=torch.float32))
            bn.num_batches_tracked.fill_(7)
    before = {n: bn.num_features for n, bn in bns.items()}
    _prune(model, _shape("cnn_tiny"), ratio=0.25)
    assert model.training  # mode restored
    for name, bn in bns.items():
        kept = bn.running_mean.tolist()
        assert len(kept) == int(before[name] * 0.75), name
        assert kept == sorted(set(kept)), name  # distinct channels, in their original order
        assert all(v == int(v) and 0 <= v < before[name] for v in kept), name
        assert bn.running_var.tolist() == [1.0 + v for v in kept], name  # the same channels
        assert bn.num_batches_tracked.item() == 7, name


class _ChannelScale(nn.Module):
    """Holds channel-sized state in a plain buffer, which Torch-Pruning cannot see."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class _Unprunable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.scale = _ChannelScale(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale(self.conv(x)).mean((2, 3)))


def test_a_model_it_cannot_prune_gets_an_error_naming_the_layer() -> None:
    with pytest.raises(PruningError, match=r"fails in layer 'scale' \(_ChannelScale\).*prune\.ignored_layers"):
        _prune(_Unprunable(), (1, 8, 8))


# ---------------------------------------------------- prune -> save -> load
@pytest.mark.parametrize(
    "arch",
    ["cnn_small", pytest.param("resnet20", marks=pytest.mark.slow),
     pytest.param("wrn_16_2", marks=pytest.mark.slow),
     pytest.param("tv_mobilenet_v2", marks=pytest.mark.slow),
     pytest.param("tv_resnet18", marks=pytest.mark.slow)],
)
def test_pruned_model_reloads_with_identical_outputs(arch: str, tmp_path: Path) -> None:
    shape = _shape(arch)
    model = _model(arch)
    report = _prune(model, shape, ratio=0.5)
    assert report.macs_ratio > 2.5
    bundle = Bundle.from_model(model.eval(), arch=arch, classes=[str(i) for i in range(10)],
                               input_shape=shape, mean=[0.5] * shape[0], std=[0.2] * shape[0])
    assert bundle.spec.layout  # the pruned shapes are recorded
    loaded = load_bundle(save_bundle(bundle, tmp_path / "pruned"))
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert count_macs(loaded.model, shape) == report.after_pruning.macs


@pytest.mark.slow
def test_depthwise_mobilenet_v3_prunes() -> None:
    model = _model("tv_mobilenet_v3_small")
    report = _prune(model, (3, 32, 32), ratio=0.3)
    assert report.macs_ratio > 1.3
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels  # depthwise stays depthwise


@pytest.mark.slow
def test_prune_student_on_digits_recovers_and_records_fresh_history() -> None:
    """The pipeline's one pruning path (recipes.prune_student), on real data."""
    from kdpipe.config import DataConfig, DistillConfig
    from kdpipe.data import build_dataset_spec
    from kdpipe.recipes import prune_student

    spec = build_dataset_spec(DataConfig(source="digits", batch_size=64))
    classes, shape = spec.classes, spec.input_shape

    def bundle(arch: str) -> Bundle:
        torch.manual_seed(0)
        return Bundle.from_model(create_model(arch, len(classes), shape[0]).eval(), arch=arch,
                                 classes=classes, input_shape=shape, mean=spec.mean, std=spec.std,
                                 extra={"role": "student", "history": [{"epoch": 1}] * 5})

    student, teacher = bundle("cnn_tiny"), bundle("cnn_small")
    original = [p.clone() for p in student.model.parameters()]
    cfg = PruneConfig(ratio=0.5, iterative_steps=2,
                      recovery=TrainConfig(epochs=1, lr=1e-3, device="cpu"))
    pruned, report = prune_student(student, teacher, spec, cfg, DistillConfig())
    assert all(torch.equal(a, b) for a, b in zip(original, student.model.parameters(), strict=True))
    assert report is not None and report.after_recovery is not None
    assert report.after_recovery.accuracy is not None
    assert len(report.steps) == 2 and report.macs_ratio > 2.5
    extra = pruned.spec.extra
    assert extra["prune_report"]["steps"][1]["step"] == 2
    assert extra["role"] == "pruned_student"  # not the student's stale extra
    assert [(r["epoch"], r["prune_step"]) for r in extra["history"]] == [(1, 1), (2, 2)]
    assert extra["metrics"]["params"] == report.final.params
    assert pruned.spec.layout


def test_removing_dead_channels_leaves_the_outputs_unchanged() -> None:
    """Structural removal is exact: channels whose BN outputs are zero can go for free.

    In every BN, the first channels get gamma = beta = 0 (after ReLU they carry nothing),
    exactly as many as ratio 0.3 removes; ``bn_scale`` importance must pick those and the
    pruned model must compute the same logits (BN statistics of the kept channels intact).
    """
    model = _model("cnn_small")
    x = torch.rand(4, *_shape("cnn_small"), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                dead = m.num_features - int(m.num_features * 0.7)
                m.weight[:dead] = 0.0
                m.bias[:dead] = 0.0
        expected = model(x)
    report = _prune(model, _shape("cnn_small"), ratio=0.3, importance="bn_scale")
    assert report.macs_ratio > 2.0
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
