"""Training recipes: the core calls behind the ``finetune_teacher``, ``distill_student`` and
``prune_student`` steps, usable from a notebook or a plain script as well.

Each recipe first checks the configuration it is given with :mod:`kdpipe.validate` (the
same check as the CLI's: every problem at once, before any model is built), then builds
the model, trains it with the one training loop (:func:`_fit`: here,
or on DDP workers), measures the result and wraps it into a pickle-free
:class:`~kdpipe.bundle.Bundle` (:func:`_trained_bundle`). ``bundle.spec.extra`` then holds:

* ``role``: ``teacher``, ``student`` or ``pruned_student``;
* ``history``: the per-epoch rows of :func:`~kdpipe.train.fit`;
* ``best_epoch``: the epoch whose weights the bundle holds (teacher and student);
* ``metrics``: ``val_accuracy``, ``test_accuracy``, ``test_loss``, ``params``, ``macs``,
  ``size_bytes``;
* ``test_confusion``: the test split's confusion matrix (rows: true class);
* ``dataset_fingerprint``: the data the model was trained on.

:func:`prune_student` adds ``prune_report`` (:class:`~kdpipe.prune.PruneReport` as JSON)
and uses the KD recovery epochs as its ``history`` (each row with its ``prune_step``).

Multi-process training: when a ``TrainConfig`` asks for ``num_processes`` > 1, every
training run of these recipes (teacher, student, each pruning recovery) is handed to
:func:`kdpipe.launch.launch_fit`, which starts that many torchrun workers; each runs
:func:`kdpipe.fitting.fit_on_dataset` under DDP, and the trained weights come back into
the recipe's model. Callbacks get the epoch rows as rank 0 finishes them; the returned
bundles are the same as single-process ones.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from kdpipe import ddp
from kdpipe.build import build_model
from kdpipe.bundle import Bundle, ModelSpec
from kdpipe.config import (
    DistillConfig,
    ModelConfig,
    PruneConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from kdpipe.data import DatasetSpec, make_loader
from kdpipe.fitting import fit_on_dataset, make_loaders, make_task
from kdpipe.launch import FitJob, launch_fit
from kdpipe.metrics import count_macs, count_params, serialized_size_bytes
from kdpipe.onnx_teacher import onnx_teacher_for, teacher_config_of
from kdpipe.preprocess import PREPROCESSING_KEY, adapted_model, with_declared_preprocessing
from kdpipe.runtime import resolve_device, seed_everything
from kdpipe.train import Callback, TrainResult, evaluate
from kdpipe.validate import as_model_config, validate_parts

if TYPE_CHECKING:
    from kdpipe.prune import PruneReport

__all__ = ["bundle_metrics", "distill_student", "measure", "prune_student", "train_teacher"]

Architecture = ModelConfig | ModelSpec  # what a bundle needs to rebuild the model: arch + kwargs
_TEST_METRICS = ("test_accuracy", "test_loss", "params", "macs", "size_bytes")


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
    validate_parts(data=dataset.config, teacher=cfg)
    if cfg.onnx is not None:
        return onnx_teacher_for(dataset, cfg)
    seed_everything(cfg.train.seed)  # the initial weights follow from the config alone
    model = build_model(cfg.model, dataset.num_classes, dataset.in_channels)
    trained = with_declared_preprocessing(model, cfg.model.preprocessing, dataset)
    result = _fit(trained, cfg.model, dataset, cfg.train, callbacks=callbacks,
                  checkpoint_dir=checkpoint_dir, desc="teacher")
    extra: dict[str, Any] = {"best_epoch": result.best_epoch}
    if trained is not model:
        extra[PREPROCESSING_KEY] = cfg.model.preprocessing.model_dump(mode="json")
    return _trained_bundle(model, cfg.model, dataset, role="teacher", history=result.history,
                           val_accuracy=result.best_val_accuracy, device=cfg.train.device,
                           extra=extra, measured=trained)


def distill_student(
    dataset: DatasetSpec,
    teacher: Bundle,
    student_cfg: StudentConfig,
    distill_cfg: DistillConfig,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
    role: str = "student",
) -> Bundle:
    """Distil ``teacher`` into a fresh student (see :class:`kdpipe.train.DistillationTask`).

    A teacher assistant is distilled the same way (``role="assistant_<i>"``, its own
    :class:`~kdpipe.config.StudentConfig`), with the model before it as ``teacher``.

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
    validate_parts(data=dataset.config, teacher=teacher_config_of(teacher),
                   student=student_cfg, distill=distill_cfg)
    _check_compatible(teacher, dataset)
    seed_everything(student_cfg.train.seed)  # the initial weights follow from the config alone
    model, init = _initial_student(student_cfg, teacher, dataset)
    result = _fit(model, student_cfg.model, dataset, student_cfg.train, teacher=teacher,
                  distill_cfg=distill_cfg, callbacks=callbacks, checkpoint_dir=checkpoint_dir,
                  desc=role)
    return _trained_bundle(model, student_cfg.model, dataset, role=role, history=result.history,
                           val_accuracy=result.best_val_accuracy, device=student_cfg.train.device,
                           extra={"best_epoch": result.best_epoch, "init": init,
                                  "distill": distill_cfg.model_dump(mode="json")})


def _initial_student(cfg: StudentConfig, teacher: Bundle, dataset: DatasetSpec
                     ) -> tuple[nn.Module, dict[str, Any]]:
    """The student before training (``student.init``) and a record of how it started."""
    from kdpipe import student_init

    if cfg.init == "teacher_pruned":
        assert cfg.init_target is not None  # StudentConfig requires it
        model, kept = student_init.prune_teacher_to(teacher.model, cfg.init_target,
                                                    cfg.init_metric, dataset.input_shape)
        return model, {"kind": cfg.init, "metric": cfg.init_metric, "target": cfg.init_target,
                       "kept": kept}
    model = build_model(cfg.model, dataset.num_classes, dataset.in_channels)
    if cfg.init == "teacher_layers":
        mapping = student_init.from_teacher_layers(model, teacher.model)
        copied = sorted({v.split(".")[0] + "." + v.split(".")[1] for v in mapping.values()
                         if v.startswith("layer")})
        return model, {"kind": cfg.init, "teacher_blocks": copied}
    return model, {"kind": "scratch"}


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
    from kdpipe.prune import prune_model

    validate_parts(data=dataset.config, teacher=teacher_config_of(teacher),
                   student=StudentConfig(model=as_model_config(student.spec)),
                   distill=distill_cfg, prune=prune_cfg)
    _check_compatible(teacher, dataset)
    _check_compatible(student, dataset, "student")  # its bundle is rebuilt for this dataset
    model = copy.deepcopy(student.model).cpu()
    report, history = None, []
    if prune_cfg.enabled:
        rec = prune_cfg.recovery
        if _launches(rec):  # fail before pruning, not at the first recovery
            ddp.check_launch(rec, batch_size=dataset.config.batch_size)
        train_loader, val_loader = make_loaders(dataset, rec)
        recover = _Recovery(student.spec, teacher, dataset, prune_cfg, distill_cfg,
                            loaders=(train_loader, val_loader), callbacks=callbacks,
                            checkpoint_dir=checkpoint_dir)
        report = prune_model(
            model, torch.zeros(1, *dataset.input_shape), prune_cfg, recover=recover,
            taylor_loss_fn=lambda m: _first_batch_loss(m, train_loader),
            evaluate_fn=lambda m: evaluate(m, val_loader).accuracy,
        )
        history = recover.history
    return _trained_bundle(
        model, student.spec, dataset, role="pruned_student", history=history,
        val_accuracy=history[-1].get("val_accuracy") if history else None,
        extra={"prune_report": None if report is None else report.model_dump(mode="json")},
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
def _check_compatible(bundle: Bundle, dataset: DatasetSpec, role: str = "teacher") -> None:
    """Raise ValueError unless ``bundle`` was built for ``dataset``'s classes and input shape."""
    spec = bundle.spec
    if list(spec.classes) != list(dataset.classes) or tuple(spec.input_shape) != tuple(dataset.input_shape):
        raise ValueError(
            f"the {role} was trained for {spec.num_classes} classes and input "
            f"{tuple(spec.input_shape)}, but the dataset has {dataset.num_classes} classes and "
            f"input {tuple(dataset.input_shape)}; retrain the {role} on this dataset"
        )


def _launches(cfg: TrainConfig) -> bool:
    """Whether a training run with ``cfg`` goes to DDP workers (``num_processes`` > 1 and
    this process is not already one of them) rather than running here."""
    return cfg.num_processes > 1 and not ddp.is_active()


def _fit(
    model: nn.Module,
    arch: Architecture,
    dataset: DatasetSpec,
    cfg: TrainConfig,
    *,
    teacher: Bundle | None = None,
    distill_cfg: DistillConfig | None = None,
    loaders: tuple[DataLoader, Iterable | None] | None = None,
    callbacks: Sequence[Callback],
    checkpoint_dir: str | Path | None,
    desc: str,
) -> TrainResult:
    """Train ``model`` in place, here or on ``cfg.num_processes`` torchrun workers.

    Every recipe trains through this one function. Locally it is
    :func:`kdpipe.fitting.fit_on_dataset` (on ``loaders`` when given). Launched, the model
    travels to the workers as a bundle of ``arch`` and the trained weights are loaded back
    into ``model``; ``loaders`` are then not used (each worker builds its own).
    """
    if not _launches(cfg):
        task = make_task(None if teacher is None else adapted_model(teacher), distill_cfg)
        return fit_on_dataset(model, task, dataset, cfg, loaders=loaders, callbacks=callbacks,
                              checkpoint_dir=checkpoint_dir, desc=desc)
    job = FitJob(
        dataset=dataset, train=cfg, model=_bundle(model, arch, dataset), teacher=teacher,
        distill=distill_cfg, desc=desc,
        checkpoint_dir=None if checkpoint_dir is None else str(Path(checkpoint_dir).resolve()))
    trained, result = launch_fit(job, callbacks=callbacks)
    model.load_state_dict(trained.model.state_dict())
    return result


class _Recovery:
    """``prune_model``'s ``recover(model, step)``: distil the pruned model back with
    ``prune_cfg.recovery``, numbering epochs continuously across steps in :attr:`history`
    (and for ``callbacks``); recovery k checkpoints into ``checkpoint_dir/step<k>``."""

    def __init__(self, spec: ModelSpec, teacher: Bundle, dataset: DatasetSpec,
                 prune_cfg: PruneConfig, distill_cfg: DistillConfig, *,
                 loaders: tuple[DataLoader, Iterable], callbacks: Sequence[Callback],
                 checkpoint_dir: str | Path | None) -> None:
        self.spec, self.teacher, self.dataset = spec, teacher, dataset
        self.prune_cfg, self.distill_cfg, self.loaders = prune_cfg, distill_cfg, loaders
        self.callbacks, self.checkpoint_dir = callbacks, checkpoint_dir
        self.history: list[dict[str, float]] = []

    def __call__(self, model: nn.Module, step: int) -> None:
        offset, prune_step = len(self.history), step + 1

        def relabel(epoch: int, metrics: dict[str, float]) -> None:
            row = {**metrics, "epoch": offset + epoch, "prune_step": prune_step}
            self.history.append(row)
            for callback in self.callbacks:
                callback(offset + epoch, row)

        # A fresh task per step (inside _fit): a feature-loss regressor must match the new
        # channel counts.
        step_dir = None if self.checkpoint_dir is None else Path(self.checkpoint_dir) / f"step{prune_step}"
        result = _fit(model, self.spec, self.dataset, self.prune_cfg.recovery, teacher=self.teacher,
                      distill_cfg=self.distill_cfg, loaders=self.loaders, callbacks=[relabel],
                      checkpoint_dir=step_dir,
                      desc=f"recovery {prune_step}/{self.prune_cfg.iterative_steps}")
        # Epochs restored from a checkpoint ran in an earlier attempt: no callback saw
        # them this time, but the history must still hold them, in order.
        self.history[offset:offset] = [{**row, "epoch": offset + row["epoch"], "prune_step": prune_step}
                                       for row in result.history[:result.resumed_from_epoch]]
        model.cpu()


def _first_batch_loss(model: nn.Module, loader: DataLoader) -> torch.Tensor:
    """Cross-entropy of ``model`` on the next train batch (Taylor importance's loss)."""
    x, y, _ = next(iter(loader))
    device = next(model.parameters()).device
    return nn.functional.cross_entropy(model(x.to(device)), y.to(device))


def _bundle(model: nn.Module, arch: Architecture, dataset: DatasetSpec,
            extra: dict[str, Any] | None = None) -> Bundle:
    """``model`` (moved to the CPU) as a bundle of ``arch`` for ``dataset``'s classes,
    input shape and normalisation."""
    return Bundle.from_model(
        model.cpu(), arch=arch.arch, classes=dataset.classes, input_shape=dataset.input_shape,
        mean=dataset.mean, std=dataset.std, kwargs=dict(arch.kwargs), extra=extra or {})


def _trained_bundle(
    model: nn.Module,
    arch: Architecture,
    dataset: DatasetSpec,
    *,
    role: str,
    history: list[dict[str, float]],
    val_accuracy: float | None,
    device: str = "auto",
    extra: dict[str, Any],
    measured: nn.Module | None = None,
) -> Bundle:
    """A recipe's result: ``model`` in eval mode, measured on the test split, as a bundle
    whose ``spec.extra`` holds its role, history, metrics (``val_accuracy`` when known),
    test confusion and dataset fingerprint, plus ``extra``. ``measured`` is what takes the
    loader's batches (``model`` behind its declared preprocessing), when not ``model``."""
    model.eval()
    test = measure(model if measured is None else measured, dataset, "test", device)
    metrics: dict[str, Any] = {k: test[k] for k in _TEST_METRICS}
    if val_accuracy is not None:  # absent for a student handed on unpruned (no recovery ran)
        metrics["val_accuracy"] = val_accuracy
    return _bundle(model, arch, dataset, extra={
        "role": role,
        "history": history,
        "metrics": metrics,
        "test_confusion": test["test_confusion"],
        "dataset_fingerprint": dataset.fingerprint,
        **extra,
    })
