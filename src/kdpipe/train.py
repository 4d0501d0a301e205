"""The one training loop: teacher fine-tuning, student distillation, post-pruning recovery.

What is trained is a :class:`~kdpipe.tasks.Task` (:class:`ClassificationTask`,
:class:`DistillationTask`); :func:`fit` only knows that a task turns a batch
``(x, y, index)`` into a loss and its named parts.

Schedule: the learning rate is a pure function of the optimiser step
(:func:`kdpipe.optim.lr_factor`; kdpipe.optim's registries hold the optimisers and
schedules): linear warm-up *per iteration* over ``warmup_epochs``, then cosine, step or
constant. Being stateless, it needs nothing in a checkpoint but the epoch.

Reproducibility: a fresh :func:`fit` seeds python, numpy, torch and the train loader's
shuffling generator with ``cfg.seed``, so the same seed and config give the same metrics
on CPU. A checkpoint (``checkpoint_dir/last.pt``, written atomically after every epoch)
holds the model, optimiser, grad scaler, the task's extra parameters, the history, the
best weights and every RNG state; resuming from it reproduces the uninterrupted run.
Checkpoints are plain containers loaded with ``torch.load(weights_only=True)``.

Multi-process (DDP): when ``fit`` runs in an initialised process group of
``cfg.num_processes`` processes (a torchrun worker started by
:func:`kdpipe.launch.launch_fit`), the same loop runs on every rank: the model is
wrapped in DistributedDataParallel, the train loader re-sharded with a DistributedSampler
(``data.batch_size`` is the global batch), the validation loader sharded without padding,
loss and metric sums all-reduced, and rank 0 alone writes checkpoints (every rank resumes
from them). Global RNGs are re-seeded per (seed, epoch, rank), so a resumed DDP run repeats
the uninterrupted one. The seams below (``_is_main_process``, ``_reduce_sums``,
``_wrap_model``, ``_set_loader_epoch``, ``_distribute_loaders``, ``_seed_epoch``) are no-ops
with one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from kdpipe import ddp, metrics
from kdpipe.config import TrainConfig
from kdpipe.optim import build_optimizer, lr_factor
from kdpipe.runtime import epoch_seed, resolve_device, seed_everything
from kdpipe.tasks import ClassificationTask, DistillationTask, Task, describe_task

__all__ = [
    "CHECKPOINT_NAME", "ClassificationTask", "DistillationTask", "EvalResult", "Task",
    "TrainResult", "TrainingDivergedError", "TrainingOOMError", "build_optimizer",
    "evaluate", "fit", "lr_factor", "resolve_device", "seed_everything",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
_CHECKPOINT_FORMAT = 1
Callback = Callable[[int, dict[str, float]], None]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf or exceeded ``TrainConfig.max_loss``."""

    def __init__(self, desc: str, epoch: int, step: int, value: float, max_loss: float) -> None:
        self.epoch, self.step, self.value = epoch, step, value
        super().__init__(
            f"{desc}: training diverged at epoch {epoch}, step {step} (loss = {value:.4g}, "
            f"limit max_loss = {max_loss:g}); lower the learning rate (train.lr) or set "
            "train.grad_clip (e.g. 1.0). The checkpoint of the last finished epoch is kept."
        )


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
    for g in _loader_generators(loader):
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


@dataclass
class _Precision:
    """Autocast dtype (None = fp32) and the grad scaler (enabled only for fp16)."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    @classmethod
    def create(cls, amp: bool, device: torch.device) -> _Precision:
        dtype = None
        if amp and device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # bf16 has fp32's range: only fp16 needs loss scaling.
        return cls(device, dtype, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def _to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


# ---------------------------------------------------------------------- evaluate
@dataclass
class EvalResult:
    """Accuracy, mean cross-entropy, per-class accuracy (NaN for an absent class) and
    the confusion matrix (rows = true class, columns = prediction)."""

    accuracy: float
    loss: float
    per_class: list[float]
    confusion: list[list[int]]

    @property
    def num_samples(self) -> int:
        return sum(map(sum, self.confusion))


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, device: str | torch.device | None = None, *, amp: bool = False
) -> EvalResult:
    """Evaluate ``model`` on batches ``(x, y, ...)``; the model's train/eval mode is restored.

    Args:
        model: a classifier returning logits.
        loader: yields ``(x, y)`` or ``(x, y, index)``.
        device: where to run; None = where the model's parameters are.
        amp: autocast on CUDA (as in training); fp32 otherwise.

    Inside a process group of several processes (DDP) ``loader`` is this rank's shard
    (see :func:`kdpipe.ddp.shard_loader`): the sums are reduced over all ranks and
    every rank returns the result for the whole split.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = resolve_device(device)
    precision = _Precision.create(amp, device)
    was_training = model.training
    model.eval()
    loss_sum, confusion = torch.zeros((), dtype=torch.float64, device=device), None
    for batch in loader:
        x, y = _to_device(batch[0], device, device.type == "cuda"), batch[1].to(device)
        with precision.autocast():
            logits = model(x).float()
        k = logits.shape[1]
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        batch_cm = metrics.confusion_matrix(logits.argmax(1), y, k)
        confusion = batch_cm if confusion is None else confusion + batch_cm
    model.train(was_training)
    if confusion is None:
        raise ValueError("evaluate() got an empty loader: the split has no samples")
    totals = _reduce_sums(torch.cat([loss_sum.cpu().view(1), confusion.double().flatten()]))
    cm = totals[1:].round().long().view(k, k)
    n = int(cm.sum())
    return EvalResult(float(cm.diag().sum()) / n, float(totals[0]) / n,
                      metrics.per_class_accuracy(cm).tolist(), cm.tolist())


# ------------------------------------------------------------------- checkpoints
def _loader_generators(loader: DataLoader) -> list[torch.Generator]:
    """The distinct torch generators that drive a loader's shuffling (may be none)."""
    found: list[torch.Generator] = []
    for g in (getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)):
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def _rng_state(loader: DataLoader) -> dict[str, Any]:
    """All RNG states as tensors, lists and numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "loader": [g.get_state() for g in _loader_generators(loader)],
    }


def _set_rng_state(state: dict[str, Any], loader: DataLoader) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    generators = _loader_generators(loader)
    if len(generators) != len(state["loader"]):
        log.warning("the train loader has %d shuffling generator(s), the checkpoint %d: the "
                    "resumed run will not repeat the uninterrupted one's batch order",
                    len(generators), len(state["loader"]))
    for g, s in zip(generators, state["loader"], strict=False):
        g.set_state(s)


def _run_signature(cfg: TrainConfig, task: Task, model: nn.Module, steps_per_epoch: int) -> str:
    """Hash of everything a checkpoint must agree with to be resumed."""
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    text = f"{cfg.model_dump_json()}|{describe_task(task)}|{shapes}|{steps_per_epoch}"
    return hashlib.sha256(text.encode()).hexdigest()


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_checkpoint(path: Path, signature: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists and matches ``signature``, else None."""
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # re-raised with the fix; never silently ignored
        raise RuntimeError(
            f"cannot read checkpoint {path}: not a weights-only checkpoint written by kdpipe.train "
            f"({type(err).__name__}); delete it or pass resume=False") from err
    if ckpt.get("format") != _CHECKPOINT_FORMAT or ckpt.get("signature") != signature:
        log.warning("checkpoint %s was written for a different configuration (train config, task, "
                    "model or data size changed); starting from scratch and overwriting it", path)
        return None
    return ckpt


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


@dataclass
class _RunState:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_accuracy: float | None = None
    best_weights: dict[str, Tensor] | None = None
    stopped_early: bool = False

    @property
    def epoch(self) -> int:
        return len(self.history)


def _train_epoch(
    model: nn.Module, task: Task, loader: DataLoader, optimizer: torch.optim.Optimizer,
    precision: _Precision, cfg: TrainConfig, epoch: int, desc: str,
    extra: Sequence[nn.Parameter] = (),
) -> dict[str, float]:
    """One pass over ``loader``; returns lr and sample-weighted means of the loss parts
    (over all processes under DDP)."""
    model.train()
    _seed_epoch(loader, cfg.seed, epoch)
    _set_loader_epoch(loader, epoch, cfg.seed)
    steps = len(loader)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    channels_last = cfg.channels_last and precision.device.type == "cuda"
    sums: dict[str, float] = defaultdict(float)
    lr = cfg.lr
    bar = tqdm(loader, desc=f"{desc} {epoch}/{cfg.epochs}", leave=False,
               disable=not (sys.stderr.isatty() and _is_main_process()))
    for step, (x, y, index) in enumerate(bar, start=1):
        lr = cfg.lr * lr_factor(cfg, (epoch - 1) * steps + step - 1, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = _to_device(x, precision.device, channels_last), y.to(precision.device, non_blocking=True)
        with precision.autocast():
            loss, parts = task.loss(model, x, y, index, epoch)
        value = float(loss.detach())
        if not math.isfinite(value) or value > cfg.max_loss:  # before the step: weights stay finite
            raise TrainingDivergedError(desc, epoch, step, value, cfg.max_loss)
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        ddp.average_gradients(extra)  # DDP syncs the model's gradients, not these
        if cfg.grad_clip is not None:
            precision.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        precision.scaler.step(optimizer)
        precision.scaler.update()
        n = y.shape[0]
        sums["n"] += n
        sums["loss"] += value * n
        for name, part in parts.items():
            sums[name] += part * n
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
    names = sorted(sums)
    totals = dict(zip(names, _reduce_sums(torch.tensor([sums[k] for k in names], dtype=torch.float64)).tolist(), strict=True))
    n = totals.pop("n")
    return {"lr": lr, "train_loss": totals.pop("loss") / n, **{f"train_{k}": v / n for k, v in totals.items()}}


def _update_best(state: _RunState, model: nn.Module, row: dict[str, float]) -> None:
    acc = row.get("val_accuracy")
    if acc is None or state.best_accuracy is None or acc > state.best_accuracy:
        state.best_epoch, state.best_accuracy = row["epoch"], acc
        state.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def fit(
    model: nn.Module,
    task: Task,
    train_loader: DataLoader,
    val_loader: Iterable | None,
    cfg: TrainConfig,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    desc: str = "train",
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
        resume: continue from ``checkpoint_dir/last.pt`` when it exists and was written
            for the same train config, task, model shapes and steps per epoch; a checkpoint
            for anything else is ignored with a warning and overwritten.
        desc: label for the progress bar, logs and errors.

    Under DDP (``cfg.num_processes`` > 1, called on every rank of a process group of that
    size, e.g. by :mod:`kdpipe._worker`) pass the same single-process loaders
    on every rank: ``fit`` shards them itself (``train_loader.batch_size`` is the global
    batch). Metrics in the history are over all ranks; only rank 0 writes checkpoints;
    every rank calls ``callbacks`` (give rank 0 the ones with side effects).

    Returns:
        The history (``epoch``, ``lr``, ``train_loss``, ``train_<part>``, ``val_loss``,
        ``val_accuracy``, ``seconds`` per epoch) and the best epoch.

    Raises:
        TrainingDivergedError: NaN/inf loss, or a loss above ``cfg.max_loss``.
        TrainingOOMError: CUDA ran out of memory (lower ``data.batch_size``).
        RuntimeError: ``cfg.num_processes`` > 1 outside a process group of that size.
        kdpipe.ddp.DistributedConfigError: under DDP, a batch size not divisible
            by the number of processes, or loaders that cannot be sharded.
    """
    multi_process = _check_world(cfg, desc)
    device = ddp.process_device(cfg.device)
    train_loader, val_loader = _distribute_loaders(train_loader, val_loader, cfg)
    if len(train_loader) == 0:
        raise ValueError(f"{desc}: the train loader yields no batches; the train split is empty")
    seed_everything(cfg.seed)
    for g in _loader_generators(train_loader):
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
    task.prepare(model, train_loader, device)
    extra = task.extra_parameters()
    optimizer = build_optimizer([*model.parameters(), *extra], cfg)
    precision = _Precision.create(cfg.amp, device)
    state = _RunState()
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    signature = _run_signature(cfg, task, model, len(train_loader))
    ckpt = _load_checkpoint(ckpt_path, signature) if ckpt_path is not None and resume else None
    if ckpt is not None:
        _restore(ckpt, model, optimizer, precision, extra, state, train_loader)
        log.info("%s: resuming from %s after epoch %d", desc, ckpt_path, state.epoch)
    resumed_from = state.epoch
    train_model = _wrap_model(model, device)
    while state.epoch < cfg.epochs and not state.stopped_early:
        epoch, start = state.epoch + 1, time.perf_counter()
        try:
            row: dict[str, float] = {"epoch": epoch, **_train_epoch(
                train_model, task, train_loader, optimizer, precision, cfg, epoch, desc, extra)}
        except torch.cuda.OutOfMemoryError as err:
            raise TrainingOOMError(
                f"{desc}: out of GPU memory in epoch {epoch} with batch size "
                f"{train_loader.batch_size}; lower data.batch_size (e.g. to "
                f"{max(1, (train_loader.batch_size or 2) // 2)}) or enable train.amp") from err
        ddp.broadcast_buffers(model)  # DDP: every rank evaluates / keeps rank 0's model
        if val_loader is not None:
            ev = evaluate(model, val_loader, device, amp=cfg.amp)
            row.update(val_loss=ev.loss, val_accuracy=ev.accuracy)
        row["seconds"] = time.perf_counter() - start
        state.history.append(row)
        _update_best(state, model, row)
        patience = cfg.early_stopping_patience
        state.stopped_early = bool(patience and val_loader is not None and epoch - state.best_epoch >= patience)
        if ckpt_path is not None and _is_main_process():
            _save_checkpoint(ckpt_path, _checkpoint(signature, model, optimizer, precision, extra, state, train_loader))
        log.info("%s epoch %d/%d: %s", desc, epoch, cfg.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
        for callback in callbacks:
            callback(epoch, dict(row))
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    return TrainResult(state.history, state.best_epoch, state.best_accuracy, state.stopped_early, resumed_from)


def _checkpoint(
    signature: str, model: nn.Module, optimizer: torch.optim.Optimizer, precision: _Precision,
    extra: list[nn.Parameter], state: _RunState, loader: DataLoader,
) -> dict[str, Any]:
    return {
        "format": _CHECKPOINT_FORMAT,
        "signature": signature,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": precision.scaler.state_dict(),
        "extra": [p.detach() for p in extra],
        "history": state.history,
        "best": {"epoch": state.best_epoch, "accuracy": state.best_accuracy, "weights": state.best_weights},
        "stopped_early": state.stopped_early,
        "rng": _rng_state(loader),
    }


def _restore(
    ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, precision: _Precision,
    extra: list[nn.Parameter], state: _RunState, loader: DataLoader,
) -> None:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"]:  # empty when the saving run used no fp16 scaler
        precision.scaler.load_state_dict(ckpt["scaler"])
    with torch.no_grad():
        for p, saved in zip(extra, ckpt["extra"], strict=True):
            p.copy_(saved)
    state.history = list(ckpt["history"])
    best = ckpt["best"]
    state.best_epoch, state.best_accuracy, state.best_weights = best["epoch"], best["accuracy"], best["weights"]
    state.stopped_early = ckpt["stopped_early"]
    _set_rng_state(ckpt["rng"], loader)
