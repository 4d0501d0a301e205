"""Fashion-MNIST quality: teacher, student alone, KD, teacher-initialised KD, DKD, assistants.

Per seed, one teacher is trained with that seed, then every student row of the seed runs
with the same train config (epochs, optimiser, schedule, seed), the same data and, for one
architecture, the same initial weights, so rows are compared **paired per seed**:

* ``teacher``        the default config's teacher (``teacher.train``, cross-entropy)
* ``alone``          the student trained on labels alone (the teacher recipe on the student)
* ``alone_dropout``  the same with dropout before the classifier (``model.kwargs.dropout``)
* ``kd``             logit KD from the teacher, random initial weights (``student.init: scratch``)
* ``kd_pruned``      logit KD, the student *is* the teacher pruned to the student's share of
                     its params (``student.init: teacher_pruned``)
* ``dkd``            decoupled KD (``distill.loss: dkd``)
* ``tiny_alone``     a tiny student (>= 50x fewer params than the teacher) on labels alone
* ``tiny_kd``        the tiny student distilled straight from the teacher
* ``tiny_ta``        the tiny student distilled from a teacher assistant (teacher -> student
                     -> tiny): the assistant is the ``kd`` row's model, which is what the
                     pipeline's ``distill.assistants: [<student>]`` trains (same recipe
                     function, config and seed); its time counts in the chain's wall time

The recipe is configs/default.yaml's (``common.default_config()``): teacher and student
train configs, T, alpha, ``data.augment``, ``distill.cache_teacher_logits``, batch size. It
is never restated here, so the benchmark follows the default when it changes. Every model
is trained by kdpipe's own recipes (``kdpipe.recipes.train_teacher`` / ``distill_student``),
so augmentation, the teacher-logit cache or on-the-fly teacher logits, best-validation
weights and the teacher_pruned search run exactly as in the pipeline. Only the
architectures are this benchmark's: the pipeline's cnn_medium has 1/4 of the teacher's
params, while the question here is a student with <= 1/10 of them.

Data: a class-balanced subset of Fashion-MNIST's training split (``--per-class`` images of
each class, from which kdpipe splits off ``data.val_fraction`` for validation; see
fashion_subset.py) and the full official 10,000-image test split.

    python benchmarks/bench_fashion.py                 # seeds 0 1 2 (about 25 min, 2 quiet cores)
    python benchmarks/bench_fashion.py --seeds 0 1 2 3 4
    python benchmarks/bench_fashion.py --quick         # smoke test: tiny data, 1 epoch, 1 seed
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fashion_subset
import torch
from common import default_config, default_out, envelope, load_average, write_json
from fashion_report import summarize

from kdpipe import recipes
from kdpipe.bundle import Bundle
from kdpipe.config import (
    DataConfig,
    DistillConfig,
    ModelConfig,
    PipelineConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from kdpipe.data import DatasetSpec, build_dataset_spec
from kdpipe.metrics import count_params
from kdpipe.models import create_model

NAME = "fashion"
MIN_TINY_RATIO = 50  # the tiny student has at least this many times fewer params than the teacher


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--quick`` shrinks everything to a smoke test."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--student", default="cnn_small", help="the student architecture (<= 1/10 of the teacher)")
    p.add_argument("--tiny", default="cnn_tiny", help=f"the tiny student (>= {MIN_TINY_RATIO}x fewer params)")
    p.add_argument("--dropout", type=float, default=0.3,
                   help="dropout of the alone_dropout row (not tuned; the other rows keep the "
                        "default config's model kwargs)")
    p.add_argument("--per-class", type=int, default=1100,
                   help="training images per class (val is split out of them; test is the full split)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="override the default config's")
    p.add_argument("--student-epochs", type=int, default=None, help="override the default config's")
    p.add_argument("--quick", action="store_true",
                   help="50 images per class (test too), 1 epoch, 1 seed: a smoke test, numbers mean nothing")
    p.add_argument("--out", type=Path, default=default_out(NAME))
    args = p.parse_args(argv)
    args.test_per_class = None
    if args.quick:
        args.seeds, args.per_class, args.test_per_class = args.seeds[:1], 50, 50
        args.teacher_epochs = args.student_epochs = 1
    return args


def _replace(cfg: Any, **changes: Any) -> Any:
    """A copy of a frozen config with ``changes``, validated again (unlike model_copy)."""
    return type(cfg)(**{**cfg.model_dump(), **changes})


def _epochs(train: TrainConfig, epochs: int | None) -> TrainConfig:
    """``train`` with another epoch count (its warm-up and milestones kept inside it)."""
    if epochs is None or epochs == train.epochs:
        return train
    return _replace(train, epochs=epochs, warmup_epochs=min(train.warmup_epochs, epochs - 1),
                    step_milestones=tuple(m for m in train.step_milestones if m < epochs))


@dataclass(frozen=True)
class Plan:
    """The default recipe, instantiated for this benchmark's architectures."""

    data: DataConfig  # on the Fashion-MNIST subset
    teacher: TeacherConfig
    student_train: TrainConfig
    student: ModelConfig
    student_dropout: ModelConfig
    tiny: ModelConfig
    kd: DistillConfig
    dkd: DistillConfig

    @classmethod
    def from_recipe(cls, recipe: PipelineConfig, args: argparse.Namespace) -> Plan:
        student_kwargs = dict(recipe.student.model.kwargs)  # e.g. a default dropout, kept
        kd = _replace(recipe.distill, loss="kd", feature_loss="none", student_layer=None,
                      teacher_layer=None, assistants=())
        s_train = _epochs(recipe.student.train, args.student_epochs)
        # DKD ramps its weight up over the first epochs (20 of 240 in the paper); the config's
        # value if it sets one, else 2 epochs as in bench_quality.py.
        dkd_warmup = recipe.distill.dkd_warmup_epochs or min(2, s_train.epochs)
        return cls(
            data=fashion_subset.data_config(recipe.data, args.per_class, args.test_per_class),
            teacher=_replace(recipe.teacher, train=_epochs(recipe.teacher.train, args.teacher_epochs)),
            student_train=s_train,
            student=ModelConfig(arch=args.student, kwargs=student_kwargs),
            student_dropout=ModelConfig(arch=args.student, kwargs={**student_kwargs, "dropout": args.dropout}),
            tiny=ModelConfig(arch=args.tiny, kwargs=student_kwargs),
            kd=kd, dkd=_replace(kd, loss="dkd", dkd_warmup_epochs=dkd_warmup))

    def teacher_cfg(self, seed: int) -> TeacherConfig:
        return _replace(self.teacher, train=_replace(self.teacher.train, seed=seed))

    def alone_cfg(self, model: ModelConfig, seed: int) -> TeacherConfig:
        """Labels only: kdpipe's cross-entropy recipe (the teacher's) on a student model."""
        return TeacherConfig(model=model, train=_replace(self.student_train, seed=seed))

    def student_cfg(self, model: ModelConfig, seed: int, **init: Any) -> StudentConfig:
        return StudentConfig(model=model, train=_replace(self.student_train, seed=seed), **init)


def param_ratio(plan: Plan, spec: DatasetSpec, arch: ModelConfig) -> float:
    """params(arch) / params(teacher) on this dataset's input."""
    def params(m: ModelConfig) -> int:
        return count_params(create_model(m.arch, spec.num_classes, spec.in_channels, **m.kwargs))
    return params(arch) / params(plan.teacher.model)


Job = Callable[[dict[str, Bundle]], Bundle]


def seed_jobs(plan: Plan, spec: DatasetSpec, seed: int) -> list[tuple[str, Job]]:
    """Every row of one seed, in training order; a job gets the bundles trained before it."""
    pruned = plan.student_cfg(plan.teacher.model, seed, init="teacher_pruned",
                              init_target=param_ratio(plan, spec, plan.student), init_metric="params")
    tiny = plan.student_cfg(plan.tiny, seed)

    def kd(student: StudentConfig, distill: DistillConfig, teacher: str = "teacher") -> Job:
        return lambda done: recipes.distill_student(spec, done[teacher], student, distill)

    def alone(model: ModelConfig) -> Job:
        return lambda done: recipes.train_teacher(spec, plan.alone_cfg(model, seed))

    return [
        ("teacher", lambda done: recipes.train_teacher(spec, plan.teacher_cfg(seed))),
        ("alone", alone(plan.student)),
        ("alone_dropout", alone(plan.student_dropout)),
        ("kd", kd(plan.student_cfg(plan.student, seed), plan.kd)),
        ("kd_pruned", kd(pruned, plan.kd)),
        ("dkd", kd(plan.student_cfg(plan.student, seed), plan.dkd)),
        ("tiny_alone", alone(plan.tiny)),
        ("tiny_kd", kd(tiny, plan.kd)),
        ("tiny_ta", kd(tiny, plan.kd, teacher="kd")),  # the kd row's student is the assistant
    ]


def run_job(name: str, job: Job, done: dict[str, Bundle], seed: int) -> dict[str, Any]:
    """Train one row; its test accuracy, validation curve, size and time."""
    wall, cpu = time.perf_counter(), time.process_time()
    bundle = job(done)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    done[name] = bundle
    extra, metrics = bundle.spec.extra, bundle.spec.extra["metrics"]
    history = extra["history"]
    row = {"seed": seed, "test_accuracy": metrics["test_accuracy"],
           "best_val_accuracy": metrics.get("val_accuracy"), "best_epoch": extra.get("best_epoch"),
           "val_curve": [r.get("val_accuracy") for r in history], "epochs": len(history),
           "s_per_epoch": statistics.fmean(r["seconds"] for r in history),
           "params": metrics["params"], "macs": metrics["macs"],
           "wall_seconds": wall, "cpu_seconds": cpu, "load_average": load_average()}
    if extra.get("init", {}).get("kind", "scratch") != "scratch":
        row["init"] = extra["init"]
    print(f"  seed {seed} {name:14s} test {row['test_accuracy']:.4f}  {wall:6.1f} s "
          f"(cpu {cpu:.0f} s, load {row['load_average'][0]:.1f})", flush=True)
    return row


def check_sizes(plan: Plan, spec: DatasetSpec) -> dict[str, float]:
    """The size ratios the issue asks for; raise before training if the tiny one is too big."""
    student, tiny = param_ratio(plan, spec, plan.student), param_ratio(plan, spec, plan.tiny)
    if tiny > 1 / MIN_TINY_RATIO:
        raise SystemExit(f"--tiny {plan.tiny.arch} has 1/{1 / tiny:.1f} of the teacher's params; "
                         f"pick one with at most 1/{MIN_TINY_RATIO} (e.g. cnn_tiny under cnn_large)")
    return {"student_over_teacher": student, "tiny_over_teacher": tiny}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train every row for every seed, writing the JSON after each row (partial runs count)."""
    args = parse_args(argv)
    plan = Plan.from_recipe(default_config(), args)
    spec = build_dataset_spec(plan.data)
    sizes = check_sizes(plan, spec)
    print(f"{plan.data.source}: {spec.split_sizes}, augment {plan.data.augment}, teacher "
          f"{plan.teacher.train.epochs} epochs, students {plan.student_train.epochs}", flush=True)
    settings = settings_of(args, plan, spec, sizes)
    runs: dict[str, list[dict[str, Any]]] = {}
    start, load_start = time.perf_counter(), load_average()
    for seed in args.seeds:
        done: dict[str, Bundle] = {}
        for name, job in seed_jobs(plan, spec, seed):
            runs.setdefault(name, []).append(run_job(name, job, done, seed))
            write(args.out, settings, runs, start, load_start, complete=False)
    doc = write(args.out, settings, runs, start, load_start, complete=True)
    print(f"wrote {args.out} ({doc['results']['total_seconds']:.0f} s)")
    return doc


def settings_of(args: argparse.Namespace, plan: Plan, spec: DatasetSpec, sizes: dict[str, float]) -> dict[str, Any]:
    """Everything the numbers depend on, the full recipe included."""
    return {
        "seeds": args.seeds, "quick": args.quick, "per_class": args.per_class,
        "test_per_class": args.test_per_class, "source": plan.data.source,
        "split_sizes": spec.split_sizes, "input_shape": list(spec.input_shape),
        "teacher": plan.teacher.model.arch, "student": plan.student.arch, "tiny": plan.tiny.arch,
        "assistant": plan.student.arch, "dropout": args.dropout, "size_ratios": sizes,
        "teacher_epochs": plan.teacher.train.epochs, "student_epochs": plan.student_train.epochs,
        "recipe": {"data": plan.data.model_dump(mode="json"),
                   "teacher_train": plan.teacher.train.model_dump(mode="json"),
                   "student_train": plan.student_train.model_dump(mode="json"),
                   "kd": plan.kd.model_dump(mode="json"), "dkd": plan.dkd.model_dump(mode="json")},
        "torch_threads": torch.get_num_threads(),
    }


def write(out: Path, settings: dict[str, Any], runs: dict[str, list[dict[str, Any]]],
          start: float, load_start: Any, *, complete: bool) -> dict[str, Any]:
    results = {"complete": complete, "runs": runs, "total_seconds": time.perf_counter() - start,
               # CPU seconds of all threads: less sensitive than wall time to other processes
               "cpu_seconds": sum(r["cpu_seconds"] for rows in runs.values() for r in rows),
               "load_average_start": load_start, "load_average_end": load_average(),
               "summary": summarize(runs, settings["student_epochs"])}
    doc = envelope(NAME, settings, results)
    write_json(out, doc)
    return doc


if __name__ == "__main__":
    main()
