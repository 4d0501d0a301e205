"""Accuracy cost of pruning: pruned + KD recovery vs the unpruned student, on real data.

Per seed: train the teacher and distil the student with the run configuration's settings
(``configs/default.yaml``: cnn_large -> cnn_medium on mnist5k), then prune a copy of that
same student at every requested setting through ``kdpipe.recipes.prune_student`` (the
pipeline's own code path: Torch-Pruning + KD recovery with ``prune.recovery``). Reported
per setting: test accuracy of the pruned + recovered student next to the unpruned
student's, validation accuracy right after pruning (before recovery) and after recovery,
MACs and params.

A setting is ``r<ratio>`` with optional parts ``/rt<round_to>``, ``/lr<recovery lr>``,
``/ep<recovery epochs>``, ``/wu<warm-up epochs>``, e.g. ``r0.5/rt8/lr0.001/ep4``; parts
not given come from the config's ``prune`` section.

Usage:
    python benchmarks/prune_accuracy.py --out benchmarks/results/prune_accuracy.json \
        [--config configs/default.yaml] [--seeds 0 1 2] [--settings default r0.5 r0.5/rt8]
        [--student-width 10] [--quick]

The goal (issue 3): after KD recovery the pruned student is within 1 point of the
unpruned one (mean over seeds).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import REPO_ROOT, envelope, load_average, mean_std, write_json

from kdpipe.config import PipelineConfig, PruneConfig
from kdpipe.configfile import load_config
from kdpipe.data import build_dataset_spec
from kdpipe.recipes import bundle_metrics, distill_student, prune_student, train_teacher

_PARTS = {"rt": ("round_to", int), "lr": ("lr", float), "ep": ("epochs", int), "wu": ("warmup_epochs", int)}


def parse_setting(text: str, default: PruneConfig) -> PruneConfig:
    """``default`` or ``r0.5/rt8/lr0.001/ep4/wu1`` -> a PruneConfig based on ``default``.

    Raises:
        ValueError: an unknown part, naming the allowed prefixes.
    """
    if text == "default":
        return default
    prune: dict[str, Any] = {}
    recovery: dict[str, Any] = {}
    for part in text.split("/"):
        if part.startswith("r") and not part.startswith("rt"):
            prune["ratio"] = float(part[1:])
            continue
        key = next((k for k in _PARTS if part.startswith(k)), None)
        if key is None:
            raise ValueError(f"setting {text!r}: unknown part {part!r}; use r<ratio>, "
                             + ", ".join(f"{k}<{v[0]}>" for k, v in _PARTS.items()))
        field, cast = _PARTS[key]
        (prune if field == "round_to" else recovery)[field] = cast(part[len(key):])
    data = default.model_dump()
    data.update(prune)
    data["recovery"] = {**data["recovery"], **recovery}
    # Validated like a config file, so a bad value fails with the field named.
    return PruneConfig.model_validate(data)


def with_seed(cfg: PipelineConfig, seed: int, student_width: int | None) -> PipelineConfig:
    """The config with every training seed set to ``seed`` (and the student's width)."""
    def seeded(train: Any) -> Any:
        return train.model_copy(update={"seed": seed})

    student_model = cfg.student.model
    if student_width is not None:
        student_model = student_model.model_copy(update={"kwargs": {**student_model.kwargs, "width": student_width}})
    return cfg.model_copy(update={
        "teacher": cfg.teacher.model_copy(update={"train": seeded(cfg.teacher.train)}),
        "student": cfg.student.model_copy(update={"train": seeded(cfg.student.train), "model": student_model}),
        "prune": cfg.prune.model_copy(update={"recovery": seeded(cfg.prune.recovery)}),
    })


def with_epochs(cfg: PipelineConfig, epochs: int) -> PipelineConfig:
    """The config with every training (teacher, student, recovery) cut to ``epochs``."""
    def cut(train: Any) -> Any:
        return train.model_copy(update={"epochs": epochs, "warmup_epochs": 0})

    return cfg.model_copy(update={
        "teacher": cfg.teacher.model_copy(update={"train": cut(cfg.teacher.train)}),
        "student": cfg.student.model_copy(update={"train": cut(cfg.student.train)}),
        "prune": cfg.prune.model_copy(update={"recovery": cut(cfg.prune.recovery)}),
    })


def run_seed(cfg: PipelineConfig, settings: dict[str, PruneConfig], seed: int) -> dict[str, Any]:
    """Teacher, student and every pruned variant of that student for one seed."""
    dataset = build_dataset_spec(cfg.data)
    t0 = time.perf_counter()
    teacher = train_teacher(dataset, cfg.teacher)
    student = distill_student(dataset, teacher, cfg.student, cfg.distill)
    out: dict[str, Any] = {"seed": seed, "teacher": bundle_metrics(teacher), "student": bundle_metrics(student),
                           "train_seconds": time.perf_counter() - t0, "pruned": {}}
    print(f"seed {seed}: teacher {out['teacher']['test_accuracy']:.4f}, student "
          f"{out['student']['test_accuracy']:.4f} ({out['train_seconds']:.0f} s)", flush=True)
    for name, pcfg in settings.items():
        pcfg = pcfg.model_copy(update={"recovery": pcfg.recovery.model_copy(update={"seed": seed})})
        t0 = time.perf_counter()
        pruned, report = prune_student(student, teacher, dataset, pcfg, cfg.distill)
        m = bundle_metrics(pruned)
        row = {"test_accuracy": m["test_accuracy"], "macs": m["macs"], "params": m["params"],
               "drop_vs_student_pp": 100 * (out["student"]["test_accuracy"] - m["test_accuracy"]),
               "val_before": report.before.accuracy, "val_after_pruning": report.after_pruning.accuracy,
               "val_after_recovery": report.after_recovery.accuracy if report.after_recovery else None,
               "channels": report.channels, "recovery_history": pruned.spec.extra["history"],
               "seconds": time.perf_counter() - t0}
        out["pruned"][name] = row
        print(f"  {name:24} test {row['test_accuracy']:.4f} (drop {row['drop_vs_student_pp']:+.2f} pp); val "
              f"{row['val_before']:.3f} -> pruned {row['val_after_pruning']:.3f} -> recovered "
              f"{row['val_after_recovery']:.3f}; MACs {row['macs']:,}", flush=True)
    return out


def summarize(runs: list[dict[str, Any]], settings: Sequence[str]) -> dict[str, Any]:
    """Mean/std over seeds of the student's and every setting's test accuracy and drop."""
    summary = {"student": mean_std([r["student"]["test_accuracy"] for r in runs]),
               "teacher": mean_std([r["teacher"]["test_accuracy"] for r in runs])}
    for name in settings:
        summary[name] = {"test_accuracy": mean_std([r["pruned"][name]["test_accuracy"] for r in runs]),
                         "drop_vs_student_pp": mean_std([r["pruned"][name]["drop_vs_student_pp"] for r in runs]),
                         "macs": runs[0]["pruned"][name]["macs"], "params": runs[0]["pruned"][name]["params"]}
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "default.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=["default"])
    p.add_argument("--student-width", type=int, default=None, help="override the cnn student's width")
    p.add_argument("--quick", action="store_true", help="1 seed, 1 epoch per training: a smoke test")
    args = p.parse_args(argv)
    base = load_config(args.config)
    if args.quick:
        args.seeds = args.seeds[:1]
        base = with_epochs(base, 1)
    settings = {s: parse_setting(s, base.prune) for s in args.settings}
    load_start = load_average()
    runs = [run_seed(with_seed(base, seed, args.student_width), settings, seed) for seed in args.seeds]
    summary = summarize(runs, list(settings))
    for name in settings:
        s = summary[name]
        print(f"{name:24} test {100 * s['test_accuracy']['mean']:.2f} ± {100 * s['test_accuracy']['std']:.2f} % "
              f"vs student {100 * summary['student']['mean']:.2f} %: drop {s['drop_vs_student_pp']['mean']:+.2f} pp "
              f"(max {s['drop_vs_student_pp']['max']:+.2f})")
    doc = envelope("prune_accuracy", {"config": str(args.config), "seeds": args.seeds, "quick": args.quick,
                                      "student": base.student.model.arch, "teacher": base.teacher.model.arch,
                                      "settings": {k: v.model_dump(mode="json") for k, v in settings.items()},
                                      "student_width": args.student_width},
                   {"summary": summary, "runs": runs, "load_average_start": load_start,
                    "load_average_end": load_average()})
    write_json(args.out, doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
