"""Does structural pruning make the exported model faster, not just smaller?

For the default student (the ``student`` arch of ``configs/default.yaml``, 1x28x28) and a
CIFAR resnet20 (3x32x32), 10 classes: prune at the default config's ``prune`` section
(ratio, round_to, importance), export unpruned and pruned to ONNX, and time ONNX Runtime
on the CPU (batch 1 and 64, p50). Besides the default setting it sweeps pruning ratios x
``round_to``, all exported the same way.

How the timing stays fair on a shared CPU: every model of one architecture (dense,
default-pruned, every sweep point) is timed in the same *round*, the order rotating from
round to round, so load from other processes hits all of them alike; a speed-up is the
median over rounds of (dense p50 / pruned p50) **of the same round**. The per-call
overhead of ONNX Runtime (a one-node graph on the same input) is timed in the same rounds:
at batch 1 the small student is so cheap that this overhead bounds its speed-up.

Weights are random (latency and MACs do not depend on their values); accuracy after KD
recovery is measured by ``benchmarks/prune_accuracy.py``.

The goal (issue 3): MACs ratio >= 1.8 and ONNX Runtime speed-up >= 0.6 x MACs ratio at
batch 1 and at batch 64. ``meets_goal`` in every row says whether a setting reaches it.

Usage:
    python benchmarks/bench_prune.py --out benchmarks/results/prune.json
        [--config configs/default.yaml] [--threads 1 2] [--repeats 30] [--rounds 5]
        [--no-sweep]

Why round_to 16: ONNX Runtime's CPU convolutions (MLAS "NCHWc" kernels) hold activations in
blocks of 16 channels on AVX-512 (8 on AVX2). A conv whose output channels are not a
multiple of the block leaves that layout: the graph gains reorder nodes and slower kernels,
so the pruned model keeps only part of the speed-up its MACs promise.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from common import REPO_ROOT, envelope, load_average, write_json
from onnx import TensorProto, helper

from kdpipe.bundle import Bundle
from kdpipe.config import ConfigError, ExportConfig, PruneConfig
from kdpipe.configfile import load_config
from kdpipe.export import export_onnx, with_preprocessing
from kdpipe.metrics import count_macs, count_params
from kdpipe.models import create_model
from kdpipe.prune import prune_model

BATCHES = (1, 64)
SWEEP_RATIOS = (0.3, 0.4, 0.5)
SWEEP_ROUND_TO: tuple[int | None, ...] = (None, 8, 16)
RESNET = ("resnet20", (3, 32, 32))
MACS_GOAL = 1.8
EFFICIENCY_GOAL = 0.6
"""Speed-up / MACs ratio that counts as "really faster" (issue 3)."""


# ------------------------------------------------------------------ settings
def setting_label(ratio: float, round_to: int | None) -> str:
    """``r0.3`` or ``r0.3/rt8``: the name of a sweep point."""
    return f"r{ratio:g}" + (f"/rt{round_to}" if round_to else "")


def sweep_configs(default: PruneConfig) -> dict[str, PruneConfig]:
    """Every ratio x round_to point, with the default's other settings (importance...)."""
    return {setting_label(r, rt): default.model_copy(update={"ratio": r, "round_to": rt})
            for r in SWEEP_RATIOS for rt in SWEEP_ROUND_TO}


# ------------------------------------------------------------------- models
def _bundle(model: torch.nn.Module, arch: str, shape: tuple[int, int, int]) -> Bundle:
    return Bundle.from_model(model.eval(), arch=arch, classes=[str(i) for i in range(10)],
                             input_shape=shape, mean=[0.5] * shape[0], std=[0.25] * shape[0])


def _conv_channels(model: torch.nn.Module) -> list[int]:
    """Output channels of every conv, in order (what ONNX Runtime's kernels see)."""
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def _export(model: torch.nn.Module, arch: str, shape: tuple[int, int, int], path: Path) -> dict:
    result = export_onnx(_bundle(model, arch, shape), path, ExportConfig())
    return {"path": str(result.path), "onnx_bytes": result.size_bytes,
            "parity_max_abs": result.parity.max_abs_error, "params": count_params(model),
            "macs": count_macs(model, shape), "channels": _conv_channels(model)}


def build_variants(arch: str, shape: tuple[int, int, int], configs: dict[str, PruneConfig],
                   workdir: Path, kwargs: dict[str, Any] | None = None) -> tuple[dict, dict]:
    """Export the dense model and one pruned copy per config.

    Returns:
        ``(models, skipped)``: name -> export facts (``dense`` included), and name -> the
        reason a config could not be applied (e.g. round_to would empty a layer).
    """
    torch.manual_seed(0)
    dense = create_model(arch, 10, shape[0], **(kwargs or {})).eval()
    tag = arch + "".join(f"-{k}{v}" for k, v in (kwargs or {}).items())
    models = {"dense": _export(dense, arch, shape, workdir / f"{tag}-dense.onnx")}
    skipped: dict[str, str] = {}
    for name, cfg in configs.items():
        pruned = create_model(arch, 10, shape[0], **(kwargs or {})).eval()
        pruned.load_state_dict(dense.state_dict())
        try:
            prune_model(pruned, torch.zeros(1, *shape), cfg, latency_repeats=3)
        except ConfigError as err:  # e.g. round_to 8 on an 8-channel layer: nothing to time
            skipped[name] = str(err)
            continue
        models[name] = _export(pruned, arch, shape, workdir / f"{tag}-{name.replace('/', '_')}.onnx")
    return models, skipped


# ------------------------------------------------------------------- timing
def _session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def trivial_graph(path: Path, shape: tuple[int, int, int]) -> str:
    """A one-node (Relu) ONNX graph with the same dynamic-batch input as the models.

    Its latency is ONNX Runtime's fixed per-call cost (Python binding, input/output
    copies, the executor), which no pruning can remove.
    """
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", *shape])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", *shape])
    graph = helper.make_graph([helper.make_node("Relu", ["pixels"], ["logits"])], "trivial", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return str(path)


def _p50_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    return float(np.median(times) * 1e3)


def interleaved_rounds(fns: dict[str, Callable[[], Any]], repeats: int, rounds: int) -> dict[str, list[float]]:
    """p50 (ms) of every function in every round; the order rotates by one each round."""
    names = list(fns)
    p50s: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            p50s[name].append(_p50_ms(fns[name], repeats))
    return p50s


def time_models(paths: dict[str, str], shape: tuple[int, int, int], threads: int, batch: int,
                repeats: int, rounds: int) -> dict[str, dict[str, float]]:
    """Per model: median p50 over rounds and the same-round speed-up over ``dense``."""
    x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    fns = {k: (lambda s=s: s.run(None, {"pixels": x})) for k, s in sessions.items()}
    p50s = interleaved_rounds(fns, repeats, rounds)
    return {k: {"p50_ms": statistics.median(v),
                "speedup": statistics.median(d / p for d, p in zip(p50s["dense"], v, strict=True))}
            for k, v in p50s.items()}


def _repeats(batch: int, repeats: int) -> int:
    # Batch-1 calls are 10-100x cheaper: more of them for a stable p50 at little cost.
    return repeats * 8 if batch == 1 else repeats


def bench_family(label: str, arch: str, shape: tuple[int, int, int], configs: dict[str, PruneConfig],
                 threads: Sequence[int], repeats: int, rounds: int, workdir: Path,
                 kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export and time one architecture's dense model and all its pruned variants."""
    models, skipped = build_variants(arch, shape, configs, workdir, kwargs)
    paths = {k: m["path"] for k, m in models.items()}
    paths["trivial_graph"] = trivial_graph(workdir / f"{arch}-trivial.onnx", shape)
    timings: dict[str, dict] = {}
    for t in threads:
        for b in BATCHES:
            timings[f"t{t}_b{b}"] = time_models(paths, shape, t, b, _repeats(b, repeats), rounds)
    rows = {name: _row(name, models, timings, threads) for name in models if name != "dense"}
    overhead = {k: v["trivial_graph"]["p50_ms"] for k, v in timings.items()}
    dense_ms = {k: v["dense"]["p50_ms"] for k, v in timings.items()}
    return {"model": label, "arch": arch, "kwargs": kwargs or {}, "input_shape": list(shape),
            "dense": {k: v for k, v in models["dense"].items() if k != "path"},
            "dense_p50_ms": dense_ms, "ort_overhead_p50_ms": overhead,
            "pruned": rows, "skipped": skipped}


def _row(name: str, models: dict, timings: dict, threads: Sequence[int]) -> dict[str, Any]:
    dense, pruned = models["dense"], models[name]
    macs_ratio = dense["macs"] / pruned["macs"]
    row: dict[str, Any] = {
        "setting": name, "macs": pruned["macs"], "params": pruned["params"],
        "channels": pruned["channels"], "macs_ratio": macs_ratio,
        "params_ratio": dense["params"] / pruned["params"], "onnx_bytes": pruned["onnx_bytes"],
        "parity_max_abs": pruned["parity_max_abs"]}
    for key, t in timings.items():
        row[f"{key}_ms"] = t[name]["p50_ms"]
        row[f"{key}_speedup"] = t[name]["speedup"]
        row[f"{key}_efficiency"] = t[name]["speedup"] / macs_ratio
    row["meets_goal"] = {f"t{t}": macs_ratio >= MACS_GOAL and all(
        row[f"t{t}_b{b}_efficiency"] >= EFFICIENCY_GOAL for b in BATCHES) for t in threads}
    return row


# ---------------------------------------------------- eager vs ORT (default)
def eager_b1(arch: str, shape: tuple[int, int, int], cfg: PruneConfig, repeats: int,
             rounds: int, kwargs: dict[str, Any] | None = None) -> dict[str, float]:
    """PyTorch eager batch-1 p50 of dense and pruned (with normalisation, like the graph)."""
    torch.manual_seed(0)
    dense = create_model(arch, 10, shape[0], **(kwargs or {})).eval()
    pruned = create_model(arch, 10, shape[0], **(kwargs or {})).eval()
    pruned.load_state_dict(dense.state_dict())
    prune_model(pruned, torch.zeros(1, *shape), cfg, latency_repeats=3)
    mods = {k: with_preprocessing(_bundle(m, arch, shape)) for k, m in (("dense", dense), ("pruned", pruned))}
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(1))

    def call(m: torch.nn.Module) -> Callable[[], Any]:
        def fn() -> Any:
            with torch.inference_mode():
                return m(x)
        return fn

    p50 = interleaved_rounds({k: call(m) for k, m in mods.items()}, repeats, rounds)
    return {k: statistics.median(v) for k, v in p50.items()}


# ------------------------------------------------------------------ results
def legacy_row(family: dict[str, Any], setting: str, eager: dict[str, float]) -> dict[str, Any]:
    """The default setting at 1 thread in the flat shape ``run_all.py`` renders."""
    r, d = family["pruned"][setting], family["dense"]
    row = {"model": family["model"], "arch": family["arch"], "input_shape": family["input_shape"],
           "setting": setting, "dense_params": d["params"], "pruned_params": r["params"],
           "dense_macs": d["macs"], "pruned_macs": r["macs"], "dense_onnx_bytes": d["onnx_bytes"],
           "pruned_onnx_bytes": r["onnx_bytes"], "pruned_parity_max_abs": r["parity_max_abs"],
           "pruned_channels": r["channels"], "macs_ratio": r["macs_ratio"],
           "params_ratio": r["params_ratio"], "meets_goal": r["meets_goal"]["t1"]}
    for b in BATCHES:
        row[f"ort_dense_b{b}_ms"] = family["dense_p50_ms"][f"t1_b{b}"]
        row[f"ort_pruned_b{b}_ms"] = r[f"t1_b{b}_ms"]
        row[f"speedup_b{b}"] = r[f"t1_b{b}_speedup"]
        row[f"speedup_over_macs_b{b}"] = r[f"t1_b{b}_efficiency"]
        row[f"ort_overhead_b{b}_ms"] = family["ort_overhead_p50_ms"][f"t1_b{b}"]
    row["eager_dense_b1_ms"], row["eager_pruned_b1_ms"] = eager["dense"], eager["pruned"]
    row["ort_vs_eager_b1_dense"] = eager["dense"] / row["ort_dense_b1_ms"]
    row["ort_vs_eager_b1_pruned"] = eager["pruned"] / row["ort_pruned_b1_ms"]
    return row


def print_family(fam: dict[str, Any], threads: Sequence[int]) -> None:
    """One line per pruned variant: MACs ratio, speed-ups and efficiency per thread/batch."""
    print(f"\n{fam['model']} ({fam['arch']} {fam['kwargs'] or ''}): dense {fam['dense']['macs']:,} MACs, "
          f"{fam['dense']['params']:,} params, channels {fam['dense']['channels']}")
    for key, ms in fam["dense_p50_ms"].items():
        print(f"  {key}: dense {ms:.4f} ms, ORT one-node graph {fam['ort_overhead_p50_ms'][key]:.4f} ms")
    keys = [f"t{t}_b{b}" for t in threads for b in BATCHES]
    print(f"  {'setting':11} {'MACs x':>6} " + " ".join(f"{k + ' x(/MACs)':>17}" for k in keys)
          + "  goal  channels")
    for name, r in fam["pruned"].items():
        cells = " ".join(f"{r[k + '_speedup']:>9.2f} ({r[k + '_efficiency']:.2f})" for k in keys)
        goal = "/".join("yes" if v else "no" for v in r["meets_goal"].values())
        print(f"  {name:11} {r['macs_ratio']:>6.2f} {cells}  {goal:5} {r['channels']}")
    for name, why in fam["skipped"].items():
        print(f"  {name:11} skipped: {why.splitlines()[0][:110]}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "default.yaml",
                   help="run configuration whose student and prune section are the default")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="ORT intra-op threads")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per round at batch 64 (x8 at batch 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-sweep", action="store_true", help="only the default setting")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads[0])
    load_start = load_average()
    cfg = load_config(args.config)
    default = cfg.prune
    default_name = "default:" + setting_label(default.ratio, default.round_to)
    configs = {default_name: default, **({} if args.no_sweep else sweep_configs(default))}
    student_arch, student_kwargs = cfg.student.model.arch, dict(cfg.student.model.kwargs)
    families = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        families.append(bench_family(f"student {student_arch}", student_arch, (1, 28, 28), configs,
                                     args.threads, args.repeats, args.rounds, work, student_kwargs))
        families.append(bench_family(RESNET[0], *RESNET, configs, args.threads, args.repeats,
                                     args.rounds, work))
    for fam in families:
        print_family(fam, args.threads)
    eager = [eager_b1(f["arch"], tuple(f["input_shape"]), default, args.repeats * 8, args.rounds, f["kwargs"])
             for f in families]
    rows = [legacy_row(f, default_name, e) for f, e in zip(families, eager, strict=True)]
    settings = {"config": str(args.config), "threads": args.threads, "repeats": args.repeats,
                "repeats_b1": _repeats(1, args.repeats), "rounds": args.rounds,
                "sweep_ratios": list(SWEEP_RATIOS), "sweep_round_to": list(SWEEP_ROUND_TO),
                "goal": {"macs_ratio": MACS_GOAL, "speedup_over_macs": EFFICIENCY_GOAL}}
    doc = envelope("prune", settings, {"default_setting": default_name, "families": families,
                                       "load_average_start": load_start, "load_average_end": load_average()})
    # Flat keys read by run_all.py's report (the default setting, 1 thread).
    doc.update({"prune_config": default.model_dump(mode="json"), "threads": 1,
                "rounds": args.rounds, "rows": rows})
    write_json(args.out, doc)
    print(f"\nload average start {load_start}, end {load_average()}; wrote {args.out}")


if __name__ == "__main__":
    main()
