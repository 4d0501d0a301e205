"""Knowledge-distillation losses as pure functions of logits and feature maps.

Convention for logit KD (libraries disagree on which term the weight multiplies)::

    L = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

``alpha`` (``DistillConfig.kd_weight``) weights the *distillation* term, as in Hinton
et al. (2015); ``alpha = 0`` is plain supervised training, ``alpha = 1`` pure
distillation. The ``T^2`` factor keeps the soft term's gradients on the same scale as
the hard term's when the temperature changes, and it is applied inside :func:`kd_kl`,
so every caller gets it.

All KL terms are averaged over the batch ("batchmean"), i.e. summed over classes and
divided by the batch size, which is the mathematically correct KL per sample.

A config names its losses (``distill.loss``, ``distill.feature_loss``); they are looked up
in :data:`LOGIT_LOSSES` and :data:`FEATURE_LOSSES`, so adding one is a registered function
here (reading its hyperparameters from the :class:`~kdpipe.config.DistillConfig`) and
nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import DistillConfig
from kdpipe.models import nearest_module_paths
from kdpipe.registry import Registry

__all__ = [
    "FEATURE_LOSSES",
    "LOGIT_LOSSES",
    "NO_FEATURE_LOSS",
    "AttentionHead",
    "FeatureHook",
    "FitNetHead",
    "HintRegressor",
    "attention_map",
    "attention_transfer_loss",
    "dkd_loss",
    "dkd_terms",
    "fitnet_loss",
    "kd_kl",
    "kd_loss",
]

# Subtracted from the ground-truth logit to remove it from NCKD's softmax (as in the
# DKD paper's code): exp(-1000) is exactly 0 in float32 and float16 alike.
_MASK_OFFSET = 1000.0


def _check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"student and teacher logits must both be (batch, classes); got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)} (do teacher and student "
            "have the same num_classes?)"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")


def kd_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton's soft-target loss ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean.

    Args:
        student_logits: (N, C) student outputs.
        teacher_logits: (N, C) teacher outputs (no gradient needed).
        temperature: softmax temperature T > 0.

    Returns:
        A scalar tensor; zero when the logits are equal.
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    kd_weight: float,
) -> dict[str, torch.Tensor]:
    """Logit KD: ``(1 - kd_weight) * CE + kd_weight * kd_kl`` (see the module docstring).

    Args:
        student_logits: (N, C) student outputs.
        teacher_logits: (N, C) teacher outputs.
        targets: (N,) integer class labels.
        temperature: softmax temperature T > 0.
        kd_weight: alpha in [0, 1], the weight of the distillation term.

    Returns:
        ``{"loss": total, "ce": cross-entropy, "kd": T^2-scaled KL}``, scalar tensors.
    """
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must lie in [0, 1] (got {kd_weight})")
    ce = F.cross_entropy(student_logits, targets)
    kd = kd_kl(student_logits, teacher_logits, temperature)
    return {"loss": (1.0 - kd_weight) * ce + kd_weight * kd, "ce": ce, "kd": kd}


def _binary_log_probs(log_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, 2) log-probabilities of [target class, all other classes] from (N, C) log-probs.

    Computed in log space (logsumexp of the non-target log-probs) so a confident model
    does not produce log(0).
    """
    log_target = log_p.gather(1, targets[:, None]).squeeze(1)
    is_target = F.one_hot(targets, log_p.shape[1]).bool()
    log_other = torch.logsumexp(log_p.masked_fill(is_target, float("-inf")), dim=1)
    return torch.stack([log_target, log_other], dim=1)


def dkd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of Decoupled KD (Zhao et al., CVPR 2022), each ``T^2``-scaled.

    * TCKD: KL between the binary distributions [p(target), p(not target)] of teacher
      and student.
    * NCKD: KL between the distributions over the non-target classes only; the target
      logit is removed by subtracting a large constant before the softmax.

    Returns:
        ``(tckd, nckd)``, scalar tensors averaged over the batch.
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    if student_logits.shape[1] < 2:
        raise ValueError("DKD needs at least 2 classes")
    n = student_logits.shape[0]
    gt_mask = F.one_hot(targets, student_logits.shape[1]).to(student_logits.dtype)
    z_s = student_logits / temperature
    z_t = teacher_logits / temperature

    b_s = _binary_log_probs(F.log_softmax(z_s, dim=1), targets)
    b_t = _binary_log_probs(F.log_softmax(z_t, dim=1), targets)
    tckd = F.kl_div(b_s, b_t, reduction="sum", log_target=True) / n

    log_q_s = F.log_softmax(z_s - _MASK_OFFSET * gt_mask, dim=1)
    q_t = F.softmax(z_t - _MASK_OFFSET * gt_mask, dim=1)
    # kl_div with a probability target treats 0 * log 0 as 0, which the masked class is.
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") / n
    scale = temperature**2
    return tckd * scale, nckd * scale


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` (see :func:`dkd_terms`).

    The cross-entropy term and the paper's warm-up ramp are the training task's job.
    """
    tckd, nckd = dkd_terms(student_logits, teacher_logits, targets, temperature)
    return alpha * tckd + beta * nckd


# ------------------------------------------------------------- feature losses
def attention_map(feat: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a (N, C, H, W) map: mean over channels of f^2, L2-normalised.

    Returns:
        (N, H*W), each row of unit L2 norm.
    """
    if feat.dim() != 4:
        raise ValueError(f"attention maps need (N, C, H, W) features (got {tuple(feat.shape)})")
    return F.normalize(feat.pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017).

    The squared L2 distance between the normalised attention maps, averaged over the
    batch. Channel counts may differ; if the spatial sizes differ, the larger map is
    adaptive-average-pooled to the smaller size first. (The reference code averages over
    positions as well, which divides this value by H*W; summing keeps the loss's scale
    independent of the resolution, so one ``feature_weight`` fits all layers.)
    """
    if student_feat.dim() != 4 or teacher_feat.dim() != 4:
        raise ValueError(
            f"attention transfer needs (N, C, H, W) features; got {tuple(student_feat.shape)} "
            f"and {tuple(teacher_feat.shape)}"
        )
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(f"batch sizes differ: {student_feat.shape[0]} vs {teacher_feat.shape[0]}")
    hs, ws = student_feat.shape[-2:]
    ht, wt = teacher_feat.shape[-2:]
    size = (min(hs, ht), min(ws, wt))
    if (hs, ws) != size:
        student_feat = F.adaptive_avg_pool2d(student_feat, size)
    if (ht, wt) != size:
        teacher_feat = F.adaptive_avg_pool2d(teacher_feat, size)
    diff = attention_map(student_feat) - attention_map(teacher_feat)
    return diff.pow(2).sum(dim=1).mean()


class HintRegressor(nn.Module):
    """FitNets regressor: maps student features onto the teacher's channel count.

    A 1x1 convolution + BatchNorm; if a target size is given and differs, the output is
    average-pooled down (or bilinearly resized up) to it.

    Args:
        s_channels: channels of the student's hint layer.
        t_channels: channels of the teacher's guided layer.
    """

    def __init__(self, s_channels: int, t_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(t_channels)

    def forward(
        self, student_feat: torch.Tensor, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        out = self.bn(self.conv(student_feat))
        if size is None or tuple(out.shape[-2:]) == tuple(size):
            return out
        if size[0] <= out.shape[-2] and size[1] <= out.shape[-1]:
            return F.adaptive_avg_pool2d(out, size)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


def fitnet_loss(regressed_student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss: mean squared error between regressed student and teacher maps."""
    if regressed_student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"hint shapes differ: student {tuple(regressed_student_feat.shape)} vs teacher "
            f"{tuple(teacher_feat.shape)}; pass the teacher's (H, W) to HintRegressor"
        )
    return F.mse_loss(regressed_student_feat, teacher_feat)


class FeatureHook:
    """Captures the output of one submodule on every forward pass.

    Usable as an object (call :meth:`remove` when done) or a context manager::

        with FeatureHook(model, "features.stage3") as hook:
            logits = model(x)
            feat = hook.output

    The captured tensor keeps its autograd graph, so a loss on it trains the model.

    Args:
        model: the network.
        path: dotted module path, as in ``model.named_modules()``.

    Raises:
        ValueError: the path does not exist; the message lists similar valid paths.
    """

    def __init__(self, model: nn.Module, path: str) -> None:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            near = nearest_module_paths(model, path)
            raise ValueError(
                f"{type(model).__name__} has no module {path!r}; nearby valid paths: "
                f"{', '.join(near) or '(none)'}"
            ) from None
        self.path = path
        self._output: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._capture)

    def _capture(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self._output = output

    @property
    def output(self) -> torch.Tensor:
        """The module's output from the latest forward pass."""
        if self._output is None:
            raise RuntimeError(
                f"FeatureHook({self.path!r}) has captured nothing yet: run a forward pass first"
            )
        return self._output

    def clear(self) -> None:
        """Drop the captured tensor (and the graph it holds)."""
        self._output = None

    def remove(self) -> None:
        """Unregister the hook and drop the captured tensor."""
        self._handle.remove()
        self._output = None

    def __enter__(self) -> FeatureHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# ------------------------------------------------------------------ registries
LogitLoss = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, int, DistillConfig],
    tuple[torch.Tensor, dict[str, torch.Tensor]],
]
"""``loss(student_logits, teacher_logits, targets, epoch, cfg) -> (total, parts)``;
``epoch`` is 1-based, ``parts`` names the terms the history reports (``train_<part>``)."""
FeatureLossHead = Callable[[DistillConfig, int, int], nn.Module | None]
"""``head(cfg, student_channels, teacher_channels)``: a module whose
``forward(student_feat, teacher_feat)`` is the scalar feature loss. Its parameters (a
FitNets regressor) train with the student, inside one module with it."""

LOGIT_LOSSES: Registry[LogitLoss] = Registry("logit loss")
FEATURE_LOSSES: Registry[FeatureLossHead] = Registry("feature loss")
NO_FEATURE_LOSS = "none"
"""``distill.feature_loss`` that switches feature losses off (no hooks, no head)."""


@LOGIT_LOSSES.register("kd")
def _kd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, epoch: int, cfg: DistillConfig):
    terms = kd_loss(s, t, y, cfg.temperature, cfg.kd_weight)
    return terms["loss"], {"ce": terms["ce"], "kd": terms["kd"]}


@LOGIT_LOSSES.register("dkd")
def _dkd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, epoch: int, cfg: DistillConfig):
    """``CE + w(epoch) * DKD`` with the paper's warm-up ``w = min(epoch / dkd_warmup_epochs, 1)``."""
    ce = F.cross_entropy(s, y)
    warm = min(epoch / cfg.dkd_warmup_epochs, 1.0) if cfg.dkd_warmup_epochs else 1.0
    dkd = dkd_loss(s, t, y, cfg.dkd_alpha, cfg.dkd_beta, cfg.temperature)
    return ce + warm * dkd, {"ce": ce, "dkd": dkd}


class FitNetHead(nn.Module):
    """FitNets as a feature-loss head: regress the student's map, then the hint loss."""

    def __init__(self, s_channels: int, t_channels: int) -> None:
        super().__init__()
        self.regressor = HintRegressor(s_channels, t_channels)

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        return fitnet_loss(self.regressor(student_feat, size=tuple(teacher_feat.shape[-2:])), teacher_feat)


class AttentionHead(nn.Module):
    """Attention transfer as a feature-loss head (no parameters)."""

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        return attention_transfer_loss(student_feat, teacher_feat)


@FEATURE_LOSSES.register("fitnet")
def _fitnet(cfg: DistillConfig, s_channels: int, t_channels: int) -> nn.Module:
    return FitNetHead(s_channels, t_channels)


@FEATURE_LOSSES.register("attention")
def _attention(cfg: DistillConfig, s_channels: int, t_channels: int) -> nn.Module:
    return AttentionHead()


@FEATURE_LOSSES.register(NO_FEATURE_LOSS)
def _no_feature_loss(cfg: DistillConfig, s_channels: int, t_channels: int) -> None:
    return None  # the task neither hooks the layers nor calls this
