"""A model from its config: architecture, then pretrained weights or a start checkpoint.

:func:`build_model` turns a :class:`~kdpipe.config.ModelConfig` into a module: it builds
the architecture with :func:`kdpipe.models.create_model` (torchvision weights included)
and loads ``model.checkpoint`` on top, read and renamed by :mod:`kdpipe.state_dicts`
(``checkpoint_key``, ``strip_prefix``, ``key_map``; ``.safetensors`` and ``torch.save``
files, kdpipe bundles). :func:`load_state_dict_checked` loads strictly,
keeping a fresh classifier with ``reset_classifier``; a mismatch names the first missing,
unexpected and reshaped keys and the option that would fix it, never guessing on its own.
It sits above both :mod:`kdpipe.models` and :mod:`kdpipe.bundle`, so neither of those
needs the other's loading code.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from kdpipe.model_registry import named_classifier
from kdpipe.models import create_model
from kdpipe.state_dicts import first_keys, load_checkpoint_state_dict, remap_keys

if TYPE_CHECKING:
    from kdpipe.config import ModelConfig

# load_checkpoint_state_dict lives in kdpipe.state_dicts; re-exported for the callers that
# read a checkpoint file without building a model.
__all__ = ["build_model", "check_checkpoint", "load_checkpoint_state_dict",
           "load_state_dict_checked"]


def load_state_dict_checked(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
    reset_classifier: bool = False,
) -> None:
    """Load ``state_dict`` into ``model`` strictly, with errors that say what differs.

    Args:
        model: the freshly built model.
        state_dict: the checkpoint's tensors, already renamed (:func:`remap_keys`).
        source: how error messages name the checkpoint.
        reset_classifier: leave the model's classifier (its last ``nn.Linear``) as
            initialised and load everything else.

    Raises:
        ValueError: keys are missing or unexpected, or tensor shapes differ. The message
            lists the first of each and suggests the option that fixes it:
            ``strip_prefix`` / ``key_map`` for renamed keys, ``reset_classifier`` for a
            classifier trained on another class count.
    """
    model.load_state_dict(_matched(model, state_dict, source, reset_classifier), strict=True)


def _matched(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, reset_classifier: bool
) -> dict[str, torch.Tensor]:
    """``state_dict`` as ``model`` will load it, or the mismatch error (see above)."""
    sd = dict(state_dict)
    if reset_classifier:
        try:
            head_name, head = named_classifier(model)
        except ValueError as err:  # the head to reset is the last nn.Linear
            raise ValueError(f"model.reset_classifier: {err}, so there is no head to "
                             "reset; remove reset_classifier") from err
        sd.update({f"{head_name}.{k}": v.clone() for k, v in head.state_dict().items()})
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    reshaped = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {first_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {first_keys(unexpected)}")
        if reshaped:
            parts.append(f"{len(reshaped)} shape difference(s): " + ", ".join(
                f"{k!r}: checkpoint shape {tuple(sd[k].shape)} vs model shape "
                f"{tuple(expected[k].shape)}" for k in first_keys(reshaped)))
        fixes = _suggested_fixes(model, sd, expected, missing, unexpected, reshaped)
        raise ValueError(
            f"{source} does not match {type(model).__name__}: {'; '.join(parts)}; "
            + "; ".join(fixes)
        )
    return sd


def _suggested_fixes(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    reshaped: list[str],
) -> list[str]:
    """The options that would make ``sd`` load, as sentences (the fallback names causes)."""
    fixes = []
    rename = _guess_rename(sd, expected, missing, unexpected)
    if rename is not None:
        old, new = rename
        option = (f"model.strip_prefix: {old!r}" if not new
                  else f"model.key_map: {{{old!r}: {new!r}}}")
        fixes.append(f"the keys look renamed: set {option}")
        # Judge the shapes as they will be once renamed, so both fixes are named at once.
        sd = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}
        reshaped = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    try:
        head_name, head = named_classifier(model)
    except ValueError:  # no nn.Linear head: nothing to reset
        head_name, head = "", None
    head_key = f"{head_name}.weight"
    new_class_count = (head is not None and head_key in reshaped
                       and sd[head_key].shape[1:] == expected[head_key].shape[1:])
    if new_class_count:
        fixes.append(
            f"the checkpoint has a classifier for {sd[head_key].shape[0]} classes but the "
            f"model was built for num_classes={head.out_features}: set "
            "model.reset_classifier: true to load the rest and train a fresh head, or use "
            "a checkpoint trained on the same classes"
        )
    others = [k for k in reshaped if not (new_class_count and k.startswith(f"{head_name}."))]
    if others or (not fixes and (missing or unexpected)):
        fixes.append(
            "was it saved from a different architecture, in_channels or kwargs (or a "
            "pruned layout)?"
        )
    return fixes


def _guess_rename(
    sd: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
) -> tuple[str, str] | None:
    """The prefix rename ``old -> new`` that maps most unexpected keys onto missing ones.

    Each unexpected key votes for every ``(old, new)`` pair of dotted prefixes under which
    it becomes a missing key of the same shape; the winner must explain at least half of
    the smaller list, so that two unrelated architectures get no suggestion.
    """
    if not missing or not unexpected:
        return None
    prefixes_by_rest: dict[str, list[str]] = defaultdict(list)
    for key in missing:
        parts = key.split(".")
        for i in range(len(parts)):
            prefixes_by_rest[".".join(parts[i:])].append("".join(p + "." for p in parts[:i]))
    votes: Counter[tuple[str, str]] = Counter()
    for key in unexpected[:500]:
        parts = key.split(".")
        pairs = set()
        for i in range(len(parts)):
            old, rest = "".join(p + "." for p in parts[:i]), ".".join(parts[i:])
            pairs.update((old, new) for new in prefixes_by_rest.get(rest, ())
                         if new != old and expected[new + rest].shape == sd[key].shape)
        votes.update(pairs)
    if not votes:
        return None
    (old, new), count = max(votes.items(), key=lambda kv: (kv[1], -len(kv[0][0] + kv[0][1])))
    return (old, new) if 2 * count >= min(len(missing), len(unexpected)) else None


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
    """Build the model a :class:`~kdpipe.config.ModelConfig` describes.

    Applies ``cfg.weights`` (torchvision pretrained weights) or ``cfg.checkpoint`` (a
    ``.safetensors`` / ``torch.save`` file or a kdpipe bundle directory, read through
    ``checkpoint_key``, renamed by ``strip_prefix`` / ``key_map``, its classifier kept
    fresh with ``reset_classifier``) on top of :func:`create_model`.

    Raises:
        ValueError: both ``weights`` and ``checkpoint`` are set; the checkpoint holds
            pickled objects, belongs to another architecture or class count, or its keys
            or shapes differ (see :func:`load_state_dict_checked`).
        WeightsUnavailableError: pretrained weights cannot be downloaded.
    """
    if cfg.weights is not None and cfg.checkpoint is not None:
        raise ValueError(
            f"model {cfg.arch!r} sets both weights={cfg.weights!r} and "
            f"checkpoint={cfg.checkpoint!r}; the checkpoint would overwrite the weights, "
            "so set only one"
        )
    model = create_model(cfg.arch, num_classes, in_channels, weights=cfg.weights, **cfg.kwargs)
    if cfg.checkpoint is not None:
        state_dict, source = _read_checkpoint(cfg)
        load_state_dict_checked(model, state_dict, source, cfg.reset_classifier)
    return model


def check_checkpoint(cfg: ModelConfig, num_classes: int, in_channels: int) -> None:
    """Raise what :func:`build_model` would raise for ``cfg.checkpoint``, without weights.

    The file is read, but the model is built on the ``meta`` device (no memory, no
    download): a pipeline can check the student's start checkpoint before the teacher
    trains. Does nothing when ``cfg.checkpoint`` is unset.
    """
    if cfg.checkpoint is None:
        return
    with torch.device("meta"):
        model = create_model(cfg.arch, num_classes, in_channels, **cfg.kwargs)
    state_dict, source = _read_checkpoint(cfg)
    _matched(model, state_dict, source, cfg.reset_classifier)


def _read_checkpoint(cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], str]:
    """``cfg.checkpoint``'s tensors under the model's names, and how messages name it."""
    assert cfg.checkpoint is not None
    source = f"checkpoint {cfg.checkpoint}"
    state_dict, bundle_arch = load_checkpoint_state_dict(cfg.checkpoint, cfg.checkpoint_key)
    if bundle_arch is not None and bundle_arch != cfg.arch:
        raise ValueError(
            f"checkpoint bundle {cfg.checkpoint} holds a {bundle_arch!r} model but "
            f"model.arch is {cfg.arch!r}; make them agree"
        )
    return remap_keys(state_dict, cfg.strip_prefix, cfg.key_map, source), source
