"""Does a run configuration fit the active ZenML stack? One readable answer, before compiling.

A cluster config (configs/cluster/*.yaml) carries settings for components a local stack
does not have: Kubernetes pod settings, a Docker image, GPU resources, an MLflow tracker.
ZenML handles each on its own and differently: pod settings are dropped with an
info-level line per step, Docker settings are dropped silently, resources get one
warning per step at run time, and a step that asks for an experiment tracker the stack
lacks stops the compile with a StackValidationError. :func:`check_stack_fit` collects
all of them into one report: what will be ignored and why, and what cannot run at all.

``run_pipeline.py`` prints the report once, refuses to start when something cannot run
(exit code 2, nothing ran), and otherwise silences ZenML's own per-step lines about the
same settings (:func:`silence_reported_zenml_warnings`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zenml.utils.settings_utils import is_stack_component_setting_key

CLUSTER_DOCS = "docs/cluster.md"
LOCAL_FLAVOR = "local"

# ZenML's own messages for the settings reported here (filtered once kdpipe reported them).
_ZENML_MESSAGES = (
    "Not including stack component settings with key",
    "Specifying step resources is not supported for the local orchestrator",
)


@dataclass
class Finding:
    """One setting (or request) that the active stack ignores or cannot satisfy."""

    key: str
    why: str
    fatal: bool = False
    places: list[str] = field(default_factory=list)


class StackMismatchError(RuntimeError):
    """The configuration asks for stack components the active stack does not have."""


@dataclass(frozen=True)
class _Component:
    name: str
    flavor: str


def _components(stack: Any) -> dict[str, _Component]:
    """``{component type: _Component}`` of a ZenML stack model (``Client().active_stack_model``).

    A stack holds at most one component per type in ZenML 0.98 (the list is the API's shape).
    """
    return {
        kind.value: _Component(parts[0].name, parts[0].flavor_name)
        for kind, parts in stack.components.items()
        if parts
    }


def _describe(component: _Component) -> str:
    return f"'{component.name}' (flavor {component.flavor})"


def _component_setting_why(key: str, components: Mapping[str, _Component]) -> str | None:
    """Why a ``<type>``, ``<type>.<flavor>`` or ``<type>:<name>`` setting is dropped, or None."""
    name = flavor = None
    if ":" in key:
        kind, name = key.split(":", 1)
    elif "." in key:
        kind, flavor = key.split(".", 1)
    else:
        kind = key
    label = kind.replace("_", " ")
    component = components.get(kind)
    if component is None:
        return f"the stack has no {label}"
    if name is not None and component.name != name:
        return f"the stack's {label} is {_describe(component)}, not '{name}'"
    if flavor is not None and component.flavor != flavor:
        return f"the stack's {label} is {_describe(component)}, not {flavor}"
    return None


def _setting_why(key: str, components: Mapping[str, _Component]) -> str | None:
    """Why the active stack ignores settings ``key`` (None when it applies them)."""
    orchestrator = components.get("orchestrator")
    local = orchestrator is not None and orchestrator.flavor == LOCAL_FLAVOR
    if key == "docker":
        if local and "step_operator" not in components:
            return ("the local orchestrator runs every step in this process: no Docker image "
                    "is built")
        return None
    if key == "resources":
        if local:
            return ("the local orchestrator does not allocate CPUs, GPUs or memory: steps use "
                    "this machine as it is")
        return None
    if not is_stack_component_setting_key(key):
        return None  # other general settings (e.g. deployment) are not stack-dependent
    return _component_setting_why(key, components)


def check_stack_fit(raw: Mapping[str, Any], stack: Any) -> list[Finding]:
    """Compare a run configuration's stack-dependent requests with ``stack``.

    Args:
        raw: the run-configuration YAML as a dict (``settings``, ``steps``).
        stack: the stack model the pipeline would run on (``Client().active_stack_model``).

    Returns:
        One :class:`Finding` per (key, reason), listing where it was configured; fatal
        ones mean ZenML would refuse to run (a step asks for a component the stack lacks).
    """
    components = _components(stack)
    findings: dict[tuple[str, str], Finding] = {}

    def add(key: str, why: str, place: str, fatal: bool = False) -> None:
        finding = findings.setdefault((key, why), Finding(key, why, fatal))
        finding.places.append(place)

    def scan_settings(settings: Mapping[str, Any] | None, place: str) -> None:
        for key in settings or {}:
            why = _setting_why(key, components)
            if why is not None:
                add(f"settings.{key}", why, place)

    scan_settings(raw.get("settings"), "pipeline")
    for step, config in (raw.get("steps") or {}).items():
        config = config or {}
        scan_settings(config.get("settings"), step)
        for kind in ("experiment_tracker", "step_operator"):
            wanted = config.get(kind)
            if wanted in (None, False):
                continue
            component = components.get(kind)
            label = kind.replace("_", " ")
            if component is None:
                add(f"{kind}: {wanted}", f"the stack has no {label}, so ZenML cannot run the "
                    "step", step, fatal=True)
            elif isinstance(wanted, str) and wanted != component.name:
                add(f"{kind}: {wanted}", f"the stack's {label} is {_describe(component)}",
                    step, fatal=True)
    return list(findings.values())


def format_report(config_path: str, stack: Any, findings: list[Finding]) -> str:
    """The one message for :func:`check_stack_fit`'s findings."""
    orchestrator = _components(stack).get("orchestrator")
    head = (f"{config_path} asks for stack components the active stack '{stack.name}' "
            f"(orchestrator {_describe(orchestrator) if orchestrator else 'none'}) does not have:")
    lines = [head]
    for finding in sorted(findings, key=lambda f: (not f.fatal, f.key)):
        verdict = "cannot run" if finding.fatal else "ignored"
        lines.append(f"  {verdict}: {finding.key} ({', '.join(finding.places)}): {finding.why}")
    if any(f.fatal for f in findings):
        lines.append(f"Register and activate the cluster stack first ({CLUSTER_DOCS}), or run a "
                     "local config such as configs/default.yaml.")
    else:
        lines.append(f"The run goes on without them; on a cluster stack ({CLUSTER_DOCS}) they "
                     "apply.")
    return "\n".join(lines)


class _DropReported(logging.Filter):
    """Drops ZenML's per-step lines about settings kdpipe already reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _ZENML_MESSAGES)


def silence_reported_zenml_warnings() -> None:
    """Install the filter on the handlers ZenML's records reach (idempotent)."""
    loggers = [logging.getLogger("zenml"), logging.getLogger()]
    for handler in (h for lg in loggers for h in lg.handlers):
        if not any(isinstance(f, _DropReported) for f in handler.filters):
            handler.addFilter(_DropReported())
