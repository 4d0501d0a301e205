"""Scheduled retraining: turn ``--schedule "CRON"`` into a ZenML ``Schedule``.

ZenML hands a schedule to the stack's orchestrator, and only some orchestrators can
run one: the local orchestrator cannot, Kubernetes turns it into a CronJob, Kubeflow
into a KFP recurring run. This module checks both sides before anything is compiled:

- :func:`validate_cron` / :func:`make_schedule`: a standard 5-field cron expression
  (minute hour day-of-month month day-of-week), checked field by field, so a typo
  fails here with the field's name instead of inside the cluster.
- :func:`ensure_stack_can_schedule`: the active stack's orchestrator must be
  schedulable (ZenML's own ``orchestrator.config.is_schedulable``); otherwise a
  :class:`ScheduleNotSupportedError` names the orchestrator and points to
  docs/cluster.md.
- :func:`prepare_schedule`: the one call ``run_pipeline.py`` makes; it covers both
  ``--schedule`` and a ``schedule:`` block inside the YAML.

Kubeflow Pipelines reads cron expressions with a leading *seconds* field (6 fields,
robfig/cron format) and ZenML 0.98 passes the expression through unchanged, so for a
Kubeflow orchestrator a 5-field expression gets ``0`` seconds prepended.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zenml.config.schedule import Schedule

CLUSTER_DOCS = "docs/cluster.md"
KUBEFLOW_FLAVOR = "kubeflow"

# (name, lowest, highest, symbolic names) per cron field. Bounds follow robfig/cron's
# standard parser, which both Kubernetes CronJobs and Kubeflow Pipelines use: day of
# week is 0-6 (0 = Sunday), so 7 is rejected rather than silently meaning Sunday.
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)
_SECONDS_FIELD = ("second", 0, 59, ())
_EXAMPLE = '"0 2 * * *" (every day at 02:00 UTC)'


class CronError(ValueError):
    """A cron expression that the cluster's scheduler would reject."""


class ScheduleNotSupportedError(RuntimeError):
    """The active stack's orchestrator cannot run scheduled pipelines."""


# ----------------------------------------------------------------------------- cron
def _field_value(token: str, name: str, low: int, high: int, names: tuple[str, ...]) -> int:
    """One number (or JAN/MON-style name) of a cron field, range-checked."""
    upper = token.upper()
    if upper in names:
        # Months count from 1, days of the week from 0 (SUN).
        return names.index(upper) + low
    if not token.isdigit():
        allowed = f" or one of {', '.join(names)}" if names else ""
        raise CronError(f"{name} field: {token!r} is not a number{allowed}")
    value = int(token)
    if not low <= value <= high:
        raise CronError(f"{name} field: {value} is outside {low}-{high}")
    return value


def _check_item(item: str, field: tuple[str, int, int, tuple[str, ...]]) -> None:
    """Check one comma-separated item: ``*``, ``?``, ``n``, ``a-b``, any of those ``/step``."""
    name, low, high, names = field
    base, _, step = item.partition("/")
    if step and (not step.isdigit() or int(step) < 1):
        raise CronError(f"{name} field: step {step!r} in {item!r} must be a positive integer")
    if base == "?" and name in {"day of month", "day of week"} and not step:
        return  # robfig/cron accepts '?' as "no specific value" for the day fields
    if base == "*":
        return
    start, dash, end = base.partition("-")
    first = _field_value(start, name, low, high, names)
    if dash:
        last = _field_value(end, name, low, high, names)
        if first > last:
            raise CronError(f"{name} field: range {base!r} runs backwards")


def validate_cron(expression: str, *, allow_seconds: bool = False) -> str:
    """Check a cron expression field by field and return it with single spaces.

    Args:
        expression: ``minute hour day-of-month month day-of-week``, e.g. ``"0 2 * * *"``.
            Each field takes ``*``, numbers, ranges ``a-b``, lists ``a,b`` and steps
            ``*/n``; months and days also take names (``JAN``, ``MON``).
        allow_seconds: Also accept Kubeflow's 6-field form with a leading seconds field.

    Returns:
        The normalised expression.

    Raises:
        CronError: Naming the field and value that is wrong, with an example.
    """
    fields = expression.split()
    if expression.strip().startswith("@"):
        raise CronError(
            f"cron macros such as {expression.strip()!r} are not portable across "
            f"orchestrators; write the 5 fields instead, e.g. {_EXAMPLE}"
        )
    layout = _FIELDS
    if allow_seconds and len(fields) == 6:
        layout = (_SECONDS_FIELD, *_FIELDS)
    if len(fields) != len(layout):
        raise CronError(
            f"cron expression {expression!r} has {len(fields)} field(s); expected 5: "
            f"minute hour day-of-month month day-of-week, e.g. {_EXAMPLE}"
        )
    try:
        for token, field in zip(fields, layout, strict=True):
            for item in token.split(","):
                if not item:
                    raise CronError(f"{field[0]} field: empty list item in {token!r}")
                _check_item(item, field)
    except CronError as err:
        raise CronError(f"cron expression {expression!r}: {err}; e.g. {_EXAMPLE}") from None
    return " ".join(fields)


def make_schedule(
    cron: str, *, orchestrator_flavor: str | None = None, name: str | None = None
) -> Schedule:
    """Build the ZenML schedule for a validated cron expression.

    Args:
        cron: A 5-field cron expression (see :func:`validate_cron`); evaluated in the
            scheduler's time zone, UTC on most clusters.
        orchestrator_flavor: The flavor that will run it. ``kubeflow`` gets the
            6-field form Kubeflow Pipelines expects (seconds = 0 prepended); a
            6-field expression is accepted only for that flavor.
        name: Optional schedule name; ZenML derives one from the run name otherwise.

    Returns:
        A ``Schedule`` with ``cron_expression`` set and ``catchup`` off, so a paused
        schedule does not replay every missed night when it resumes.

    Raises:
        CronError: If the expression is malformed.
    """
    is_kubeflow = orchestrator_flavor == KUBEFLOW_FLAVOR
    expression = validate_cron(cron, allow_seconds=is_kubeflow)
    if is_kubeflow and len(expression.split()) == 5:
        expression = f"0 {expression}"
    return Schedule(name=name, cron_expression=expression, catchup=False)


# ---------------------------------------------------------------------------- stack
def ensure_stack_can_schedule() -> str:
    """Check that the active ZenML stack's orchestrator can run schedules.

    Returns:
        The orchestrator's flavor name (e.g. ``kubernetes``), for :func:`make_schedule`.

    Raises:
        ScheduleNotSupportedError: Naming the stack, the orchestrator and its flavor,
            and pointing to docs/cluster.md.
    """
    from zenml.client import Client  # a Client touches the store: only when asked

    stack = Client().active_stack
    orchestrator = stack.orchestrator
    # The same property ZenML checks when it registers a schedule, asked before any
    # compile or image build so the error comes first and reads clearly.
    if not orchestrator.config.is_schedulable:
        raise ScheduleNotSupportedError(
            f"the active stack '{stack.name}' uses the orchestrator '{orchestrator.name}' "
            f"(flavor '{orchestrator.flavor}'), which cannot run scheduled pipelines. "
            "Register and activate a stack with a schedulable orchestrator (kubernetes or "
            f"kubeflow) as described in {CLUSTER_DOCS}, or run once without --schedule "
            "(and without a schedule: block in the config)."
        )
    return orchestrator.flavor


def prepare_schedule(cron: str | None, run_config: Mapping[str, Any]) -> Schedule | None:
    """The schedule a run asks for, checked against the cron grammar and the stack.

    ``--schedule`` wins over a ``schedule:`` block in the run configuration; the
    block's other keys (name, catchup, start/end time) are kept. Without either,
    nothing is checked and no ZenML client is created.

    Args:
        cron: The ``--schedule`` value, or None.
        run_config: The whole run-configuration mapping read from the YAML.

    Returns:
        The ``Schedule`` to pass to ``pipeline.with_options(schedule=...)``, or None for
        a one-off run.

    Raises:
        CronError: If either cron expression is malformed.
        ScheduleNotSupportedError: If a schedule is asked for on a stack that cannot
            run one (e.g. the local orchestrator).
    """
    block = dict(run_config.get("schedule") or {})
    if cron is None and not block:
        return None
    expression = cron if cron is not None else block.get("cron_expression")
    if expression is not None:
        # Syntax first: a typo should be reported as such, whatever the stack. The
        # field count is settled below, once the orchestrator's flavor is known.
        validate_cron(expression, allow_seconds=True)
    flavor = ensure_stack_can_schedule()
    if expression is None:
        # interval/start-time schedules are passed through: ZenML validates them and
        # the orchestrator decides (Kubernetes refuses them, naming the fix).
        return Schedule.model_validate(block)
    schedule = make_schedule(expression, orchestrator_flavor=flavor, name=block.get("name"))
    return Schedule.model_validate({**block, "cron_expression": schedule.cron_expression})
