"""Sweep logit-KD settings against the student alone, paired per seed.

For every seed, one teacher is trained with that seed (or loaded from ``--teacher-dir``,
where every trained teacher is saved as safetensors under a key of its settings, so later
sweeps reuse it). Then the student is trained once on the labels alone and once per
(temperature T, kd weight α) with logit KD, every run of a seed starting from the same
initial weights, with the same TrainConfig (epochs, optimiser, schedule, shuffle order).
Test accuracy uses the best-validation weights (``fit`` restores them).

The summary gives, per setting, the mean ± sample std over the seeds and the *paired*
differences KD − alone (one per seed), their mean, std, a paired t statistic and the
number of seeds KD wins: the test split holds 1,000 images on mnist5k, so one image is
0.1 point and seed-to-seed noise is about 0.5 point; only a paired comparison resolves a
gain of a few tenths.

    python benchmarks/kd_sweep.py --seeds 0 1 2 --teacher-epochs 15 \\
        --temperatures 2 4 8 --kd-weights 0.5 0.9 --out benchmarks/results/kd_sweep.json

Results are written after every run and reused on a rerun with the same ``--out``
(``--fresh`` to start over), so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import envelope, mean_std, read_json, write_json
from safetensors.torch import load_file, save_file

from kdpipe.config import DataConfig, DistillConfig, TrainConfig
from kdpipe.data import DatasetSpec, build_dataset_spec, make_loader
from kdpipe.metrics import count_params
from kdpipe.models import create_model
from kdpipe.train import ClassificationTask, DistillationTask, evaluate, fit, seed_everything

NAME = "kd_sweep"
DEFAULT_TEACHER_DIR = Path("~/.cache/kdpipe/kd_sweep_teachers").expanduser()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (defaults: the recipe of configs/default.yaml on mnist5k)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="mnist5k")
    p.add_argument("--teacher", default="cnn_large")
    p.add_argument("--student", default="cnn_small")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--teacher-lr", type=float, default=3e-3)
    p.add_argument("--teacher-augment", action="store_true",
                   help="random-crop augmentation for the teacher only (students stay unaugmented, "
                        "so their teacher logits are cached)")
    p.add_argument("--student-epochs", type=int, nargs="+", default=[10])
    p.add_argument("--student-lr", type=float, default=5e-3)
    p.add_argument("--temperatures", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    p.add_argument("--kd-weights", type=float, nargs="+", default=[0.5, 0.9])
    p.add_argument("--teacher-seed", type=int, default=None,
                   help="share the teacher of this seed across all student seeds (default: one "
                        "teacher per seed); saves teacher training time on a busy CPU")
    p.add_argument("--teacher-dir", type=Path, default=DEFAULT_TEACHER_DIR,
                   help="trained teachers are saved here (safetensors) and reused")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / f"{NAME}.json")
    p.add_argument("--fresh", action="store_true", help="ignore the runs already in --out")
    return p.parse_args(argv)


def train_config(epochs: int, lr: float, seed: int) -> TrainConfig:
    """The recipe of configs/default.yaml (AdamW, cosine, 1 warm-up epoch), on CPU."""
    return TrainConfig(epochs=epochs, optimizer="adamw", lr=lr, weight_decay=5e-4,
                       scheduler="cosine", warmup_epochs=min(1, epochs - 1), seed=seed, device="cpu")


def teacher_key(spec: DatasetSpec, args: argparse.Namespace, cfg: TrainConfig) -> str:
    """Short hash of everything that determines a trained teacher's weights."""
    # exclude_defaults: a config field added later (at its default) must not orphan saved teachers.
    text = (f"{spec.fingerprint}|{args.teacher}|{cfg.model_dump_json(exclude_defaults=True)}|{args.batch_size}|"
            f"augment={args.teacher_augment}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def get_teacher(spec: DatasetSpec, loaders: dict, args: argparse.Namespace,
                seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The teacher of one seed: loaded from ``--teacher-dir`` if saved there, else trained and saved."""
    cfg = train_config(args.teacher_epochs, args.teacher_lr, seed)
    key = teacher_key(spec, args, cfg)
    path = args.teacher_dir / f"{args.teacher}-{key}.safetensors"
    seed_everything(seed)
    teacher = create_model(args.teacher, spec.num_classes, spec.in_channels)
    info: dict[str, Any] = {"seed": seed, "key": key, "path": str(path)}
    if path.is_file():
        teacher.load_state_dict(load_file(str(path)))
        info["train_seconds"] = None
    else:
        train_loader = loaders["teacher_train"]
        start = time.perf_counter()
        fit(teacher, ClassificationTask(), train_loader, loaders["val"], cfg, desc=f"teacher-{seed}")
        info["train_seconds"] = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(teacher.state_dict(), str(path))
    info["test_accuracy"] = evaluate(teacher, loaders["test"]).accuracy
    print(f"teacher seed {seed}: test {info['test_accuracy']:.4f} ({path.name})", flush=True)
    return teacher, info


def settings_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every student run of one seed: alone and each (T, α), for each epoch count."""
    grid = []
    for epochs in args.student_epochs:
        grid.append({"variant": "alone", "epochs": epochs})
        grid += [{"variant": "kd", "epochs": epochs, "temperature": t, "kd_weight": a}
                 for t in args.temperatures for a in args.kd_weights]
    return grid


def setting_name(setting: dict[str, Any]) -> str:
    """A readable, unique name of a student setting (without the seed)."""
    if setting["variant"] == "alone":
        return f"alone ep{setting['epochs']}"
    return f"kd T{setting['temperature']:g} a{setting['kd_weight']:g} ep{setting['epochs']}"


def train_student(spec: DatasetSpec, loaders: dict, args: argparse.Namespace, teacher: torch.nn.Module,
                  setting: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train one student run; return its row (test accuracy, best epoch, seconds)."""
    seed_everything(seed)  # the same initial weights for every setting of a seed
    student = create_model(args.student, spec.num_classes, spec.in_channels)
    if setting["variant"] == "alone":
        task: Any = ClassificationTask()
    else:
        task = DistillationTask(teacher, DistillConfig(temperature=setting["temperature"],
                                                       kd_weight=setting["kd_weight"]))
    cfg = train_config(setting["epochs"], args.student_lr, seed)
    start = time.perf_counter()
    result = fit(student, task, loaders["train"], loaders["val"], cfg, desc=setting_name(setting))
    seconds = time.perf_counter() - start
    acc = evaluate(student, loaders["test"]).accuracy
    print(f"  seed {seed} {setting_name(setting):22s} test {acc:.4f} "
          f"(val {result.best_val_accuracy:.4f} @ {result.best_epoch}, {seconds:.0f} s)", flush=True)
    return {"seed": seed, "setting": setting_name(setting), **setting, "test_accuracy": acc,
            "best_val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch,
            "train_seconds": seconds}


def paired(kd: dict[int, float], alone: dict[int, float]) -> dict[str, Any]:
    """Paired KD − alone differences over the seeds both have (percentage points)."""
    seeds = sorted(set(kd) & set(alone))
    diffs = [100 * (kd[s] - alone[s]) for s in seeds]
    out: dict[str, Any] = {"seeds": seeds, "diff_pp": diffs,
                           "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs)}
    if diffs:
        out["mean_pp"] = statistics.mean(diffs)
    if len(diffs) > 1:
        sd = statistics.stdev(diffs)
        out["std_pp"] = sd
        # Paired t statistic: how many standard errors the mean gain is away from zero.
        out["t"] = out["mean_pp"] / (sd / math.sqrt(len(diffs))) if sd > 0 else math.inf
    return out


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting: accuracy mean ± std, and the paired comparison with alone (same epochs)."""
    by_setting: dict[str, dict[int, float]] = {}
    for r in rows:
        by_setting.setdefault(r["setting"], {})[r["seed"]] = r["test_accuracy"]
    summary = {}
    for name, accs in by_setting.items():
        entry: dict[str, Any] = {"test_accuracy": mean_std(list(accs.values()))}
        if name.startswith("kd"):
            epochs = name.rsplit("ep", 1)[1]
            alone = by_setting.get(f"alone ep{epochs}", {})
            entry["vs_alone"] = paired(accs, alone)
        summary[name] = entry
    return summary


def print_summary(summary: dict[str, Any], teachers: list[dict[str, Any]]) -> None:
    """A markdown table of the summary."""
    t = mean_std([x["test_accuracy"] for x in teachers])
    print(f"\nteacher: {100 * t['mean']:.2f} ± {100 * t['std']:.2f} % over {t['n']} seeds")
    print("| setting | test acc. % | KD − alone (pp), per seed | mean ± std | t | wins |")
    print("|---|---:|---|---:|---:|---:|")
    for name, e in summary.items():
        a = e["test_accuracy"]
        acc = f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f}"
        v = e.get("vs_alone")
        if v is None or not v["diff_pp"]:
            print(f"| {name} | {acc} |  |  |  |  |")
            continue
        per_seed = ", ".join(f"{d:+.1f}" for d in v["diff_pp"])
        print(f"| {name} | {acc} | {per_seed} | {v['mean_pp']:+.2f} ± {v.get('std_pp', 0):.2f} | "
              f"{v.get('t', float('nan')):.2f} | {v['wins']}/{len(v['diff_pp'])} |")


def load_previous(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of an earlier run of the same sweep (same teachers), unless ``--fresh``."""
    if args.fresh or not args.out.is_file():
        return []
    doc = read_json(args.out)
    same = all(doc["settings"].get(k) == v for k, v in _teacher_settings(args).items())
    return doc["results"]["runs"] if same else []


def _teacher_settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("source", "teacher", "student", "batch_size", "teacher_epochs", "teacher_lr",
            "teacher_augment", "teacher_seed", "student_lr")
    return {k: getattr(args, k) for k in keys}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the sweep, writing the JSON result after every student run."""
    args = parse_args(argv)
    spec = build_dataset_spec(DataConfig(source=args.source, batch_size=args.batch_size))
    t_spec = build_dataset_spec(DataConfig(source=args.source, batch_size=args.batch_size,
                                           augment=args.teacher_augment))
    loaders = {s: make_loader(spec, s, train=s == "train") for s in ("train", "val", "test")}
    loaders["teacher_train"] = make_loader(t_spec, "train", train=True)
    rows = load_previous(args)
    done = {(r["seed"], r["setting"]) for r in rows}
    teachers: list[dict[str, Any]] = []
    settings = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "teacher_params": count_params(create_model(args.teacher, spec.num_classes, spec.in_channels)),
                "student_params": count_params(create_model(args.student, spec.num_classes, spec.in_channels))}
    start = time.perf_counter()
    shared = None if args.teacher_seed is None else get_teacher(spec, loaders, args, args.teacher_seed)
    for seed in args.seeds:
        teacher, info = shared or get_teacher(spec, loaders, args, seed)
        if info not in teachers:
            teachers.append(info)
        for setting in settings_grid(args):
            if (seed, setting_name(setting)) in done:
                continue
            rows.append(train_student(spec, loaders, args, teacher, setting, seed))
            results = {"teachers": teachers, "runs": rows, "summary": summarize(rows),
                       "seconds_this_invocation": time.perf_counter() - start}
            write_json(args.out, envelope(NAME, settings, results))
    summary = summarize(rows)
    print_summary(summary, teachers)
    doc = envelope(NAME, settings, {"teachers": teachers, "runs": rows, "summary": summary,
                                    "seconds_this_invocation": time.perf_counter() - start})
    write_json(args.out, doc)
    return doc


if __name__ == "__main__":
    main()
