"""Training recipes: the core calls behind the ``finetune_teacher`` and ``distill_student``
steps, usable from a notebook or a plain script as well.

Each recipe builds the model and loaders, runs the one training loop
(:func:`kdpipe.train.fit`) with the right task, measures the result and wraps it into a
pickle-free :class:`~kdpipe.bundle.Bundle`. ``bundle.spec.extra`` then holds:

* ``role``: ``teacher`` or ``student``;
* ``history``: the per-epoch rows of :func:`~kdpipe.train.fit`;
* ``best_epoch``: the epoch whose weights the bundle holds;
* ``metrics``: ``val_accuracy``, ``test_accuracy``, ``test_loss``, ``params``, ``macs``,
  ``size_bytes``;
* ``test_confusion``: the test split's confusion matrix (rows: true class);
* ``dataset_fingerprint``: the data the model was trained on.

:func:`prune_student` adds ``prune_report`` (:class:`~kdpipe.prune.PruneReport` as JSON)
and uses the KD recovery epochs as its ``history`` (each row with its ``prune_step``).

Multi-process training: when a ``TrainConfig`` asks for ``num_processes`` > 1, every
training run of these recipes (teacher, student, each pruning recovery) is handed to
:func:`kdpipe.distributed.launch_fit`, which starts that many torchrun workers; each runs
:func:`fit_on_dataset` under DDP, and the trained weights come back into the recipe's
model. Callbacks get the epoch rows as rank 0 finishes them; the returned bundles are the
same as single-process ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from kdpipe import distributed
from kdpipe.build import build_model
from kdpipe.bundle import Bundle
from kdpipe.config import (
    DistillConfig,
    ModelConfig,
    PruneConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from kdpipe.data import DatasetSpec, make_loader
from kdpipe.metrics import count_macs, count_params, serialized_size_bytes
from kdpipe.train import (
    Callback,
    ClassificationTask,
    DistillationTask,
    Task,
    TrainResult,
    evaluate,
    fit,
    resolve_device,
    seed_everything,
)

if TYPE_CHECKING:
    from kdpipe.prune import PruneReport

__all__ = [
    "bundle_metrics", "distill_student", "fit_on_dataset", "make_task", "measure", "prune_student",
    "train_teacher",
]


def train_teacher(
    dataset: DatasetSpec,
    cfg: TeacherConfig,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
) -> Bundle:
    """Fine-tune (or train from scratch) the teacher with plain cross-entropy.

    Args:
        dataset: the dataset spec (from :func:`kdpipe.data.build_dataset_spec`).
        cfg: architecture (``cfg.model``: pretrained weights or a start checkpoint
            apply) and training knobs (``cfg.train``). ``cfg.init == "production"`` is
            resolved by the caller into ``cfg.model.checkpoint``.
        callbacks: ``callback(epoch, metrics)`` after every epoch (e.g. MLflow logging).
        checkpoint_dir: where :func:`~kdpipe.train.fit` keeps ``last.pt`` to resume.

    Returns:
        The trained teacher with its history and metrics in ``spec.extra``.
    """
    seed_everything(cfg.train.seed)  # the initial weights follow from the config alone
    model = build_model(cfg.model, dataset.num_classes, dataset.in_channels)
    return _train(model, None, None, dataset, cfg.model, cfg.train, role="teacher",
                  callbacks=callbacks, checkpoint_dir=checkpoint_dir)


def distill_student(
    dataset: DatasetSpec,
    teacher: Bundle,
    student_cfg: StudentConfig,
    distill_cfg: DistillConfig,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
) -> Bundle:
    """Distil ``teacher`` into a fresh student (see :class:`kdpipe.train.DistillationTask`).

    Args:
        dataset: the dataset spec the teacher was trained on.
        teacher: the trained teacher bundle (used frozen, in eval mode).
        student_cfg: the student's architecture and training knobs.
        distill_cfg: loss, temperature, ``kd_weight`` (alpha) and feature losses.
        callbacks: ``callback(epoch, metrics)`` after every epoch.
        checkpoint_dir: where :func:`~kdpipe.train.fit` keeps ``last.pt`` to resume.

    Raises:
        ValueError: the teacher was built for other classes or another input shape.
    """
    _check_compatible(teacher, dataset)
    seed_everything(student_cfg.train.seed)  # the initial weights follow from the config alone
    model = build_model(student_cfg.model, dataset.num_classes, dataset.in_channels)
    return _train(model, teacher, distill_cfg, dataset, student_cfg.model, student_cfg.train,
                  role="student",
                  callbacks=callbacks, checkpoint_dir=checkpoint_dir,
                  extra={"distill": distill_cfg.model_dump(mode="json")})


def prune_student(
    student: Bundle,
    teacher: Bundle,
    dataset: DatasetSpec,
    prune_cfg: PruneConfig,
    distill_cfg: DistillConfig,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
) -> tuple[Bundle, PruneReport | None]:
    """Structurally prune a copy of the student, distilling it back after every step.

    Pruning is :func:`kdpipe.prune.prune_model`; the recovery after each step is the one
    training loop with a :class:`~kdpipe.train.DistillationTask` and ``prune_cfg.recovery``.
    Recovery epochs are numbered continuously across pruning steps, so ``callbacks`` can
    log them as one curve. With ``prune_cfg.enabled`` false the student is handed on
    unpruned (``report`` is None), re-labelled ``pruned_student`` so consumers need no
    special case.

    With ``checkpoint_dir``, recovery k checkpoints every epoch into
    ``checkpoint_dir/step<k>``. A second call with the same inputs prunes the same
    channels again (pruning is deterministic for every importance but ``random``), finds
    the finished recoveries complete and resumes the interrupted one from its last epoch.
    A checkpoint whose model shapes no longer match is ignored (see :func:`kdpipe.train.fit`).

    Returns:
        The pruned bundle (test metrics re-measured; the input bundles are untouched) and
        the pruning report.
    """
    import copy

    import torch

    from kdpipe.prune import prune_model

    _check_compatible(teacher, dataset)
    model = copy.deepcopy(student.model).cpu()
    report = None
    history: list[dict[str, float]] = []
    if prune_cfg.enabled:
        rec = prune_cfg.recovery
        launch = rec.num_processes > 1 and not distributed.is_active()
        if launch:  # fail before pruning, not at the first recovery
            distributed.check_launch(rec, batch_size=dataset.config.batch_size)
        device = resolve_device(rec.device)
        train_loader = make_loader(dataset, "train", train=True, device=device, seed=rec.seed)
        val_loader = make_loader(dataset, "val", train=False, device=device)

        def recover(m: nn.Module, step: int) -> None:
            offset = len(history)

            def relabel(epoch: int, metrics: dict[str, float]) -> None:
                row = {**metrics, "epoch": offset + epoch, "prune_step": step + 1}
                history.append(row)
                for callback in callbacks:
                    callback(offset + epoch, row)

            # A fresh task per step: a feature-loss regressor must match the new channel counts.
            desc = f"recovery {step + 1}/{prune_cfg.iterative_steps}"
            step_dir = None if checkpoint_dir is None else Path(checkpoint_dir) / f"step{step + 1}"
            if launch:
                result = _fit_distributed(m, student.spec, teacher, distill_cfg, dataset, rec,
                                          callbacks=[relabel], checkpoint_dir=step_dir, desc=desc)
            else:
                result = fit(m, DistillationTask(teacher.model, distill_cfg), train_loader, val_loader,
                             rec, callbacks=[relabel], checkpoint_dir=step_dir, desc=desc)
            # Epochs restored from a checkpoint ran in an earlier attempt: no callback saw
            # them this time, but the history must still hold them, in order.
            history[offset:offset] = [{**row, "epoch": offset + row["epoch"], "prune_step": step + 1}
                                      for row in result.history[:result.resumed_from_epoch]]
            m.cpu()

        def taylor_loss(m: nn.Module) -> torch.Tensor:
            x, y, _ = next(iter(train_loader))
            dev = next(m.parameters()).device
            return nn.functional.cross_entropy(m(x.to(dev)), y.to(dev))

        report = prune_model(
            model, torch.zeros(1, *dataset.input_shape), prune_cfg, recover=recover,
            taylor_loss_fn=taylor_loss, evaluate_fn=lambda m: evaluate(m, val_loader).accuracy,
        )
    model.eval()
    test = measure(model, dataset, "test")
    metrics = {k: test[k] for k in ("test_accuracy", "test_loss", "params", "macs", "size_bytes")}
    if history:
        metrics["val_accuracy"] = history[-1].get("val_accuracy")
    return Bundle.from_model(
        model,
        arch=student.spec.arch,
        classes=student.spec.classes,
        input_shape=student.spec.input_shape,
        mean=student.spec.mean,
        std=student.spec.std,
        kwargs=dict(student.spec.kwargs),
        extra={
            "role": "pruned_student",
            "history": history,
            "metrics": metrics,
            "test_confusion": test["test_confusion"],
            "dataset_fingerprint": dataset.fingerprint,
            "prune_report": None if report is None else report.model_dump(mode="json"),
        },
    ), report


def measure(model: nn.Module, dataset: DatasetSpec, split: str = "test",
            device: str = "auto") -> dict[str, Any]:
    """Accuracy, loss and confusion on ``split`` plus params / MACs / serialized size.

    Returns:
        ``{"<split>_accuracy", "<split>_loss", "<split>_confusion", "params", "macs",
        "size_bytes"}``.
    """
    dev = resolve_device(device)
    result = evaluate(model.to(dev), make_loader(dataset, split, train=False, device=dev), dev)
    model.cpu()
    return {
        f"{split}_accuracy": result.accuracy,
        f"{split}_loss": result.loss,
        f"{split}_confusion": result.confusion,
        "params": count_params(model),
        "macs": count_macs(model, dataset.input_shape),
        "size_bytes": serialized_size_bytes(model),
    }


def bundle_metrics(bundle: Bundle) -> dict[str, float | int]:
    """The scalar metrics a recipe stored in ``bundle.spec.extra["metrics"]`` ({} if none)."""
    metrics = bundle.spec.extra.get("metrics", {})
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


# ---------------------------------------------------------------------- helpers
def _check_compatible(teacher: Bundle, dataset: DatasetSpec) -> None:
    spec = teacher.spec
    if list(spec.classes) != list(dataset.classes) or tuple(spec.input_shape) != tuple(dataset.input_shape):
        raise ValueError(
            f"the teacher was trained for {spec.num_classes} classes and input "
            f"{tuple(spec.input_shape)}, but the dataset has {dataset.num_classes} classes and "
            f"input {tuple(dataset.input_shape)}; retrain the teacher on this dataset"
        )


def make_task(teacher: nn.Module | None, distill_cfg: DistillConfig | None) -> Task:
    """The training objective: distillation from ``teacher`` with ``distill_cfg``, or plain
    cross-entropy when there is no teacher."""
    if teacher is None:
        return ClassificationTask()
    if distill_cfg is None:
        raise ValueError("distillation needs a DistillConfig with the teacher")
    return DistillationTask(teacher, distill_cfg)


def fit_on_dataset(
    model: nn.Module,
    task: Task,
    dataset: DatasetSpec,
    cfg: TrainConfig,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
    desc: str = "train",
) -> TrainResult:
    """Build the train / val loaders of ``dataset`` and run :func:`kdpipe.train.fit` here.

    This is the in-process part of every recipe; a DDP worker runs it on each rank, where
    ``fit`` shards the loaders (``data.batch_size`` = global batch).
    """
    device = distributed.process_device(cfg.device)
    train_loader = make_loader(dataset, "train", train=True, device=device, seed=cfg.seed)
    val_loader = make_loader(dataset, "val", train=False, device=device)
    return fit(model, task, train_loader, val_loader, cfg, callbacks=callbacks,
               checkpoint_dir=checkpoint_dir, desc=desc)


def _fit_distributed(
    model: nn.Module,
    spec_source: Any,
    teacher: Bundle | None,
    distill_cfg: DistillConfig | None,
    dataset: DatasetSpec,
    cfg: TrainConfig,
    *,
    callbacks: Sequence[Callback],
    checkpoint_dir: str | Path | None,
    desc: str,
) -> TrainResult:
    """Train ``model`` in place on ``cfg.num_processes`` torchrun workers.

    ``spec_source`` gives the architecture (``arch`` and ``kwargs``: a ModelConfig or a
    ModelSpec) under which the model travels to the workers as a bundle.
    """
    initial = Bundle.from_model(
        model.cpu(), arch=spec_source.arch, classes=dataset.classes,
        input_shape=dataset.input_shape, mean=dataset.mean, std=dataset.std,
        kwargs=dict(spec_source.kwargs))
    job = distributed.FitJob(
        dataset=dataset, train=cfg, model=initial, teacher=teacher, distill=distill_cfg,
        checkpoint_dir=None if checkpoint_dir is None else str(Path(checkpoint_dir).resolve()),
        desc=desc)
    trained, result = distributed.launch_fit(job, callbacks=callbacks)
    model.load_state_dict(trained.model.state_dict())
    return result


def _train(
    model: nn.Module,
    teacher: Bundle | None,
    distill_cfg: DistillConfig | None,
    dataset: DatasetSpec,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    role: str,
    callbacks: Sequence[Callback],
    checkpoint_dir: str | Path | None,
    extra: dict[str, Any] | None = None,
) -> Bundle:
    if train_cfg.num_processes > 1 and not distributed.is_active():
        result = _fit_distributed(model, model_cfg, teacher, distill_cfg, dataset, train_cfg,
                                  callbacks=callbacks, checkpoint_dir=checkpoint_dir, desc=role)
    else:
        task = make_task(None if teacher is None else teacher.model, distill_cfg)
        result = fit_on_dataset(model, task, dataset, train_cfg, callbacks=callbacks,
                                checkpoint_dir=checkpoint_dir, desc=role)
    model.eval()
    test = measure(model, dataset, "test", train_cfg.device)
    metrics = {
        "val_accuracy": result.best_val_accuracy,
        "test_accuracy": test["test_accuracy"],
        "test_loss": test["test_loss"],
        "params": test["params"],
        "macs": test["macs"],
        "size_bytes": test["size_bytes"],
    }
    return Bundle.from_model(
        model.cpu(),
        arch=model_cfg.arch,
        classes=dataset.classes,
        input_shape=dataset.input_shape,
        mean=dataset.mean,
        std=dataset.std,
        kwargs=dict(model_cfg.kwargs),
        extra={
            "role": role,
            "history": result.history,
            "best_epoch": result.best_epoch,
            "metrics": metrics,
            "test_confusion": test["test_confusion"],
            "dataset_fingerprint": dataset.fingerprint,
            **(extra or {}),
        },
    )
