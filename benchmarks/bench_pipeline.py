"""Pipeline wall time, cold and warm, and how much of it is ZenML rather than the steps.

Runs ``run_pipeline.py --config configs/default.yaml`` (what ``make run`` runs) twice in
a fresh, isolated world: a new ZenML store and a new MLflow database in a temporary
directory (``ZENML_CONFIG_PATH``, ``ZENML_LOCAL_STORES_PATH``, ``MLFLOW_TRACKING_URI``),
so nothing the user has is read or touched.

* cold: the first run. It creates the ZenML store and the MLflow database and trains
  everything.
* warm: the same command again. Training steps are served from ZenML's cache; the
  steps that never cache (ingest, gate, promotion) run again.

Each run's wall time is measured around the whole process (interpreter start, imports,
validation, the run, the summary). The steps' own times come from ZenML's run records
(``Client().get_pipeline_run(name).steps[step].start_time / end_time``, read in a
subprocess with the same environment); a cached step did no compute and counts as 0.
ZenML's overhead = wall time - the sum of the step times. A step's time still includes
ZenML's work inside it (loading inputs, materialising outputs), so this overhead is a
lower bound on what the orchestration costs.

    python benchmarks/bench_pipeline.py                      # ~3-5 min on 2 CPU cores
    python benchmarks/bench_pipeline.py --config configs/smoke.yaml --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import REPO_ROOT, default_out, envelope, write_json

NAME = "pipeline"

# Read in a subprocess: this script never imports zenml, so the store it reads is
# certainly the isolated one (ZenML reads its environment when first imported).
_RECORDS_SCRIPT = r"""
import json, sys
from zenml.client import Client

def iso(t):
    return None if t is None else t.isoformat()

def seconds(a, b):
    return None if a is None or b is None else (b - a).total_seconds()

out = {}
client = Client()
for name in sys.argv[1:]:
    run = client.get_pipeline_run(name)
    steps = {}
    for step_name, step in run.steps.items():
        steps[step_name] = {"status": step.status.value, "start": iso(step.start_time),
                            "end": iso(step.end_time),
                            "seconds": seconds(step.start_time, step.end_time)}
    out[name] = {"status": run.status.value, "start": iso(run.start_time), "end": iso(run.end_time),
                 "seconds": seconds(run.start_time, run.end_time), "steps": steps}
print("RECORDS " + json.dumps(out))
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml", help="run configuration (repo-relative)")
    p.add_argument("--quick", action="store_true",
                   help="use configs/smoke.yaml unless --config is given: a smoke test")
    p.add_argument("--timeout", type=float, default=1500.0, help="seconds per pipeline run")
    p.add_argument("--keep", type=Path, default=None,
                   help="keep the store, database and logs in this folder instead of a temp dir")
    p.add_argument("--out", type=Path, default=default_out(NAME))
    args = p.parse_args(argv)
    if args.quick and args.config == "configs/default.yaml":
        args.config = "configs/smoke.yaml"
    return args


def isolated_env(root: Path) -> dict[str, str]:
    """The environment of a fresh ZenML store and MLflow database under ``root``."""
    env = dict(os.environ)
    env.update({
        "ZENML_CONFIG_PATH": str(root / "zenml_config"),
        "ZENML_LOCAL_STORES_PATH": str(root / "zenml_stores"),
        "ZENML_ANALYTICS_OPT_IN": "false",
        "ZENML_ENABLE_RICH_TRACEBACK": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def run_pipeline(config: str, run_name: str, env: dict[str, str], log: Path, timeout: float) -> dict[str, Any]:
    """Run the pipeline CLI once; return its wall time and exit code (output goes to ``log``)."""
    cmd = [sys.executable, "run_pipeline.py", "--config", config, "--run-name", run_name]
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)
    wall = time.perf_counter() - start
    print(f"  {run_name}: exit {proc.returncode}, {wall:.1f} s (log: {log})", flush=True)
    return {"run_name": run_name, "exit_code": proc.returncode, "wall_seconds": wall, "log": str(log)}


def read_records(run_names: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Step start/end times of the named runs, from the isolated ZenML store."""
    proc = subprocess.run([sys.executable, "-c", _RECORDS_SCRIPT, *run_names], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RECORDS "):
            return json.loads(line[len("RECORDS "):])
    raise RuntimeError(f"could not read the ZenML run records (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def summarize(run: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """Wall time, step compute (cached steps = 0) and the overhead between them."""
    steps = record["steps"]
    computed = {n: s["seconds"] or 0.0 for n, s in steps.items() if s["status"] != "cached"}
    step_sum = sum(computed.values())
    return {**run, "status": record["status"], "zenml_run_seconds": record["seconds"],
            "step_seconds": computed, "cached_steps": sorted(n for n, s in steps.items() if s["status"] == "cached"),
            "steps": steps, "step_compute_seconds": step_sum,
            "zenml_overhead_seconds": run["wall_seconds"] - step_sum,
            "overhead_fraction": (run["wall_seconds"] - step_sum) / run["wall_seconds"]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Cold run, warm run, records; write the JSON result and return it."""
    args = parse_args(argv)
    tag = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        env = isolated_env(root)
        print(f"pipeline {args.config} in an isolated store under {root}", flush=True)
        runs = {phase: run_pipeline(args.config, f"bench-{phase}-{tag}", env, root / f"{phase}.log", args.timeout)
                for phase in ("cold", "warm")}
        failed = {p: r for p, r in runs.items() if r["exit_code"] != 0}
        if failed:
            tails = {p: Path(r["log"]).read_text()[-3000:] for p, r in failed.items()}
            raise SystemExit(f"pipeline run(s) failed: {sorted(failed)}\n"
                             + "\n".join(f"--- {p} ---\n{t}" for p, t in tails.items()))
        records = read_records([r["run_name"] for r in runs.values()], env)
    if args.keep is None:  # the logs went with the temporary directory
        for run in runs.values():
            run["log"] = None
    results = {phase: summarize(run, records[run["run_name"]]) for phase, run in runs.items()}
    for phase, r in results.items():
        print(f"{phase}: wall {r['wall_seconds']:.1f} s, steps {r['step_compute_seconds']:.1f} s, "
              f"overhead {r['zenml_overhead_seconds']:.1f} s ({r['overhead_fraction']:.0%}); "
              f"cached: {', '.join(r['cached_steps']) or 'none'}")
    results["warm_over_cold"] = results["warm"]["wall_seconds"] / results["cold"]["wall_seconds"]
    settings = {"config": args.config, "quick": args.quick}
    doc = envelope(NAME, settings, results)
    write_json(args.out, doc)
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
