"""DDP, the rank side: what runs inside one process of a torchrun process group.

:func:`kdpipe.train.fit` calls these on every rank (each is a no-op, or the identity,
without a process group): who this process is (:func:`rank`, :func:`world_size`,
:func:`is_active`), its device (:func:`process_device`), reductions of loss and metric
sums (:func:`all_reduce_sum`), rank 0's BatchNorm statistics for everyone
(:func:`broadcast_buffers`), SyncBatchNorm (:func:`sync_batchnorm`) and this rank's share
of the data (:func:`distribute_loader` for training, :func:`shard_loader` for evaluation).
:func:`check_launch` says, before anything starts, whether N processes can run here.

The launcher side (job files, torchrun, supervision, the failure report and the worker
entry point) is :mod:`kdpipe.launch`; this module imports neither it nor the training loop.
The per-epoch seeds of every rank come from :func:`kdpipe.runtime.epoch_seed`.

Batch semantics: ``data.batch_size`` is the *global* batch; each of N processes loads
``batch_size / N`` samples per step. Because DDP averages gradients over equal per-process
batches, one step sees the same gradient and the schedule the same number of steps as
the single-process run: a config keeps its meaning when ``num_processes`` changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from kdpipe.config import TrainConfig
from kdpipe.runtime import resolve_device

__all__ = [
    "DistributedConfigError", "ShardSampler", "all_reduce_sum",
    "broadcast_buffers", "check_launch", "distribute_loader", "is_active", "is_main_process",
    "local_rank", "process_device", "rank", "shard_loader", "sync_batchnorm", "world_size",
]


class DistributedConfigError(ValueError):
    """A multi-process run that cannot work as configured (found before launching)."""


# ------------------------------------------------------------ the process group
def is_active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    """Rank on this node, as torchrun sets it (0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the process that writes checkpoints, logs and results."""
    return rank() == 0


def process_device(name: str | torch.device = "auto") -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` for a CUDA worker, else
    :func:`kdpipe.runtime.resolve_device` of ``name``."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and is_active():
        return torch.device("cuda", local_rank())
    return device


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum ``values`` over all processes (a copy; identity with one process).

    nccl only reduces CUDA tensors, so the sum is computed on this process's device and
    returned on the input's device.
    """
    if not is_active():
        return values
    device = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else values.device
    total = values.detach().to(device, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(values.device)


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process.

    DDP broadcasts buffers at the start of each forward, so after the last step of an
    epoch each rank holds its own update; evaluating and checkpointing rank 0's exact
    model needs them equal.
    """
    if not is_active():
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def sync_batchnorm(model: nn.Module) -> Callable[[], None]:
    """Replace every BatchNorm layer of ``model`` by a SyncBatchNorm sharing its tensors.

    Returns:
        ``restore()``: puts the original layers back with the trained state, so the model
        keeps its module types (a bundle's layout compares them with a fresh model).
    """
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                replaced.append((parent, name, child))

    def restore() -> None:
        for parent, name, original in replaced:
            synced = getattr(parent, name)
            original.to(next(synced.buffers(), torch.empty(0)).device)
            original.load_state_dict(synced.state_dict())
            original.train(synced.training)
            setattr(parent, name, original)

    return restore


class ShardSampler(Sampler[int]):
    """Positions ``rank, rank + world, ...`` of a dataset: every sample exactly once over
    all ranks, without the padding a DistributedSampler adds (padding would count some
    samples twice in an evaluation whose sums are reduced across ranks)."""

    def __init__(self, length: int, process_rank: int, num_processes: int) -> None:
        if not 0 <= process_rank < num_processes:
            raise ValueError(f"rank {process_rank} outside 0..{num_processes - 1}")
        self.length, self.rank, self.num_processes = length, process_rank, num_processes

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_processes))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_processes))


def _loader_options(loader: DataLoader) -> dict[str, Any]:
    """The DataLoader arguments a re-sharded copy keeps."""
    options: dict[str, Any] = {
        "num_workers": loader.num_workers, "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory, "worker_init_fn": loader.worker_init_fn,
        "generator": loader.generator, "timeout": loader.timeout,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return options


def distribute_loader(loader: DataLoader, *, process_rank: int, num_processes: int, seed: int) -> DataLoader:
    """The train loader of one DDP process: a :class:`~torch.utils.data.DistributedSampler`
    (shuffled with ``seed``; ``set_epoch(epoch)`` gives every epoch its own order, the same
    on every rank) and ``loader.batch_size / num_processes`` samples per step.

    A loader that already has a DistributedSampler is returned unchanged.

    Raises:
        DistributedConfigError: the batch size is not a multiple of ``num_processes``, or
            the loader uses a custom sampler / batch sampler that cannot be sharded.
    """
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if loader.batch_size is None or not isinstance(loader.sampler, RandomSampler | SequentialSampler):
        raise DistributedConfigError(
            f"cannot shard a train loader with {type(loader.sampler).__name__} / batch_size="
            f"{loader.batch_size} across {num_processes} processes; give it a plain batch_size "
            "(shuffle=True/False) or a torch DistributedSampler")
    per_process = _per_process_batch(loader.batch_size, num_processes)
    sampler = DistributedSampler(loader.dataset, num_replicas=num_processes, rank=process_rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
                                 drop_last=False)  # pads so that every rank runs the same steps
    # kdpipe.data.make_loader drops a last batch of exactly one sample (it breaks BatchNorm
    # in train mode): apply that rule per process; keep a drop_last the caller chose otherwise.
    one_sample_rule = len(loader.dataset) % loader.batch_size == 1
    drop_last = len(sampler) % per_process == 1 or (loader.drop_last and not one_sample_rule)
    return DataLoader(loader.dataset, batch_size=per_process, sampler=sampler, drop_last=drop_last,
                      **_loader_options(loader))


def shard_loader(loader: DataLoader, *, process_rank: int, num_processes: int) -> DataLoader:
    """An evaluation loader over this process's :class:`ShardSampler` share (no padding)."""
    if isinstance(loader.sampler, ShardSampler):
        return loader
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise DistributedConfigError(
            "under DDP the validation loader must be a torch DataLoader with a batch_size "
            f"(got {type(loader).__name__}); it is sharded across processes for evaluation")
    return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=False,
                      sampler=ShardSampler(len(loader.dataset), process_rank, num_processes),
                      **_loader_options(loader))


def _per_process_batch(batch_size: int, num_processes: int) -> int:
    if batch_size % num_processes:
        lower = max(num_processes, batch_size // num_processes * num_processes)
        raise DistributedConfigError(
            f"data.batch_size={batch_size} is not divisible by train.num_processes="
            f"{num_processes}: the batch size is the global batch, split evenly across the "
            f"processes; set data.batch_size to a multiple of {num_processes} (e.g. {lower})")
    return batch_size // num_processes


# ---------------------------------------------------------------- before launch
def check_launch(cfg: TrainConfig, *, batch_size: int) -> str:
    """Check that ``cfg.num_processes`` workers can run here; cheap, before any launch.

    Returns:
        The process-group backend: ``nccl`` (one process per CUDA device) or ``gloo`` (CPU).

    Raises:
        DistributedConfigError: more processes than CUDA devices; ``device: auto`` on a
            machine without a GPU (gloo on the CPU must be asked for with ``device: cpu``);
            ``mps``; SyncBatchNorm on the CPU; a batch size that does not split evenly.
    """
    n = cfg.num_processes
    if cfg.device == "mps":
        raise DistributedConfigError(
            f"train.num_processes={n} with device: mps: DDP runs on CUDA GPUs (nccl) or on the "
            "CPU (gloo); set train.device: cuda or cpu, or num_processes: 1")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n > visible:
            raise DistributedConfigError(
                f"train.num_processes={n} needs {n} CUDA devices (one per process) but {visible} "
                f"{'is' if visible == 1 else 'are'} visible here (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); set num_processes to at "
                f"most {visible}, request more GPUs for the step, or set train.device: cpu to run "
                f"{n} gloo processes on the CPU")
    elif cfg.device == "auto":
        raise DistributedConfigError(
            f"train.num_processes={n} with device: auto, but there is no GPU here; set "
            f"train.device: cpu to run {n} gloo processes on the CPU (the explicit CPU "
            "fallback), or num_processes: 1")
    if cfg.sync_batchnorm and not cuda:
        raise DistributedConfigError(
            "train.sync_batchnorm: true needs CUDA devices (PyTorch's SyncBatchNorm has no CPU "
            "kernel); set sync_batchnorm: false for gloo processes on the CPU")
    _per_process_batch(batch_size, n)
    return "nccl" if cuda else "gloo"
