"""Shared helpers of the benchmark scripts: machine facts, package versions, JSON results.

Every result file has the same envelope::

    {"benchmark": "<name>", "meta": {machine, date, versions, command}, "settings": {...},
     "results": {...}}

so BENCHMARKS.md can say, next to every table, on what and with what it was measured.
This module needs only the standard library (gpu.py imports it on a machine without
kdpipe's dependencies); torch is looked up lazily when it is installed.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"

# Packages whose versions every result file records (absent ones are reported as such).
DEFAULT_PACKAGES = ("kdpipe", "torch", "torchvision", "torch-pruning", "onnx", "onnxruntime",
                    "numpy", "zenml", "mlflow")


def default_config() -> Any:
    """configs/default.yaml's parameters as a ``PipelineConfig`` (kdpipe's defaults if absent).

    Benchmarks take their recipe (student architecture, epochs, lr, T, alpha) from here so
    they measure what ``make run`` runs instead of drifting from it. kdpipe is imported
    lazily: gpu.py uses this module on a machine without kdpipe.
    """
    from kdpipe.config import PipelineConfig
    from kdpipe.configfile import load_config

    return load_config(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else PipelineConfig()


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows have no affinity API
        return os.cpu_count() or 1


def package_versions(names: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions; None for a package that is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def load_average() -> tuple[float, float, float] | None:
    """The 1/5/15-minute load averages (a busy shared machine explains slow numbers)."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """Machine, OS, Python, thread settings and load at the time of measuring."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average": load_average(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:  # only report torch's settings when the benchmark uses torch
        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def now_utc() -> str:
    """The current time as an ISO-8601 UTC string (seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def envelope(name: str, settings: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """A result document with its provenance (see the module docstring)."""
    return {
        "benchmark": name,
        "meta": {
            "date": now_utc(),
            "machine": machine_info(),
            "versions": package_versions(),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        },
        "settings": settings,
        "results": results,
    }


def _json_default(value: Any) -> Any:
    """Make tuples of paths, numpy scalars and the like JSON-serialisable."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json(path: str | Path, document: dict[str, Any]) -> Path:
    """Write ``document`` as indented JSON (NaN written as null), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none(document), indent=2, default=_json_default) + "\n")
    return path


def _nan_to_none(value: Any) -> Any:
    # JSON has no NaN; a reader in another language would choke on the bare token.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a result file written by :func:`write_json`."""
    return json.loads(Path(path).read_text())


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and n."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std() needs at least one value")
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def default_out(name: str) -> Path:
    """``benchmarks/results/<name>.json``."""
    return RESULTS_DIR / f"{name}.json"
