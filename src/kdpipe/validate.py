"""One check of a whole :class:`~kdpipe.config.PipelineConfig` before any work starts.

:mod:`kdpipe.config` checks types, ranges and the rules inside one section. What needs
the registries or the models themselves is checked here, all at once, so that a config
with three mistakes reports three problems, each with its key path:

- every name resolves through the registry that defines it (data sources, architectures,
  optimisers, schedulers, logit and feature losses, pruning importances);
- ``model.kwargs`` bind to the architecture factory's signature;
- teacher and student are built on the ``meta`` device (no weights, no memory, no data)
  so that module paths (``distill.student_layer`` / ``teacher_layer``,
  ``prune.ignored_layers``) are checked against the real module trees;
- rules across sections (a batch that splits evenly over DDP processes).

:func:`validate` raises :class:`ConfigProblems` (a :class:`~kdpipe.config.ConfigError`);
:func:`find_problems` returns the list. Files, downloads and caches are
:mod:`kdpipe.preflight`'s business: nothing here touches the disk or the network.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdpipe.config import ConfigError, DataConfig, ModelConfig, PipelineConfig, TrainConfig
from kdpipe.losses import FEATURE_LOSSES, LOGIT_LOSSES
from kdpipe.models import MODELS, nearest_module_paths
from kdpipe.optim import OPTIMIZERS, SCHEDULERS
from kdpipe.prune import IMPORTANCES
from kdpipe.quantize_calib import calibration_problems, type_problems
from kdpipe.registry import Registry
from kdpipe.sources import SOURCES, TORCHVISION_NAMES, known_class_count, known_train_size
from kdpipe.student_init import layer_mapping_problem
from kdpipe.teacher_checks import teacher_input_problems
from kdpipe.user_code import UserCodeError, call_arguments, is_import_path, resolve
from kdpipe.user_code import build as build_user_model

__all__ = ["ConfigProblems", "Problem", "as_model_config", "find_problems", "find_warnings",
           "input_channels", "meta_model", "validate", "validate_parts"]

_PLACEHOLDER_CLASSES = 10
"""Class count for the meta-device builds: module paths do not depend on it."""


@dataclass(frozen=True)
class Problem:
    """One mistake: the key path (``parameters.student.model.kwargs``) and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigProblems(ConfigError):
    """Every problem :func:`find_problems` found, in one error."""

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = list(problems)
        where = f" {source}" if source else ""
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid configuration{where} ({len(self.problems)} problem"
                         f"{'s' if len(self.problems) != 1 else ''}):\n{lines}")


def validate(config: PipelineConfig, *, source: str = "", prefix: str = "parameters",
             num_classes: int | None = None) -> PipelineConfig:
    """Return ``config`` unchanged, or raise :class:`ConfigProblems` listing every problem.

    ``num_classes``: the dataset's class count once it is read (image folders), against
    which the output width of an import-path model is checked.
    """
    problems = find_problems(config, prefix=prefix, num_classes=num_classes)
    if problems:
        raise ConfigProblems(problems, source)
    return config


def validate_parts(**sections: Any) -> None:
    """:func:`validate` for the sections a recipe is given (the others take defaults).

    Key paths are then relative (``student.model.kwargs.widht``): a recipe called from
    Python has no YAML file. Raises :class:`ConfigProblems`.
    """
    validate(PipelineConfig(**sections), prefix="")


def as_model_config(spec: Any) -> ModelConfig:
    """The :class:`ModelConfig` a bundle's model was built from (architecture, options)."""
    return ModelConfig(arch=spec.arch, kwargs=dict(spec.kwargs))


def find_problems(config: PipelineConfig, *, prefix: str = "parameters",
                  num_classes: int | None = None) -> list[Problem]:
    """Every problem of ``config`` (empty when it is runnable as far as config can tell)."""
    found: list[Problem] = []
    prefix = f"{prefix}." if prefix else ""  # "" for a config built in Python
    found += _data_problems(config.data, f"{prefix}data")
    channels = input_channels(config.data)
    classes = num_classes or known_class_count(config.data)
    chain = _chain(config, prefix)  # teacher, assistants..., student: (key path, section)
    models: list[nn.Module | None] = []
    for path, section in chain:
        found += _model_problems(section.model, f"{path}.model")
        models.append(_try_meta(section.model, channels, found, f"{path}.model", classes))
        found += _train_problems(section.train, f"{path}.train", config.data)
    if config.teacher.onnx is not None:
        models[0] = None  # teacher.model.arch is not used: no layers or weights to check there
    found += [Problem(p, m) for p, m in teacher_input_problems(config, chain, prefix)]
    for k in range(1, len(chain)):  # every hop: (its teacher, its pupil)
        found += _init_problems(chain[k - 1], chain[k], models[k - 1], models[k])
        found += _feature_layer_problems(config, chain[k - 1][0], chain[k][0],
                                         models[k - 1], models[k], prefix)
    found += _distill_problems(config, prefix)
    found += _prune_problems(config, models[-1], prefix)
    found += _quantize_problems(config, prefix)
    return found


def find_warnings(config: PipelineConfig) -> list[str]:
    """Allowed but unusual settings: an assistant larger than the model before it."""
    chain = _chain(config, "")
    warnings = []
    for k in range(1, len(chain) - 1):  # the assistants, each against the model before it
        (t_path, t_cfg), (s_path, s_cfg) = chain[k - 1], chain[k]
        t_size, s_size = _meta_params(t_cfg.model), _meta_params(s_cfg.model)
        if None not in (t_size, s_size) and s_size > t_size:
            warnings.append(f"{s_path} ({s_cfg.model.arch}, {s_size:,} params) is larger than "
                            f"the model it learns from, {t_path} ({t_cfg.model.arch}, "
                            f"{t_size:,}): assistants usually shrink step by step")
    return warnings


def _chain(config: PipelineConfig, prefix: str) -> list[tuple[str, Any]]:
    assistants = [(f"{prefix}distill.assistants[{i}]", a)
                  for i, a in enumerate(config.distill.assistants)]
    return [(f"{prefix}teacher", config.teacher), *assistants, (f"{prefix}student", config.student)]


def _meta_params(cfg: ModelConfig) -> int | None:
    try:
        return sum(p.numel() for p in meta_model(cfg, 3).parameters())
    except Exception:  # noqa: BLE001 - reported as a problem by find_problems
        return None


# ------------------------------------------------------------------------- names
def _name_problem(registry: Registry, name: str, path: str) -> list[Problem]:
    if name in registry:
        return []
    return [Problem(path, f"unknown {registry.kind} {name!r}; valid names: "
                          f"{', '.join(registry.names())}")]


def _data_problems(cfg: DataConfig, path: str) -> list[Problem]:
    kind, _, arg = cfg.source.partition(":")
    found = _name_problem(SOURCES, kind, f"{path}.source")
    if found:
        return found
    if kind == "torchvision" and arg not in TORCHVISION_NAMES:
        found.append(Problem(f"{path}.source", f"unknown torchvision dataset {arg!r}; valid: "
                             + ", ".join(f"torchvision:{n}" for n in TORCHVISION_NAMES)))
    if kind == "imagefolder":
        if not arg:
            found.append(Problem(f"{path}.source", "imagefolder needs a folder: "
                                                   "imagefolder:<folder with one sub-folder per class>"))
        if cfg.image_size is None:
            found.append(Problem(f"{path}.image_size", "imagefolder sources need image_size "
                                                       "(e.g. 32): images are resized to it"))
    elif cfg.image_size is not None or cfg.grayscale is not None:
        found.append(Problem(path, f"image_size and grayscale only apply to imagefolder "
                                   f"sources; remove them for source {cfg.source!r}"))
    return found


def _train_problems(cfg: TrainConfig, path: str, data: DataConfig) -> list[Problem]:
    found = _name_problem(OPTIMIZERS, cfg.optimizer, f"{path}.optimizer")
    found += _name_problem(SCHEDULERS, cfg.scheduler, f"{path}.scheduler")
    if cfg.scheduler == "step" and not cfg.step_milestones:
        found.append(Problem(f"{path}.step_milestones", "scheduler 'step' needs at least one "
                                                        "milestone epoch (e.g. [5, 8])"))
    if cfg.num_processes > 1 and data.batch_size % cfg.num_processes:
        found.append(Problem(f"{path}.num_processes",
                             f"data.batch_size={data.batch_size} does not split evenly over "
                             f"{cfg.num_processes} processes; make it a multiple of "
                             f"{cfg.num_processes}"))
    return found


# ------------------------------------------------------------------------ models
def _user_code_problems(cfg: ModelConfig, path: str) -> list[Problem]:
    """An import-path ``arch``: it resolves, and ``kwargs`` fit the callable's signature."""
    try:
        factory = resolve(cfg.arch)
    except UserCodeError as err:
        return [Problem(f"{path}.arch", str(err))]
    found = []
    try:
        call_arguments(cfg.arch, factory, _PLACEHOLDER_CLASSES, 1, dict(cfg.kwargs))
    except UserCodeError as err:
        found.append(Problem(f"{path}.kwargs", str(err)))
    if cfg.weights is not None:
        found.append(Problem(f"{path}.weights", f"{cfg.arch!r} is your own code and has no "
                                                "pretrained weights; use model.checkpoint"))
    return found


def _model_problems(cfg: ModelConfig, path: str) -> list[Problem]:
    if is_import_path(cfg.arch):
        return _user_code_problems(cfg, path) + _checkpoint_problems(cfg, path)
    found = _name_problem(MODELS, cfg.arch, f"{path}.arch")
    if found:
        return found + _checkpoint_problems(cfg, path)
    found += _checkpoint_problems(cfg, path)
    factory = MODELS.get(cfg.arch)
    params, options = inspect.signature(factory).parameters, _options(factory)
    unknown = sorted(set(cfg.kwargs) - set(options))
    if "weights" in cfg.kwargs:
        found.append(Problem(f"{path}.kwargs.weights", "pretrained weights go in model.weights, "
                                                       "not in kwargs"))
        unknown.remove("weights")
    for name in unknown:
        near = [o for o in options if o.startswith(name[:2])]
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        found.append(Problem(f"{path}.kwargs.{name}",
                             f"{cfg.arch!r} takes no option {name!r}{hint}; it accepts: "
                             f"{', '.join(options) or 'no options'}"))
    if cfg.weights is not None and cfg.checkpoint is not None:
        found.append(Problem(f"{path}.weights", "set either weights (pretrained torchvision "
                                                "weights) or checkpoint (your own file), not both"))
    if cfg.weights is not None and "weights" not in params:
        found.append(Problem(f"{path}.weights",
                             f"{cfg.arch!r} has no pretrained weights; use one of "
                             f"{', '.join(MODELS.names('tv_*'))}, or model.checkpoint"))
    return found


def _checkpoint_problems(cfg: ModelConfig, path: str) -> list[Problem]:
    """The checkpoint-loading options that cannot apply (kdpipe.build reads the file)."""
    if cfg.checkpoint is None:
        return [Problem(f"{path}.{name}", f"{name} only applies when loading model.checkpoint; "
                                          f"set checkpoint or remove {name}")
                for name in ("checkpoint_key", "strip_prefix", "key_map", "reset_classifier")
                if getattr(cfg, name)]
    found = []
    if cfg.checkpoint_key is not None and cfg.checkpoint.endswith(".safetensors"):
        found.append(Problem(f"{path}.checkpoint_key", "a .safetensors file holds one flat state "
                             "dict; remove checkpoint_key (strip_prefix / key_map rename keys)"))
    if cfg.strip_prefix == "":
        found.append(Problem(f"{path}.strip_prefix", "an empty prefix strips nothing; set the "
                             "prefix to remove (e.g. 'module.') or null"))
    return found


def _options(factory: Callable[..., nn.Module]) -> list[str]:
    params = inspect.signature(factory).parameters.values()
    return [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.name != "weights"]


def meta_model(cfg: ModelConfig, in_channels: int, num_classes: int | None = None
               ) -> nn.Module:
    """``cfg``'s architecture built on the meta device: its module tree, no weights.

    Options the factory does not take are left out (they are reported by name), so that
    layer paths are still checked against the architecture. An import-path architecture's
    output width is checked against ``num_classes`` when it is given.
    """
    if is_import_path(cfg.arch):
        return _user_meta_model(cfg, in_channels, num_classes)
    factory: Callable[..., nn.Module] = MODELS.get(cfg.arch)
    options = _options(factory)
    kwargs = {k: v for k, v in cfg.kwargs.items() if k in options}
    with torch.device("meta"):
        return factory(_PLACEHOLDER_CLASSES, in_channels, **kwargs)


def _user_meta_model(cfg: ModelConfig, in_channels: int, num_classes: int | None) -> nn.Module:
    """The user's model on the meta device; on the CPU if its code cannot run on meta."""
    args = (cfg.arch, num_classes or _PLACEHOLDER_CLASSES, in_channels, cfg.kwargs)
    try:
        with torch.device("meta"):
            return build_user_model(*args, check_width=num_classes is not None)
    except UserCodeError as err:
        if err.__cause__ is None:  # it ran and returned the wrong thing: a CPU build agrees
            raise
    return build_user_model(*args, check_width=num_classes is not None)  # e.g. .item() in __init__


def _try_meta(cfg: ModelConfig, channels: int, found: list[Problem], path: str,
              classes: int | None = None) -> nn.Module | None:
    if is_import_path(cfg.arch):
        if any(p.path.startswith(path) for p in found):
            return None  # reported already; a build would only repeat it
    elif cfg.arch not in MODELS:
        return None
    try:
        return meta_model(cfg, channels, classes)
    except UserCodeError as err:  # the user's callable failed or returned no fitting model
        found.append(Problem(f"{path}.arch", str(err)))
    except (TypeError, ValueError, RuntimeError) as err:  # right option names, bad values
        found.append(Problem(f"{path}.kwargs", f"{cfg.arch!r} cannot be built with "
                                               f"{cfg.kwargs}: {err}"))
        return None


def input_channels(cfg: DataConfig) -> int:
    """The input channel count of ``cfg``'s images, known without reading them."""
    kind, _, arg = cfg.source.partition(":")
    if kind in ("digits", "mnist5k", "fashion_mnist") or arg in ("MNIST", "FashionMNIST"):
        return 1
    return 1 if cfg.grayscale else 3


def _layer_problem(model: nn.Module, layer: str, path: str, role: str) -> list[Problem]:
    names = {n for n, _ in model.named_modules() if n}
    if layer in names:
        return []
    near = nearest_module_paths(model, layer)
    return [Problem(path, f"no module {layer!r} in the {role} ({type(model).__name__}); "
                          f"nearby module paths: {', '.join(near) or '(none)'}")]


# ---------------------------------------------------------------- distill, prune
def _init_problems(teacher: tuple[str, Any], pupil: tuple[str, Any],
                   t_model: nn.Module | None, p_model: nn.Module | None) -> list[Problem]:
    (t_path, t_cfg), (p_path, p_cfg) = teacher, pupil
    path = f"{p_path}.init"
    same = (p_cfg.model.arch, p_cfg.model.kwargs) == (t_cfg.model.arch, t_cfg.model.kwargs)
    if p_cfg.init == "teacher_pruned" and not same:
        return [Problem(path, f"teacher_pruned prunes the model it learns from ({t_path}): "
                              f"set {p_path}.model.arch to {t_cfg.model.arch!r} (got "
                              f"{p_cfg.model.arch!r}) and its kwargs to that model's, or use "
                              "init: teacher_layers / scratch")]
    if p_cfg.init == "teacher_layers" and None not in (t_model, p_model):
        problem = layer_mapping_problem(t_model, p_model)
        if problem is not None:
            return [Problem(path, problem)]
    return []


def _feature_layer_problems(config: PipelineConfig, t_path: str, p_path: str,
                            t_model: nn.Module | None, p_model: nn.Module | None,
                            prefix: str) -> list[Problem]:
    cfg, path = config.distill, f"{prefix}distill"
    if cfg.feature_loss == "none" or cfg.feature_loss not in FEATURE_LOSSES:
        return []
    found = []
    for layer, model, key, who in ((cfg.student_layer, p_model, "student_layer", p_path),
                                   (cfg.teacher_layer, t_model, "teacher_layer", t_path)):
        if layer and model is not None:
            found += _layer_problem(model, layer, f"{path}.{key}", who.removeprefix(prefix))
    return found


def _distill_problems(config: PipelineConfig, prefix: str) -> list[Problem]:
    cfg, path = config.distill, f"{prefix}distill"
    found = _name_problem(LOGIT_LOSSES, cfg.loss, f"{path}.loss")
    return found + _name_problem(FEATURE_LOSSES, cfg.feature_loss, f"{path}.feature_loss")


def _prune_problems(config: PipelineConfig, student: nn.Module | None, prefix: str
                    ) -> list[Problem]:
    cfg, path = config.prune, f"{prefix}prune"
    if not cfg.enabled:
        return []
    found = _name_problem(IMPORTANCES, cfg.importance, f"{path}.importance")
    found += _train_problems(cfg.recovery, f"{path}.recovery", config.data)
    if student is not None:
        for i, layer in enumerate(cfg.ignored_layers):
            found += _layer_problem(student, layer, f"{path}.ignored_layers[{i}]", "student")
    return found


def _quantize_problems(config: PipelineConfig, prefix: str) -> list[Problem]:
    """Type pairs ONNX Runtime supports, and the calibration sample against the data's size
    where it is known without loading it (bundled and standard sources); other sources are
    checked when the sample is drawn."""
    cfg, path = config.quantize, f"{prefix}quantize"
    if not cfg.enabled:
        return []
    found = [Problem(f"{path}.weight_type", m)
             for m in type_problems(cfg.activation_type, cfg.weight_type)]
    messages = calibration_problems(cfg.calibration_size, known_train_size(config.data),
                                    known_class_count(config.data))
    if config.gate.prefer == "fastest" and 1 not in config.evaluate.latency_batch_sizes:
        found.append(Problem(f"{prefix}gate.prefer", "fastest compares p50 latency at batch 1, "
                             "which is not measured; add 1 to evaluate.latency_batch_sizes "
                             f"(got {list(config.evaluate.latency_batch_sizes)}) or choose "
                             "prefer: smallest / most_accurate"))
    return found + [Problem(f"{path}.calibration_size", m) for m in messages]
