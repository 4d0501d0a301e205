"""Is the INT8 model faster than FP32 in ONNX Runtime, with which settings, and at what cost?

Three parts, one JSON (issue 16's benchmark):

1. Latency. A CIFAR resnet20 (3x32x32), the default student (the ``student`` arch of
   ``configs/default.yaml``, 1x28x28) unpruned, pruned at the config's ``prune`` section, and
   pruned with wider ``round_to`` values: exported by kdpipe, quantised with
   :func:`kdpipe.quantize.quantize_model` in every setting kdpipe offers (QDQ / QOperator x
   U8S8 / S8S8, per-channel), timed in ONNX Runtime on the CPU (p50) at batch 1 and 64, 1 and
   2 threads. FP32, every INT8 variant and a one-node graph (ONNX Runtime's fixed per-call
   cost) of one model are timed in the same *round*, the order rotating from round to round; a
   speed-up is the median over rounds of (FP32 p50 / INT8 p50) **of the same round**, with the
   min and max over rounds. Weights are random, calibration uses uniform pixels: latency does
   not depend on their values.
2. Accuracy (:mod:`quantize_accuracy`): students trained by kdpipe's recipe on mnist5k and
   Fashion-MNIST, FP32 vs INT8 at kdpipe's default setting on the test split.
3. Why (:mod:`quantize_graphs`): for each student, the graph ONNX Runtime runs for FP32 and
   for the default INT8 setting (nodes left in FP32, Q/DQ nodes not fused) and a profile of
   where a call's time goes.

The CPU's features are recorded with every result: INT8 speed depends on VNNI.

Usage:
    python benchmarks/bench_quantize.py --out benchmarks/results/quantize.json
        [--config configs/default.yaml] [--threads 1 2] [--repeats 30] [--rounds 5]
        [--round-to 32 64] [--accuracy mnist5k:cnn_medium:3 ...] [--no-analysis]
        [--quick]   # tiny repeats, digits: a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from bench_prune import trivial_graph
from common import REPO_ROOT, envelope, load_average, write_json
from quantize_accuracy import MAX_DROP_GOAL, AccuracyRun, measure_all
from quantize_graphs import analyse, conv_graph

from kdpipe.bundle import Bundle
from kdpipe.config import ExportConfig, PruneConfig, QuantizeConfig
from kdpipe.configfile import load_config
from kdpipe.cpu import cpu_features
from kdpipe.export import export_onnx
from kdpipe.metrics import count_macs
from kdpipe.models import create_model
from kdpipe.prune import prune_model
from kdpipe.quantize import quantize_model, resolve_settings

BATCHES = (1, 64)
SETTINGS = {
    "qdq_u8s8": QuantizeConfig(format="qdq", activation_type="uint8", weight_type="int8"),
    "qdq_s8s8": QuantizeConfig(format="qdq", activation_type="int8", weight_type="int8"),
    "qop_u8s8": QuantizeConfig(format="qoperator", activation_type="uint8", weight_type="int8"),
    "qop_s8s8": QuantizeConfig(format="qoperator", activation_type="int8", weight_type="int8"),
}
"""Every format x activation-type pair kdpipe offers, per-channel weights (its default)."""
FIRST_CONV_FP32 = "+conv1_fp32"
"""Suffix of the variant that keeps the first convolution in FP32."""
CONV_SIZE = 14
"""Spatial size of the conv sweep: the default student's second stage (28 -> 14 -> 7)."""
SPEEDUP_GOAL = 2.0
"""Issue 16: resnet20's INT8 at kdpipe's default setting >= 2x FP32 at batch 1 and 64."""


def default_setting() -> str:
    """The SETTINGS key that kdpipe's default QuantizeConfig resolves to on this CPU."""
    chosen = resolve_settings(QuantizeConfig(), cpu_features())
    for name, cfg in SETTINGS.items():
        if (cfg.format, cfg.activation_type, cfg.weight_type) == (
                chosen.format, chosen.activation_type, chosen.weight_type):
            return name
    raise RuntimeError(f"kdpipe's default setting {chosen.short} is not benchmarked here; "
                       "add it to SETTINGS")


def _export(arch: str, shape: tuple[int, int, int], kwargs: dict[str, Any],
            prune: PruneConfig | None, path: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(arch, 10, shape[0], **kwargs).eval()
    if prune is not None:
        prune_model(model, torch.zeros(1, *shape), prune, latency_repeats=3)
    bundle = Bundle.from_model(model.eval(), arch=arch, classes=[str(i) for i in range(10)],
                               input_shape=shape, mean=[0.5] * shape[0], std=[0.25] * shape[0],
                               kwargs=kwargs)
    export_onnx(bundle, path, ExportConfig())
    return {"path": str(path), "macs": count_macs(model, shape),
            "channels": [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]}


def _session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _calls(fn: Any, target_s: float, most: int) -> int:
    """Calls per round so that one round of ``fn`` takes about ``target_s`` (>= 5, <= most)."""
    for _ in range(2):  # warm-up
        fn()
    start = time.perf_counter()
    fn()
    return max(5, min(most, int(target_s / max(time.perf_counter() - start, 1e-6))))


def timed_rounds(fns: dict[str, Any], most: int, rounds: int, target_s: float
                 ) -> dict[str, list[float]]:
    """p50 (ms) of every function in every round, the order rotating by one each round;
    each function gets as many calls per round as fit ``target_s`` (a slow INT8 variant
    must not eat the benchmark's time), at most ``most``."""
    calls = {k: _calls(f, target_s, most) for k, f in fns.items()}
    p50s: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times = np.empty(calls[name])
            for i in range(calls[name]):
                start = time.perf_counter()
                fns[name]()
                times[i] = time.perf_counter() - start
            p50s[name].append(float(np.median(times) * 1e3))
    return p50s


def _ratios(fp32: list[float], other: list[float]) -> dict[str, Any]:
    per_round = [f / q for f, q in zip(fp32, other, strict=True)]
    return {"p50_ms": statistics.median(other), "speedup": statistics.median(per_round),
            "speedup_min": min(per_round), "speedup_max": max(per_round),
            "speedup_per_round": per_round}


def first_block(path: str) -> tuple[str, ...]:
    """The first Conv node and the nodes after it up to the second Conv (its Relu and, in the
    CNN students, its MaxPool): kept FP32 together, so that the tensor is quantised after the
    pooling (ONNX Runtime's uint8 MaxPool in NCHW layout is far slower than its FP32 one).
    The exported graph's node names survive ``quant_pre_process``."""
    import onnx

    nodes = list(onnx.load(path).graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    return tuple(n.name for n in nodes[convs[0]:convs[1]])


def quantise_all(fp32: str, shape: tuple[int, int, int], tag: str, work: Path) -> dict[str, str]:
    """Every SETTINGS variant of one FP32 file (uniform-pixel calibration, no control), and
    the default setting with the first block kept in FP32 (``quantize.nodes_to_exclude``):
    with 1-3 input channels the first conv's integer kernel is slower (see part 3)."""
    calibration = np.random.default_rng(0).random((64, *shape), dtype=np.float32)
    out = {name: quantize_model(fp32, work / f"{tag}-{name}.onnx", calibration,
                                cfg.model_copy(update={"max_drop": None})).path
           for name, cfg in SETTINGS.items()}
    default = default_setting()
    keep = SETTINGS[default].model_copy(update={"max_drop": None,
                                                "nodes_to_exclude": first_block(fp32)})
    out[f"{default}{FIRST_CONV_FP32}"] = quantize_model(
        fp32, work / f"{tag}-{default}-conv1fp32.onnx", calibration, keep).path
    return out


def bench_model(label: str, arch: str, shape: tuple[int, int, int], kwargs: dict[str, Any],
                prune: PruneConfig | None, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """FP32, every INT8 setting and a one-node graph of one model, in the same rounds."""
    tag = label.replace(" ", "_")
    fp32 = _export(arch, shape, kwargs, prune, work / f"{tag}.onnx")
    paths = {"fp32": fp32["path"], **quantise_all(fp32["path"], shape, tag, work)}
    sizes = {k: Path(p).stat().st_size for k, p in paths.items()}
    paths["one_node_graph"] = trivial_graph(work / f"{tag}-trivial.onnx", shape)
    timings: dict[str, Any] = {}
    for threads in args.threads:
        for batch in BATCHES:
            x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
            sessions = {k: _session(p, threads) for k, p in paths.items()}
            fns = {k: (lambda s=s, x=x: s.run(None, {"pixels": x})) for k, s in sessions.items()}
            repeats = args.repeats * 8 if batch == 1 else args.repeats
            p50s = timed_rounds(fns, repeats, args.rounds, args.round_seconds)
            timings[f"t{threads}_b{batch}"] = {k: _ratios(p50s["fp32"], v) for k, v in p50s.items()}
    row = {"model": label, "arch": arch, "kwargs": kwargs, "input_shape": list(shape),
           "pruned": prune is not None, "round_to": prune.round_to if prune else None,
           "macs": fp32["macs"], "channels": fp32["channels"], "onnx_bytes": sizes,
           "timings": timings}
    if args.analyse:
        default = default_setting()
        conv1 = default + FIRST_CONV_FP32
        row["analysis"] = analyse({"fp32": paths["fp32"], default: paths[default],
                                   conv1: paths[conv1]}, shape, work, calls=args.profile_calls)
    return row


def conv_sweep(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """One 3x3 conv per channel count, FP32 vs the default INT8 setting, 1 thread: from
    which width on does ONNX Runtime's integer convolution beat its FP32 one?"""
    default, rows = default_setting(), []
    for channels in args.conv_channels:
        shape = (channels, CONV_SIZE, CONV_SIZE)
        fp32 = conv_graph(work / f"conv{channels}.onnx", channels, CONV_SIZE)
        calibration = np.random.default_rng(0).random((64, *shape), dtype=np.float32)
        int8 = quantize_model(fp32, work / f"conv{channels}-int8.onnx", calibration,
                              SETTINGS[default].model_copy(update={"max_drop": None})).path
        row: dict[str, Any] = {"channels": channels, "size": CONV_SIZE,
                               "macs_per_image": 9 * channels * channels * CONV_SIZE ** 2}
        for batch in BATCHES:
            x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
            sessions = {"fp32": _session(fp32, 1), default: _session(int8, 1)}
            fns = {k: (lambda s=s, x=x: s.run(None, {"pixels": x})) for k, s in sessions.items()}
            p50s = timed_rounds(fns, args.repeats * 8, args.rounds, args.round_seconds / 2)
            row[f"t1_b{batch}"] = {k: _ratios(p50s["fp32"], v) for k, v in p50s.items()}
        rows.append(row)
    return rows


def print_model(row: dict[str, Any], default: str) -> None:
    """The latency table of one model: p50 and same-round speed-up per thread x batch."""
    print(f"\n{row['model']} ({row['arch']}, {row['macs']:,} MACs, channels {row['channels']})")
    keys = list(row["timings"])
    print(f"  {'setting':20} " + " ".join(f"{k:>22}" for k in keys))
    for name in ["fp32", *SETTINGS, default + FIRST_CONV_FP32, "one_node_graph"]:
        cells = " ".join(
            f"{row['timings'][k][name]['p50_ms']:>9.3f} ms {row['timings'][k][name]['speedup']:>5.2f}x"
            f" ({row['timings'][k][name]['speedup_min']:.2f}-{row['timings'][k][name]['speedup_max']:.2f})"
            for k in keys)
        mark = "*" if name == default else " "
        print(f"  {name + mark:20} {cells}")
    for name, a in row.get("analysis", {}).items():
        g = a["graph"]
        print(f"  ORT-optimised graph {name}: {g['integer_ops']} integer ops, "
              f"{g['float_compute_ops']} FP32 compute ops, {g['qdq_ops']} Q/DQ left; "
              + ", ".join(f"b{b[1:]}: {p['per_call_us']:.0f} us/call, Q/DQ {p['qdq_us']:.0f} us, "
                          f"outside ops {p['outside_ops_us']:.0f} us"
                          for b, p in a["profile"].items()))


def goals(rows: list[dict[str, Any]], accuracy: list[dict[str, Any]], default: str
          ) -> dict[str, Any]:
    """Issue 16's goals: resnet20 default INT8 >= 2x at b1 and b64; drop <= 0.3 points."""
    resnet = next(r for r in rows if r["arch"] == "resnet20")
    speed = {k: {"value": t[default]["speedup"], "met": t[default]["speedup"] >= SPEEDUP_GOAL}
             for k, t in resnet["timings"].items()}
    drops = {f"{a['source']}/{a['arch']}": {"value": a["drop"], "met": a["meets_goal"]}
             for a in accuracy if "drop" in a}
    return {"resnet20_speedup": speed, "accuracy_drop": drops,
            "speedup_goal": SPEEDUP_GOAL, "max_drop_goal": MAX_DROP_GOAL}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "default.yaml",
                   help="run configuration whose student, recipe and prune section are used")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="ORT intra-op threads")
    p.add_argument("--repeats", type=int, default=30,
                   help="most timed calls per round at batch 64 (x8 at batch 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-seconds", type=float, default=0.3,
                   help="target time of one variant's calls in one round (fewer calls if slow)")
    p.add_argument("--round-to", type=int, nargs="*", default=[32, 64],
                   help="extra pruned variants of the student with these round_to values")
    p.add_argument("--accuracy", nargs="*", type=AccuracyRun.parse,
                   default=[AccuracyRun("mnist5k", "cnn_medium", 3),
                            AccuracyRun("fashion_mnist", "cnn_medium", 2, 8000)],
                   help="source:arch:epochs[:train_size] trained for the FP32 vs INT8 accuracy "
                        "check (e.g. mnist5k:resnet20:2)")
    p.add_argument("--profile-calls", type=int, default=200,
                   help="profiled ORT calls at batch 1 (1/8 of them at batch 64)")
    p.add_argument("--conv-channels", type=int, nargs="*", default=[16, 32, 64, 128],
                   help="channel counts of the single-conv sweep (14x14, 1 thread)")
    p.add_argument("--no-analysis", dest="analyse", action="store_false",
                   help="skip the optimised-graph dump and profile")
    p.add_argument("--quick", action="store_true",
                   help="3 repeats, 2 rounds, digits for 2 epochs: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.rounds, args.profile_calls = 3, 2, 16
        args.round_to, args.accuracy = [32], [AccuracyRun("digits", "cnn_medium", 2)]
    return args


def _models(cfg: Any, round_to: Sequence[int]) -> list[tuple]:
    student, kwargs = cfg.student.model.arch, dict(cfg.student.model.kwargs)
    models = [("resnet20", "resnet20", (3, 32, 32), {}, None),
              (f"student {student}", student, (1, 28, 28), kwargs, None),
              (f"student {student} pruned", student, (1, 28, 28), kwargs, cfg.prune)]
    models += [(f"student {student} pruned round_to {r}", student, (1, 28, 28), kwargs,
                cfg.prune.model_copy(update={"round_to": r})) for r in round_to]
    return models


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads[0])
    load_start, cfg, default = load_average(), load_config(args.config), default_setting()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_model(*m, args=args, work=Path(tmp)) for m in _models(cfg, args.round_to)]
        convs = conv_sweep(args, Path(tmp))
    for row in rows:
        print_model(row, default)
    for c in convs:
        print(f"conv {c['channels']}->{c['channels']} 3x3 at {c['size']}x{c['size']}: INT8 " + ", ".join(
            f"{k} {c[k][default]['speedup']:.2f}x ({c[k]['fp32']['p50_ms']:.3f} ms FP32)"
            for k in c if k.startswith("t1_")))
    accuracy = measure_all(args.accuracy, cfg)
    for a in accuracy:
        print(f"{a['source']} {a['arch']}: " + (a["skipped"] if "skipped" in a else
              f"FP32 {100 * a['fp32_test_accuracy']:.2f} %, INT8 {100 * a['int8_test_accuracy']:.2f} %"
              f" (drop {100 * a['drop']:+.2f} pp), agreement {100 * a['argmax_agreement']:.2f} %"))
    features = cpu_features()
    settings = {"config": str(args.config), "threads": args.threads, "repeats": args.repeats,
                "repeats_b1": args.repeats * 8, "rounds": args.rounds, "quick": args.quick,
                "round_to": args.round_to, "conv_channels": args.conv_channels, "round_seconds": args.round_seconds,
                "accuracy_runs": [vars(a) for a in args.accuracy],
                "profile_calls": args.profile_calls, "default_setting": default,
                "quantize_settings": {k: v.model_dump(mode="json") for k, v in SETTINGS.items()},
                "prune_config": cfg.prune.model_dump(mode="json")}
    doc = envelope("quantize", settings, {
        "cpu": {"model": features.model_name, "flags": sorted(features.flags),
                "vnni": features.has_vnni},
        "models": rows, "conv_sweep": convs, "accuracy": accuracy, "goals": goals(rows, accuracy, default),
        "load_average_start": load_start, "load_average_end": load_average()})
    write_json(args.out, doc)
    print(f"\nCPU {features.describe()}; load average start {load_start}, end {load_average()}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
