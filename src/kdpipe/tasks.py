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
from kdpipe.losses import FEATURE_LOSSES, LOGIT_LOSSES, NO_FEATURE_LOSS, FeatureHook

log = logging.getLogger(__name__)

# Cached teacher logits must match a fresh teacher forward within this tolerance;
# random augmentation or a wrong ``index`` column moves logits far more than this.
_CACHE_CHECK_ATOL = 1e-3


@runtime_checkable
class Task(Protocol):
    """What :func:`kdpipe.train.fit` needs from a training objective."""

    def prepare(self, model: nn.Module, train_loader: DataLoader, device: torch.device) -> nn.Module:
        """Called once before the optimiser is built; returns the module to train.

        That is ``model`` itself, or one module owning it and the task's trainable helpers
        (e.g. :class:`StudentWithHint` with a FitNets regressor): the optimiser, DDP and the
        checkpoints see that module, while ``fit`` evaluates and returns ``model``.
        """

    def loss(
        self, module: nn.Module, x: Tensor, y: Tensor, index: Tensor, epoch: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the total loss (scalar tensor with grad) and its parts, detached.

        ``module`` is what :meth:`prepare` returned (wrapped by DDP under several
        processes). The parts stay on the device: the loop reads them back once per log
        interval, not per step. ``epoch`` is 1-based.
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

    def prepare(self, model: nn.Module, train_loader: DataLoader, device: torch.device) -> nn.Module:
        """Nothing to prepare for plain classification: the model itself is trained."""
        return model

    def describe(self) -> str:
        """Identity of this task for checkpoint matching."""
        return f"ClassificationTask(label_smoothing={self.label_smoothing})"

    def loss(
        self, module: nn.Module, x: Tensor, y: Tensor, index: Tensor, epoch: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy of the model's logits against ``y``."""
        ce = F.cross_entropy(module(x), y, label_smoothing=self.label_smoothing)
        return ce, {"ce": ce.detach()}


def loader_augments(loader: DataLoader) -> bool:
    """Whether a loader's dataset applies random augmentation.

    Reads the dataset's ``augment`` attribute (set by :func:`kdpipe.data.get_split`);
    datasets without it (e.g. a ``TensorDataset``) are taken as deterministic. The
    first cached batch is verified against a fresh teacher forward anyway.
    """
    return bool(getattr(loader.dataset, "augment", False))


class StudentWithHint(nn.Module):
    """The student and its feature-loss head as one module (training only).

    ``forward(x, teacher_feat) -> (logits, feature_loss)``: the student's ``layer`` output is
    captured during its forward pass and handed to ``head`` with the teacher's map. One
    module means DDP reduces the head's gradients with the student's, the optimiser holds
    both, and a checkpoint restores both; the hook lives only for the forward call, so
    the student itself is left without hooks (the exported model is the bare student).

    Args:
        student: the network being distilled.
        layer: module path of the student's feature layer (e.g. ``features.stage3``).
        head: e.g. :class:`~kdpipe.losses.FitNetHead` (a regressor) or
            :class:`~kdpipe.losses.AttentionHead`.
    """

    def __init__(self, student: nn.Module, layer: str, head: nn.Module) -> None:
        super().__init__()
        FeatureHook(student, layer).remove()  # a wrong path fails here, naming near ones
        self.student, self.head, self.layer = student, head, layer

    def forward(self, x: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
        with FeatureHook(self.student, self.layer) as hook:
            logits = self.student(x)
            student_feat = hook.output
        return logits, self.head(student_feat, teacher_feat)


class DistillationTask:
    """Distil a frozen teacher into the trained model (the student).

    The logit loss is ``LOGIT_LOSSES[cfg.loss]`` (:mod:`kdpipe.losses`: ``kd`` with parts
    ``ce``, ``kd``; ``dkd`` with ``ce``, ``dkd``). A feature loss
    ``FEATURE_LOSSES[cfg.feature_loss]`` (``fitnet``, ``attention``) between
    ``cfg.student_layer`` and ``cfg.teacher_layer`` is added with weight
    ``cfg.feature_weight`` (part ``feat``); its head trains inside a
    :class:`StudentWithHint` that :meth:`prepare` returns.

    The teacher runs first on each batch, under ``no_grad``, so its activations are freed
    before the student's autograd graph is built.

    Teacher logits are computed once for the whole train split (indexed by the batch's
    ``index`` column) when ``cfg.cache_teacher_logits`` is set, no feature loss is used
    and the train loader does not augment (:func:`loader_augments`). The first cached
    batch is checked against a fresh teacher forward, so a dataset that augments without
    saying so fails loudly instead of training on stale targets.

    Args:
        teacher: the trained teacher; put in eval mode with gradients off.
        cfg: the distillation configuration.

    Raises:
        kdpipe.registry.UnknownNameError: ``cfg.loss`` or ``cfg.feature_loss`` is not
            registered (the message lists the valid names).
    """

    def __init__(self, teacher: nn.Module, cfg: DistillConfig) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.cfg = cfg
        self._logit_loss = LOGIT_LOSSES.get(cfg.loss)
        self._make_head = FEATURE_LOSSES.get(cfg.feature_loss)
        self.head: nn.Module | None = None
        """The feature-loss head (e.g. the FitNets regressor) once prepared."""
        self._cache: Tensor | None = None
        self._verify_cache = False

    # ---------------------------------------------------------------- preparation
    @property
    def caches_logits(self) -> bool:
        """True once :meth:`prepare` has cached the teacher's logits."""
        return self._cache is not None

    @property
    def uses_features(self) -> bool:
        """Whether a feature loss is configured (the teacher then runs every step)."""
        return self.cfg.feature_loss != NO_FEATURE_LOSS

    def prepare(self, model: nn.Module, train_loader: DataLoader, device: torch.device) -> nn.Module:
        """Move the teacher to ``device``; set up the feature head or the logit cache.

        Returns:
            ``model``, or a :class:`StudentWithHint` owning it when a feature loss is used.
        """
        self.teacher.eval().to(device)  # eval again: the caller may have trained it since
        if device.type == "cuda":
            self.teacher.to(memory_format=torch.channels_last)
        self._cache = None
        if self.uses_features:
            return self._prepare_features(model, train_loader, device)
        if self.cfg.cache_teacher_logits and not loader_augments(train_loader):
            self._cache = self._teacher_logits_for_split(train_loader, device)
            self._verify_cache = True
        return model

    def _prepare_features(self, model: nn.Module, loader: DataLoader, device: torch.device) -> nn.Module:
        FeatureHook(self.teacher, self.cfg.teacher_layer).remove()  # a wrong path fails here
        if self.head is None:  # kept across prepare() calls, like the student's weights
            s_feat, t_feat = self._probe_features(model, loader, device)
            self.head = self._make_head(self.cfg, s_feat.shape[1], t_feat.shape[1]).to(device)
        return StudentWithHint(model, self.cfg.student_layer, self.head)

    @torch.no_grad()
    def _probe_features(
        self, model: nn.Module, loader: DataLoader, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Run one sample through both nets (eval mode: BN statistics stay untouched)."""
        x = loader.dataset[0][0].unsqueeze(0).to(device)
        was_training = model.training
        model.eval()
        with FeatureHook(model, self.cfg.student_layer) as hook:
            model(x)
            s_feat = hook.output
        with FeatureHook(self.teacher, self.cfg.teacher_layer) as hook:
            self.teacher(x)
            t_feat = hook.output
        model.train(was_training)
        return s_feat, t_feat

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

    # ----------------------------------------------------------------------- loss
    @torch.no_grad()
    def _teacher_outputs(self, x: Tensor, index: Tensor) -> tuple[Tensor, Tensor | None]:
        """The teacher's logits (cached or fresh) and, with a feature loss, its feature map."""
        if self._cache is not None:
            cached = self._cache[index.to(self._cache.device, non_blocking=True)]
            if self._verify_cache:
                self._check_cache(x, cached)
            return cached, None
        if not self.uses_features:
            return self.teacher(x), None
        if self.head is None:
            raise RuntimeError("DistillationTask.loss() with a feature loss needs prepare() first "
                               "(kdpipe.train.fit calls it)")
        with FeatureHook(self.teacher, self.cfg.teacher_layer) as hook:  # no hook left behind
            return self.teacher(x), hook.output

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

    def loss(
        self, module: nn.Module, x: Tensor, y: Tensor, index: Tensor, epoch: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Distillation loss on one batch; ``module`` is what :meth:`prepare` returned."""
        t_logits, t_feat = self._teacher_outputs(x, index)  # first: no student graph alive yet
        if t_feat is None:
            s_logits, feat = module(x), None
        else:
            s_logits, feat = module(x, t_feat)
        total, parts = self._logit_loss(s_logits, t_logits, y, epoch, self.cfg)
        if feat is not None:
            parts = {**parts, "feat": feat}
            total = total + self.cfg.feature_weight * feat
        return total, {k: v.detach() for k, v in parts.items()}


def teacher_fingerprint(teacher: nn.Module) -> str:
    """Short sha256 of a teacher's weights, so checkpoints of different teachers differ."""
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
