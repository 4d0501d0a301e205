"""Training tasks: what the one training loop (:func:`kdpipe.train.fit`) optimises.

A task turns a batch into a scalar loss plus its named parts; the loop does not care
whether it is fine-tuning a teacher, distilling a student or recovering a pruned model.

Logit KD convention (shared with :mod:`kdpipe.losses`)::

    L = (1 - kd_weight) * CE(student, y) + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))

``kd_weight`` (alpha) weights the KD term, as in Hinton et al.; libraries disagree on this.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdpipe.config import DistillConfig

log = logging.getLogger(__name__)

# Cached teacher logits must match a fresh teacher forward within this tolerance;
# random augmentation or a wrong ``index`` column moves logits far more than this.
_CACHE_CHECK_ATOL = 1e-3


@runtime_checkable
class Task(Protocol):
    """What :func:`kdpipe.train.fit` needs from a training objective."""

    def prepare(self, model: nn.Module, train_loader: DataLoader, device: torch.device) -> None:
        """Called once before the optimiser is built (move helpers, cache teacher outputs)."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the model (e.g. a FitNet regressor)."""

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor, epoch: int
    ) -> tuple[Tensor, dict[str, float]]:
        """Return the total loss (scalar tensor with grad) and its parts as floats.

        ``epoch`` is 1-based.
        """


def describe_task(task: Task) -> str:
    """A stable text identifying a task and its configuration (used in checkpoint hashes).

    Uses the task's own ``describe()`` when it has one, else its class name.
    """
    describe = getattr(task, "describe", None)
    return describe() if callable(describe) else type(task).__name__


class ClassificationTask:
    """Plain cross-entropy: teacher fine-tuning, or a student trained without a teacher.

    Args:
        label_smoothing: passed to :func:`torch.nn.functional.cross_entropy`.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def prepare(self, model: nn.Module, train_loader: DataLoader, device: torch.device) -> None:
        """Nothing to prepare for plain classification."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """No parameters outside the model."""
        return []

    def describe(self) -> str:
        """Identity of this task for checkpoint matching."""
        return f"ClassificationTask(label_smoothing={self.label_smoothing})"

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor, epoch: int
    ) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy of the model's logits against ``y``."""
        ce = F.cross_entropy(model(x), y, label_smoothing=self.label_smoothing)
        return ce, {"ce": float(ce.detach())}


def loader_augments(loader: DataLoader) -> bool:
    """Whether a loader's dataset applies random augmentation.

    Reads the dataset's ``augment`` attribute (set by :func:`kdpipe.data.get_split`);
    datasets without it (e.g. a ``TensorDataset``) are taken as deterministic. The
    first cached batch is verified against a fresh teacher forward anyway.
    """
    return bool(getattr(loader.dataset, "augment", False))


class DistillationTask:
    """Distil a frozen teacher into the trained model (the student).

    Losses (``cfg.loss``):

    * ``kd``: ``(1 - kd_weight) * CE + kd_weight * T^2 * KL`` (:func:`kdpipe.losses.kd_loss`);
      parts ``ce``, ``kd``.
    * ``dkd``: ``CE + w(epoch) * DKD`` with the warm-up ``w = min(epoch / dkd_warmup_epochs, 1)``
      (1-based epochs); parts ``ce``, ``dkd``.

    An optional feature loss (``fitnet`` through a trainable :class:`HintRegressor`, or
    ``attention`` transfer) between ``cfg.student_layer`` and ``cfg.teacher_layer`` is
    added with weight ``cfg.feature_weight``; part ``feat``.

    Teacher logits are computed once for the whole train split (indexed by the batch's
    ``index`` column) when ``cfg.cache_teacher_logits`` is set, no feature loss is used
    and the train loader does not augment (:func:`loader_augments`). The first cached
    batch is checked against a fresh teacher forward, so a dataset that augments without
    saying so fails loudly instead of training on stale targets.

    Args:
        teacher: the trained teacher; put in eval mode with gradients off.
        cfg: the distillation configuration.
    """

    def __init__(self, teacher: nn.Module, cfg: DistillConfig) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.cfg = cfg
        self.regressor: nn.Module | None = None
        self._cache: Tensor | None = None
        self._verify_cache = False
        self._hooks: tuple = ()

    # ---------------------------------------------------------------- preparation
    @property
    def caches_logits(self) -> bool:
        """True once :meth:`prepare` has cached the teacher's logits."""
        return self._cache is not None

    def prepare(self, model: nn.Module, train_loader: DataLoader, device: torch.device) -> None:
        """Move the teacher to ``device``; set up feature hooks or the logit cache."""
        self.teacher.eval().to(device)  # eval again: the caller may have trained it since
        if device.type == "cuda":
            self.teacher.to(memory_format=torch.channels_last)
        self._cache = None
        if self.cfg.feature_loss != "none":
            self._prepare_features(model, train_loader, device)
        elif self.cfg.cache_teacher_logits and not loader_augments(train_loader):
            self._cache = self._teacher_logits_for_split(train_loader, device)
            self._verify_cache = True

    def _prepare_features(self, model: nn.Module, loader: DataLoader, device: torch.device) -> None:
        from kdpipe.losses import FeatureHook, HintRegressor

        for hook in self._hooks:  # a second prepare() must not stack hooks
            hook.remove()
        self._hooks = (
            FeatureHook(model, self.cfg.student_layer),
            FeatureHook(self.teacher, self.cfg.teacher_layer),
        )
        if self.cfg.feature_loss == "fitnet" and self.regressor is None:
            s_feat, t_feat = self._probe_features(model, loader, device)
            self.regressor = HintRegressor(s_feat.shape[1], t_feat.shape[1]).to(device)

    @torch.no_grad()
    def _probe_features(
        self, model: nn.Module, loader: DataLoader, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Run one sample through both nets (eval mode: BN statistics stay untouched)."""
        x = loader.dataset[0][0].unsqueeze(0).to(device)
        was_training = model.training
        model.eval()
        model(x)
        self.teacher(x)
        model.train(was_training)
        return self._hooks[0].output, self._hooks[1].output

    @torch.no_grad()
    def _teacher_logits_for_split(self, loader: DataLoader, device: torch.device) -> Tensor:
        """Teacher logits for every sample of ``loader.dataset``, row ``i`` = ``index == i``.

        Uses its own sequential loader, so neither the train loader's shuffling generator
        nor the global RNG is advanced (cached and uncached runs see the same batches).
        """
        seq = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size or 256,
            shuffle=False,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            # Its own generator: iterating must not draw from torch's global RNG, or the
            # cached run would drop out / shuffle differently from the uncached one.
            generator=torch.Generator(),
        )
        n = len(loader.dataset)
        cache: Tensor | None = None
        seen = torch.zeros(n, dtype=torch.bool)
        for x, _, index in seq:
            logits = self.teacher(x.to(device, non_blocking=True)).float()
            if cache is None:
                cache = torch.empty(n, logits.shape[1], device=device)
            if index.min() < 0 or index.max() >= n:
                raise ValueError(
                    f"dataset index column holds {int(index.min())}..{int(index.max())} but the "
                    f"split has {n} samples; `index` must be the position within the split"
                )
            cache[index.to(device)] = logits
            seen[index] = True
        if cache is None or not bool(seen.all()):
            raise ValueError(
                f"dataset index column does not cover all {n} samples of the split; "
                "it must be the sample's position within the split (0..n-1)"
            )
        log.info("cached teacher logits for %d samples (%d classes)", n, cache.shape[1])
        return cache

    def describe(self) -> str:
        """Identity for checkpoint matching: the config and a hash of the teacher's weights."""
        return f"DistillationTask({self.cfg.model_dump_json()}, teacher={teacher_fingerprint(self.teacher)})"

    def extra_parameters(self) -> list[nn.Parameter]:
        """The FitNet regressor's parameters (empty for other losses)."""
        return [] if self.regressor is None else list(self.regressor.parameters())

    # ----------------------------------------------------------------------- loss
    def _teacher_logits(self, x: Tensor, index: Tensor) -> Tensor:
        if self._cache is None:
            with torch.no_grad():
                return self.teacher(x)
        cached = self._cache[index.to(self._cache.device)]
        if self._verify_cache:
            self._check_cache(x, cached)
        return cached

    @torch.no_grad()
    def _check_cache(self, x: Tensor, cached: Tensor) -> None:
        with torch.autocast(x.device.type, enabled=False):
            fresh = self.teacher(x.float()).float()
        err = float((fresh - cached).abs().max())
        if err > _CACHE_CHECK_ATOL * max(1.0, float(fresh.abs().max())):
            raise ValueError(
                f"cached teacher logits differ from a fresh teacher forward by {err:.3g}: the "
                "train loader seems to augment (or its `index` column is not the position in "
                "the split). Give the dataset an `augment = True` attribute or set "
                "distill.cache_teacher_logits: false"
            )
        self._verify_cache = False

    def _feature_loss(self) -> Tensor:
        from kdpipe.losses import attention_transfer_loss, fitnet_loss

        s_feat, t_feat = self._hooks[0].output, self._hooks[1].output
        if self.cfg.feature_loss == "fitnet":
            return fitnet_loss(self.regressor(s_feat, size=tuple(t_feat.shape[-2:])), t_feat)
        return attention_transfer_loss(s_feat, t_feat)

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor, epoch: int
    ) -> tuple[Tensor, dict[str, float]]:
        """Distillation loss of the student ``model`` on one batch (``epoch`` is 1-based)."""
        from kdpipe.losses import dkd_loss, kd_loss

        cfg = self.cfg
        s_logits = model(x)
        t_logits = self._teacher_logits(x, index)
        if cfg.loss == "kd":
            terms = kd_loss(s_logits, t_logits, y, cfg.temperature, cfg.kd_weight)
            total, parts = terms["loss"], {"ce": terms["ce"], "kd": terms["kd"]}
        else:
            ce = F.cross_entropy(s_logits, y)
            warm = min(epoch / cfg.dkd_warmup_epochs, 1.0) if cfg.dkd_warmup_epochs else 1.0
            dkd = dkd_loss(s_logits, t_logits, y, cfg.dkd_alpha, cfg.dkd_beta, cfg.temperature)
            total, parts = ce + warm * dkd, {"ce": ce, "dkd": dkd}
        if cfg.feature_loss != "none":
            parts["feat"] = self._feature_loss()
            total = total + cfg.feature_weight * parts["feat"]
        return total, {k: float(v.detach()) for k, v in parts.items()}


def teacher_fingerprint(teacher: nn.Module) -> str:
    """Short sha256 of a teacher's weights, so checkpoints of different teachers differ."""
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
