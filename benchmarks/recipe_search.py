"""Which distillation recipe makes logit KD beat the student alone? (issue 15, item 4)

One teacher per (dataset, teacher recipe, seed); then the same student trained alone and by
KD under each student recipe, same seed, same epochs, same data (paired). A recipe is
a few knobs of kdpipe's own config: augmentation (random crop; the teacher then runs on the
same augmented view: "consistent teaching", no logit cache), epochs, T, alpha.

    python benchmarks/recipe_search.py --dataset fashion_mnist --train-size 10000 \
        --seeds 0 --teacher plain aug --student base aug aug_t2 ...

Results are JSON lines (one per trained model) in --out, so partial runs keep what they did.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from kdpipe.config import DataConfig, DistillConfig, TrainConfig
from kdpipe.data import build_dataset_spec, make_loader
from kdpipe.metrics import count_params
from kdpipe.models import create_model
from kdpipe.train import ClassificationTask, DistillationTask, evaluate, fit, seed_everything

# knobs: augment, epochs, lr, T, alpha, label_smoothing (teacher only)
TEACHERS = {
    "plain": dict(augment=False, epochs=15, lr=3e-3),
    "aug": dict(augment=True, epochs=15, lr=3e-3),
    "aug30": dict(augment=True, epochs=30, lr=3e-3),
    "plain5": dict(augment=False, epochs=5, lr=3e-3),  # early-stopped: memorises less
}
STUDENTS = {
    "base": dict(augment=False, epochs=10, lr=5e-3, T=4.0, alpha=0.9),
    "aug": dict(augment=True, epochs=10, lr=5e-3, T=4.0, alpha=0.9),
    "aug_a1": dict(augment=True, epochs=10, lr=5e-3, T=4.0, alpha=1.0),
    "aug_t2": dict(augment=True, epochs=10, lr=5e-3, T=2.0, alpha=0.9),
    "aug_t1": dict(augment=True, epochs=10, lr=5e-3, T=1.0, alpha=0.9),
    "aug20": dict(augment=True, epochs=20, lr=5e-3, T=4.0, alpha=0.9),
    "aug20_a1": dict(augment=True, epochs=20, lr=5e-3, T=4.0, alpha=1.0),
    "base20": dict(augment=False, epochs=20, lr=5e-3, T=4.0, alpha=0.9),
    "base_t2": dict(augment=False, epochs=10, lr=5e-3, T=2.0, alpha=0.9),
    "base_a05": dict(augment=False, epochs=10, lr=5e-3, T=4.0, alpha=0.5),
    "base_a1": dict(augment=False, epochs=10, lr=5e-3, T=4.0, alpha=1.0),
    "base_t1": dict(augment=False, epochs=10, lr=5e-3, T=1.0, alpha=0.9),
    "base_t8": dict(augment=False, epochs=10, lr=5e-3, T=8.0, alpha=0.9),
}


def train_cfg(epochs: int, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, optimizer="adamw", lr=lr, weight_decay=5e-4,
                       scheduler="cosine", warmup_epochs=1, seed=seed, device="cpu")


def loaders(source: str, augment: bool, train_size: int | None, seed_split: int = 0):
    spec = build_dataset_spec(DataConfig(source=source, augment=augment, val_fraction=0.05))
    out = {s: make_loader(spec, s, train=s == "train") for s in ("train", "val", "test")}
    if train_size:
        ds = out["train"].dataset
        labels = np.asarray(ds.source.labels)[ds.source_positions]
        rng = np.random.default_rng(seed_split)
        per = train_size // spec.num_classes
        keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per]
                               for c in range(spec.num_classes)])
        ds.source_positions = ds.source_positions[np.sort(keep)]
    return spec, out


def run(args):
    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add(r["key"])
    cache: dict = {}
    for seed in args.seeds:
        for t_name in args.teacher:
            t = TEACHERS[t_name]
            spec, ld = cache.setdefault(t["augment"], loaders(args.dataset, t["augment"], args.train_size))
            seed_everything(seed)
            teacher = create_model(args.teacher_arch, spec.num_classes, spec.in_channels)
            tpath = Path(f"/work/exp/teacher_{args.dataset}_{args.train_size}_{t_name}_{seed}.pt")
            if tpath.exists():
                teacher.load_state_dict(torch.load(tpath, weights_only=True))
                tsec = 0.0
            else:
                s0 = time.perf_counter()
                fit(teacher, ClassificationTask(), ld["train"], ld["val"],
                    train_cfg(t["epochs"], t["lr"], seed), desc=f"teacher {t_name}")
                tsec = time.perf_counter() - s0
                torch.save(teacher.state_dict(), tpath)
            tacc = evaluate(teacher, ld["test"]).accuracy
            key = f"{args.dataset}|{t_name}|teacher|{seed}"
            if key not in done:
                with out.open("a") as f:
                    f.write(json.dumps({"key": key, "acc": tacc, "sec": tsec,
                                        "params": count_params(teacher)}) + "\n")
            print(f"teacher {t_name} seed {seed}: {tacc:.4f}", flush=True)
            for s_name in args.student:
                s = STUDENTS[s_name]
                spec, ld = cache.setdefault(s["augment"], loaders(args.dataset, s["augment"], args.train_size))
                for mode in ("alone", "kd"):
                    key = f"{args.dataset}|{t_name}|{s_name}|{mode}|{args.student_arch}|{seed}"
                    akey = f"{args.dataset}|*|{s_name}|alone|{args.student_arch}|{seed}"
                    if key in done or (mode == "alone" and akey in done):
                        continue
                    seed_everything(seed)
                    student = create_model(args.student_arch, spec.num_classes, spec.in_channels)
                    task = ClassificationTask() if mode == "alone" else DistillationTask(
                        teacher, DistillConfig(loss="kd", temperature=s["T"], kd_weight=s["alpha"]))
                    s0 = time.perf_counter()
                    fit(student, task, ld["train"], ld["val"], train_cfg(s["epochs"], s["lr"], seed),
                        desc=f"{s_name} {mode}")
                    sec = time.perf_counter() - s0
                    acc = evaluate(student, ld["test"]).accuracy
                    print(f"  {t_name} {s_name} {mode} seed {seed}: {acc:.4f} ({sec:.0f} s)", flush=True)
                    with out.open("a") as f:
                        f.write(json.dumps({"key": akey if mode == "alone" else key, "acc": acc,
                                            "sec": sec, "params": count_params(student)}) + "\n")
                    done.add(akey if mode == "alone" else key)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--teacher", nargs="+", default=["plain"])
    p.add_argument("--student", nargs="+", default=["base"])
    p.add_argument("--teacher-arch", default="cnn_large")
    p.add_argument("--student-arch", default="cnn_small")
    p.add_argument("--out", default="/work/exp/search.jsonl")
    run(p.parse_args())
