"""Training throughput: kdpipe's distillation loop vs a minimal hand-written PyTorch KD loop.

Both loops train the same student (configs/default.yaml's) against the same frozen teacher
(likewise, forwarded on every step), on the same DataLoader (kdpipe's
``make_loader`` over the mnist5k train split, batch 128), with AdamW at the same
learning rate and the same loss ``(1 - α)·CE + α·T²·KL``. Weights are freshly
initialised from the same seed for every measurement: throughput does not depend on
what the weights are, and no run profits from another's warm caches of its own.

* ``kdpipe``: ``fit(student, DistillationTask(teacher, cache_teacher_logits=False), ...)``,
  timed around the whole call (seeding, optimiser set-up, per-step lr schedule,
  divergence check, loss-part bookkeeping, best-weights copy included).
* ``plain``: the ten-line loop below, with nothing but forward, backward, step.

One untimed warm-up run of each comes first; then ``--repeats`` pairs, in alternating
order (kdpipe first, then plain first, ...) so that neither profits from running second
on a machine whose load drifts. The ratio is the median of the per-pair ratios (the two
runs of a pair are back to back, so drifting load mostly cancels); images/s are medians.

A second comparison times kdpipe with teacher-logit caching (the teacher runs once over
the train split, then never again) against without, over ``--cache-epochs`` epochs, the
caching pass included in the cached run's time.

    python benchmarks/bench_throughput.py            # ~2-3 min on 2 CPU cores
    python benchmarks/bench_throughput.py --quick    # digits, 1 pair: a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import default_config, default_out, envelope, write_json
from torch import nn
from torch.utils.data import DataLoader

from kdpipe.config import DataConfig, DistillConfig, TrainConfig
from kdpipe.data import DatasetSpec, build_dataset_spec, make_loader
from kdpipe.models import create_model
from kdpipe.train import DistillationTask, fit, seed_everything

NAME = "throughput"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--quick`` shrinks everything to a smoke test."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="mnist5k")
    recipe = default_config()
    p.add_argument("--teacher", default=recipe.teacher.model.arch)
    p.add_argument("--student", default=recipe.student.model.arch)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--kd-weight", type=float, default=0.9)
    p.add_argument("--epochs", type=int, default=1, help="epochs per kdpipe-vs-plain measurement")
    p.add_argument("--repeats", type=int, default=5, help="timed pairs per comparison")
    p.add_argument("--cache-epochs", type=int, default=2,
                   help="epochs per cached-vs-uncached measurement (caching pays off over epochs)")
    p.add_argument("--quick", action="store_true", help="digits, 1 pair, 2 cache epochs")
    p.add_argument("--out", type=Path, default=default_out(NAME))
    args = p.parse_args(argv)
    if args.quick:
        args.source, args.repeats, args.cache_epochs = "digits", 1, 2
    return args


# --------------------------------------------------------------------- the loops
def plain_kd_loop(student: nn.Module, teacher: nn.Module, loader: DataLoader, epochs: int,
                  lr: float, temperature: float, kd_weight: float) -> None:
    """The minimal PyTorch KD loop a user would write by hand (the baseline)."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=5e-4)
    student.train()
    teacher.eval()
    t2 = temperature**2
    for _ in range(epochs):
        for x, y, _index in loader:
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            kd = F.kl_div(F.log_softmax(s_logits / temperature, dim=1),
                          F.softmax(t_logits / temperature, dim=1), reduction="batchmean")
            loss = (1 - kd_weight) * F.cross_entropy(s_logits, y) + kd_weight * t2 * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def kdpipe_loop(student: nn.Module, teacher: nn.Module, loader: DataLoader, epochs: int,
                args: argparse.Namespace, cache: bool) -> list[float]:
    """kdpipe's ``fit`` with a DistillationTask; returns the per-epoch seconds it recorded."""
    distill = DistillConfig(loss="kd", temperature=args.temperature, kd_weight=args.kd_weight,
                            cache_teacher_logits=cache)
    cfg = TrainConfig(epochs=epochs, optimizer="adamw", lr=args.lr, weight_decay=5e-4,
                      scheduler="cosine", device="cpu", seed=0)
    result = fit(student, DistillationTask(teacher, distill), loader, None, cfg, desc="bench")
    return [row["seconds"] for row in result.history]


# ------------------------------------------------------------------ measurement
class Bench:
    """Builds fresh models and loaders, and times one run of a loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.spec: DatasetSpec = build_dataset_spec(DataConfig(source=args.source, batch_size=args.batch_size))
        self.teacher = self._model(args.teacher)
        self.n_train = self.spec.split_sizes["train"]

    def _model(self, arch: str) -> nn.Module:
        seed_everything(0)
        return create_model(arch, self.spec.num_classes, self.spec.in_channels)

    def loader(self) -> DataLoader:
        return make_loader(self.spec, "train", train=True, batch_size=self.args.batch_size, seed=0)

    def images(self, loader: DataLoader, epochs: int) -> int:
        """Images one run trains on (a dropped last batch is not counted)."""
        dropped = self.n_train % loader.batch_size if loader.drop_last else 0
        return epochs * (self.n_train - dropped)

    def time_run(self, kind: str, epochs: int) -> dict[str, Any]:
        """Time one run of ``kind`` (plain, kdpipe, kdpipe_cached) on fresh weights."""
        student, loader = self._model(self.args.student), self.loader()
        run: Callable[[], Any] = {
            "plain": lambda: plain_kd_loop(student, self.teacher, loader, epochs, self.args.lr,
                                           self.args.temperature, self.args.kd_weight),
            "kdpipe": lambda: kdpipe_loop(student, self.teacher, loader, epochs, self.args, cache=False),
            "kdpipe_cached": lambda: kdpipe_loop(student, self.teacher, loader, epochs, self.args, cache=True),
        }[kind]
        start = time.perf_counter()
        epoch_seconds = run()
        seconds = time.perf_counter() - start
        images = self.images(loader, epochs)
        row = {"kind": kind, "seconds": seconds, "images": images, "images_per_s": images / seconds}
        if epoch_seconds:  # kdpipe's own per-epoch clock: excludes set-up (e.g. the caching pass)
            row["steady_images_per_s"] = images / sum(epoch_seconds)
        print(f"  {kind:14s} {epochs} ep: {seconds:6.2f} s  {row['images_per_s']:8.1f} img/s", flush=True)
        return row


def compare(bench: Bench, a: str, b: str, epochs: int, repeats: int) -> dict[str, Any]:
    """Warm up both, then ``repeats`` pairs in alternating order; ratio = a / b throughput."""
    print(f"{a} vs {b} (warm-up, then {repeats} pairs of {epochs} epoch(s))", flush=True)
    bench.time_run(a, 1)
    bench.time_run(b, 1)
    rows: dict[str, list[dict[str, Any]]] = {a: [], b: []}
    for r in range(repeats):
        for kind in ((a, b) if r % 2 == 0 else (b, a)):
            rows[kind].append(bench.time_run(kind, epochs))
    median = {k: statistics.median(x["images_per_s"] for x in v) for k, v in rows.items()}
    pair_ratios = [x["images_per_s"] / y["images_per_s"] for x, y in zip(rows[a], rows[b], strict=True)]
    # The estimate is the median of the per-pair ratios: the two runs of a pair are back to
    # back, so load from other processes mostly cancels within a pair (less so across pairs).
    return {"runs": rows, "median_images_per_s": median, "ratio": statistics.median(pair_ratios),
            "ratio_of_medians": median[a] / median[b], "pair_ratios": pair_ratios,
            "epochs": epochs, "repeats": repeats}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Both comparisons; write the JSON result and return it."""
    args = parse_args(argv)
    bench = Bench(args)
    start = time.perf_counter()
    loop = compare(bench, "kdpipe", "plain", args.epochs, args.repeats)
    cache = compare(bench, "kdpipe_cached", "kdpipe", args.cache_epochs, args.repeats)
    steady = [x["steady_images_per_s"] for x in cache["runs"]["kdpipe_cached"]]
    cache["median_steady_images_per_s_cached"] = statistics.median(steady)
    results = {"kdpipe_vs_plain": loop, "cached_vs_uncached": cache, "train_images": bench.n_train,
               "goal_ratio": 0.95, "meets_goal": loop["ratio"] >= 0.95,
               "total_seconds": time.perf_counter() - start}
    print(f"kdpipe / plain = {loop['ratio']:.3f}   cached / uncached = {cache['ratio']:.3f}")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    doc = envelope(NAME, settings, results)
    write_json(args.out, doc)
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
