"""Does structural pruning make the exported model faster, not just smaller?

For the default student (cnn_small, 1x28x28, 10 classes) and a CIFAR resnet20 (3x32x32):
prune at the configured ratio (default: PruneConfig's), export unpruned and pruned to
ONNX, and time ONNX Runtime on the CPU (batch 1 and 64, p50, fixed intra-op threads)
for both in the same run, interleaved in rounds so that load from other processes hits
both alike. Also times PyTorch eager against ONNX Runtime at batch 1 for the student.

Weights are random (latency and MACs do not depend on their values); accuracy after
recovery needs a trained teacher/student and is measured by the pipeline, not here.

Usage:
    python benchmarks/bench_prune.py --out bench_prune.json [--ratio 0.5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from kdpipe.bundle import Bundle
from kdpipe.config import ExportConfig, PruneConfig
from kdpipe.export import export_onnx, with_preprocessing
from kdpipe.metrics import count_macs, count_params, latency_stats
from kdpipe.models import create_model
from kdpipe.prune import prune_model

MODELS = {"student cnn_small": ("cnn_small", (1, 28, 28)), "resnet20": ("resnet20", (3, 32, 32))}
BATCHES = (1, 64)


def _bundle(model: torch.nn.Module, arch: str, shape: tuple[int, int, int]) -> Bundle:
    return Bundle.from_model(model.eval(), arch=arch, classes=[str(i) for i in range(10)],
                             input_shape=shape, mean=[0.5] * shape[0], std=[0.25] * shape[0])


def _session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _interleaved_p50(fns: dict[str, callable], repeats: int, rounds: int) -> dict[str, float]:
    """Median over rounds of each function's p50, alternating the order every round."""
    p50s: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            p50s[name].append(latency_stats(fns[name], repeats=repeats, warmup=5)["p50_ms"])
    return {k: statistics.median(v) for k, v in p50s.items()}


def bench_model(label: str, arch: str, shape: tuple[int, int, int], cfg: PruneConfig,
                threads: int, repeats: int, rounds: int, workdir: Path) -> dict:
    torch.manual_seed(0)
    dense = create_model(arch, 10, shape[0]).eval()
    pruned = create_model(arch, 10, shape[0]).eval()
    pruned.load_state_dict(dense.state_dict())
    prune_model(pruned, torch.zeros(1, *shape), cfg, latency_repeats=5)
    row: dict = {"model": label, "arch": arch, "input_shape": list(shape)}
    sessions, modules = {}, {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        bundle = _bundle(model, arch, shape)
        result = export_onnx(bundle, workdir / f"{arch}-{name}.onnx", ExportConfig())
        sessions[name], modules[name] = _session(result.path, threads), with_preprocessing(bundle)
        row[f"{name}_params"] = count_params(model)
        row[f"{name}_macs"] = count_macs(model, shape)
        row[f"{name}_onnx_bytes"] = result.size_bytes
        row[f"{name}_parity_max_abs"] = result.parity.max_abs_error
    row["macs_ratio"] = row["dense_macs"] / row["pruned_macs"]
    row["params_ratio"] = row["dense_params"] / row["pruned_params"]
    for batch in BATCHES:
        x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
        fns = {k: (lambda s=s, x=x: s.run(None, {"pixels": x})) for k, s in sessions.items()}
        if batch == 1:
            xt = torch.from_numpy(x)
            fns["eager_dense"] = lambda xt=xt: _eager(modules["dense"], xt)
            fns["eager_pruned"] = lambda xt=xt: _eager(modules["pruned"], xt)
        p50 = _interleaved_p50(fns, repeats, rounds)
        row[f"ort_dense_b{batch}_ms"] = p50["dense"]
        row[f"ort_pruned_b{batch}_ms"] = p50["pruned"]
        speedup = p50["dense"] / p50["pruned"]
        row[f"speedup_b{batch}"] = speedup
        row[f"speedup_over_macs_b{batch}"] = speedup / row["macs_ratio"]
        if batch == 1:
            row["eager_dense_b1_ms"], row["eager_pruned_b1_ms"] = p50["eager_dense"], p50["eager_pruned"]
            row["ort_vs_eager_b1_dense"] = p50["eager_dense"] / p50["dense"]
            row["ort_vs_eager_b1_pruned"] = p50["eager_pruned"] / p50["pruned"]
    return row


def _eager(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module(x)


def _print_table(rows: list[dict]) -> None:
    print(f"{'model':18} {'MACs dense':>11} {'pruned':>10} {'ratio':>6} | "
          f"{'b1 dense':>8} {'pruned':>7} {'x':>5} {'/MACs':>5} | "
          f"{'b64 dense':>9} {'pruned':>7} {'x':>5} {'/MACs':>5} | {'eager b1':>8} {'ORT/eager':>9}")
    for r in rows:
        print(f"{r['model']:18} {r['dense_macs']:>11,} {r['pruned_macs']:>10,} {r['macs_ratio']:>6.2f} | "
              f"{r['ort_dense_b1_ms']:>8.3f} {r['ort_pruned_b1_ms']:>7.3f} {r['speedup_b1']:>5.2f} "
              f"{r['speedup_over_macs_b1']:>5.2f} | {r['ort_dense_b64_ms']:>9.3f} "
              f"{r['ort_pruned_b64_ms']:>7.3f} {r['speedup_b64']:>5.2f} {r['speedup_over_macs_b64']:>5.2f} | "
              f"{r['eager_pruned_b1_ms']:>8.3f} {r['ort_vs_eager_b1_pruned']:>9.2f}")
    print("latencies in ms (p50); x = dense/pruned; /MACs = speed-up / MACs ratio; "
          "ORT/eager = eager latency / ORT latency of the pruned model at batch 1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--ratio", type=float, default=PruneConfig().ratio)
    parser.add_argument("--round-to", type=int, default=PruneConfig().round_to)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op and torch threads")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PruneConfig(ratio=args.ratio, round_to=args.round_to)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_model(label, arch, shape, cfg, args.threads, args.repeats, args.rounds, Path(tmp))
                for label, (arch, shape) in MODELS.items()]
    _print_table(rows)
    result = {
        "prune_config": cfg.model_dump(mode="json"),
        "threads": args.threads, "repeats": args.repeats, "rounds": args.rounds,
        "machine": platform.platform(), "cpu_count": torch.get_num_threads(),
        "torch": torch.__version__, "onnxruntime": ort.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
