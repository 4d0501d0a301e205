"""Run a kdpipe pipeline from a run-configuration YAML.

    python run_pipeline.py                                   # configs/default.yaml
    python run_pipeline.py --config configs/smoke.yaml --run-name try-1
    python run_pipeline.py --pipeline predict --config configs/predict.yaml
    python run_pipeline.py --schedule "0 2 * * *"            # on a stack that can schedule

Exit codes: 0 success; 1 a step failed (named, with its cause; ``--debug`` for the full
trace); 2 bad configuration or arguments (nothing ran).

The configuration is validated before ZenML is touched, so a typo costs a second, not a
pipeline run. Every value comes from the YAML (defaults live in kdpipe.config only).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Any

from kdpipe.config import ConfigError
from kdpipe.configfile import load_config, load_predict_config, read_yaml
from kdpipe.preflight import preflight
from kdpipe.user_code import activate
from kdpipe.validate import ConfigProblems, find_problems, find_warnings

DEFAULT_CONFIG = "configs/default.yaml"
EXIT_STEP_FAILED = 1
EXIT_BAD_CONFIG = 2
SUMMARY_MODELS = ("teacher", "student", "pruned_student", "onnx", "onnx_int8")
SUMMARY_LABELS = {"onnx": "student (ONNX)", "onnx_int8": "student (ONNX INT8)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (argparse exits with 2 on a malformed command line)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"run-configuration YAML (default: {DEFAULT_CONFIG})")
    parser.add_argument("--pipeline", choices=("distill", "predict"), default="distill",
                        help="distill: train, evaluate, gate and promote (default); "
                             "predict: batch inference with the promoted champion")
    parser.add_argument("--no-cache", action="store_true",
                        help="re-run every step instead of reusing cached outputs")
    parser.add_argument("--run-name", help="name of this pipeline run (default: ZenML's)")
    parser.add_argument("--schedule", metavar="CRON",
                        help='run on a cron schedule, e.g. "0 2 * * *" (needs an orchestrator '
                             "that can schedule; see docs/cluster.md)")
    parser.add_argument("--debug", action="store_true",
                        help="print full tracebacks (they are always in the step logs)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------ validation
def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Check the YAML before any ZenML work; return the raw run configuration.

    Raises:
        ConfigError: missing file, bad YAML, unknown top-level key, bad ``parameters``.
    """
    raw = read_yaml(args.config)
    if args.pipeline == "distill":
        # Every problem of `parameters:` at once, keys named: types and ranges, then names,
        # model options and layer paths (kdpipe.validate; models built on the meta device).
        # Then what the run needs from outside the config (kdpipe.preflight): folders,
        # dataset files, checkpoints, pretrained weights cached or downloadable.
        config = load_config(args.config)
        activate(config, args.config)  # its own model code: importable from its folder, trusted
        problems = find_problems(config) + preflight(config)
        if problems:
            raise ConfigProblems(problems, args.config)
        for warning in find_warnings(config):  # allowed, but probably not what was meant
            print(f"WARNING: {warning}", file=sys.stderr)
    else:
        load_predict_config(args.config)
    _check_run_config_keys(raw, args.config)
    return raw


def _check_run_config_keys(raw: dict[str, Any], path: str) -> None:
    """ZenML silently ignores unknown top-level keys; a typo there should fail instead."""
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    unknown = sorted(set(raw) - set(PipelineRunConfiguration.model_fields))
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(sorted(PipelineRunConfiguration.model_fields))} "
            "(kdpipe's own settings go under `parameters:`)")


# ----------------------------------------------------------------------- running
def init_zenml_store() -> None:
    """Create (or open) the ZenML store under a file lock.

    Two runs started at once on a machine without a ZenML store would both create and
    migrate its database, and one fails ("database has never been migrated with
    alembic"). The lock file sits in ZenML's config directory; once the store exists,
    taking the lock costs nothing measurable.
    """
    import fcntl
    from pathlib import Path

    from zenml.utils.io_utils import get_global_config_directory

    directory = Path(get_global_config_directory())
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".kdpipe-init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        from zenml.client import Client

        Client().active_stack_model  # noqa: B018 - creates and migrates the store


def check_stack(config_path: str, raw: dict[str, Any]) -> None:
    """One message for the settings the active stack ignores; refuse what it cannot run.

    Raises:
        StackMismatchError: a step asks for a component the stack lacks (exit code 2).
    """
    from zenml.client import Client

    from pipelines.stack_fit import (
        StackMismatchError,
        check_stack_fit,
        format_report,
        silence_reported_zenml_warnings,
    )

    stack = Client().active_stack_model
    findings = check_stack_fit(raw, stack)
    if not findings:
        return
    report = format_report(config_path, stack, findings)
    if any(f.fatal for f in findings):
        raise StackMismatchError(report)
    print(f"WARNING: {report}", file=sys.stderr)
    silence_reported_zenml_warnings()


def build_pipeline(args: argparse.Namespace, raw: dict[str, Any]) -> Any:
    """The configured pipeline object (schedule, cache and run name applied)."""
    from pipelines.schedule import prepare_schedule

    schedule = prepare_schedule(args.schedule, raw)  # before the (slower) pipeline import
    if args.pipeline == "distill":
        from pipelines.distillation import distillation_pipeline as pipeline
    else:
        from pipelines.predict import predict_pipeline as pipeline
    options: dict[str, Any] = {"config_path": args.config}
    if schedule is not None:
        options["schedule"] = schedule
    if args.no_cache:
        options["enable_cache"] = False
    if args.run_name:
        options["run_name"] = args.run_name
    return pipeline.with_options(**options)


def _failed_step(pipeline_name: str) -> tuple[str | None, Any]:
    """Name and recorded ``ExceptionInfo`` of the failed step in the latest run, if any."""
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    try:
        run = Client().get_pipeline(pipeline_name).last_run
    except (KeyError, RuntimeError):
        return None, None
    for name, step in run.steps.items():
        if step.status == ExecutionStatus.FAILED:
            return name, step.exception_info
    return None, None


class _DropTraceback(logging.Filter):
    """Keep a log record's message, drop its traceback (ZenML logs every step failure
    with the orchestrator's internal frames; the cause alone is printed instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def quiet_step_tracebacks() -> None:
    """Stop the local orchestrator from printing a traceback wall for a failed step."""
    logging.getLogger("zenml.orchestrators.local.local_orchestrator").addFilter(_DropTraceback())


def report_failure(err: BaseException, pipeline_name: str, debug: bool) -> None:
    """Print the failed step and its cause, without a wall of internal frames."""
    step, info = _failed_step(pipeline_name)
    where = f"step '{step}' failed" if step else "the pipeline failed"
    recorded = info.traceback.strip().splitlines()[-1] if info and info.traceback else None
    print(f"\nERROR: {where}: {recorded or f'{type(err).__name__}: {err}'}", file=sys.stderr)
    if debug:
        print(info.traceback if info and info.traceback else "", file=sys.stderr)
        traceback.print_exception(err)
    else:
        print("  (full traceback: re-run with --debug, or see the step's logs in the ZenML "
              "dashboard)", file=sys.stderr)


# ----------------------------------------------------------------------- summary
def _load_output(run: Any, step: str, output: str) -> Any | None:
    step_run = run.steps.get(step)
    if step_run is None or output not in step_run.outputs:
        return None
    return step_run.outputs[output][0].load()


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(evaluation: Any) -> str:
    """Accuracy, params, MACs, size and latency per model, as a fixed-width table."""
    batch_sizes = sorted({s.batch_size for ev in evaluation.models.values() for s in ev.latency})
    lat_heads = [f"p50 b{b} (ms)" for b in batch_sizes]
    head = ["model", "accuracy", "params", "MACs", "size (MB)", *lat_heads]
    rows = [head]
    for name in SUMMARY_MODELS:
        ev = evaluation.models.get(name)
        if ev is None:
            continue
        lat = [_fmt(getattr(ev.latency_at(b), "p50_ms", None), ".3f") for b in batch_sizes]
        size = None if ev.size_bytes is None else ev.size_bytes / 1e6
        label = SUMMARY_LABELS.get(name, name)
        rows.append([label, f"{ev.accuracy:.4f}", _fmt(ev.params, ","), _fmt(ev.macs, ","),
                     _fmt(size, ".3f"), *lat])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_summary(run: Any) -> None:
    """The terminal summary of a finished distillation run, read from its artifacts."""
    from kdpipe.tracking import redact_uri, resolve_tracking_uri

    print(f"\n=== kdpipe run {run.name}: {run.status.value} ===")
    evaluation = _load_output(run, "evaluate_models", "evaluation")
    if evaluation is not None:
        print(summary_table(evaluation))
        print(f"ONNX Runtime vs PyTorch parity: max |diff| = {evaluation.parity_max_abs_diff:.3g}")
        int8 = evaluation.models.get("onnx_int8")
        if int8 is not None:
            print(f"INT8 vs FP32 ONNX: argmax agreement {int8.agreement:.4f}")
    quantized = _load_output(run, "quantize_onnx", "student_onnx_int8")
    if quantized is not None:
        print(quantized.reason)
    decision = _load_output(run, "gate_student", "gate_decision")
    if decision is not None:
        print(f"\n{decision.summary()}")
    promotion = _load_output(run, "promote_student", "promotion")
    if promotion is not None:
        print(f"Promotion: {promotion.summary()}")
    card = _load_output(run, "publish_model_card", "model_card")
    if card is not None:
        from kdpipe.frontier import frontier_table

        print(f"\n{frontier_table(card.frontier)}\n\nModel card: {card.summary()}")
    if run.model_version is not None:
        mv = run.model_version
        print(f"Model version: {mv.model.name} version {mv.name} (stage: "
              f"{mv.stage or 'none'})")
    uri = resolve_tracking_uri()
    print("\nWhere to look next:")
    if uri.startswith("sqlite:"):
        print(f"  MLflow UI:       mlflow ui --backend-store-uri {uri}")
    else:
        print(f"  MLflow UI:       {redact_uri(uri)}")
    print("  ZenML dashboard: zenml login --local")


def main(argv: list[str] | None = None) -> int:
    """Validate, run, summarise; return the process exit code."""
    args = parse_args(argv)
    # Plain tracebacks (and only with --debug); must be set before zenml is imported.
    os.environ.setdefault("ZENML_ENABLE_RICH_TRACEBACK", "false")
    try:
        raw = validate(args)
    except ConfigError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    from pipelines.schedule import CronError, ScheduleNotSupportedError
    from pipelines.stack_fit import StackMismatchError

    try:
        init_zenml_store()
        check_stack(args.config, raw)
        pipeline = build_pipeline(args, raw)
    except (CronError, ScheduleNotSupportedError, StackMismatchError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if not args.debug:
        quiet_step_tracebacks()
    try:
        run = pipeline()
    except Exception as err:  # reported with the step's name; exit code says it failed
        report_failure(err, pipeline.name, args.debug)
        return EXIT_STEP_FAILED
    if args.schedule or raw.get("schedule"):
        print(f"Scheduled pipeline {pipeline.name} ({args.schedule or raw['schedule']}).")
        return 0
    if run is not None and args.pipeline == "distill":
        from zenml.client import Client

        print_summary(Client().get_pipeline_run(run.id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
