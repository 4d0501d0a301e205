"""Optimisers and learning-rate schedules, each through a registry.

A config names them (``train.optimizer``, ``train.scheduler``); :func:`kdpipe.validate.validate`
checks those names against :data:`OPTIMIZERS` and :data:`SCHEDULERS`, so adding one is a
registered function here and nothing else.

Schedules are pure functions of the optimiser step (``factor(cfg, step, steps_per_epoch)``
multiplies ``cfg.lr``): being stateless, they need nothing in a checkpoint but the epoch.
Linear warm-up *per iteration* over ``warmup_epochs`` comes first for every schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from kdpipe.config import TrainConfig
from kdpipe.registry import Registry

__all__ = ["OPTIMIZERS", "SCHEDULERS", "build_optimizer", "lr_factor"]

OptimizerFactory = Callable[[list[dict], TrainConfig], torch.optim.Optimizer]
Schedule = Callable[[TrainConfig, int, int, int], float]
"""``schedule(cfg, step, steps_per_epoch, warmup_steps)`` for a step past the warm-up."""

OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")
SCHEDULERS: Registry[Schedule] = Registry("scheduler")


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False)


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr)


@SCHEDULERS.register("cosine")
def _cosine(cfg: TrainConfig, step: int, steps_per_epoch: int, warmup: int) -> float:
    progress = (step - warmup) / max(1, cfg.epochs * steps_per_epoch - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@SCHEDULERS.register("step")
def _step(cfg: TrainConfig, step: int, steps_per_epoch: int, warmup: int) -> float:
    epoch = step // steps_per_epoch
    return cfg.step_gamma ** sum(m <= epoch for m in cfg.step_milestones)


@SCHEDULERS.register("none")
def _constant(cfg: TrainConfig, step: int, steps_per_epoch: int, warmup: int) -> float:
    return 1.0


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params``; no weight decay on biases and norm scales (1-D)."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return OPTIMIZERS.get(cfg.optimizer)([g for g in groups if g["params"]], cfg)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of ``cfg.lr`` at the 0-based optimiser ``step``.

    Warm-up is linear per iteration, reaching 1 at the end of ``warmup_epochs``. Cosine
    decays over the remaining steps towards 0; ``step`` multiplies by ``step_gamma`` once
    per milestone ``m`` from (1-based) epoch ``m + 1`` on, as ``MultiStepLR`` would.
    """
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    return SCHEDULERS.get(cfg.scheduler)(cfg, step, steps_per_epoch, warmup)
