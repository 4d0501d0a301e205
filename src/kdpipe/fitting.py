"""Training a model on a dataset in this process: the part a recipe and a DDP worker share.

:func:`make_task` turns "a teacher and a distillation config, or neither" into the
:class:`~kdpipe.tasks.Task` the loop trains; :func:`fit_on_dataset` builds the loaders and
runs :func:`kdpipe.train.fit`. A recipe calls them for a single-process run; each torchrun
worker (:mod:`kdpipe._worker`) calls them on its rank, where ``fit`` shards the loaders
(``data.batch_size`` is the global batch). Nothing here launches processes: that is
:mod:`kdpipe.launch`, and deciding between the two is :mod:`kdpipe.recipes`' job.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from kdpipe import ddp
from kdpipe.config import DistillConfig, TrainConfig
from kdpipe.data import DatasetSpec, make_loader
from kdpipe.tasks import ClassificationTask, DistillationTask, Task
from kdpipe.train import Callback, TrainResult, fit

__all__ = ["fit_on_dataset", "make_loaders", "make_task"]


def make_task(teacher: nn.Module | None, distill_cfg: DistillConfig | None) -> Task:
    """The training objective: distillation from ``teacher`` with ``distill_cfg``, or plain
    cross-entropy when there is no teacher.

    Raises:
        ValueError: a teacher without a distillation config.
    """
    if teacher is None:
        return ClassificationTask()
    if distill_cfg is None:
        raise ValueError("distillation needs a DistillConfig with the teacher")
    return DistillationTask(teacher, distill_cfg)


def make_loaders(dataset: DatasetSpec, cfg: TrainConfig) -> tuple[DataLoader, DataLoader]:
    """The train loader (shuffled with ``cfg.seed``) and the validation loader of
    ``dataset``, pinned for this process's device."""
    device = ddp.process_device(cfg.device)
    return (make_loader(dataset, "train", train=True, device=device, seed=cfg.seed),
            make_loader(dataset, "val", train=False, device=device))


def fit_on_dataset(
    model: nn.Module,
    task: Task,
    dataset: DatasetSpec,
    cfg: TrainConfig,
    *,
    loaders: tuple[DataLoader, Iterable | None] | None = None,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
    desc: str = "train",
) -> TrainResult:
    """Run :func:`kdpipe.train.fit` on ``dataset``'s train / val splits, in this process.

    Args:
        model: trained in place (it ends with the best-validation weights).
        task: the objective (see :func:`make_task`).
        dataset: the data; its loaders come from :func:`make_loaders`.
        cfg: the train config.
        loaders: (train, val) loaders to train on instead, e.g. those a pruning run also
            draws its importance batches from; None builds them.
        callbacks: ``callback(epoch, metrics)`` after each epoch.
        checkpoint_dir: where ``fit`` keeps ``last.pt`` to resume.
        desc: label for logs and errors.
    """
    train_loader, val_loader = make_loaders(dataset, cfg) if loaders is None else loaders
    return fit(model, task, train_loader, val_loader, cfg, callbacks=callbacks,
               checkpoint_dir=checkpoint_dir, desc=desc)
