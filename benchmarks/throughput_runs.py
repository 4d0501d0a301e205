"""One timed KD training run of one variant, in its own process (bench_throughput.py's worker).

    python benchmarks/throughput_runs.py JOB.json

``JOB.json`` (written by ``bench_throughput.py``) names the variant, the data source, the
seed, the hyper-parameters and the files holding the teacher's and the student's initial
weights (``torch.save`` of state dicts, loaded with ``weights_only=True``). The worker
builds the same train DataLoader as every other variant (kdpipe's ``make_loader``, shuffle
generator seeded with the job's seed), times the training call and writes the trained
student's weights and a JSON record (``job["result"]``).

Every variant does the same work: teacher in eval mode and forwarded on every step
(except ``kdpipe_cached``, which forwards it once over the train split), loss
``(1 - α)·CE + α·T²·KL(batchmean)``, AdamW with two groups (weight decay on weights of
ndim > 1, none on biases and norm scales), learning rate ``lr·½(1 + cos(π·k/K))`` set for
every optimiser step ``k`` of ``K``, the same batches in the same order and the same
dropout draws (global RNG seeded with the job's seed).

* ``plain``: the hand-written loop below.
* ``kdpipe`` / ``kdpipe_cached``: ``kdpipe.train.fit`` + ``DistillationTask``, without /
  with the teacher-logit cache.
* ``torchdistill``: torchdistill's ``DistillationBox`` (``get_distillation_box``) with its
  ``KDLoss`` inside a ``WeightedSumLoss``, driven by the loop its examples use
  (``pre_epoch_process`` / ``forward_process`` / ``post_forward_process`` /
  ``post_epoch_process``), minus their per-step logging. The two AdamW groups come from an
  optimiser factory registered with ``register_optimizer`` (its ``module_wise_configs``
  group by module, not by tensor rank); the schedule is torch's ``CosineAnnealingLR``
  stepped after every optimiser step (``scheduling_step: 1``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kdpipe.config import DataConfig, DistillConfig, TrainConfig
from kdpipe.data import build_dataset_spec, make_loader
from kdpipe.models import create_model
from kdpipe.train import DistillationTask, fit

VARIANTS = ("plain", "kdpipe", "kdpipe_cached", "torchdistill")


# ------------------------------------------------------------------- shared pieces
def decay_groups(params: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay on weights (ndim > 1), none on biases / norm scales."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def cosine_factor(step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at 0-based optimiser ``step`` (no warm-up)."""
    return 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps)))


# ------------------------------------------------------------------------ variants
def run_plain(student: nn.Module, teacher: nn.Module, loader: DataLoader, job: dict[str, Any]) -> dict[str, Any]:
    """The KD loop a user would write by hand: forward, loss, backward, step, schedule."""
    epochs, lr, temp, alpha = job["epochs"], job["lr"], job["temperature"], job["kd_weight"]
    torch.manual_seed(job["seed"])  # what fit() does: the same dropout draws
    optimizer = torch.optim.AdamW(decay_groups(student.parameters(), job["weight_decay"]), lr=lr)
    total, step, lrs = epochs * len(loader), 0, []
    teacher.eval()
    student.train()
    for _ in range(epochs):
        for x, y, _index in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr * cosine_factor(step, total)
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            kd = F.kl_div(F.log_softmax(s_logits / temp, dim=1), F.softmax(t_logits / temp, dim=1),
                          reduction="batchmean")
            loss = (1 - alpha) * F.cross_entropy(s_logits, y) + alpha * temp**2 * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        lrs.append(optimizer.param_groups[0]["lr"])
    return {"lr_last_step": lrs}


def _run_kdpipe(cache: bool) -> Callable[..., dict[str, Any]]:
    def run(student: nn.Module, teacher: nn.Module, loader: DataLoader, job: dict[str, Any]) -> dict[str, Any]:
        distill = DistillConfig(loss="kd", temperature=job["temperature"], kd_weight=job["kd_weight"],
                                cache_teacher_logits=cache)
        cfg = TrainConfig(epochs=job["epochs"], optimizer="adamw", lr=job["lr"],
                          weight_decay=job["weight_decay"], scheduler="cosine", warmup_epochs=0,
                          device="cpu", seed=job["seed"])
        result = fit(student, DistillationTask(teacher, distill), loader, None, cfg, desc="bench")
        return {"lr_last_step": [row["lr"] for row in result.history],
                "epoch_seconds": [row["seconds"] for row in result.history]}
    return run


_TD_OPTIMIZER = "kdpipe_bench_adamw_decay_groups"


def _register_td_optimizer() -> None:
    """torchdistill's hook for a custom optimiser: AdamW over the same two groups."""
    from torchdistill.optim.registry import OPTIM_DICT, register_optimizer

    if _TD_OPTIMIZER in OPTIM_DICT:
        return

    @register_optimizer(key=_TD_OPTIMIZER)
    def _adamw(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(decay_groups(module.parameters(), weight_decay), lr=lr)


def torchdistill_config(loader: DataLoader, job: dict[str, Any]) -> dict[str, Any]:
    """torchdistill's train config for the same data order, loss, optimiser and schedule."""
    # The same sampler and DataLoader seeding as make_loader's DataLoader(shuffle=True,
    # generator=g): the RandomSampler and the loader share one generator seeded like it.
    generator = torch.Generator().manual_seed(job["seed"])
    loader_kwargs = {"batch_size": loader.batch_size, "drop_last": loader.drop_last,
                     "num_workers": loader.num_workers, "pin_memory": loader.pin_memory,
                     "worker_init_fn": loader.worker_init_fn,
                     "persistent_workers": loader.persistent_workers, "generator": generator}
    kd = {"student_module_path": ".", "student_module_io": "output",
          "teacher_module_path": ".", "teacher_module_io": "output",
          "temperature": job["temperature"],
          # torchdistill's alpha weights CE, beta the T²-scaled KL: kdpipe's α is its beta.
          "alpha": 1.0 - job["kd_weight"], "beta": job["kd_weight"], "reduction": "batchmean"}
    return {
        "num_epochs": job["epochs"],
        "train_data_loader": {
            "dataset_id": "train", "requires_supp": False,  # kdpipe's dataset yields (x, y, index)
            "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": {"generator": generator}},
            "kwargs": loader_kwargs},
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "requires_grad": True},
        "optimizer": {"key": _TD_OPTIMIZER, "filters_params": False,
                      "kwargs": {"lr": job["lr"], "weight_decay": job["weight_decay"]}},
        "scheduler": {"key": "CosineAnnealingLR", "scheduling_step": 1,
                      "kwargs": {"T_max": job["epochs"] * len(loader), "eta_min": 0.0}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {
            "kd": {"criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}}},
    }


def run_torchdistill(student: nn.Module, teacher: nn.Module, loader: DataLoader, job: dict[str, Any]) -> dict[str, Any]:
    """torchdistill's DistillationBox, driven the way its example scripts drive it."""
    from torchdistill.common.main_util import set_seed
    from torchdistill.core.distillation import get_distillation_box

    _register_td_optimizer()
    set_seed(job["seed"])
    teacher.eval()
    box = get_distillation_box(teacher, student, {"train": loader.dataset}, torchdistill_config(loader, job),
                               torch.device("cpu"), None, False, 1)
    lrs, lr = [], None
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        for x, y, _index in box.train_data_loader:
            lr = box.optimizer.param_groups[0]["lr"]  # the lr this step uses
            loss = box.forward_process(x, y, None)
            box.post_forward_process(loss=loss)
        lrs.append(lr)
        box.post_epoch_process()
    box.clean_modules()
    return {"lr_last_step": lrs}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "plain": run_plain, "kdpipe": _run_kdpipe(False), "kdpipe_cached": _run_kdpipe(True),
    "torchdistill": run_torchdistill,
}


# ---------------------------------------------------------------------------- main
def load_model(arch: str, weights: str, num_classes: int, in_channels: int) -> nn.Module:
    """``arch`` with the state dict saved in ``weights`` (loaded without pickle)."""
    model = create_model(arch, num_classes, in_channels)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Build the data and models, time the variant's training call, save the student."""
    if job["variant"] not in RUNNERS:
        raise ValueError(f"unknown variant {job['variant']!r}; choose from {', '.join(VARIANTS)}")
    spec = build_dataset_spec(DataConfig(source=job["source"], batch_size=job["batch_size"]))
    loader = make_loader(spec, "train", train=True, batch_size=job["batch_size"], seed=job["seed"])
    teacher = load_model(job["teacher"], job["teacher_weights"], spec.num_classes, spec.in_channels)
    student = load_model(job["student"], job["student_weights"], spec.num_classes, spec.in_channels)
    n = len(loader.dataset)
    images = job["epochs"] * (n - (n % loader.batch_size if loader.drop_last else 0))
    start, cpu_start = time.perf_counter(), time.process_time()
    extra = RUNNERS[job["variant"]](student, teacher, loader, job)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    torch.save(student.state_dict(), job["trained_weights"])
    record = {"variant": job["variant"], "seed": job["seed"], "epochs": job["epochs"],
              "steps": job["epochs"] * len(loader), "images": images, "seconds": seconds,
              "images_per_s": images / seconds, "cpu_seconds": cpu_seconds,
              "teacher_in_eval_mode": not teacher.training, "torch_threads": torch.get_num_threads(),
              **extra}
    if "epoch_seconds" in extra:  # fit's own per-epoch clock: excludes set-up (the caching pass)
        record["steady_images_per_s"] = images / sum(extra["epoch_seconds"])
    return record


def main(argv: list[str]) -> None:
    """Run the job file given as the only argument; write its result JSON."""
    if len(argv) != 1:
        raise SystemExit("usage: throughput_runs.py JOB.json (written by bench_throughput.py)")
    job = json.loads(Path(argv[0]).read_text())
    record = run_job(job)
    Path(job["result"]).write_text(json.dumps(record, indent=2) + "\n")
    print(f"  {record['variant']:14s} seed {record['seed']}: {record['seconds']:6.2f} s "
          f"{record['images_per_s']:8.1f} img/s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
