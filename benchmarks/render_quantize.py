"""BENCHMARKS.md's INT8 section, from ``results/quantize.json`` (bench_quantize.py).

Kept out of run_all.py so that file does not grow with every benchmark; run_all.py calls
:func:`render_quantize` and :func:`quantize_headline`.
"""

from __future__ import annotations

from typing import Any

from quantize_graphs import kernel_groups

TITLE = "## 8. INT8 quantisation (benchmarks/bench_quantize.py)"
LABELS = {"qdq_u8s8": "QDQ U8S8", "qdq_s8s8": "QDQ S8S8", "qop_u8s8": "QOperator U8S8",
          "qop_s8s8": "QOperator S8S8"}


def _table(head: list[str], rows: list[list[Any]], align: str) -> str:
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def _cell(t: dict[str, Any]) -> str:
    return f"{t['speedup']:.2f}× ({t['speedup_min']:.2f}–{t['speedup_max']:.2f})"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _latency(doc: dict[str, Any]) -> list[str]:
    st, models = doc["settings"], doc["results"]["models"]
    default = st["default_setting"]
    keys = list(models[0]["timings"])
    head = ["model", "setting"] + [f"{k.split('_')[0][1:]} thr. b{k.split('_b')[1]}" for k in keys]
    rows = []
    for m in models:
        name = f"{m['model']} ({m['macs'] / 1e6:.1f} M MACs, channels {'/'.join(map(str, m['channels']))})"
        rows.append([name, "FP32 p50 ms"] + [f"{m['timings'][k]['fp32']['p50_ms']:.3f}" for k in keys])
        for s in LABELS:
            mark = f"**{LABELS[s]}** (default)" if s == default else LABELS[s]
            rows.append(["", mark] + [_cell(m["timings"][k][s]) for k in keys])
        conv1 = default + "+conv1_fp32"
        if conv1 in m["timings"][keys[0]]:
            rows.append(["", f"{LABELS[default]}, first conv block kept FP32"] +
                        [_cell(m["timings"][k][conv1]) for k in keys])
        rows.append(["", "one-node graph ms"] +
                    [f"{m['timings'][k]['one_node_graph']['p50_ms']:.3f}" for k in keys])
    return [f"Every INT8 setting kdpipe offers (per-channel weights, `quantize_static` after "
            f"`quant_pre_process`, 64 uniform-pixel calibration images; random weights: latency does "
            f"not depend on them), timed against FP32 in the same process: {st['rounds']} interleaved "
            f"rounds (order rotating), up to {st['repeats_b1']} calls per round at batch 1 and "
            f"{st['repeats']} at batch 64 (fewer for a slow variant: about "
            f"{st.get('round_seconds', 0.3):g} s per variant and round). Cell: speed-up FP32 p50 / INT8 p50 of the same round, "
            "median over rounds (min–max over rounds). The one-node graph (a Relu on the same input) "
            "is ONNX Runtime's fixed cost per call. Pruned students use the default config's "
            f"`prune` section (ratio {st['prune_config']['ratio']}, round_to "
            f"{st['prune_config']['round_to']}) and the same with round_to "
            f"{', '.join(map(str, st['round_to']))} (a layer with fewer channels than round_to is left "
            "whole, so round_to 64 gives back the unpruned widths).", "",
            _table(head, rows, "ll" + "r" * len(keys)), ""]


def _accuracy(doc: dict[str, Any]) -> list[str]:
    rows = []
    for a in doc["results"]["accuracy"]:
        if "skipped" in a:
            rows.append([a["source"], a["arch"], a["epochs"], "—", "—", "—", "—", a["skipped"]])
            continue
        rows.append([a["source"], f"`{a['arch']}`", a["epochs"], f"{100 * a['fp32_test_accuracy']:.2f}",
                     f"{100 * a['int8_test_accuracy']:.2f}", f"{-100 * a['drop']:+.2f}",
                     f"{100 * a['argmax_agreement']:.2f} ({a['disagreements']} of {a['test_images']})",
                     _verdict(a["meets_goal"])])
    first = next((a for a in doc["results"]["accuracy"] if "settings" in a), None)
    how = f" ({first['settings']['reason']})" if first else ""
    return ["### Accuracy with trained weights", "",
            "Students trained with plain cross-entropy by kdpipe's recipe (the config's student "
            "optimiser settings, the epochs shown), exported by kdpipe, quantised at kdpipe's default "
            f"setting{how}, calibrated on a class-balanced sample of "
            f"{first['settings']['calibration_size'] if first else '?'} training images, accuracy "
            "control off (the setting itself is measured). Test split, top-1 %:", "",
            _table(["data", "model", "epochs", "FP32 %", "INT8 %", "INT8 − FP32 (pp)",
                    "argmax agreement %", "drop ≤ 0.3 pp"], rows, "llrrrrrl"), ""]


def _analysis(doc: dict[str, Any]) -> list[str]:
    rows = []
    for m in doc["results"]["models"]:
        a = m.get("analysis")
        if not a:
            continue
        fp32, int8 = a["fp32"], next(v for k, v in a.items() if k != "fp32")
        g = int8["graph"]
        for b in fp32["profile"]:
            pf, pi = fp32["profile"][b], int8["profile"][b]
            gf, gi = kernel_groups(pf["us_by_op"]), kernel_groups(pi["us_by_op"])
            first = [f"{p['conv_nodes_us'][0]['us']:.0f}" if p.get("conv_nodes_us") else "?"
                     for p in (pf, pi)]
            rows.append([m["model"], b, f"{g['integer_ops']} / {g['float_compute_ops']} / {g['qdq_ops']}",
                         f"{pf['per_call_us']:.0f} → {pi['per_call_us']:.0f}",
                         " → ".join(f"{sum(c['us'] for c in p['conv_nodes_us']):.0f}" for p in (pf, pi)),
                         f"{first[0]} → {first[1]}",
                         f"{gi['qdq']:.0f}",
                         f"{gf['layout']:.0f} → {gi['layout']:.0f}",
                         f"{gf['other']:.0f} → {gi['other']:.0f}",
                         f"{pf['outside_ops_us']:.0f} → {pi['outside_ops_us']:.0f}"])
    if not rows:
        return []
    return [*_graph_facts(doc), "FP32 vs the default INT8 setting, 1 thread: the graph ONNX Runtime executes after its "
            "own optimisations (`optimized_model_filepath`, all levels) and its profiler "
            f"(`enable_profiling`, {doc['settings']['profile_calls']} calls at batch 1, 1/8 of that at "
            "64), FP32 → INT8: median µs per call and outside any kernel (executor, allocations), "
            "the convolution kernels (per-node medians, summed; the first one on its own), and "
            "per-operator-type medians of the Q/DQ nodes left after fusion, layout changes (NCHWc reorders in FP32, NHWC "
            "transposes in INT8) and the other kernels. The profiles are not interleaved: on a "
            "busy machine they are noisier than the latency table.", "",
            _table(["model", "batch", "INT8 graph: integer / FP32 compute / Q-DQ nodes",
                    "µs per call", "conv kernels µs", "of which first conv µs", "Q/DQ µs", "layout µs", "other kernels µs",
                    "outside kernels µs"], rows, "llrrrrrrrr"), "",
            "The profiler adds its own time to every node, so its µs per call are above the "
            "timed p50s of the latency table: compare FP32 with INT8 within a row.", "",
            *_conv_sweep(doc)]


def _conv_sweep(doc: dict[str, Any]) -> list[str]:
    """One 3x3 conv per width: where the integer kernel starts to win."""
    convs, default = doc["results"].get("conv_sweep") or [], doc["settings"]["default_setting"]
    if not convs:
        return []
    keys = [k for k in convs[0] if k.startswith("t1_b")]
    rows = [[f"{c['channels']} → {c['channels']}"] +
            [f"{c[k]['fp32']['p50_ms']:.3f} ms: {_cell(c[k][default])}" for k in keys] for c in convs]
    return [f"One 3x3 convolution + Relu at {convs[0]['size']}x{convs[0]['size']} (the student's second "
            f"stage), FP32 vs {LABELS[default]} (its input quantised and its output dequantised "
            "inside the graph), 1 thread, same-round speed-up:", "",
            _table(["channels"] + [f"batch {k.split('_b')[1]}: FP32 p50, INT8 speed-up" for k in keys],
                   rows, "l" + "r" * len(keys)), ""]


def _describe_graph(g: dict[str, Any]) -> str:
    left = ", ".join(f"`{n['node']}` ({n['op']})" for n in g["float_compute_nodes"]) or "none"
    qdq = ", ".join(f"{q['from']} → {q['op']} → {'/'.join(q['to'])}" for q in g["unfused_qdq"]) or "none"
    return f"FP32 compute nodes left: {left}; Q/DQ nodes not fused: {qdq}"


def _graph_facts(doc: dict[str, Any]) -> list[str]:
    """Which nodes of the default INT8 graph ONNX Runtime runs stay FP32 / unfused."""
    seen: dict[str, list[str]] = {}
    for m in doc["results"]["models"]:
        a = m.get("analysis")
        if a:
            for key, variant in a.items():
                if key == "fp32":
                    continue
                int8 = variant["graph"]
                ops = ", ".join(f"{k} {v}" for k, v in int8["op_counts"].items())
                label = "" if "+" not in key else " (first conv block kept FP32)"
                seen.setdefault(f"{_describe_graph(int8)}. All nodes: {ops}", []).append(
                    m["model"] + label)
    return ["### What ONNX Runtime runs (optimised graphs, profile)", "",
            "The INT8 graphs as ONNX Runtime executes them (default setting):", "",
            *[f"- {', '.join(models)}: {text}." for text, models in seen.items()], ""]


def render_quantize(doc: dict[str, Any]) -> str:
    """The whole section."""
    r, default = doc["results"], doc["settings"]["default_setting"]
    speed = r["goals"]["resnet20_speedup"]
    goal = ", ".join(f"{k.replace('_', ' ')} {v['value']:.2f}× {_verdict(v['met'])}" for k, v in speed.items())
    load = r.get("load_average_start")
    return "\n".join([
        TITLE, "",
        f"CPU: {r['cpu']['model']} (VNNI: {'yes' if r['cpu']['vnni'] else 'no'}); kdpipe's default "
        f"setting here: **{LABELS[default]}** per-channel. Load average at the start "
        f"{load[0]:.1f}, at the end {r['load_average_end'][0]:.1f} (shared machine: ratios are "
        "same-round).", "", *_latency(doc),
        f"Goal: resnet20 ≥ {r['goals']['speedup_goal']:g}× at batch 1 and 64 with the default "
        f"setting — {goal}.", "", *_accuracy(doc), *_analysis(doc),
        f"_Measured {doc['meta']['date']}; raw: `benchmarks/results/quantize.json`._"])


def quantize_headline(doc: dict[str, Any]) -> str:
    """One line for the page's headlines."""
    r, default = doc["results"], doc["settings"]["default_setting"]
    parts = []
    for m in r["models"]:
        t = m["timings"]
        parts.append(f"{m['model']} {t['t1_b1'][default]['speedup']:.2f}× / "
                     f"{t['t1_b64'][default]['speedup']:.2f}×")
    drops = [f"{a['source']} {a['arch']} {-100 * a['drop']:+.2f} pp" for a in r["accuracy"]
             if "drop" in a]
    return (f"- INT8 ({LABELS[default]}, kdpipe's default here) vs FP32, ONNX Runtime 1 thread, batch "
            f"1 / 64: {'; '.join(parts)}. Accuracy INT8 − FP32: {', '.join(drops) or 'not measured'}.")
