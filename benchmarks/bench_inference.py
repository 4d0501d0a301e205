"""Inference latency: the student in ONNX Runtime vs PyTorch eager, same process, same threads.

The default student (the ``student`` arch of configs/default.yaml, on 1x28x28 MNIST
digits) is exported with kdpipe's own exporter (:func:`kdpipe.export.export_onnx`:
normalisation inside the graph, raw [0, 1] pixels in), and both runtimes are timed on
the same raw-pixel batch at batch 1 and 64:

* PyTorch eager: the same graph as a module (:func:`kdpipe.export.with_preprocessing`)
  under ``torch.inference_mode()``, ``torch.set_num_threads(threads)``.
* ONNX Runtime: CPUExecutionProvider, ``intra_op_num_threads = threads``, one inter-op thread.

For each thread count, the two runtimes are timed in ``--rounds`` rounds in alternating
order (load from other processes then hits both alike); the estimate is the median of the
rounds' p50 latencies. Weights are random: latency does not depend on their values, and
the outputs are still compared (max |ONNX - eager|) so a fast-but-wrong graph shows.

Pruned vs unpruned latency (next to the MACs ratio) is benchmarks/bench_prune.py's job;
run_all.py merges its table into BENCHMARKS.md.

    python benchmarks/bench_inference.py
    python benchmarks/bench_inference.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import default_config, default_out, envelope, usable_cores, write_json

from kdpipe.bundle import Bundle
from kdpipe.config import ExportConfig
from kdpipe.export import export_onnx, with_preprocessing
from kdpipe.metrics import count_macs, count_params, latency_stats
from kdpipe.models import create_model

NAME = "inference"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--quick`` shrinks everything to a smoke test."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=default_config().student.model.arch)
    p.add_argument("--input-shape", type=int, nargs=3, default=[1, 28, 28], metavar=("C", "H", "W"))
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts to compare at (default: 1 and all usable cores)")
    p.add_argument("--repeats", type=int, default=100, help="timed calls per round")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="few repeats and rounds: a smoke test")
    p.add_argument("--out", type=Path, default=default_out(NAME))
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = sorted({1, usable_cores()})
    if args.quick:
        args.repeats, args.warmup, args.rounds = 10, 2, 1
    return args


def ort_session(path: str, threads: int) -> Any:
    """A CPU ONNX Runtime session with a fixed intra-op thread count."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def interleaved_p50(fns: dict[str, Callable[[], Any]], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Median over rounds of each function's p50 (order alternates every round)."""
    p50s: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            p50s[name].append(latency_stats(fns[name], repeats=args.repeats, warmup=args.warmup)["p50_ms"])
    return {k: {"p50_ms": statistics.median(v), "round_p50_ms": v} for k, v in p50s.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Export, check outputs, time both runtimes; write the JSON result and return it."""
    args = parse_args(argv)
    shape = tuple(args.input_shape)
    torch.manual_seed(0)
    model = create_model(args.arch, args.num_classes, shape[0]).eval()
    bundle = Bundle.from_model(model, arch=args.arch, classes=[str(i) for i in range(args.num_classes)],
                               input_shape=shape, mean=[0.5] * shape[0], std=[0.25] * shape[0])
    eager = with_preprocessing(bundle)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_onnx(bundle, Path(tmp) / f"{args.arch}.onnx", ExportConfig())
        for threads in args.threads:
            torch.set_num_threads(threads)
            session = ort_session(exported.path, threads)
            for batch in args.batch_sizes:
                rows.append(time_batch(eager, session, shape, batch, threads, args))
    results = {"arch": args.arch, "params": count_params(model), "macs": count_macs(model, shape),
               "onnx_bytes": exported.size_bytes, "onnx_exporter": exported.exporter,
               "rows": rows}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    doc = envelope(NAME, settings, results)
    write_json(args.out, doc)
    print(f"wrote {args.out}")
    return doc


def time_batch(eager: torch.nn.Module, session: Any, shape: tuple[int, ...], batch: int,
               threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """Latency of both runtimes on one batch size; ratio = eager / ORT (>1: ORT faster)."""
    x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        expected = eager(xt).numpy()
    (got,) = session.run(None, {"pixels": x})
    max_abs = float(np.abs(got.astype(np.float64) - expected).max())

    def run_eager() -> Any:
        with torch.inference_mode():
            return eager(xt)

    p50 = interleaved_p50({"eager": run_eager, "onnxruntime": lambda: session.run(None, {"pixels": x})}, args)
    row = {"threads": threads, "batch": batch, "eager": p50["eager"], "onnxruntime": p50["onnxruntime"],
           "eager_over_ort": p50["eager"]["p50_ms"] / p50["onnxruntime"]["p50_ms"],
           "ort_images_per_s": batch / p50["onnxruntime"]["p50_ms"] * 1e3,
           "eager_images_per_s": batch / p50["eager"]["p50_ms"] * 1e3,
           "max_abs_diff": max_abs}
    print(f"  threads {threads} batch {batch:3d}: eager {p50['eager']['p50_ms']:.3f} ms, "
          f"ORT {p50['onnxruntime']['p50_ms']:.3f} ms (eager/ORT {row['eager_over_ort']:.2f}x, "
          f"max |diff| {max_abs:.2g})", flush=True)
    return row


if __name__ == "__main__":
    main()
