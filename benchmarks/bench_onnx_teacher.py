"""A PyTorch teacher vs the same teacher exported to ONNX, distilling the same student.

One teacher is trained with the run configuration (``configs/default.yaml``: cnn_large on
mnist5k) and exported with kdpipe's exporter (its normalisation inside the graph, so the
ONNX teacher declares ``preprocessing: {mean: [0], std: [1]}``: raw [0, 1] pixels). The
default student is then distilled from each (``kdpipe.recipes.distill_student``, same
seed, same settings, cached teacher logits as in the default config), in interleaved
rounds. Reported: the teachers' logit agreement on the whole train split, the students'
test accuracies and the wall time of each distillation.

Goals (issue 14): student test accuracies within 0.1 points; logits within the parity
tolerance (``gate.max_parity_error``); the ONNX teacher's distillation at most 1.1x the
PyTorch teacher's time.

Usage:
    python benchmarks/bench_onnx_teacher.py --out benchmarks/results/onnx_teacher.json \
        [--config configs/default.yaml] [--rounds 2] [--teacher-epochs N] [--student-epochs N]
        [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import REPO_ROOT, envelope, write_json

from kdpipe.bundle import Bundle
from kdpipe.config import Preprocessing, TeacherConfig
from kdpipe.configfile import load_config
from kdpipe.data import build_dataset_spec, make_loader
from kdpipe.export import export_onnx
from kdpipe.recipes import bundle_metrics, distill_student, train_teacher


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results/onnx_teacher.json")
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs/default.yaml")
    p.add_argument("--rounds", type=int, default=2, help="interleaved PyTorch/ONNX rounds")
    p.add_argument("--teacher-epochs", type=int, default=None, help="override the config's")
    p.add_argument("--student-epochs", type=int, default=None, help="override the config's")
    p.add_argument("--quick", action="store_true", help="1 teacher epoch, 1 student epoch, 1 round")
    return p.parse_args(argv)


def _epochs(section: Any, epochs: int | None) -> Any:
    if epochs is None:
        return section
    train = section.train.model_copy(update={"epochs": epochs, "warmup_epochs": 0})
    return section.model_copy(update={"train": train})


@torch.no_grad()
def logit_agreement(a: torch.nn.Module, b: torch.nn.Module, dataset: Any) -> dict[str, float]:
    """Largest absolute logit difference and argmax agreement on the whole train split."""
    worst, same, n = 0.0, 0, 0
    for x, _, _ in make_loader(dataset, "train", train=False):
        la, lb = a(x).float(), b(x).float()
        worst = max(worst, float((la - lb).abs().max()))
        same += int((la.argmax(1) == lb.argmax(1)).sum())
        n += len(x)
    return {"max_abs_diff": worst, "argmax_agreement": same / n, "samples": n}


class NudgedTeacher(torch.nn.Module):
    """The teacher's logits moved by at most ``eps`` (a deterministic function of them)."""

    def __init__(self, teacher: torch.nn.Module, eps: float) -> None:
        super().__init__()
        self.teacher, self.eps = teacher, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.teacher(x)
        return out + self.eps * torch.sin(1e3 * out)


def noise_floor(pt: Any, eps: float, dataset: Any, student_cfg: Any, distill: Any,
                seeds: Sequence[int]) -> list[dict[str, float]]:
    """Per seed: the student of the PyTorch teacher as is and with its logits moved by eps.

    How far two students drift apart when their teachers differ only by float rounding,
    i.e. the floor under any PyTorch-vs-ONNX accuracy comparison of single runs.
    """
    nudged = Bundle(NudgedTeacher(pt.model.eval(), eps).eval(), pt.spec)
    rows = []
    for seed in seeds:
        cfg = student_cfg.model_copy(update={"train": student_cfg.train.model_copy(
            update={"seed": seed})})
        a, b = (bundle_metrics(distill_student(dataset, t, cfg, distill))["test_accuracy"]
                for t in (pt, nudged))
        rows.append({"seed": seed, "as_is": a, "nudged": b, "diff_pp": 100 * abs(a - b)})
        print(f"noise floor seed {seed}: {rows[-1]}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Train, export, distil twice per round, write the JSON result."""
    args = parse_args(argv)
    cfg = load_config(args.config)
    t_epochs, s_epochs = (1, 1) if args.quick else (args.teacher_epochs, args.student_epochs)
    rounds = 1 if args.quick else args.rounds
    teacher_cfg, student_cfg = _epochs(cfg.teacher, t_epochs), _epochs(cfg.student, s_epochs)
    dataset = build_dataset_spec(cfg.data)
    pt = train_teacher(dataset, teacher_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(pt, Path(tmp) / "teacher.onnx", cfg.export).path
        raw_pixels = Preprocessing(mean=(0.0,) * dataset.in_channels, std=(1.0,) * dataset.in_channels)
        ox = train_teacher(dataset, TeacherConfig(onnx=str(onnx_path), train=teacher_cfg.train,
                                                  model=teacher_cfg.model.model_copy(
                                                      update={"preprocessing": raw_pixels})))
        agreement = logit_agreement(pt.model.eval(), ox.model, dataset)
        runs: dict[str, list[dict[str, float]]] = {"pytorch": [], "onnx": []}
        for r in range(rounds):
            order = ("pytorch", "onnx") if r % 2 == 0 else ("onnx", "pytorch")
            for name in order:
                start, cpu = time.perf_counter(), time.process_time()
                student = distill_student(dataset, pt if name == "pytorch" else ox, student_cfg,
                                          cfg.distill)
                runs[name].append({"seconds": time.perf_counter() - start,
                                   "cpu_seconds": time.process_time() - cpu,
                                   "test_accuracy": bundle_metrics(student)["test_accuracy"]})
                print(f"round {r} {name}: {runs[name][-1]}", flush=True)
    seed = student_cfg.train.seed
    floor = noise_floor(pt, agreement["max_abs_diff"], dataset, student_cfg, cfg.distill,
                        [seed] if args.quick else [seed, seed + 1, seed + 2])
    pairs = list(zip(runs["pytorch"], runs["onnx"], strict=True))
    ratios = [o["seconds"] / p["seconds"] for p, o in pairs]
    cpu_ratios = [o["cpu_seconds"] / p["cpu_seconds"] for p, o in pairs]  # every core counts
    acc = {k: runs[k][0]["test_accuracy"] for k in runs}  # same seed: round 0 is the comparison
    tol = cfg.gate.max_parity_error or cfg.export.atol
    results = {
        "teacher_test_accuracy": {"pytorch": bundle_metrics(pt)["test_accuracy"],
                                  "onnx": bundle_metrics(ox)["test_accuracy"]},
        "logits": {**agreement, "tolerance": tol},
        "runs": runs, "time_ratios": ratios, "cpu_time_ratios": cpu_ratios,
        "noise_floor": {"eps": agreement["max_abs_diff"], "seeds": floor},
        "goals": {
            "accuracy_within_0.1pp": {"value": 100 * abs(acc["onnx"] - acc["pytorch"]),
                                      "met": abs(acc["onnx"] - acc["pytorch"]) <= 0.001 + 1e-12},
            "logits_within_tolerance": {"value": agreement["max_abs_diff"],
                                        "met": agreement["max_abs_diff"] <= tol},
            "time_ratio_at_most_1.1": {"value": statistics.median(ratios),
                                       "met": statistics.median(ratios) <= 1.1},
        },
    }
    settings = {"config": str(args.config.relative_to(REPO_ROOT)) if args.config.is_relative_to(
        REPO_ROOT) else str(args.config), "source": cfg.data.source,
        "teacher": teacher_cfg.model.arch, "teacher_epochs": teacher_cfg.train.epochs,
        "student": student_cfg.model.arch, "student_epochs": student_cfg.train.epochs,
        "rounds": rounds, "cache_teacher_logits": cfg.distill.cache_teacher_logits,
        "exporter": cfg.export.exporter, "quick": args.quick}
    write_json(args.out, envelope("onnx_teacher", settings, results))
    print(f"wrote {args.out}: {results['goals']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
