"""KD losses against independent float64 NumPy references and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdpipe.config import DistillConfig
from kdpipe.losses import (
    FEATURE_LOSSES,
    LOGIT_LOSSES,
    NO_FEATURE_LOSS,
    AttentionHead,
    FeatureHook,
    FitNetHead,
    HintRegressor,
    attention_transfer_loss,
    dkd_loss,
    dkd_terms,
    fitnet_loss,
    kd_kl,
    kd_loss,
)

ATOL = 1e-6


# --------------------------------------------------------- NumPy references
def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_kd_kl(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    log_ps, log_pt = np_log_softmax(s / temp), np_log_softmax(t / temp)
    kl_per_sample = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1)
    return float(temp**2 * kl_per_sample.mean())


def np_ce(s: np.ndarray, y: np.ndarray) -> float:
    return float(-np_log_softmax(s)[np.arange(len(y)), y].mean())


def np_dkd_raw(s: np.ndarray, t: np.ndarray, y: np.ndarray, temp: float) -> tuple[float, float]:
    """DKD's two KLs by definition (no T^2): binary [p_gt, 1 - p_gt], then other classes."""
    tckd = nckd = 0.0
    for i, gt in enumerate(y):
        ps = np.exp(np_log_softmax(s[i : i + 1] / temp))[0]
        pt = np.exp(np_log_softmax(t[i : i + 1] / temp))[0]
        bs, bt = np.array([ps[gt], 1 - ps[gt]]), np.array([pt[gt], 1 - pt[gt]])
        tckd += (bt * np.log(bt / bs)).sum()
        others = np.arange(len(ps)) != gt
        qs, qt = ps[others] / ps[others].sum(), pt[others] / pt[others].sum()
        nckd += (qt * np.log(qt / qs)).sum()
    n = len(y)
    return tckd / n, nckd / n


def np_attention(f: np.ndarray) -> np.ndarray:
    a = (f**2).mean(axis=1).reshape(f.shape[0], -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2
    t = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    return s, t, y


# --------------------------------------------------------------------- kd_kl
def test_kd_kl_matches_numpy_reference(logits):
    s, t, _ = logits
    for temp in (1.0, 2.0, 4.0):
        got = kd_kl(s, t, temp).item()
        assert got == pytest.approx(np_kd_kl(s.numpy(), t.numpy(), temp), abs=1e-10)


def test_kd_kl_hand_computed_value():
    # Student uniform over 2 classes, teacher logits (ln 3, 0) -> p_t = (3/4, 1/4), T = 1.
    # KL = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 3/4 ln 1.5 - 1/4 ln 2 = 0.13081203...
    s = torch.zeros(1, 2, dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    assert kd_kl(s, t, 1.0).item() == pytest.approx(0.1308120263, abs=ATOL)
    # T = 2: p_t = softmax((ln 3)/2, 0) = (sqrt3/(1+sqrt3), 1/(1+sqrt3)); times T^2 = 4.
    a = math.sqrt(3) / (1 + math.sqrt(3))
    expected = 4 * (a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a)))
    assert expected == pytest.approx(0.1453631315, abs=ATOL)
    assert kd_kl(s, t, 2.0).item() == pytest.approx(expected, abs=ATOL)


def test_kd_kl_zero_for_identical_and_positive_otherwise(logits):
    s, t, _ = logits
    assert kd_kl(s, s.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-12)
    assert kd_kl(s, t, 4.0).item() > 1e-3


def test_kd_kl_has_t_squared_factor():
    # For large T, KL(p_t||p_s) ~ sum_j (dz_j - mean dz)^2 / (2 C T^2) per sample, so
    # T^2 * KL tends to a constant: doubling T must barely change the scaled loss, while
    # without the T^2 factor it would drop ~4x.
    s = torch.tensor([[0.5, -0.3, 0.1, 0.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.2, -0.4, 0.3]], dtype=torch.float64)
    d = (t - s).numpy()[0]
    limit = ((d - d.mean()) ** 2).sum() / (2 * 4)
    at_50, at_100 = kd_kl(s, t, 50.0).item(), kd_kl(s, t, 100.0).item()
    assert at_50 == pytest.approx(limit, rel=1e-2)
    assert at_100 == pytest.approx(limit, rel=5e-3)
    assert at_100 / at_50 == pytest.approx(1.0, abs=1e-2)
    assert at_50 == pytest.approx(np_kd_kl(s.numpy(), t.numpy(), 50.0), abs=1e-12)


def test_kd_kl_gradient_is_finite_for_extreme_logits():
    s = torch.tensor([[80.0, -80.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-90.0, 90.0, 0.0], [5.0, -5.0, 1.0]])
    loss = kd_kl(s, t, 1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0


def test_kd_kl_rejects_mismatched_logits_and_bad_temperature():
    with pytest.raises(ValueError, match=r"\(4, 10\) and \(4, 100\).*same num_classes"):
        kd_kl(torch.zeros(4, 10), torch.zeros(4, 100), 4.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_kl(torch.zeros(4, 10), torch.zeros(4, 10), 0.0)


# ------------------------------------------------------------------- kd_loss
def test_kd_loss_combines_terms_with_alpha_on_kd(logits):
    s, t, y = logits
    ce_ref = np_ce(s.numpy(), y.numpy())
    kd_ref = np_kd_kl(s.numpy(), t.numpy(), 4.0)
    out = kd_loss(s, t, y, temperature=4.0, kd_weight=0.3)
    assert set(out) == {"loss", "ce", "kd"}
    assert out["ce"].item() == pytest.approx(ce_ref, abs=1e-10)
    assert out["kd"].item() == pytest.approx(kd_ref, abs=1e-10)
    assert out["loss"].item() == pytest.approx(0.7 * ce_ref + 0.3 * kd_ref, abs=1e-10)


def test_kd_loss_alpha_extremes(logits):
    s, t, y = logits
    pure_ce = kd_loss(s, t, y, temperature=4.0, kd_weight=0.0)
    pure_kd = kd_loss(s, t, y, temperature=4.0, kd_weight=1.0)
    assert pure_ce["loss"].item() == pytest.approx(np_ce(s.numpy(), y.numpy()), abs=1e-12)
    assert pure_kd["loss"].item() == pytest.approx(np_kd_kl(s.numpy(), t.numpy(), 4.0), abs=1e-12)


def test_kd_loss_rejects_weight_outside_unit_interval(logits):
    s, t, y = logits
    with pytest.raises(ValueError, match=r"kd_weight must lie in \[0, 1\] \(got 1.5\)"):
        kd_loss(s, t, y, temperature=4.0, kd_weight=1.5)


def test_kd_loss_gradient_finite(logits):
    s, t, y = logits
    s = s.clone().float().requires_grad_(True)
    kd_loss(s, t.float(), y, temperature=4.0, kd_weight=0.9)["loss"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ----------------------------------------------------------------------- DKD
def test_dkd_terms_match_definition(logits):
    s, t, y = logits
    for temp in (1.0, 4.0):
        tckd, nckd = dkd_terms(s, t, y, temp)
        raw_t, raw_n = np_dkd_raw(s.numpy(), t.numpy(), y.numpy(), temp)
        ref_t, ref_n = temp**2 * raw_t, temp**2 * raw_n
        assert tckd.item() == pytest.approx(ref_t, abs=1e-9)
        assert nckd.item() == pytest.approx(ref_n, abs=1e-9)
        combined = dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=temp).item()
        assert combined == pytest.approx(ref_t + 8.0 * ref_n, abs=1e-8)


def test_dkd_hand_computed_value():
    # 3 classes, gt = 0, T = 1. Student uniform: b_s = (1/3, 2/3), q_s = (1/2, 1/2).
    # Teacher logits (0, ln 2, 0): p_t = (1/4, 1/2, 1/4) -> b_t = (1/4, 3/4), q_t = (2/3, 1/3).
    s = torch.zeros(1, 3, dtype=torch.float64)
    t = torch.tensor([[0.0, math.log(2.0), 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    tckd_ref = 0.25 * math.log(0.25 * 3) + 0.75 * math.log(0.75 * 1.5)
    nckd_ref = (2 / 3) * math.log(4 / 3) + (1 / 3) * math.log(2 / 3)
    assert tckd_ref == pytest.approx(0.0164167586, abs=ATOL)
    assert nckd_ref == pytest.approx(0.0566330, abs=ATOL)
    tckd, nckd = dkd_terms(s, t, y, 1.0)
    assert tckd.item() == pytest.approx(tckd_ref, abs=ATOL)
    assert nckd.item() == pytest.approx(nckd_ref, abs=ATOL)
    assert dkd_loss(s, t, y, 2.0, 3.0, 1.0).item() == pytest.approx(
        2 * tckd_ref + 3 * nckd_ref, abs=ATOL
    )


def test_dkd_scales_with_t_squared(logits):
    s, t, y = logits
    # Same logits, T = 1 vs T = 2: each term is 1x resp. 4x its raw KL at that temperature.
    for temp, factor in ((1.0, 1.0), (2.0, 4.0)):
        tckd, nckd = dkd_terms(s, t, y, temp)
        raw_t, raw_n = np_dkd_raw(s.numpy(), t.numpy(), y.numpy(), temp)
        assert raw_t > 1e-4 and raw_n > 1e-4
        assert tckd.item() == pytest.approx(factor * raw_t, abs=1e-9)
        assert nckd.item() == pytest.approx(factor * raw_n, abs=1e-9)


def test_dkd_confident_student_is_finite_with_finite_grad():
    s = torch.tensor([[60.0, -60.0, -60.0], [-50.0, 50.0, 0.0]], requires_grad=True)
    t = torch.tensor([[10.0, 0.0, -2.0], [0.0, 9.0, 1.0]])
    y = torch.tensor([0, 1])
    loss = dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(s.grad).all()


def test_dkd_zero_for_identical_logits(logits):
    s, _, y = logits
    assert dkd_loss(s, s.clone(), y, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-10)


# ------------------------------------------------------------ feature losses
def test_attention_transfer_matches_numpy_reference():
    g = torch.Generator().manual_seed(1)
    fs = torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64)
    ft = torch.randn(3, 16, 4, 4, generator=g, dtype=torch.float64)
    diff = np_attention(fs.numpy()) - np_attention(ft.numpy())
    expected = float((diff**2).sum(axis=1).mean())
    assert attention_transfer_loss(fs, ft).item() == pytest.approx(expected, abs=1e-12)
    assert attention_transfer_loss(fs, fs * 3.0).item() == pytest.approx(0.0, abs=1e-12)


def test_attention_transfer_hand_computed_value():
    # One channel; attention = f^2 normalised. Student f = (1, 0; 0, 0) -> a_s = e1.
    # Teacher f = (1, 1; 1, 1) -> a_t = (1/2, 1/2, 1/2, 1/2).
    # ||a_s - a_t||^2 = (1/2)^2 + 3 * (1/2)^2 = 1.
    fs = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    ft = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    assert attention_transfer_loss(fs, ft).item() == pytest.approx(1.0, abs=ATOL)


def test_attention_transfer_pools_the_larger_map():
    g = torch.Generator().manual_seed(2)
    fs = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    ft = torch.randn(2, 6, 4, 4, generator=g, dtype=torch.float64)
    pooled = torch.nn.functional.adaptive_avg_pool2d(fs, (4, 4))
    assert attention_transfer_loss(fs, ft).item() == pytest.approx(
        attention_transfer_loss(pooled, ft).item(), abs=1e-12
    )


def test_hint_regressor_and_fitnet_loss():
    torch.manual_seed(0)
    reg = HintRegressor(8, 32)
    fs = torch.randn(4, 8, 14, 14, requires_grad=True)
    ft = torch.randn(4, 32, 7, 7)
    out = reg(fs, size=(7, 7))
    assert out.shape == (4, 32, 7, 7)
    assert reg(torch.randn(4, 8, 3, 3), size=(7, 7)).shape == (4, 32, 7, 7)
    loss = fitnet_loss(out, ft)
    expected = ((out.detach().double() - ft.double()) ** 2).mean().item()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(fs.grad).all() and reg.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"hint shapes differ: student \(4, 32, 14, 14\)"):
        fitnet_loss(reg(fs), ft)


# --------------------------------------------------------------- FeatureHook
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_feature_hook_captures_output_with_graph_and_removes():
    net = _Net()
    x = torch.randn(2, 1, 5, 5)
    with FeatureHook(net, "body.0") as hook:
        net(x)
        feat = hook.output
        assert torch.allclose(feat, net.body[0](x))
        feat.pow(2).mean().backward()
        assert net.body[0].weight.grad.abs().sum() > 0
    assert len(net.body[0]._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="run a forward pass first"):
        _ = hook.output


def test_feature_hook_unknown_path_lists_nearby_paths():
    net = _Net()
    with pytest.raises(ValueError, match=r"no module 'body\.3'; nearby valid paths: ") as err:
        FeatureHook(net, "body.3")
    assert "body.0" in str(err.value) and "body.1" in str(err.value)
    with pytest.raises(ValueError, match=r"no module 'zzz'; nearby valid paths: body, head"):
        FeatureHook(net, "zzz")


# ---------------------------------------------------------------- registries
def _logits(seed: int = 0, n: int = 6, k: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    return s, t, torch.randint(0, k, (n,), generator=g)


def test_logit_and_feature_registries_hold_the_config_names():
    assert LOGIT_LOSSES.names() == ["dkd", "kd"]
    assert FEATURE_LOSSES.names() == ["attention", "fitnet", NO_FEATURE_LOSS]
    assert DistillConfig().loss in LOGIT_LOSSES and DistillConfig().feature_loss in FEATURE_LOSSES


def test_registered_kd_matches_the_numpy_reference():
    s, t, y = _logits()
    cfg = DistillConfig(loss="kd", temperature=3.0, kd_weight=0.4)
    total, parts = LOGIT_LOSSES.get("kd")(s, t, y, 1, cfg)
    ce, kd = np_ce(s.numpy(), y.numpy()), np_kd_kl(s.numpy(), t.numpy(), 3.0)
    assert set(parts) == {"ce", "kd"}
    assert float(parts["ce"]) == pytest.approx(ce, abs=1e-12)
    assert float(parts["kd"]) == pytest.approx(kd, abs=1e-12)
    assert float(total) == pytest.approx(0.6 * ce + 0.4 * kd, abs=1e-12)


@pytest.mark.parametrize(("epoch", "warm"), [(1, 1 / 3), (3, 1.0), (7, 1.0)])
def test_registered_dkd_is_ce_plus_the_warmed_up_dkd_term(epoch: int, warm: float):
    s, t, y = _logits(1)
    cfg = DistillConfig(loss="dkd", dkd_alpha=0.5, dkd_beta=4.0, temperature=2.0, dkd_warmup_epochs=3)
    total, parts = LOGIT_LOSSES.get("dkd")(s, t, y, epoch, cfg)
    tckd, nckd = np_dkd_raw(s.numpy(), t.numpy(), y.numpy(), 2.0)
    dkd = 4.0 * (0.5 * tckd + 4.0 * nckd)  # T^2 = 4
    assert float(parts["dkd"]) == pytest.approx(dkd, rel=1e-9)
    assert float(total) == pytest.approx(np_ce(s.numpy(), y.numpy()) + warm * dkd, rel=1e-9)


@torch.no_grad()
def test_registered_feature_heads_compute_their_losses():
    torch.manual_seed(0)
    fs, ft = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    cfg = DistillConfig(feature_loss="fitnet", student_layer="a", teacher_layer="b")
    fitnet = FEATURE_LOSSES.get("fitnet")(cfg, 4, 6)
    assert isinstance(fitnet, FitNetHead) and len(list(fitnet.parameters())) == 3
    expected = fitnet_loss(fitnet.regressor(fs, size=(4, 4)), ft)
    assert float(fitnet(fs, ft)) == pytest.approx(float(expected), rel=1e-6)
    attention = FEATURE_LOSSES.get("attention")(cfg, 4, 6)
    assert isinstance(attention, AttentionHead) and list(attention.parameters()) == []
    assert float(attention(fs, ft)) == pytest.approx(float(attention_transfer_loss(fs, ft)), abs=1e-7)
    assert FEATURE_LOSSES.get(NO_FEATURE_LOSS)(cfg, 4, 6) is None


def test_unknown_loss_name_lists_the_valid_ones():
    with pytest.raises(KeyError, match=r"unknown logit loss 'kl'; valid names: dkd, kd"):
        LOGIT_LOSSES.get("kl")
