"""Is the INT8 model faster than FP32 in ONNX Runtime, and with which settings?

For a CIFAR resnet20 (3x32x32), the default student (the ``student`` arch of
``configs/default.yaml``, 1x28x28) unpruned, and the same student pruned at the default
config's ``prune`` section: export to ONNX with kdpipe, quantise with
:func:`kdpipe.quantize.quantize_model` in every setting kdpipe offers, and time ONNX
Runtime on the CPU (p50) at batch 1 and 64, 1 and 2 threads.

Fairness on a shared CPU: FP32 and every INT8 variant of one model are timed in the same
*round*, the order rotating from round to round; a speed-up is the median over rounds of
(FP32 p50 / INT8 p50) **of the same round**. Weights are random and calibration uses
uniform pixels: latency does not depend on their values (accuracy is tests/test_quantize.py's
and the pipeline's business).

The CPU's features are recorded with every result: INT8 speed depends on VNNI (issue 16
measured U8S8 2.1-2.3x faster than FP32 for resnet20 on an AVX-512 VNNI Xeon, S8S8 slower).

Usage:
    python benchmarks/bench_quantize.py --out benchmarks/results/quantize.json
        [--config configs/default.yaml] [--threads 1 2] [--repeats 30] [--rounds 5]
        [--quick]   # tiny repeats: a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from bench_prune import interleaved_rounds
from common import REPO_ROOT, envelope, load_average, write_json

from kdpipe.bundle import Bundle
from kdpipe.config import ExportConfig, PruneConfig, QuantizeConfig
from kdpipe.configfile import load_config
from kdpipe.cpu import cpu_features
from kdpipe.export import export_onnx
from kdpipe.metrics import count_macs
from kdpipe.models import create_model
from kdpipe.prune import prune_model
from kdpipe.quantize import quantize_model

BATCHES = (1, 64)
SETTINGS = {
    "qdq_u8s8_pc": QuantizeConfig(format="qdq", activation_type="uint8", weight_type="int8"),
    "qdq_s8s8_pc": QuantizeConfig(format="qdq", activation_type="int8", weight_type="int8"),
    "qop_u8s8_pc": QuantizeConfig(format="qoperator", activation_type="uint8", weight_type="int8"),
    "qdq_u8s8_pt": QuantizeConfig(format="qdq", activation_type="uint8", weight_type="int8",
                                  per_channel=False),
}
"""Every format x activation-type pair kdpipe offers (per-channel), plus per-tensor U8S8."""


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


def bench_model(label: str, arch: str, shape: tuple[int, int, int], kwargs: dict[str, Any],
                prune: PruneConfig | None, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """FP32 and every INT8 setting of one model, timed in the same interleaved rounds."""
    tag = label.replace(" ", "_")
    fp32 = _export(arch, shape, kwargs, prune, work / f"{tag}.onnx")
    calibration = np.random.default_rng(0).random((64, *shape), dtype=np.float32)
    paths, sizes = {"fp32": fp32["path"]}, {"fp32": Path(fp32["path"]).stat().st_size}
    for name, cfg in SETTINGS.items():
        result = quantize_model(fp32["path"], work / f"{tag}-{name}.onnx", calibration,
                                cfg.model_copy(update={"max_drop": None}))
        paths[name], sizes[name] = result.path, result.size_bytes
    timings: dict[str, Any] = {}
    for threads in args.threads:
        for batch in BATCHES:
            x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
            sessions = {k: _session(p, threads) for k, p in paths.items()}
            fns = {k: (lambda s=s, x=x: s.run(None, {"pixels": x})) for k, s in sessions.items()}
            repeats = args.repeats * 8 if batch == 1 else args.repeats
            p50s = interleaved_rounds(fns, repeats, args.rounds)
            timings[f"t{threads}_b{batch}"] = {
                k: {"p50_ms": statistics.median(v), "speedup": statistics.median(
                    f / q for f, q in zip(p50s["fp32"], v, strict=True))}
                for k, v in p50s.items()}
    return {"model": label, "arch": arch, "kwargs": kwargs, "input_shape": list(shape),
            "pruned": prune is not None, "macs": fp32["macs"], "channels": fp32["channels"],
            "onnx_bytes": sizes, "timings": timings}


def print_model(row: dict[str, Any]) -> None:
    print(f"\n{row['model']} ({row['arch']}, {row['macs']:,} MACs, channels {row['channels']})")
    keys = list(row["timings"])
    print(f"  {'setting':12} " + " ".join(f"{k:>18}" for k in keys))
    for name in ["fp32", *SETTINGS]:
        cells = " ".join(f"{row['timings'][k][name]['p50_ms']:>9.3f} ms {row['timings'][k][name]['speedup']:>4.2f}x"
                         for k in keys)
        print(f"  {name:12} {cells}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "default.yaml",
                   help="run configuration whose student and prune section are the default")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="ORT intra-op threads")
    p.add_argument("--repeats", type=int, default=30,
                   help="timed calls per round at batch 64 (x8 at batch 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="3 repeats, 2 rounds: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.rounds = 3, 2
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads[0])
    load_start, cfg = load_average(), load_config(args.config)
    student, kwargs = cfg.student.model.arch, dict(cfg.student.model.kwargs)
    models = [("resnet20", "resnet20", (3, 32, 32), {}, None),
              (f"student {student}", student, (1, 28, 28), kwargs, None),
              (f"student {student} pruned", student, (1, 28, 28), kwargs, cfg.prune)]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_model(*m, args=args, work=Path(tmp)) for m in models]
    for row in rows:
        print_model(row)
    features = cpu_features()
    settings = {"config": str(args.config), "threads": args.threads, "repeats": args.repeats,
                "repeats_b1": args.repeats * 8, "rounds": args.rounds, "quick": args.quick,
                "quantize_settings": {k: v.model_dump(mode="json") for k, v in SETTINGS.items()},
                "prune_config": cfg.prune.model_dump(mode="json")}
    doc = envelope("quantize", settings, {
        "cpu": {"model": features.model_name, "flags": sorted(features.flags),
                "vnni": features.has_vnni},
        "models": rows, "load_average_start": load_start, "load_average_end": load_average()})
    write_json(args.out, doc)
    print(f"\nCPU {features.describe()}; load average start {load_start}, end {load_average()}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
