"""What ONNX Runtime actually runs for an FP32 and an INT8 model (bench_quantize.py's part 3).

For one ``.onnx`` file: the graph ONNX Runtime's CPU provider executes after its own
optimisations (``SessionOptions.optimized_model_filepath``, basic level, so the dump is
plain ONNX + com.microsoft ops; the extended level only adds NCHWc layout rewrites), and
a profile of real calls (``enable_profiling``): time per operator type, and the part of a
call's time spent outside the operators (ONNX Runtime's per-call overhead).

Read off that: which nodes stay FP32 (convolutions / matmuls / adds ONNX Runtime did not
turn into integer kernels), where QuantizeLinear / DequantizeLinear nodes survive (a Q/DQ
pair that was fused disappears into QLinearConv & co.), and how much of a call the
quantise / dequantise work and the fixed overhead take.
"""

from __future__ import annotations

import bisect
import json
import os
import statistics
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

# onnx / onnxruntime are imported inside the functions that use them: run_all.py imports
# kernel_groups (through render_quantize) to render the report without them.

# Operators that compute in integers (ONNX + com.microsoft contrib ops ORT fuses into).
INTEGER_OPS = frozenset({
    "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm", "QLinearAdd",
    "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
# FP32 operators that carry the arithmetic (what INT8 is meant to replace).
FLOAT_COMPUTE_OPS = frozenset({"Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul",
                               "Add", "Mul", "Sub", "Div", "GlobalAveragePool", "AveragePool",
                               "BatchNormalization"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
# What the profile's kernel time is grouped into (the rest is "other").
KERNEL_GROUPS = {
    "conv": frozenset({"Conv", "FusedConv", "QLinearConv", "ConvInteger"}),
    "qdq": QDQ_OPS,
    "layout": frozenset({"Transpose", "ReorderInput", "ReorderOutput"}),
}
_WARMUP = 5


def optimized_graph(path: str | Path, out: str | Path) -> dict[str, Any]:
    """Dump the graph ONNX Runtime runs and count what is in it.

    Returns:
        ``op_counts`` (per op type), ``integer_ops`` / ``float_compute_ops`` / ``qdq_ops``
        (counts of each kind), ``float_compute_nodes`` (name + op of the FP32 compute
        nodes that are left), ``unfused_qdq`` (each surviving Q/DQ node with the op that
        feeds it and the ops it feeds: where a Q/DQ pair was not folded into an integer op).
    """
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(out)
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(out)).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    counts = Counter(n.op_type for n in graph.node)
    unfused = []
    for node in graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        src = producer.get(node.input[0])
        unfused.append({"node": node.name, "op": node.op_type,
                        "from": src.op_type if src is not None else "graph input",
                        "to": sorted({c.op_type for c in consumers.get(node.output[0], [])})
                        or ["graph output"]})
    return {"nodes": len(graph.node), "op_counts": dict(sorted(counts.items())),
            "integer_ops": sum(v for k, v in counts.items() if k in INTEGER_OPS),
            "float_compute_ops": sum(v for k, v in counts.items() if k in FLOAT_COMPUTE_OPS),
            "qdq_ops": sum(v for k, v in counts.items() if k in QDQ_OPS),
            "float_compute_nodes": [{"node": n.name, "op": n.op_type} for n in graph.node
                                    if n.op_type in FLOAT_COMPUTE_OPS],
            "unfused_qdq": unfused}


def profile(path: str | Path, x: np.ndarray, threads: int, calls: int) -> dict[str, Any]:
    """Per-operator-type share of a call's time, from ONNX Runtime's own profiler.

    ``calls`` profiled runs after 5 warm-up runs (left out of the numbers).
    ``per_call_us`` is the mean ``model_run`` duration, ``ops_us`` the mean time inside
    the operators' kernels, ``outside_ops_us`` the rest (executor, allocation, input /
    output handling): the fixed cost INT8 cannot shrink.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="kdpipe-prof-") as tmp:
        opts.profile_file_prefix = os.path.join(tmp, "p")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(_WARMUP + calls):
            session.run(None, {name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    return _summarise(events, skip_runs=_WARMUP)


def _runs(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]


def _summarise(events: list[dict[str, Any]], skip_runs: int) -> dict[str, Any]:
    """Per profiled call (the model_run events after the first ``skip_runs``): kernel time
    per op type; every figure is the median over calls (a few slow calls on a shared CPU
    must not set the picture)."""
    runs = sorted(_runs(events), key=lambda e: e["ts"])[skip_runs:]
    if not runs:
        raise RuntimeError("ONNX Runtime's profile has no model_run events")
    starts = [r["ts"] for r in runs]
    per_run: list[Counter[str]] = [Counter() for _ in runs]
    per_node: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= 0 and e["ts"] <= starts[i] + runs[i]["dur"]:
            op = e.get("args", {}).get("op_name", "?")
            per_run[i][op] += e["dur"]
            per_node.setdefault((e["name"].removesuffix("_kernel_time"), op), []).append(e["dur"])
    ops = sorted({k for c in per_run for k in c})
    us_by_op = {k: statistics.median(c[k] for c in per_run) for k in ops}
    groups = kernel_groups(us_by_op)
    kernels = [sum(c.values()) for c in per_run]
    per_call = statistics.median(r["dur"] for r in runs)
    outside = statistics.median(r["dur"] - k for r, k in zip(runs, kernels, strict=True))
    return {"calls": len(runs), "per_call_us": per_call, "ops_us": statistics.median(kernels),
            "outside_ops_us": outside, "us_by_group": groups, "qdq_us": groups["qdq"],
            "qdq_share": groups["qdq"] / per_call if per_call else 0.0,
            "us_by_op": dict(sorted(us_by_op.items(), key=lambda kv: -kv[1])),
            # in execution order: the first convolution is the first conv entry
            "conv_nodes_us": [{"node": n, "op": op, "us": statistics.median(v)}
                              for (n, op), v in per_node.items() if op in KERNEL_GROUPS["conv"]]}


def kernel_groups(us_by_op: dict[str, float]) -> dict[str, float]:
    """Per-op-type medians summed into conv / qdq / layout / other. Sums of medians, not
    medians of per-call sums: on a shared CPU most calls catch one descheduled kernel
    somewhere, which a per-call sum keeps and a per-operator median drops."""
    groups = {g: sum(v for k, v in us_by_op.items() if k in members)
              for g, members in KERNEL_GROUPS.items()}
    groups["other"] = sum(us_by_op.values()) - sum(groups.values())
    return groups


def analyse(paths: dict[str, str], shape: tuple[int, int, int], workdir: Path,
            threads: int = 1, batches: tuple[int, ...] = (1, 64), calls: int = 200
            ) -> dict[str, Any]:
    """``optimized_graph`` + ``profile`` (per batch size) of every file in ``paths``."""
    out: dict[str, Any] = {}
    for name, path in paths.items():
        graph = optimized_graph(path, workdir / f"{Path(path).stem}-ort-optimized.onnx")
        prof = {}
        for batch in batches:
            x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
            prof[f"b{batch}"] = profile(path, x, threads, calls if batch == 1 else max(calls // 8, 10))
        out[name] = {"graph": graph, "profile": prof}
    return out


def conv_graph(path: Path, channels: int, size: int, seed: int = 0) -> str:
    """One 3x3 Conv (``channels`` -> ``channels``, padding 1) + Relu on a
    ``channels x size x size`` input named ``pixels``: the unit a CNN student is made of."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((channels, channels, 3, 3)) / (3 * channels ** 0.5)).astype(np.float32)
    b = np.zeros(channels, dtype=np.float32)
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", channels, size, size])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", channels, size, size])
    nodes = [helper.make_node("Conv", ["pixels", "w", "b"], ["c"], pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["out"])]
    graph = helper.make_graph(nodes, f"conv{channels}", [x], [y],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return str(path)
