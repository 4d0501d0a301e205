"""Does knowledge distillation win? Student alone vs student distilled from a teacher.

One teacher is fine-tuned (or loaded from ``--teacher-weights`` when that file exists),
then for every seed the same student architecture is trained twice with the same
TrainConfig: once on the labels alone (ClassificationTask), once with logit KD from the
teacher (DistillationTask). Test accuracy is reported as mean ± std over the seeds.

    python benchmarks/kd_vs_baseline.py                      # mnist5k, cnn_large -> cnn_small
    python benchmarks/kd_vs_baseline.py --seeds 0 1 2 --student-epochs 12 --temperature 4

CPU timings on a shared machine are pessimistic; compare rows of one run only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kdpipe.config import DataConfig, DistillConfig, TrainConfig
from kdpipe.data import build_dataset_spec, make_loader
from kdpipe.metrics import count_params
from kdpipe.models import create_model
from kdpipe.train import (
    ClassificationTask,
    DistillationTask,
    TrainResult,
    evaluate,
    fit,
    seed_everything,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="mnist5k")
    p.add_argument("--teacher", default="cnn_large")
    p.add_argument("--student", default="cnn_small")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--teacher-lr", type=float, default=3e-3)
    p.add_argument("--student-epochs", type=int, default=12)
    p.add_argument("--student-lr", type=float, default=5e-3)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--kd-weight", type=float, default=0.9)
    p.add_argument("--teacher-weights", type=Path, default=None,
                   help="reuse a teacher trained with the same settings (written when missing)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def train_cfg(args: argparse.Namespace, epochs: int, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=lr, optimizer=args.optimizer,
                       warmup_epochs=min(args.warmup_epochs, epochs - 1), seed=seed, device="cpu")


def per_epoch_seconds(result: TrainResult) -> float:
    return statistics.mean(r["seconds"] for r in result.history)


def get_teacher(args, spec, loaders) -> tuple[torch.nn.Module, float | None]:
    """Train the teacher, or load it when ``--teacher-weights`` holds one for these settings."""
    cfg = train_cfg(args, args.teacher_epochs, args.teacher_lr, seed=0)
    seed_everything(0)
    teacher = create_model(args.teacher, spec.num_classes, spec.in_channels)
    key = hashlib.sha256(f"{spec.fingerprint}|{args.teacher}|{cfg.model_dump_json()}|"
                         f"{args.batch_size}".encode()).hexdigest()[:16]
    path = args.teacher_weights
    if path is not None and path.is_file():
        state = load_file(str(path))
        saved_key = state.pop("__key__", None)
        if saved_key is not None and bytes(saved_key.tolist()).decode() == key:
            teacher.load_state_dict(state)
            print(f"teacher: loaded {path}")
            return teacher, None
        print(f"teacher: {path} was trained with other settings; retraining")
    result = fit(teacher, ClassificationTask(), loaders["train"], loaders["val"], cfg, desc="teacher")
    if path is not None:
        save_file({**teacher.state_dict(), "__key__": _key_tensor(key)}, str(path))
    return teacher, per_epoch_seconds(result)


def _key_tensor(key: str) -> torch.Tensor:
    return torch.tensor(list(key.encode()), dtype=torch.uint8)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    spec = build_dataset_spec(DataConfig(source=args.source, batch_size=args.batch_size))
    loaders = {s: make_loader(spec, s, train=s == "train") for s in ("train", "val", "test")}
    start = time.perf_counter()
    teacher, teacher_s = get_teacher(args, spec, loaders)
    teacher_acc = evaluate(teacher, loaders["test"]).accuracy
    print(f"teacher {args.teacher}: test accuracy {teacher_acc:.4f}")
    distill = DistillConfig(temperature=args.temperature, kd_weight=args.kd_weight)
    runs: dict[str, list[dict]] = {"alone": [], "kd": []}
    for seed in args.seeds:
        for kind in ("alone", "kd"):
            seed_everything(seed)
            student = create_model(args.student, spec.num_classes, spec.in_channels)
            task = ClassificationTask() if kind == "alone" else DistillationTask(teacher, distill)
            cfg = train_cfg(args, args.student_epochs, args.student_lr, seed)
            result = fit(student, task, loaders["train"], loaders["val"], cfg, desc=f"{kind}-{seed}")
            acc = evaluate(student, loaders["test"]).accuracy
            runs[kind].append({"seed": seed, "test_accuracy": acc, "s_per_epoch": per_epoch_seconds(result),
                               "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy})
            print(f"  seed {seed} {kind:5s}: test {acc:.4f} (best val {result.best_val_accuracy:.4f} "
                  f"@ epoch {result.best_epoch}, {per_epoch_seconds(result):.1f} s/epoch)")
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "teacher": {"arch": args.teacher, "params": count_params(teacher), "test_accuracy": teacher_acc,
                    "s_per_epoch": teacher_s},
        "student_params": count_params(create_model(args.student, spec.num_classes, spec.in_channels)),
        "runs": runs, "total_seconds": time.perf_counter() - start,
    }
    print_table(report)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    return report


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def print_table(report: dict) -> None:
    a, t = report["args"], report["teacher"]
    kd = f"KD (T={a['temperature']:g}, α={a['kd_weight']:g})"
    ts = f"{t['s_per_epoch']:.1f}" if t["s_per_epoch"] else "(loaded)"
    rows = [(f"teacher {t['arch']} ({a['teacher_epochs']} ep)", f"{t['params']:,}",
             f"{t['test_accuracy']:.4f}", ts)]
    for kind, label in (("alone", "alone"), ("kd", kd)):
        r = report["runs"][kind]
        rows.append((f"student {a['student']} {label} ({a['student_epochs']} ep)", f"{report['student_params']:,}",
                     _mean_std([x["test_accuracy"] for x in r]),
                     f"{statistics.mean(x['s_per_epoch'] for x in r):.1f}"))
    print(f"\n| model | params | test accuracy (mean ± std, seeds {a['seeds']}) | s/epoch |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ntotal {report['total_seconds']:.0f} s (2 shared CPU cores: timings are pessimistic)")


if __name__ == "__main__":
    main()
