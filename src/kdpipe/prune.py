"""Structural channel pruning through Torch-Pruning, with KD recovery between steps.

Structural, not masks: Torch-Pruning's ``DependencyGraph`` finds every layer coupled to
a channel (the BN after a conv, the next conv's input, both sides of a residual add, a
depthwise conv's groups) and removes that channel from all of them, so the pruned
model really has smaller tensors, fewer MACs and a smaller file.

:func:`prune_model` prunes a model in place, in ``cfg.iterative_steps`` steps that
each reach a linearly growing fraction of ``cfg.ratio``; after each step an optional
``recover(model, step_index)`` fine-tunes it (the pipeline distils from the teacher).
It measures params, MACs, serialized size, CPU latency and (optionally) accuracy
before pruning, after the last pruning step and after the last recovery.

:func:`kdpipe.recipes.prune_student` wires that to kdpipe's data, training loop and
bundles (the pipeline's one pruning path). The reports are :mod:`kdpipe.prune_report`'s.

Bad input fails before the model is touched: an ignored layer path that does not exist
(nearby paths listed), a ratio that would empty a layer, Taylor importance without a
loss. A model Torch-Pruning cannot follow fails with :class:`PruningError` naming the
layer, rather than a traceback from deep inside the library.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from kdpipe.config import ConfigError, PruneConfig
from kdpipe.prune_report import ModelStats, PruneReport, PruneStep, measure_model
from kdpipe.registry import Registry

__all__ = [
    "IMPORTANCES",
    "ModelStats",
    "PruneReport",
    "PruneStep",
    "PruningError",
    "measure_model",
    "prune_model",
]

log = logging.getLogger(__name__)

RecoverFn = Callable[[nn.Module, int], Any]
"""``recover(model, step_index)``: fine-tune the model in place after pruning step i."""


class PruningError(RuntimeError):
    """Torch-Pruning cannot prune this model (or layer); the message names the layer."""


# ------------------------------------------------------------------ importances
IMPORTANCES: Registry[Callable[[], tp.importance.Importance]] = Registry("pruning importance")
IMPORTANCES.register("l2", lambda: tp.importance.GroupMagnitudeImportance(p=2))
IMPORTANCES.register("l1", lambda: tp.importance.GroupMagnitudeImportance(p=1))
IMPORTANCES.register("taylor", lambda: tp.importance.GroupTaylorImportance())
IMPORTANCES.register("bn_scale", lambda: tp.importance.BNScaleImportance())
IMPORTANCES.register("random", lambda: tp.importance.RandomImportance())


# ---------------------------------------------------------------------- checks
def _resolve_ignored(model: nn.Module, paths: Sequence[str]) -> list[nn.Module]:
    """The classifier plus the modules at ``paths``; an unknown path lists nearby ones."""
    from kdpipe.models import classifier_module, nearest_module_paths

    modules = dict(model.named_modules())
    ignored = [classifier_module(model)]
    for path in paths:
        if path not in modules or path == "":
            near = nearest_module_paths(model, path)
            raise ConfigError(
                f"prune.ignored_layers: no module {path!r} in {type(model).__name__}; "
                f"nearby module paths: {', '.join(near) or '(none)'}"
            )
        ignored.append(modules[path])
    return ignored


def _kept_channels(n: int, ratio: float, round_to: int | None) -> int:
    """Output channels a layer of ``n`` keeps at ``ratio`` (local mode).

    ``int(n * (1 - ratio))`` as Torch-Pruning counts; with ``round_to`` that is rounded
    down to a multiple of ``round_to`` but never below ``min(n, round_to)``: rounding
    exists to make channel counts vectorise well, so it must not empty a small layer
    (a layer of at most ``round_to`` channels is left whole). A ratio that by itself
    keeps nothing still returns 0 (a config error, see :func:`_check_no_layer_emptied`).
    """
    kept = int(n * (1 - ratio))
    if round_to and kept >= 1:
        kept = max(kept - kept % round_to, min(n, round_to))
    return kept


def _root_channels(pruner: tp.pruner.BasePruner, group: Any) -> tuple[nn.Module, int]:
    """A group's root layer and its prunable channel count (per channel group)."""
    root = group[0][0].target.module
    return root, pruner.DG.get_out_channels(root) // pruner.out_channel_groups.get(root, 1)


def _rounded_ratios(pruner: tp.pruner.BasePruner, cfg: PruneConfig) -> dict[nn.Module, float]:
    """Per-layer ratios that make Torch-Pruning keep exactly :func:`_kept_channels`.

    Torch-Pruning's own ``round_to`` rounds the kept count down to a multiple, which can
    empty a layer of ``round_to`` channels or fewer. Passing each layer the ratio of its
    rounded target instead (with half a channel of slack against float error: Torch-
    Pruning keeps ``int(n * (1 - ratio))``) keeps every layer at ``round_to`` or more.
    """
    ratios: dict[nn.Module, float] = {}
    for group in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        root, n = _root_channels(pruner, group)
        kept = _kept_channels(n, cfg.ratio, cfg.round_to)
        ratios[root] = 0.0 if kept >= n else 1.0 - (kept + 0.5) / n
    return ratios


def _check_no_layer_emptied(
    pruner: tp.pruner.BasePruner, names: dict[nn.Module, str], cfg: PruneConfig
) -> None:
    """Fail before pruning if a layer would keep no channel.

    Torch-Pruning silently *skips* such a layer (it refuses to empty it), so the model
    would come out less pruned than asked without a word. ``round_to`` never empties a
    layer (see :func:`_kept_channels`); only the ratio itself can.
    """
    ratio = cfg.max_layer_ratio if cfg.global_pruning else cfg.ratio
    problems = []
    for group in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        root, n = _root_channels(pruner, group)
        if _kept_channels(n, ratio, cfg.round_to) < 1:
            problems.append(f"{names.get(root, '?')} ({n} channels)")
    if problems:
        what = "max_layer_ratio" if cfg.global_pruning else "ratio"
        raise ConfigError(
            f"prune.{what}={ratio} would remove every channel of: {', '.join(problems[:8])}"
            + (f" and {len(problems) - 8} more" if len(problems) > 8 else "")
            + f"; lower prune.{what}, or add those layers to "
            "prune.ignored_layers"
        )


def _check_forward(model: nn.Module, example: torch.Tensor, step: int) -> None:
    """Run the pruned model once; a failure names the module it happened in.

    Torch-Pruning edits every layer it can trace. A module that holds channel-sized
    state it cannot see (a plain tensor attribute, a hard-coded reshape) breaks the
    forward pass afterwards; the pre-hooks below find which module that is.
    """
    names = {m: n for n, m in model.named_modules()}
    entered: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _: entered.append(mod)) for m in names]
    try:
        with torch.no_grad():
            model(example)
    except Exception as err:  # any failure here is a pruning failure; re-raised with the layer
        leaf = next((m for m in reversed(entered) if not list(m.children())), None)
        culprit = leaf if leaf is not None else (entered[-1] if entered else model)
        raise PruningError(
            f"after pruning step {step} the model fails in layer "
            f"{names.get(culprit) or '<root>'!r} ({type(culprit).__name__}): {err}. "
            "Torch-Pruning could not follow a channel dependency through it; add this layer "
            "(or its parent block) to prune.ignored_layers"
        ) from err
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------------- pruning
def _build_pruner(
    model: nn.Module, example: torch.Tensor, cfg: PruneConfig, ignored: list[nn.Module]
) -> tp.pruner.BasePruner:
    """Torch-Pruning's pruner for ``cfg``; a tracing failure becomes a :class:`PruningError`.

    Local pruning with ``round_to`` traces twice: once to list the layers, once with the
    per-layer ratios of :func:`_rounded_ratios` (Torch-Pruning reads them only at
    construction).
    """
    def build(ratio_dict: dict[nn.Module, float] | None) -> tp.pruner.BasePruner:
        return tp.pruner.BasePruner(
            model,
            example,
            importance=IMPORTANCES.get(cfg.importance)(),
            global_pruning=cfg.global_pruning,
            pruning_ratio=cfg.ratio,
            pruning_ratio_dict=ratio_dict,
            max_pruning_ratio=cfg.max_layer_ratio,
            iterative_steps=cfg.iterative_steps,
            round_to=cfg.round_to,
            ignored_layers=ignored,
        )

    try:
        pruner = build(None)
        if cfg.round_to and not cfg.global_pruning:
            pruner = build(_rounded_ratios(pruner, cfg))
        return pruner
    except Exception as err:  # tracing failures come from arbitrary model code
        raise PruningError(
            f"Torch-Pruning could not trace {type(model).__name__} to build its dependency "
            f"graph: {type(err).__name__}: {err}. The forward pass must be traceable with "
            "autograd on the example input; add the offending block to prune.ignored_layers"
        ) from err


def _capped_indices(
    pruner: tp.pruner.BasePruner, group: Any, initial: dict[nn.Module, int], cfg: PruneConfig
) -> list[int]:
    """The group's pruning indices, trimmed so the root keeps its max_layer_ratio share.

    Torch-Pruning applies ``max_pruning_ratio`` only between steps: one global step can
    take a layer below it. The least important channels are pruned first.
    """
    dep, idxs = group[0]
    root = dep.target.module
    n_now = pruner.DG.get_out_channels(root)
    floor = max(1, math.ceil(initial[root] * (1 - cfg.max_layer_ratio)))
    allowed = max(0, n_now - floor)
    if cfg.round_to:  # keep a multiple of round_to: prune fewer, never more
        keep = n_now - allowed
        keep += (-keep) % cfg.round_to
        allowed = max(0, n_now - keep)
    idxs = list(idxs)
    if len(idxs) <= allowed:
        return idxs
    imp = pruner.estimate_importance(group)
    order = torch.argsort(imp).tolist() if imp is not None else range(len(idxs))
    return sorted(idxs[i] for i in list(order)[:allowed])


def _prune_step(
    pruner: tp.pruner.BasePruner,
    names: dict[nn.Module, str],
    initial: dict[nn.Module, int],
    cfg: PruneConfig,
) -> None:
    for group in pruner.step(interactive=True):
        dep, idxs = group[0]
        root = dep.target.module
        layer = names.get(root, type(root).__name__)
        try:
            if cfg.global_pruning:
                capped = _capped_indices(pruner, group, initial, cfg)
                if capped:
                    group.prune(idxs=capped)
            else:
                group.prune()
        except Exception as err:  # Torch-Pruning's own errors, re-raised with the layer
            raise PruningError(
                f"Torch-Pruning failed to prune layer {layer!r} ({type(root).__name__}, "
                f"{len(idxs)} channels): {type(err).__name__}: {err}; add it to "
                "prune.ignored_layers"
            ) from err


def _taylor_gradients(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()


def _out_channels(model: nn.Module) -> dict[str, int]:
    return {
        n: (m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    }


def _pruning_steps(
    model: nn.Module, pruner: tp.pruner.BasePruner, names: dict[nn.Module, str],
    example_input: torch.Tensor, cfg: PruneConfig, stats: Callable[[], ModelStats],
    recover: RecoverFn | None, taylor_loss_fn: Callable[[nn.Module], torch.Tensor] | None,
    evaluate_fn: Callable[[nn.Module], float] | None,
) -> tuple[list[PruneStep], ModelStats]:
    """Prune in ``cfg.iterative_steps`` steps, recovering after each; per-step records."""
    initial = dict(pruner.layer_init_out_ch)
    steps: list[PruneStep] = []
    for i in range(cfg.iterative_steps):
        model.eval()
        if taylor_loss_fn is not None and cfg.importance == "taylor":
            _taylor_gradients(model, taylor_loss_fn)
        # RandomImportance draws from torch's global RNG: seed it so runs repeat.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.recovery.seed + i)
            _prune_step(pruner, names, initial, cfg)
        model.zero_grad(set_to_none=True)
        _check_forward(model, example_input.to(next(model.parameters()).device), i + 1)
        after_pruning = stats()
        recovered = None
        if recover is not None:
            recover(model, i)
            recovered = float(evaluate_fn(model)) if evaluate_fn is not None else None
        steps.append(PruneStep(step=i + 1, target_ratio=float(pruner.per_step_pruning_ratio[i + 1]),
                               params=after_pruning.params, macs=after_pruning.macs,
                               accuracy_after_pruning=after_pruning.accuracy,
                               accuracy_after_recovery=recovered))
        log.info("pruning step %d/%d: %d params, %d MACs", i + 1, cfg.iterative_steps,
                 after_pruning.params, after_pruning.macs)
    return steps, after_pruning


def prune_model(
    model: nn.Module,
    example_input: torch.Tensor,
    cfg: PruneConfig,
    *,
    recover: RecoverFn | None = None,
    taylor_loss_fn: Callable[[nn.Module], torch.Tensor] | None = None,
    evaluate_fn: Callable[[nn.Module], float] | None = None,
    latency_repeats: int = 20,
) -> PruneReport:
    """Structurally prune ``model`` in place and report what it cost and saved.

    Args:
        model: a classifier; its last ``nn.Linear`` (the classifier) is never pruned.
        example_input: one input batch (e.g. ``(1, C, H, W)``) used to trace the graph.
        cfg: importance, ratio, global/local, iterative steps, round_to, ignored layers.
        recover: ``recover(model, step_index)`` after every step (0-based), e.g. KD.
        taylor_loss_fn: ``loss_fn(model) -> scalar``, needed by ``importance: taylor``.
        evaluate_fn: ``evaluate_fn(model) -> accuracy`` for the report.
        latency_repeats: timed batch-1 forward passes per latency measurement.

    Returns:
        A :class:`PruneReport`.

    Raises:
        ConfigError: unknown ignored layer path (nearby paths listed), a ratio that
            would empty a layer, Taylor importance without ``taylor_loss_fn``.
        PruningError: Torch-Pruning cannot trace or prune the model (the layer is named).
    """
    if cfg.importance == "taylor" and taylor_loss_fn is None:
        raise ConfigError(
            "prune.importance=taylor ranks channels by gradients and needs a loss: pass "
            "taylor_loss_fn, or choose importance l2 / l1 / bn_scale"
        )
    input_shape = tuple(example_input.shape[1:])
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    names = {m: n for n, m in model.named_modules()}
    ignored = _resolve_ignored(model, cfg.ignored_layers)

    def stats() -> ModelStats:
        return measure_model(model, input_shape, evaluate_fn=evaluate_fn,
                             latency_repeats=latency_repeats)

    before, channels_before = stats(), _out_channels(model)
    # Eval mode while tracing and pruning: a train-mode forward would update BN statistics.
    model.eval()
    pruner = _build_pruner(model, example_input.to(device), cfg, ignored)
    _check_no_layer_emptied(pruner, names, cfg)
    steps, after_pruning = _pruning_steps(model, pruner, names, example_input, cfg, stats,
                                          recover, taylor_loss_fn, evaluate_fn)
    after_recovery = stats() if recover is not None else None
    model.train(was_training)
    channels_after = _out_channels(model)
    _warn_off_block(model, channels_before, channels_after)
    changed = {n: (c, channels_after[n]) for n, c in channels_before.items()
               if channels_after[n] != c}
    return PruneReport(config=cfg.model_dump(mode="json"), before=before,
                       after_pruning=after_pruning, after_recovery=after_recovery, steps=steps,
                       channels=changed)


CPU_CHANNEL_BLOCK = 8
"""Channels per block of ONNX Runtime's CPU conv kernels (MLAS NCHWc) on AVX2; 16 on AVX-512."""


def _warn_off_block(model: nn.Module, before: dict[str, int], after: dict[str, int]) -> None:
    """Warn when pruning left a conv's channel count off a multiple of 8.

    ONNX Runtime then runs that conv outside its blocked layout (slower kernels, reorder
    nodes around it): fewer MACs, but little measured speed-up ("pruned but not faster").
    Measured in benchmarks/bench_prune.py: cnn_medium pruned to 11/22/44 channels has
    2.1x fewer MACs and runs 1.07x faster; pruned to 16/16/32, 3.2x and 2.5x.
    """
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    off = {n: c for n, c in after.items()
           if n in convs and c != before[n] and c % CPU_CHANNEL_BLOCK}
    if off:
        sample = ", ".join(f"{n}={c}" for n, c in list(off.items())[:4])
        log.warning(
            "%d pruned conv(s) have channel counts that are not multiples of 8 (%s%s): ONNX "
            "Runtime's CPU kernels work in blocks of 8 (AVX2) or 16 (AVX-512) channels, so the "
            "pruned model may be barely faster than its MACs suggest; set prune.round_to: 16",
            len(off), sample, ", ..." if len(off) > 4 else "")
