"""The one training loop: teacher fine-tuning, student distillation, post-pruning recovery.

What is trained is a :class:`~kdpipe.tasks.Task` (:class:`ClassificationTask`,
:class:`DistillationTask`); :func:`fit` only knows that a task turns a batch
``(x, y, index)`` into a loss and its named parts, and which module it trains (the model,
or the model together with a training-only head such as a FitNets regressor).

Schedule: the learning rate is a pure function of the optimiser step
(:func:`kdpipe.optim.lr_factor`): linear warm-up *per iteration*, then the registered
schedule. Being stateless, it needs nothing in a checkpoint but the epoch.

The loss and its parts stay on the device and are read back every :data:`LOG_INTERVAL`
steps and at the epoch's end, not per step (a read-back waits for the accelerator; nanoGPT
reads its loss once per log interval for the same reason). The divergence check stays
exact: each step's loss is kept and tested on the device (non-finite, or above
``max_loss``) at every read-back, and the error names the first diverged step. Updates of
the steps since the last read-back may already be applied; resume from the checkpoint.

Reproducibility: a fresh :func:`fit` seeds python, numpy, torch and the train loader's
shuffling generator with ``cfg.seed``, so the same seed and config give the same metrics
on CPU. :mod:`kdpipe.checkpoint` writes ``checkpoint_dir/last.pt`` after every epoch (and
every RNG state); resuming reproduces the uninterrupted run. :mod:`kdpipe.eval_loop`
evaluates after each epoch.

Multi-process (DDP): in an initialised process group of ``cfg.num_processes`` processes
(a torchrun worker of :func:`kdpipe.launch.launch_fit`) the same loop runs on every
rank: the trained module is wrapped in DistributedDataParallel, the train loader
re-sharded with a DistributedSampler (``data.batch_size`` is the global batch), the
validation loader sharded without padding, sums all-reduced, and rank 0 alone writes
checkpoints. Global RNGs are re-seeded per (seed, epoch, rank), so a resumed DDP run
repeats the uninterrupted one. The seams below (``_is_main_process``, ``_reduce_sums``,
``_wrap_model``, ``_set_loader_epoch``, ``_distribute_loaders``, ``_seed_epoch``) are no-ops
with one process.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from kdpipe import ddp
from kdpipe.checkpoint import (
    CHECKPOINT_NAME,
    RunState,
    load_checkpoint,
    loader_generators,
    restore,
    run_signature,
    save_checkpoint,
    to_checkpoint,
)
from kdpipe.config import TrainConfig
from kdpipe.device import Precision, to_device
from kdpipe.eval_loop import EvalResult, evaluate
from kdpipe.loss_meter import LOG_INTERVAL, LossMeter, TrainingDivergedError
from kdpipe.optim import build_optimizer, lr_factor
from kdpipe.runtime import epoch_seed, resolve_device, seed_everything
from kdpipe.tasks import ClassificationTask, DistillationTask, Task, describe_task

__all__ = [
    "CHECKPOINT_NAME", "LOG_INTERVAL", "Callback", "ClassificationTask", "DistillationTask",
    "EvalResult", "Task", "TrainResult", "TrainingDivergedError", "TrainingOOMError",
    "build_optimizer", "evaluate", "fit", "lr_factor", "resolve_device", "seed_everything",
]

log = logging.getLogger(__name__)

Callback = Callable[[int, dict[str, float]], None]


class TrainingOOMError(RuntimeError):
    """The accelerator ran out of memory during training."""


# ------------------------------------------------------------- distributed seams
def _check_world(cfg: TrainConfig, desc: str) -> bool:
    """Whether this ``fit`` runs as one of ``cfg.num_processes`` DDP processes.

    Raises:
        RuntimeError: ``num_processes`` > 1 without a process group (``fit`` does not
            launch workers; the recipes do), or a process group of another size.
    """
    world = ddp.world_size()
    if world == cfg.num_processes:
        return world > 1
    if world == 1:
        raise RuntimeError(
            f"{desc}: train.num_processes={cfg.num_processes} needs a torch.distributed process "
            "group of that size, and fit() does not launch one; train through kdpipe.recipes "
            "(they start the workers with torchrun) or call fit() inside torchrun workers with "
            "the process group initialised, or set num_processes: 1")
    raise RuntimeError(
        f"{desc}: the process group has {world} processes but train.num_processes="
        f"{cfg.num_processes}; set num_processes: {world} (or launch {cfg.num_processes} workers)")


def _is_main_process() -> bool:
    """Whether this process writes checkpoints and logs (DDP: rank 0)."""
    return ddp.is_main_process()


def _reduce_sums(values: Tensor) -> Tensor:
    """Sum per-process totals across processes (DDP: ``all_reduce(values, SUM)``)."""
    return ddp.all_reduce_sum(values)


def _wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The module the training step calls (DDP: DistributedDataParallel(model))."""
    if not ddp.is_active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _distribute_loaders(
    train_loader: DataLoader, val_loader: Iterable | None, cfg: TrainConfig
) -> tuple[DataLoader, Iterable | None]:
    """DDP: this rank's share of the data (train: DistributedSampler and the global batch
    split across processes; validation: a shard without padding, sums reduced later)."""
    if not ddp.is_active():
        return train_loader, val_loader
    where = {"process_rank": ddp.rank(), "num_processes": ddp.world_size()}
    train = ddp.distribute_loader(train_loader, seed=cfg.seed, **where)
    val = None if val_loader is None else ddp.shard_loader(val_loader, **where)  # type: ignore[arg-type]
    return train, val


def _seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """DDP: re-seed the global RNGs (dropout...) and the loader's worker seeds from
    (seed, epoch, rank), so every rank draws its own numbers and a resumed run repeats the
    uninterrupted one without per-rank RNG state in the checkpoint."""
    if not ddp.is_active():
        return
    s = epoch_seed(seed, epoch, ddp.rank(), stream="global")
    seed_everything(s)
    for g in loader_generators(loader):
        g.manual_seed(s)


def _set_loader_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    """Prepare the loader for ``epoch``: reshuffle a DistributedSampler-style sampler and
    restart a dataset's own augmentation stream (``dataset.reseed``, as in
    :class:`kdpipe.data.SplitDataset`) from (seed, epoch, rank), so that a resumed run draws
    the same augmentations as an uninterrupted one without checkpointing the dataset."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    reseed = getattr(loader.dataset, "reseed", None)
    if callable(reseed):
        reseed(epoch_seed(seed, epoch, ddp.rank(), stream="data"))


# -------------------------------------------------------------------------- fit
@dataclass
class TrainResult:
    """Per-epoch history, the best validation epoch (whose weights the model holds)."""

    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float | None
    stopped_early: bool
    resumed_from_epoch: int = 0
    """0 for a fresh run, else the last epoch found in the checkpoint."""


def _train_epoch(
    module: nn.Module, task: Task, loader: DataLoader, optimizer: torch.optim.Optimizer,
    precision: Precision, cfg: TrainConfig, epoch: int, desc: str,
) -> dict[str, float]:
    """One pass over ``loader``; returns lr and sample-weighted means of the loss parts
    (over all processes under DDP)."""
    module.train()
    _seed_epoch(loader, cfg.seed, epoch)
    _set_loader_epoch(loader, epoch, cfg.seed)
    steps = len(loader)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    channels_last = cfg.channels_last and precision.device.type == "cuda"
    meter, lr = LossMeter(precision.device, desc, epoch, cfg.max_loss), cfg.lr
    bar = tqdm(loader, desc=f"{desc} {epoch}/{cfg.epochs}", leave=False,
               disable=not (sys.stderr.isatty() and _is_main_process()))
    for step, (x, y, index) in enumerate(bar, start=1):
        lr = cfg.lr * lr_factor(cfg, (epoch - 1) * steps + step - 1, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = to_device(x, precision.device, channels_last), y.to(precision.device, non_blocking=True)
        with precision.autocast():
            loss, parts = task.loss(module, x, y, index, epoch)
        meter.add(loss, parts, y.shape[0])
        if step == steps or step % LOG_INTERVAL == 0:  # read back before this step's update
            bar.set_postfix(loss=f"{meter.check():.4f}", refresh=False)
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        if cfg.grad_clip is not None:
            precision.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        precision.scaler.step(optimizer)
        precision.scaler.update()
    return {"lr": lr, **meter.means(_reduce_sums)}


def _update_best(state: RunState, model: nn.Module, row: dict[str, float]) -> None:
    acc = row.get("val_accuracy")
    if acc is None or state.best_accuracy is None or acc > state.best_accuracy:
        state.best_epoch, state.best_accuracy = row["epoch"], acc
        state.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def fit(
    model: nn.Module, task: Task, train_loader: DataLoader, val_loader: Iterable | None,
    cfg: TrainConfig, *, callbacks: Sequence[Callback] = (), checkpoint_dir: str | Path | None = None,
    resume: bool = True, desc: str = "train",
) -> TrainResult:
    """Train ``model`` on ``task``; at the end it holds the best-validation weights.

    Args:
        model: the network to train (moved to the configured device).
        task: the objective (:class:`ClassificationTask`, :class:`DistillationTask`...).
        train_loader: yields ``(x, y, index)``; its generator is re-seeded with ``cfg.seed``.
        val_loader: yields ``(x, y, ...)``; None = no validation (the last epoch is "best").
        cfg: optimiser, schedule, precision, early stopping, seed, device.
        callbacks: ``callback(epoch, metrics)`` after each epoch, once its checkpoint is
            written (a callback that raises loses nothing: resume continues after it).
        checkpoint_dir: where ``last.pt`` is written every epoch; None = no checkpoints.
        resume: continue from ``checkpoint_dir/last.pt`` if it was written for the same
            train config, task, module shapes and steps per epoch (else: a warning, and
            it is overwritten).
        desc: label for the progress bar, logs and errors.

    Under DDP (``cfg.num_processes`` > 1) call it on every rank of a process group of that
    size with the same single-process loaders: ``fit`` shards them (the train batch is
    global); only rank 0 writes checkpoints; every rank calls ``callbacks``.

    Returns:
        The history (``epoch``, ``lr``, ``train_loss``, ``train_<part>``, ``val_loss``,
        ``val_accuracy``, ``seconds`` per epoch) and the best epoch.

    Raises:
        TrainingDivergedError: NaN/inf loss, or a loss above ``cfg.max_loss``.
        TrainingOOMError: CUDA ran out of memory (lower ``data.batch_size``).
        RuntimeError: ``cfg.num_processes`` > 1 outside a process group of that size.
        kdpipe.ddp.DistributedConfigError: under DDP, loaders that cannot be sharded.
    """
    multi_process = _check_world(cfg, desc)
    device = ddp.process_device(cfg.device)
    train_loader, val_loader = _distribute_loaders(train_loader, val_loader, cfg)
    if len(train_loader) == 0:
        raise ValueError(f"{desc}: the train loader yields no batches; the train split is empty")
    seed_everything(cfg.seed)
    for g in loader_generators(train_loader):
        g.manual_seed(cfg.seed)
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    # Before the task hooks into modules and before the optimiser: SyncBatchNorm layers
    # share the BatchNorm tensors; the original layers come back at the end.
    restore_batchnorm = ddp.sync_batchnorm(model) if multi_process and cfg.sync_batchnorm else None
    try:
        return _fit(model, task, train_loader, val_loader, cfg, device, callbacks=callbacks,
                    checkpoint_dir=checkpoint_dir, resume=resume, desc=desc)
    finally:
        if restore_batchnorm is not None:
            restore_batchnorm()


def _fit(
    model: nn.Module, task: Task, train_loader: DataLoader, val_loader: Iterable | None,
    cfg: TrainConfig, device: torch.device, *, callbacks: Sequence[Callback],
    checkpoint_dir: str | Path | None, resume: bool, desc: str,
) -> TrainResult:
    """The loop proper, on loaders already sharded for this process."""
    module = task.prepare(model, train_loader, device)  # model, or model + a training-only head
    if not isinstance(module, nn.Module):
        raise TypeError(f"{desc}: {type(task).__name__}.prepare() returned {type(module).__name__}; "
                        "it must return the module to train (the model itself, or one owning it)")
    optimizer = build_optimizer(module.parameters(), cfg)
    precision, state = Precision.create(cfg.amp, device), RunState()
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    signature = run_signature(cfg, describe_task(task), module, len(train_loader))
    ckpt = load_checkpoint(ckpt_path, signature) if ckpt_path is not None and resume else None
    if ckpt is not None:
        state = restore(ckpt, module, optimizer, precision.scaler, train_loader)
        log.info("%s: resuming from %s after epoch %d", desc, ckpt_path, state.epoch)
    resumed_from, train_module = state.epoch, _wrap_model(module, device)
    while state.epoch < cfg.epochs and not state.stopped_early:
        epoch, start = state.epoch + 1, time.perf_counter()
        try:
            row: dict[str, float] = {"epoch": epoch, **_train_epoch(
                train_module, task, train_loader, optimizer, precision, cfg, epoch, desc)}
        except torch.cuda.OutOfMemoryError as err:
            raise TrainingOOMError(
                f"{desc}: out of GPU memory in epoch {epoch} with batch size "
                f"{train_loader.batch_size}; lower data.batch_size (e.g. to "
                f"{max(1, (train_loader.batch_size or 2) // 2)}) or enable train.amp") from err
        ddp.broadcast_buffers(module)  # DDP: every rank evaluates / keeps rank 0's model
        if val_loader is not None:
            ev = evaluate(model, val_loader, device, amp=cfg.amp)
            row.update(val_loss=ev.loss, val_accuracy=ev.accuracy)
        row["seconds"] = time.perf_counter() - start
        state.history.append(row)
        _update_best(state, model, row)
        patience = cfg.early_stopping_patience
        state.stopped_early = bool(patience and val_loader is not None and epoch - state.best_epoch >= patience)
        if ckpt_path is not None and _is_main_process():
            save_checkpoint(ckpt_path, to_checkpoint(signature, module, optimizer, precision.scaler, state, train_loader))
        log.info("%s epoch %d/%d: %s", desc, epoch, cfg.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
        for callback in callbacks:
            callback(epoch, dict(row))
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    return TrainResult(state.history, state.best_epoch, state.best_accuracy, state.stopped_early, resumed_from)
