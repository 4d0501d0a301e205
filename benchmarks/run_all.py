"""Run every benchmark and write BENCHMARKS.md (``make bench``).

Each benchmark runs as its own subprocess, so one failure (or a hang, cut by a timeout)
does not stop the others; a failure is recorded with its exit code and the tail of its
log, and BENCHMARKS.md says so instead of showing stale numbers. Raw results go to
``benchmarks/results/<name>.json``, logs to ``benchmarks/results/logs/``.

    python benchmarks/run_all.py                   # everything (< 30 min on 2 CPU cores)
    python benchmarks/run_all.py --quick           # smoke test of every script, to results/quick/
    python benchmarks/run_all.py --only throughput inference
    python benchmarks/run_all.py --report-only     # rewrite BENCHMARKS.md from the JSON files

BENCHMARKS.md keeps whatever is written above its ``GENERATED_MARKER`` line (the
hand-written preamble); everything below the marker is regenerated.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import BENCH_DIR, REPO_ROOT, RESULTS_DIR, envelope, read_json, usable_cores, write_json
from fashion_report import TITLE as FASHION_TITLE
from fashion_report import headline as fashion_headline
from fashion_report import render_fashion
from render_quantize import TITLE as QUANTIZE_TITLE
from render_quantize import quantize_headline, render_quantize

BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script: how to call it, in full and in quick mode."""

    name: str
    script: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ("--quick",)
    timeout_s: float = 900.0
    out_flag: str = "--out"
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# Order: the short timing benchmarks first, the long training runs last.
BENCHMARKS = (
    Benchmark("throughput", "bench_throughput.py", timeout_s=1200,
              description="kdpipe's KD loop (with and without logit cache) vs a plain PyTorch loop and torchdistill"),
    Benchmark("inference", "bench_inference.py", timeout_s=300,
              description="ONNX Runtime vs PyTorch eager"),
    Benchmark("prune", "bench_prune.py",
              quick_args=("--no-sweep", "--repeats", "5", "--rounds", "1"),
              timeout_s=900,
              description="pruned vs unpruned ONNX latency and MACs (bench_prune.py)"),
    Benchmark("quantize", "bench_quantize.py", timeout_s=900,
              description="INT8 vs FP32 ONNX Runtime latency per setting, accuracy, graph analysis"),
    Benchmark("prune_accuracy", "prune_accuracy.py", timeout_s=900,
              description="pruned + KD-recovered student vs the unpruned one (3 seeds)"),
    Benchmark("quality", "bench_quality.py", timeout_s=1800,
              description="teacher, student alone, KD, KD + features, DKD"),
    # Fashion-MNIST: 3 seeds x (teacher + 8 student rows), at most 25 min on 2 quiet cores.
    Benchmark("fashion", "bench_fashion.py", timeout_s=2400,
              description="Fashion-MNIST: KD, teacher_pruned init, DKD, dropout, an assistant chain"),
    Benchmark("pipeline", "bench_pipeline.py", timeout_s=1200,
              description="make run cold and warm, ZenML overhead"),
    Benchmark("onnx_teacher", "bench_onnx_teacher.py", timeout_s=2400,
              description="a PyTorch teacher vs its ONNX export distilling the same student"),
)
NAMES = tuple(b.name for b in BENCHMARKS)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke-test every script with tiny settings; results and report go to results/quick/")
    p.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES), help="run only these")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from existing JSON")
    return p.parse_args(argv)


def run_benchmark(bench: Benchmark, results_dir: Path, quick: bool) -> dict[str, Any]:
    """Run one benchmark script in a subprocess; return its status record."""
    out = results_dir / f"{bench.name}.json"
    log = results_dir / "logs" / f"{bench.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(BENCH_DIR / bench.script), *bench.args,
           *(bench.quick_args if quick else ()), bench.out_flag, str(out)]
    print(f"[{bench.name}] {' '.join(cmd[1:])}", flush=True)
    previous = out.stat().st_mtime if out.exists() else None
    start = time.perf_counter()
    try:
        with log.open("w") as f:
            code = subprocess.run(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=bench.timeout_s, check=False).returncode
        error = None if code == 0 else f"exit code {code}"
    except subprocess.TimeoutExpired:
        code, error = None, f"timed out after {bench.timeout_s:.0f} s"
    seconds = time.perf_counter() - start
    fresh = out.exists() and out.stat().st_mtime != previous
    if error is None and not fresh:
        error = f"exited 0 but wrote no new {out.name}"
    record = {"name": bench.name, "command": cmd[1:], "seconds": seconds, "exit_code": code,
              "ok": error is None, "error": error, "result": str(out.relative_to(REPO_ROOT)),
              "log": str(log.relative_to(REPO_ROOT))}
    if error is not None:
        record["log_tail"] = log.read_text(errors="replace")[-2500:]
    print(f"[{bench.name}] {'ok' if error is None else 'FAILED: ' + error} ({seconds:.0f} s)", flush=True)
    return record


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Every ``<name>.json`` found for the known benchmarks (and a GPU run, if any)."""
    found = {}
    for name in (*NAMES, "gpu"):
        path = results_dir / f"{name}.json"
        if path.exists():
            found[name] = read_json(path)
    return found


# ===================================================================== the report
GENERATED_MARKER = ("<!-- Everything below is generated by `make bench` (benchmarks/run_all.py) "
                    "from benchmarks/results/*.json: change the code, not this text. -->")

DEFAULT_PREAMBLE = """# kdpipe benchmarks

Every number on this page was measured by `make bench` (`benchmarks/run_all.py`) on the
machine named below, and every comparison is against a baseline measured **in the same
run** on the same machine: ratios are the numbers to read, absolute timings are only as
good as a shared 2-core CPU allows. Raw results (with settings, machine and versions) are
in `benchmarks/results/*.json`; how each benchmark works is in `benchmarks/README.md`.

"""


def md_table(head: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one character per column (l or r)."""
    align = align or "l" + "r" * (len(head) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(map(str, head)) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _status(name: str, results: dict[str, Any], run_info: dict[str, Any] | None) -> str | None:
    """None when the result can be shown, else a line saying why it cannot."""
    status = (run_info or {}).get("results", {}).get("benchmarks", {}).get(name)
    if status is not None and not status.get("ok"):
        return (f"_Not available: this benchmark failed in the last run ({status.get('error')}); "
                f"log: `{status.get('log')}`._")
    if name not in results:
        return "_Not available: no result file (run `make bench`)._"
    return None


# Where the report says the raw JSON lives (results/ or results/quick/); set by main().
_results_rel = "benchmarks/results"


def _measured(doc: dict[str, Any]) -> str:
    meta = doc.get("meta", {})
    load = meta.get("machine", {}).get("load_average")
    load_txt = f", load average {load[0]:.1f}" if load else ""
    return f"_Measured {meta.get('date', '?')}{load_txt}; raw: `{_results_rel}/{doc['benchmark']}.json`._"


def render_header(results: dict[str, Any], run_info: dict[str, Any] | None, quick: bool) -> str:
    """Machine, date, versions, and which benchmarks ran."""
    # Machine facts from a benchmark that ran torch (it records torch's thread count).
    metas = [d["meta"] for d in results.values() if "meta" in d and d["benchmark"] != "gpu"]
    meta = next((x for x in metas if "torch_threads" in x.get("machine", {})),
                (run_info or {}).get("meta", {}))
    if run_info is not None:
        meta = {**meta, "date": run_info["meta"]["date"]}
    m, v = meta.get("machine", {}), meta.get("versions", {})
    lines = ["## Machine and software", ""]
    if quick:
        lines += ["**Quick mode (`--quick`): smoke-test settings; these numbers mean nothing.**", ""]
    lines += [f"- Date: {meta.get('date', '?')} (UTC)",
              f"- CPU: {m.get('cpu_model', '?')}, {m.get('usable_cores', '?')} usable cores, "
              f"PyTorch threads {m.get('torch_threads', 'default')}, no GPU" if not m.get("cuda_available")
              else f"- CPU: {m.get('cpu_model', '?')}, GPU: {m.get('gpu')}",
              f"- OS: {m.get('os', '?')}, Python {m.get('python', '?')}",
              "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val)]
    if run_info is not None:
        load = run_info["results"].get("load_at_start", {}).get("load_average")
        if load:
            lines.append(f"- Load average at the start of the last invocation: {load[0]:.1f} (1 min) on "
                         f"{m.get('usable_cores', '?')} cores; "
                         "the machine is shared, so timings are pessimistic, ratios are same-run")
        ran = run_info["results"]["benchmarks"]
        rows = [(s["name"], "ok" if s["ok"] else f"FAILED ({s['error']})", f"{s['seconds']:.0f}", f"`{s['log']}`")
                for s in ran.values()]
        # Results on disk that this invocation did not run (--only): say where they come from.
        rows += [(name, f"ok, from an earlier invocation ({doc.get('meta', {}).get('date', 'date unknown')})",
                  "", "") for name, doc in results.items() if name not in ran and name != "gpu"]
        total = sum(s["seconds"] for s in ran.values())
        lines += ["", md_table(["benchmark", "status", "seconds", "log"], rows, "llrl"),
                  "", f"Sum of the benchmarks' run times: {total / 60:.1f} min (statuses are kept across "
                  "`--only` invocations; each result's own date and load are under its section)."]
    return "\n".join(lines)


def _acc(stat: dict[str, float]) -> str:
    return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"


def render_quality(doc: dict[str, Any]) -> str:
    """Per dataset: teacher, student alone and every KD variant, with the goal checks."""
    st, out = doc["settings"], ["## 1. Distillation quality", ""]
    out += [f"Teacher `{st['teacher']}` ({st['teacher_epochs']} epochs), student `{st['student']}` "
            f"({st['student_epochs']} epochs for every student row), AdamW with cosine schedule, batch "
            f"{st['batch_size']}, seeds {st['seeds']}: one teacher trained per seed, and each student row of "
            f"a seed starts from the same initial weights. Logit KD: T = {st['temperature']:g}, "
            f"α = {st['kd_weight']:g} (weight of the KD term). Test accuracy (%) on the held-out test split "
            "with the best-validation weights, mean ± sample std over the seeds. Feature losses act on "
            f"`features.stage3` of both nets: attention transfer weight {st['at_weight']:g} (picked with one "
            f"digits seed: 10 hurt), FitNets weight {st['fitnet_weight']:g}; DKD α = 1, β = {st['dkd_beta']:g}. "
            "Logit KD and DKD use cached teacher logits (no augmentation); the feature losses need the "
            "teacher's forward every step, hence their s/epoch.", ""]
    for source, ds in doc["results"]["datasets"].items():
        summ, cost = ds["summary"], ds["cost"]
        acc, teacher_cost, student_cost = summ["test_accuracy"], cost["teacher"], cost["student"]
        rows = []
        for name in acc:
            is_teacher = name == "teacher"
            c = teacher_cost if is_teacher else student_cost
            label = f"teacher `{st['teacher']}`" if is_teacher else st["variants_described"].get(name, name)
            gain = summ.get("gain_vs_alone", {}).get(name)
            wins = summ.get("wins_vs_alone", {}).get(name)
            rows.append((label, f"{c['params']:,}", f"{c['macs']:,}", _acc(acc[name]),
                         "" if gain is None else f"{100 * gain:+.2f}",
                         "" if wins is None else f"{wins}/{acc[name]['n']}",
                         "100" if is_teacher else f"{100 * summ['of_teacher'][name]:.1f}",
                         f"{summ['s_per_epoch'][name]:.1f}"))
        out += [f"### {source} (train/val/test = {ds['split_sizes']['train']}/{ds['split_sizes']['val']}/"
                f"{ds['split_sizes']['test']}, input {'x'.join(map(str, ds['input_shape']))})", "",
                md_table(["model", "params", "MACs", "test acc. %", "vs alone (pp)", "seeds beating alone",
                          "% of teacher", "s/epoch"], rows, "lrrrrrrr"), ""]
        if "kd" in acc and "alone" in acc:
            ratio = teacher_cost["params"] / student_cost["params"]
            beats = summ["gain_vs_alone"]["kd"] > 0
            of_t = summ["of_teacher"]["kd"]
            out += [f"Goal (logit KD): beats the student alone — {_verdict(beats)} "
                    f"({100 * summ['gain_vs_alone']['kd']:+.2f} pp, {summ['wins_vs_alone']['kd']}/"
                    f"{acc['kd']['n']} seeds); ≥ 98 % of the teacher's accuracy — {_verdict(of_t >= 0.98)} "
                    f"({100 * of_t:.1f} %); ≤ 1/10 of its params — {_verdict(ratio >= 10)} (1/{ratio:.1f}).", ""]
    out.append(_measured(doc))
    return "\n".join(out)


THROUGHPUT_LABELS = {
    "plain": "plain hand-written PyTorch KD loop",
    "torchdistill": "torchdistill `DistillationBox` + `KDLoss`",
    "kdpipe": "kdpipe `fit` + `DistillationTask`, no logit cache",
    "kdpipe_cached": "kdpipe `fit` + `DistillationTask`, teacher-logit cache",
}


def _goal_text(goal: dict[str, Any] | None, fmt: str) -> str:
    if goal is None:
        return "not measured"
    return f"{_verdict(goal['met'])} ({fmt.format(goal['value'])})"


OLD_THROUGHPUT = ("_Not available: `throughput.json` predates the side-by-side comparison with "
                  "torchdistill; re-run it (`python benchmarks/run_all.py --only throughput`)._")


def _accuracy_goal(goal: dict[str, Any] | None) -> str:
    if goal is None:
        return "not measured"
    return (f"{_verdict(goal['met'])} ({100 * goal['value']:+.2f} pp, spread "
            f"{100 * goal['spread']:.2f} pp)")


def render_throughput(doc: dict[str, Any]) -> str:
    """The four KD loops side by side: images/s, ratio to the plain loop, test accuracy."""
    st, r = doc["settings"], doc["results"]
    if "variants" not in r:
        return "\n".join(["## 2. Training throughput", "", OLD_THROUGHPUT])
    variants, goals = r["variants"], r["goals"]
    out = ["## 2. Training throughput", "",
           f"Student `{st['student']}` distilled from `{st['teacher']}` (trained {st['teacher_epochs']} "
           f"epoch(s) first; test accuracy {100 * r['teacher_test_accuracy']:.2f} %) on {st['source']} "
           f"({r['train_images']} training images, {r['steps_per_epoch']} steps per epoch), {st['epochs']} "
           f"epoch(s) per run, batch {st['batch_size']}, CPU. Every variant: the same data and batch order "
           f"(kdpipe's `make_loader`), initial weights, loss (T = {st['temperature']:g}, α = {st['kd_weight']:g}), "
           "AdamW groups (no decay on biases / norm scales) and per-step cosine schedule; teacher in eval mode. "
           f"Each run is a fresh process; {st['repeats']} interleaved round(s) (round r: seed r, variants in a "
           f"rotated order){'' if st.get('no_warmup') else ' after one untimed warm-up run of each'}. "
           "Images/s = training images / wall time of the training call (the variant's set-up included, "
           "imports and loading excluded); ratio = median over rounds of images/s over the plain loop's "
           f"in the same round. torchdistill {st.get('torchdistill_version') or 'not installed'}; it has no "
           "logit cache.", ""]
    rows = []
    for name in ("plain", "torchdistill", "kdpipe", "kdpipe_cached"):
        if name not in variants:
            continue
        v = variants[name]
        ratio = "1.000" if name == "plain" else f"**{v['ratio_vs_plain']:.3f}**"
        rounds = ", ".join(f"{x:.3f}" for x in v["ratios_vs_plain"])
        rows.append((THROUGHPUT_LABELS[name], f"{v['median_images_per_s']:.0f}", ratio,
                     "" if name == "plain" else rounds, f"{v['median_cpu_seconds']:.1f}",
                     _acc(v["test_accuracy"]),
                     "0" if name == "plain" else f"{v['max_weight_diff_vs_plain']:.1e}"))
    out += [md_table(["training loop", "images/s", "vs plain", "per round", "CPU s", "test acc. %",
                      "max weight diff. vs plain"], rows, "lrrrrrr"), ""]
    out += [f"Goals: kdpipe without the cache ≥ 1.0× the plain loop — "
            f"{_goal_text(goals.get('kdpipe_vs_plain'), '{:.3f}×')}; ahead of torchdistill — "
            f"{_goal_text(goals.get('kdpipe_vs_torchdistill'), '{:.3f}× its images/s')}; with the cache "
            f"≥ 1.6× — {_goal_text(goals.get('kdpipe_cached_vs_plain'), '{:.3f}×')}; test accuracy equal to "
            "the plain loop's within the seed spread (the larger sample std of the two) — " + ", ".join(
                f"{name} {_accuracy_goal(goals.get(f'{name}_accuracy'))}"
                for name in ("torchdistill", "kdpipe", "kdpipe_cached") if name in variants) + ".", ""]
    cached = variants.get("kdpipe_cached", {})
    if "median_steady_images_per_s" in cached:
        out += [f"With the cache, steady state (epochs only, the caching pass excluded): "
                f"{cached['median_steady_images_per_s']:.0f} images/s.", ""]
    out += ["Trained students of one round are compared weight by weight with the plain loop's (same "
            "seed): a difference at float-rounding level means the same work was done. What still "
            "differs:", ""]
    out += [f"- {d}" for d in r["differences"]]
    lr_diff = max(v["max_lr_diff_vs_plain"] for v in variants.values())
    eval_mode = all(v["teacher_in_eval_mode"] for v in variants.values())
    out += [f"- Largest difference of the last-step learning rate of an epoch from the plain loop's: "
            f"{lr_diff:.1e}. Teacher still in eval mode after every run: {'yes' if eval_mode else '**no**'}.",
            "", "CPU s = median process CPU time of the training call (every core counts): roughly the "
            "work done, less sensitive than wall time to other processes on the machine (OpenMP "
            "spin-waiting counts too).", "", _measured(doc)]
    return "\n".join(out)


def render_inference(doc: dict[str, Any] | None, prune: dict[str, Any] | None,
                     inf_status: str | None, prune_status: str | None) -> str:
    """ORT vs eager (bench_inference.py) and pruned vs unpruned (bench_prune.py)."""
    out = ["## 3. Inference", ""]
    if inf_status:
        out += [inf_status, ""]
    else:
        r = doc["results"]
        rows = [(x["threads"], x["batch"], f"{x['eager']['p50_ms']:.3f}", f"{x['onnxruntime']['p50_ms']:.3f}",
                 f"**{x['eager_over_ort']:.2f}×**", f"{x['ort_images_per_s']:.0f}", f"{x['max_abs_diff']:.1e}")
                for x in r["rows"]]
        out += [f"Student `{r['arch']}` ({r['params']:,} params, {r['macs']:,} MACs), exported by kdpipe "
                f"(`{r['onnx_exporter']}` exporter, normalisation inside the graph); ONNX Runtime CPU vs "
                "PyTorch eager on the same module and input, in one process with the same thread count; "
                "p50 latency, median over alternating rounds.", "",
                md_table(["threads", "batch", "eager p50 ms", "ONNX Runtime p50 ms", "eager / ORT",
                          "ORT images/s", "max abs diff"], rows, "rrrrrrr"), "", _measured(doc), ""]
    out += ["### Pruned vs unpruned (benchmarks/bench_prune.py)", ""]
    if prune_status:
        out.append(prune_status)
        return "\n".join(out)
    rows = [(x["model"], f"{x['dense_macs']:,} → {x['pruned_macs']:,}", f"**{x['macs_ratio']:.2f}×**",
             f"{x['params_ratio']:.2f}×",
             f"{x['ort_dense_b1_ms']:.3f} → {x['ort_pruned_b1_ms']:.3f}",
             f"**{x['speedup_b1']:.2f}×** ({x['speedup_over_macs_b1']:.2f})",
             f"{x['ort_dense_b64_ms']:.2f} → {x['ort_pruned_b64_ms']:.2f}",
             f"**{x['speedup_b64']:.2f}×** ({x['speedup_over_macs_b64']:.2f})")
            for x in prune["rows"]]
    cfg = prune.get("prune_config", {})
    out += [f"Structural pruning at the default config's setting (Torch-Pruning, `{cfg.get('importance')}` "
            f"importance, ratio {cfg.get('ratio')}, round_to {cfg.get('round_to')}), random weights "
            "(latency and MACs do not depend on them); ONNX Runtime CPU, 1 thread, p50 latency, median "
            f"of {prune.get('rounds')} interleaved rounds. Speed-up, and in brackets the speed-up divided "
            "by the MACs ratio (goal ≥ 0.60):", "",
            md_table(["model", "MACs dense → pruned", "MACs ratio", "params ratio", "batch 1 ms",
                      "speed-up b1", "batch 64 ms", "speed-up b64"], rows, "lrrrrrrr"), ""]
    out += _prune_sweep(prune)
    out += [f"_Raw: `{_results_rel}/prune.json`._"]
    return "\n".join(out)


def render_prune_accuracy(doc: dict[str, Any] | None, status: str | None) -> str:
    """Accuracy of the pruned + KD-recovered student next to the unpruned one."""
    out = ["### Accuracy after pruning (benchmarks/prune_accuracy.py)", ""]
    if status:
        return "\n".join([*out, status])
    st, summ = doc["settings"], doc["results"]["summary"]
    rows = [(f"teacher `{st.get('teacher', '?')}`", "", "", _acc(summ["teacher"]), ""),
            (f"student `{st.get('student', '?')}`, distilled", f"{doc['results']['runs'][0]['student']['params']:,}",
             f"{doc['results']['runs'][0]['student']['macs']:,}", _acc(summ["student"]), "")]
    drops = {}
    for name in st["settings"]:
        s = summ[name]
        cfg = st["settings"][name]
        drops[name] = s["drop_vs_student_pp"]["mean"]
        rows.append((f"pruned ({name}: ratio {cfg['ratio']:g}, round_to {cfg['round_to']}) + "
                     f"{cfg['recovery']['epochs']} epochs KD recovery", f"{s['params']:,}", f"{s['macs']:,}",
                     _acc(s["test_accuracy"]), f"{-drops[name]:+.2f} (worst seed {-s['drop_vs_student_pp']['max']:+.2f})"))
    out += [f"The pipeline's own path (`kdpipe.recipes`: train the teacher, distil the student, prune "
            f"with Torch-Pruning and recover by KD) on mnist5k with `{st['config'].split('/')[-1]}`, "
            f"seeds {st['seeds']}: test accuracy (%) on the held-out test split, mean ± std.", "",
            md_table(["model", "params", "MACs", "test acc. %", "vs unpruned (pp)"], rows, "lrrrr"), ""]
    if "default" in drops:
        out += [f"Goal: pruned within 1 point of the unpruned student — {_verdict(drops['default'] <= 1.0)} "
                f"({-drops['default']:+.2f} pp).", ""]
    out.append(_measured(doc))
    return "\n".join(out)


def _prune_sweep(prune: dict[str, Any]) -> list[str]:
    """The ratio x round_to sweep (bench_prune.py without --no-sweep), 1 thread."""
    families = prune.get("results", {}).get("families") or []
    out: list[str] = []
    for fam in families:
        rows = []
        for name, x in fam.get("pruned", {}).items():
            if name.startswith("default:") or "t1_b1_speedup" not in x:
                continue
            rows.append((name, ",".join(str(c) for c in sorted(set(x["channels"]))),
                         f"{x['macs_ratio']:.2f}×",
                         f"{x['t1_b1_speedup']:.2f}× ({x['t1_b1_efficiency']:.2f})",
                         f"{x['t1_b64_speedup']:.2f}× ({x['t1_b64_efficiency']:.2f})"))
        if not rows:
            continue
        overhead = fam.get("ort_overhead_p50_ms", {}).get("t1_b1")
        out += [f"Sweep, {fam['model']} (ONNX Runtime's own cost per call, a one-node graph: "
                f"{overhead:.4f} ms at batch 1):" if overhead is not None else f"Sweep, {fam['model']}:",
                "", md_table(["setting", "channel counts", "MACs ratio", "speed-up b1 (/MACs)",
                              "speed-up b64 (/MACs)"], rows, "lrrrr"), ""]
    return out


def render_pipeline(doc: dict[str, Any]) -> str:
    """Cold vs warm wall time and ZenML's overhead."""
    r = doc["results"]
    cold, warm = r["cold"], r["warm"]
    rows = [(phase, f"{x['wall_seconds']:.1f}", f"{x['step_compute_seconds']:.1f}",
             f"{x['zenml_overhead_seconds']:.1f} ({100 * x['overhead_fraction']:.0f} %)",
             ", ".join(x["cached_steps"]) or "none") for phase, x in (("cold", cold), ("warm", warm))]
    steps = list(cold["steps"])
    step_rows = [(name, _step_time(cold["steps"][name]), _step_time(warm["steps"].get(name))) for name in steps]
    return "\n".join([
        "## 4. Pipeline", "",
        f"`python run_pipeline.py --config {doc['settings']['config']}`"
        f"{' (what `make run` runs)' if doc['settings']['config'] == 'configs/default.yaml' else ''}, twice, in "
        "a fresh ZenML store and MLflow database (temporary directory). Wall time = the whole process; "
        "step compute = the sum of the steps' start→end times in ZenML's run records (a cached step "
        "counts 0); ZenML overhead = wall − step compute (interpreter and imports, store set-up, "
        "orchestration, the summary). Step times include ZenML's work inside a step (loading inputs, "
        "saving outputs), so the overhead is a lower bound.", "",
        md_table(["run", "wall s", "step compute s", "overhead s", "cached steps"], rows, "lrrrl"), "",
        f"Warm / cold wall time: {r['warm_over_cold']:.2f}.", "",
        md_table(["step", "cold s", "warm s"], step_rows, "lrr"), "", _measured(doc)])


def _step_time(step: dict[str, Any] | None) -> str:
    if step is None:
        return "-"
    if step["status"] == "cached":
        return "cached"
    return "-" if step["seconds"] is None else f"{step['seconds']:.1f}"


def render_gpu(doc: dict[str, Any] | None) -> str:
    """The GPU benchmark's table, or why there is none."""
    out = ["## 6. GPU (benchmarks/gpu.py)", ""]
    how = ("Run it on a machine with a CUDA GPU (needs only torch; it imports `kdpipe.models` and "
           "`kdpipe.losses` from `src/`): `python benchmarks/gpu.py --out benchmarks/results/gpu.json`, "
           "then `python benchmarks/run_all.py --report-only` to put the table here.")
    if doc is None or doc["results"]["device"]["device"] == "cpu":
        smoke = "" if doc is None else " (`--device cpu --quick` smoke test only)"
        return "\n".join(out + [
            f"**Not run here: this machine has no GPU**{smoke}. The script measures images/s of "
            "teacher forward + student training step at CIFAR size (resnet56 → resnet20, "
            "resnet32x4 → resnet8x4, batch 256, synthetic data on the device) in fp32, AMP bf16 and AMP "
            "bf16 + channels_last, with achieved TFLOP/s from counted MACs (student 3× forward, teacher "
            "1×), after correctness checks (finite losses; device fp32 = CPU fp32 on a small batch).",
            "", how])
    r = doc["results"]
    dev = r["device"]
    out += [f"Card: **{dev.get('gpu')}** (CUDA {dev.get('cuda')}, torch {dev.get('torch')}); checks passed: "
            f"{r['checks_passed']}. fp32 ran with TF32 matmul {dev.get('tf32_matmul')}, TF32 cuDNN "
            f"{dev.get('tf32_cudnn')}. Batch {doc['settings']['batch_size']}, synthetic data on the device.", ""]
    for pair in r["pairs"]:
        rows = [(m["mode"], f"{m['images_per_s']:.0f}", f"{m['ms_per_step']:.1f}", f"{m['tflops']:.1f}",
                 f"{m['speedup_vs_fp32']:.2f}×", f"{m.get('peak_memory_gib', 0):.1f}") for m in pair["modes"]]
        chk = pair["checks"]["device_vs_cpu_fp32"]
        out += [f"### {pair['teacher']} → {pair['student']}", "",
                md_table(["mode", "images/s", "ms/step", "TFLOP/s", "vs fp32", "peak GiB"], rows, "lrrrrr"), "",
                f"Device vs CPU (fp32): logits max |diff| {chk['student_logits_max_abs']:.1e}, loss rel "
                f"{chk['loss_rel']:.1e}, grad rel {chk['grad_rel']:.1e}: {'passed' if chk['passed'] else 'FAILED'}.", ""]
    out.append(_measured(doc))
    return "\n".join(out)


def render_repro() -> str:
    """The CIFAR-100 reproduction recipe (not run here)."""
    try:
        from kdpipe.configfile import load_config

        cfg = load_config(REPO_ROOT / "configs" / "cifar100_repro.yaml")
        t = cfg.student.train
        valid = (f"validated by `kdpipe.config.load_config`: {cfg.teacher.model.arch} → "
                 f"{cfg.student.model.arch}, {t.epochs} epochs, {t.optimizer} lr {t.lr}, milestones "
                 f"{list(t.step_milestones)} × {t.step_gamma}, wd {t.weight_decay}, batch {cfg.data.batch_size}, "
                 f"T = {cfg.distill.temperature}, α = {cfg.distill.kd_weight}, augment {cfg.data.augment}")
    except Exception as err:  # reported in the page: a broken recipe must be visible
        valid = f"**does not validate**: {err}"
    return "\n".join([
        "## 7. Reproduction recipe: CIFAR-100, resnet56 → resnet20", "",
        f"`configs/cifar100_repro.yaml` ({valid}).", "",
        md_table(["resnet20 on CIFAR-100 (test top-1 %)", "published (CRD, Tian et al. 2020)", "kdpipe"], [
            ("student alone", "69.06", "not run here"),
            ("logit KD (T = 4, α = 0.9)", "70.66", "not run here"),
            ("teacher resnet56", "72.34", "not run here")], "lrr"), "",
        "**Not run here** (240 epochs × 2 models need a GPU: about 2–3 GPU-hours). To run it: "
        "`python run_pipeline.py --config configs/cifar100_repro.yaml`; the student-alone baseline is "
        "the same file with `distill.kd_weight: 0.0`. Differences from the paper's code to keep in mind: "
        "kdpipe keeps the best-validation epoch (a 5k validation split carved out of the 50k training "
        "images) instead of the last epoch, trains on 45k images instead of 50k, and applies no weight "
        "decay to biases and BatchNorm scales."])


def render_headlines(results: dict[str, Any], run_info: dict[str, Any] | None) -> str:
    """One line per goal of the benchmark issue, with the measured value."""
    lines = ["## Headlines", ""]
    if _status("quality", results, run_info) is None:
        for source, ds in results["quality"]["results"]["datasets"].items():
            summ, cost = ds["summary"], ds["cost"]
            if "kd" not in summ["test_accuracy"] or "alone" not in summ["test_accuracy"]:
                continue
            acc = summ["test_accuracy"]
            ratio = cost["teacher"]["params"] / cost["student"]["params"]
            lines.append(f"- {source}: KD student {_acc(acc['kd'])} % vs student alone {_acc(acc['alone'])} % "
                         f"vs teacher {_acc(acc['teacher'])} %; {100 * summ['of_teacher']['kd']:.1f} % of the "
                         f"teacher's accuracy with 1/{ratio:.1f} of its params.")
    if _status("fashion", results, run_info) is None and (line := fashion_headline(results["fashion"])):
        lines.append(line)
    r = results.get("throughput", {}).get("results", {})
    if _status("throughput", results, run_info) is None and "variants" not in r:
        lines.append("- Training throughput: " + OLD_THROUGHPUT)
    elif _status("throughput", results, run_info) is None:
        v, g = r["variants"], r["goals"]
        short = {"torchdistill": "torchdistill", "kdpipe": "kdpipe without cache",
                 "kdpipe_cached": "kdpipe with cache"}
        parts = [f"{label} {v[name]['ratio_vs_plain']:.3f}×" for name, label in short.items() if name in v]
        lines.append("- Training throughput vs a plain PyTorch KD loop: " + ", ".join(parts) +
                     f" (goals: kdpipe ≥ 1.0× {_goal_text(g.get('kdpipe_vs_plain'), '{:.3f}×')}, ahead of "
                     f"torchdistill {_goal_text(g.get('kdpipe_vs_torchdistill'), '{:.3f}×')}, with cache ≥ 1.6× "
                     f"{_goal_text(g.get('kdpipe_cached_vs_plain'), '{:.3f}×')}).")
    if _status("inference", results, run_info) is None:
        rows = {(x["threads"], x["batch"]): x for x in results["inference"]["results"]["rows"]}
        best = ", ".join(f"batch {b} ({t} thr.) {x['eager_over_ort']:.2f}×" for (t, b), x in sorted(rows.items()))
        lines.append(f"- ONNX Runtime vs PyTorch eager latency (eager / ORT): {best}.")
    if _status("prune", results, run_info) is None:
        goal = results["prune"]["settings"]["goal"]
        for x in results["prune"]["rows"]:
            lines.append(f"- Pruned {x['model']}: {x['macs_ratio']:.2f}× fewer MACs → {x['speedup_b1']:.2f}× "
                         f"faster at batch 1, {x['speedup_b64']:.2f}× at batch 64 (ONNX Runtime, 1 thread): "
                         f"{x['speedup_over_macs_b1']:.2f} / {x['speedup_over_macs_b64']:.2f} of the MACs ratio "
                         f"(goal MACs ≥ {goal['macs_ratio']:g}× and ≥ {goal['speedup_over_macs']:.2f}: "
                         f"{_verdict(x['meets_goal'])}).")
    if _status("prune_accuracy", results, run_info) is None:
        summ = results["prune_accuracy"]["results"]["summary"]
        if "default" in summ:
            lines.append(f"- Pruned + KD-recovered student: {_acc(summ['default']['test_accuracy'])} % vs "
                         f"{_acc(summ['student'])} % unpruned "
                         f"({-summ['default']['drop_vs_student_pp']['mean']:+.2f} pp, goal ≥ -1: "
                         f"{_verdict(summ['default']['drop_vs_student_pp']['mean'] <= 1.0)}).")
    if _status("pipeline", results, run_info) is None:
        r = results["pipeline"]["results"]
        lines.append(f"- Pipeline (`{results['pipeline']['settings']['config']}`): cold {r['cold']['wall_seconds']:.0f} s, "
                     f"warm {r['warm']['wall_seconds']:.0f} s; ZenML overhead {r['cold']['zenml_overhead_seconds']:.0f} s "
                     f"cold, {r['warm']['zenml_overhead_seconds']:.0f} s warm.")
    if _status("quantize", results, run_info) is None:
        lines.append(quantize_headline(results["quantize"]))
    gpu = results.get("gpu")
    if gpu is None or gpu["results"]["device"]["device"] == "cpu":
        lines.append("- GPU: not run here (no GPU on this machine); `benchmarks/gpu.py` is ready.")
    lines.append("- CIFAR-100 resnet56 → resnet20 reproduction: recipe shipped, not run here.")
    return "\n".join(lines)


def render_report(results: dict[str, Any], run_info: dict[str, Any] | None, quick: bool) -> str:
    """The generated part of BENCHMARKS.md."""
    def section(name: str, render: Any) -> str:
        status = _status(name, results, run_info)
        title = {"quality": "## 1. Distillation quality", "throughput": "## 2. Training throughput",
                 "pipeline": "## 4. Pipeline", "onnx_teacher": "## 5. ONNX teacher",
                 "quantize": QUANTIZE_TITLE,
                 "fashion": FASHION_TITLE}[name]
        return f"{title}\n\n{status}" if status else render(results[name])

    parts = [render_header(results, run_info, quick),
             render_headlines(results, run_info),
             section("quality", render_quality),
             section("fashion", lambda doc: render_fashion(doc, _results_rel)),
             section("throughput", render_throughput),
             render_inference(results.get("inference"), results.get("prune"),
                              _status("inference", results, run_info), _status("prune", results, run_info)),
             render_prune_accuracy(results.get("prune_accuracy"), _status("prune_accuracy", results, run_info)),
             section("pipeline", render_pipeline),
             section("onnx_teacher", render_onnx_teacher),
             render_gpu(results.get("gpu")),
             render_repro(),
             section("quantize", render_quantize)]
    return "\n\n".join(parts)


def render_onnx_teacher(doc: dict[str, Any]) -> str:
    """The same teacher as a PyTorch bundle and as ONNX, distilling the same student."""
    st, r = doc["settings"], doc["results"]
    goals, runs = r["goals"], r["runs"]
    rows = [(name, f"{100 * r['teacher_test_accuracy'][key]:.2f}",
             f"{100 * runs[key][0]['test_accuracy']:.2f}",
             ", ".join(f"{x['seconds']:.1f}" for x in runs[key]))
            for name, key in (("PyTorch bundle", "pytorch"), ("ONNX (kdpipe export)", "onnx"))]
    return "\n".join([
        "## 5. ONNX teacher", "",
        f"Teacher `{st['teacher']}` ({st['teacher_epochs']} epochs on {st['source']}) once as a "
        f"PyTorch bundle, once exported to ONNX (`{st['exporter']}` exporter, declared "
        "preprocessing: raw [0, 1] pixels) and run by ONNX Runtime; each distils the same student "
        f"`{st['student']}` ({st['student_epochs']} epochs, same seed and settings, cached teacher "
        f"logits: {st['cache_teacher_logits']}) in {st['rounds']} interleaved round(s).", "",
        md_table(["teacher", "teacher test acc. %", "student test acc. %", "distillation s per round"],
                 rows, "lrrr"), "",
        f"Goals: student accuracies within 0.1 points — "
        f"{_verdict(goals['accuracy_within_0.1pp']['met'])} "
        f"({goals['accuracy_within_0.1pp']['value']:.2f} pp); teacher logits within the parity "
        f"tolerance {r['logits']['tolerance']:g} on all {r['logits']['samples']} train images — "
        f"{_verdict(goals['logits_within_tolerance']['met'])} (max abs diff "
        f"{r['logits']['max_abs_diff']:.1e}, argmax agreement "
        f"{100 * r['logits']['argmax_agreement']:.2f} %); ONNX teacher's distillation ≤ 1.1× the "
        f"PyTorch teacher's time — {_verdict(goals['time_ratio_at_most_1.1']['met'])} "
        f"({goals['time_ratio_at_most_1.1']['value']:.3f}× wall time, median over rounds; "
        f"per round {', '.join(f'{x:.3f}' for x in r['time_ratios'])}; CPU time "
        f"{', '.join(f'{x:.3f}' for x in r.get('cpu_time_ratios', []))}).", "",
        *_noise_floor_lines(r.get("noise_floor")),
        _measured(doc)])


def _noise_floor_lines(floor: dict[str, Any] | None) -> list[str]:
    """How far students drift when their teachers differ only by float rounding."""
    if not floor:
        return []
    rows = floor["seeds"]
    diffs = ", ".join(f"seed {x['seed']}: {x['diff_pp']:.2f}" for x in rows)
    return [f"Noise floor (same run): the same PyTorch teacher with its logits moved by at most "
            f"{floor['eps']:.1e} (the measured ONNX difference) gives students "
            f"{diffs} pp away from the unmoved teacher's (max "
            f"{max(x['diff_pp'] for x in rows):.2f} pp). A single-seed gap at or below that is float "
            "rounding amplified by training, not a difference between the teachers.", ""]


def main(argv: Sequence[str] | None = None) -> int:
    """Run, record, report; the exit code is 1 if any benchmark failed."""
    args = parse_args(argv)
    global _results_rel
    results_dir = RESULTS_DIR / "quick" if args.quick else RESULTS_DIR
    _results_rel = str(results_dir.relative_to(REPO_ROOT))
    report_path = results_dir / "BENCHMARKS.md" if args.quick else BENCHMARKS_MD
    status_path = results_dir / "run_all.json"
    statuses: dict[str, Any] = {}
    if status_path.exists():  # keep the status of benchmarks not re-run this time
        statuses = read_json(status_path)["results"].get("benchmarks", {})
    if not args.report_only:
        load = _load_note()
        start = time.perf_counter()
        for bench in BENCHMARKS:
            if bench.name in args.only:
                statuses[bench.name] = run_benchmark(bench, results_dir, args.quick)
                # After every benchmark: an interrupted run still leaves an honest status file.
                write_json(status_path, envelope("run_all", {"quick": args.quick, "only": args.only},
                                                 {"benchmarks": statuses, "load_at_start": load,
                                                  "seconds": time.perf_counter() - start}))
    run_info = read_json(status_path) if status_path.exists() else None
    text = render_report(load_results(results_dir), run_info, quick=args.quick)
    write_report(report_path, text)
    print(f"wrote {report_path.relative_to(REPO_ROOT)}")
    return 0 if all(s.get("ok") for s in statuses.values()) else 1


def _load_note() -> dict[str, Any]:
    """Load average at the start: a busy shared machine makes every timing pessimistic."""
    import os

    load = os.getloadavg()
    cores = usable_cores()
    if load[0] > cores:
        print(f"warning: load average {load[0]:.1f} > {cores} cores: timings will be pessimistic "
              "(ratios are measured in the same run, so they stay comparable)", flush=True)
    return {"load_average": load, "cores": cores}


def write_report(path: Path, generated: str) -> None:
    """Keep the hand-written part above the marker (or the default preamble), replace the rest."""
    preamble = DEFAULT_PREAMBLE
    if path.exists():
        text = path.read_text()
        if GENERATED_MARKER in text:
            preamble = text.split(GENERATED_MARKER, 1)[0].rstrip() + "\n\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(preamble + GENERATED_MARKER + "\n\n" + generated.rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(main())
