"""Reading run-configuration files into the typed config of :mod:`kdpipe.config`.

A run-configuration YAML (ZenML's format) carries kdpipe's sections under
``parameters:``; :func:`load_config` validates that section as a whole and reports
every problem at once, each with its key path. Names (models, losses, data sources...)
are resolved by :func:`kdpipe.validate.validate`, which runs after this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdpipe.config import ConfigError, PipelineConfig, PredictConfig, TrackingConfig
from kdpipe.uris import redact_uri

__all__ = ["format_validation_error", "load_config", "load_predict_config", "parse_config",
           "read_yaml"]


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``key.path: message (got value)``; credentials redacted."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see kdpipe.config for the allowed keys)"
        got = e.get("input")
        shown = "" if e["type"] in {"extra_forbidden", "missing"} or isinstance(got, dict) else f" (got {got!r})"
        shown = redact_uri(shown)  # a rejected tracking_uri may carry a password
        lines.append(f"  {path or '<root>'}: {msg}{shown}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any] | None, prefix: str = "parameters") -> PipelineConfig:
    """Validate a ``parameters`` mapping; raise :class:`ConfigError` listing every problem."""
    try:
        return PipelineConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(
            f"invalid kdpipe configuration ({err.error_count()} problem(s)):\n"
            + format_validation_error(err, prefix)
        ) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (pass an existing file with --config)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def load_config(path: str | Path) -> PipelineConfig:
    """Load and validate the ``parameters:`` section of a run-configuration YAML."""
    data = read_yaml(path)
    if "enable_cache" in data:
        raise ConfigError(
            f"{path}: top-level 'enable_cache' overrides every step's own caching in ZenML; "
            "set steps.<name>.enable_cache instead (or pass --no-cache)"
        )
    return parse_config(data.get("parameters"), "parameters")


def load_predict_config(path: str | Path) -> tuple[PredictConfig, TrackingConfig]:
    """Load the ``parameters:`` of a predict run-configuration (``configs/predict.yaml``).

    Only ``predict`` (required) and ``tracking`` are allowed there: they are the
    parameters of the predict pipeline.

    Raises:
        ConfigError: naming the file and the key.
    """
    data = read_yaml(path)
    if "enable_cache" in data:
        raise ConfigError(f"{path}: top-level 'enable_cache' is not allowed; use --no-cache")
    params = data.get("parameters") or {}
    unknown = sorted(set(params) - {"predict", "tracking"})
    problems = [f"  parameters.{k}: unknown key for the predict pipeline (allowed: predict, "
                "tracking)" for k in unknown]
    if "predict" not in params:
        problems.append("  parameters.predict: required (the data split or image folder to "
                        "predict; see configs/predict.yaml)")
    if problems:
        raise ConfigError(f"invalid predict configuration {path} ({len(problems)} problem(s)):\n"
                          + "\n".join(problems))
    cfg = parse_config(params)
    assert cfg.predict is not None
    return cfg.predict, cfg.tracking
