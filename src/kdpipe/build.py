"""A model from its config: architecture, then pretrained weights or a start checkpoint.

:func:`build_model` turns a :class:`~kdpipe.config.ModelConfig` into a module: it builds
the architecture with :func:`kdpipe.models.create_model` (torchvision weights included)
and loads ``model.checkpoint`` on top, from a ``.safetensors`` / ``.pt`` / ``.pth`` file
or a kdpipe bundle directory. Checkpoints as people have them load through declared
options, never guesses: ``checkpoint_key`` (where the state dict sits in the file),
``strip_prefix`` and ``key_map`` (DataParallel / Lightning key names) and
``reset_classifier`` (a head trained on another class count). A mismatch names the
missing, unexpected and reshaped keys and the option that would fix it.

``.pt`` files are read with ``torch.load(weights_only=True)`` only: tensors, dicts, lists
and numbers load; a pickled object is refused before any of its code can run.

It sits above both :mod:`kdpipe.models` and :mod:`kdpipe.bundle`, so neither of those
needs the other's loading code.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdpipe.bundle import load_bundle
from kdpipe.model_registry import named_classifier
from kdpipe.models import create_model

if TYPE_CHECKING:
    from kdpipe.config import ModelConfig

__all__ = [
    "STATE_DICT_KEYS",
    "build_model",
    "load_checkpoint_state_dict",
    "load_state_dict_checked",
    "remap_keys",
]

logger = logging.getLogger(__name__)

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "ema")
"""Where a ``.pt`` checkpoint's weights are looked for when ``checkpoint_key`` is unset."""

_SHOWN = 5  # keys shown per list in an error message


def load_checkpoint_state_dict(
    path: str | Path, key: str | None = None
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read weights from a ``.safetensors`` / ``.pt`` / ``.pth`` file or a kdpipe bundle.

    Args:
        path: the file or bundle directory.
        key: for ``.pt`` / ``.pth`` files, the entry holding the state dict. ``None``: the
            file itself when it is a dict of tensors, else the first of
            :data:`STATE_DICT_KEYS` that holds one (a Lightning checkpoint's
            ``state_dict``, next to its epoch and optimizer states).

    Returns:
        The state dict, and the bundle's architecture name (``None`` for plain files).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds pickled objects (refused unread), has no state dict
            where one is looked for (its keys are listed), or ``key`` is given for a
            file without entries.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"model checkpoint not found: {p} (set model.checkpoint to an existing "
            ".safetensors/.pt file or kdpipe bundle directory)"
        )
    if p.suffix in {".pt", ".pth"} and not p.is_dir():
        return _select_state_dict(_load_weights_only(p), key, p), None
    if p.is_dir() or p.suffix == ".safetensors":
        if key is not None:
            raise ValueError(
                f"model.checkpoint_key={key!r} only applies to .pt/.pth files, but {p} is "
                f"{'a kdpipe bundle' if p.is_dir() else 'a .safetensors file'} holding one "
                "flat state dict; remove checkpoint_key (strip_prefix / key_map rename keys)"
            )
        if p.is_dir():
            model, spec = load_bundle(p)
            return dict(model.state_dict()), spec.arch
        from safetensors.torch import load_file

        return load_file(str(p)), None
    raise ValueError(
        f"unsupported checkpoint {p}: use a .safetensors, .pt or .pth file or a bundle directory"
    )


def _load_weights_only(p: Path) -> Any:
    """``torch.load(weights_only=True)``, its refusals re-worded with the fix."""
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a pickled object: refused before it ran
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        raise ValueError(
            f"{p} holds {what}, and kdpipe loads .pt/.pth files with "
            "torch.load(weights_only=True) only (a pickle can run any code); save a plain "
            "state dict, torch.save(model.state_dict(), path), or better a .safetensors "
            "file, safetensors.torch.save_file(model.state_dict(), path)"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:  # truncated or not a torch file
        raise ValueError(
            f"{p} cannot be read by torch.load ({str(err).splitlines()[0]}); is it a "
            "complete file written by torch.save? A .safetensors file is safer to ship"
        ) from err


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _describe(obj: Mapping) -> str:
    def kind(value: Any) -> str:
        if _is_state_dict(value):
            return f"dict of {len(value)} tensors"
        return type(value).__name__

    shown = [f"{k!r} ({kind(v)})" for k, v in list(obj.items())[:10]]
    return ", ".join(shown) + (f" and {len(obj) - 10} more" if len(obj) > 10 else "")


def _select_state_dict(obj: Any, key: str | None, p: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded ``.pt`` object (see :func:`load_checkpoint_state_dict`)."""
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{p} holds a {type(obj).__name__}, not a dict; save model.state_dict()"
        )
    if key is not None:
        if key not in obj:
            raise ValueError(
                f"{p} has no entry model.checkpoint_key={key!r}; its entries: {_describe(obj)}"
            )
        if not _is_state_dict(obj[key]):
            raise ValueError(
                f"{p}[{key!r}] is not a dict of tensors; its entries: {_describe(obj)}; "
                "set model.checkpoint_key to the entry holding the weights"
            )
        return dict(obj[key])
    if _is_state_dict(obj):
        return dict(obj)
    for name in STATE_DICT_KEYS:
        if _is_state_dict(obj.get(name)) and obj[name]:
            logger.info("%s: loading the state dict under %r", p, name)
            return dict(obj[name])
    nested = [k for k, v in obj.items() if _is_state_dict(v) and v]
    fix = (
        f"set model.checkpoint_key to {' or '.join(map(repr, nested))}"
        if nested
        else "save the weights as a dict of tensors, torch.save(model.state_dict(), path)"
    )
    raise ValueError(
        f"{p} holds no state dict at its top level or under {', '.join(STATE_DICT_KEYS)}; "
        f"its entries: {_describe(obj)}; {fix}"
    )


def remap_keys(
    state_dict: Mapping[str, torch.Tensor],
    strip_prefix: str | None = None,
    key_map: Mapping[str, str] | None = None,
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Rename a checkpoint's keys to the model's: ``strip_prefix``, then ``key_map``.

    Args:
        state_dict: the checkpoint's tensors.
        strip_prefix: only the keys under this prefix are kept, with it removed
            (``module.`` for DataParallel / DDP, ``model.`` for a Lightning module's
            ``self.model``, leaving out e.g. a loss module's buffers).
        key_map: prefix renames ``old -> new``; the longest matching ``old`` wins and
            ``""`` matches every key (``{"": "backbone."}`` prefixes them all).
        source: how error messages name the checkpoint.

    Raises:
        ValueError: ``strip_prefix`` or a ``key_map`` entry matches no key (a few keys
            are shown), or two keys end up with the same name.
    """
    sd = dict(state_dict)
    if strip_prefix:
        kept = {k.removeprefix(strip_prefix): v for k, v in sd.items() if k.startswith(strip_prefix)}
        if not kept:
            raise ValueError(
                f"model.strip_prefix={strip_prefix!r} matches none of the {len(sd)} keys of "
                f"{source} (first: {list(sd)[:3]}); fix it or remove it"
            )
        if len(kept) < len(sd):
            logger.info("%s: strip_prefix %r leaves out %d key(s) without it, e.g. %s",
                        source, strip_prefix, len(sd) - len(kept),
                        [k for k in sd if not k.startswith(strip_prefix)][:3])
        sd = kept
    if not key_map:
        return sd
    olds = sorted(key_map, key=len, reverse=True)
    used: set[str] = set()
    renamed: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        old = next((o for o in olds if k.startswith(o)), None)
        new_key = k if old is None else key_map[old] + k[len(old):]
        if old is not None:
            used.add(old)
        if new_key in renamed:
            raise ValueError(
                f"model.key_map renames two keys of {source} to {new_key!r}; make the "
                "renames distinct"
            )
        renamed[new_key] = v
    unused = [o for o in key_map if o not in used]
    if unused:
        raise ValueError(
            f"model.key_map entry {unused[0]!r}: {key_map[unused[0]]!r} matches none of the "
            f"keys of {source} (first: {list(sd)[:3]}); fix it or remove it"
        )
    return renamed


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
    sd = dict(state_dict)
    if reset_classifier:
        head_name, head = named_classifier(model)
        sd.update({f"{head_name}.{k}": v.clone() for k, v in head.state_dict().items()})
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    reshaped = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {missing[:_SHOWN]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {unexpected[:_SHOWN]}")
        if reshaped:
            parts.append(f"{len(reshaped)} shape difference(s): " + ", ".join(
                f"{k!r}: checkpoint shape {tuple(sd[k].shape)} vs model shape "
                f"{tuple(expected[k].shape)}" for k in reshaped[:_SHOWN]))
        fixes = _suggested_fixes(model, sd, expected, missing, unexpected, reshaped)
        raise ValueError(
            f"{source} does not match {type(model).__name__}: {'; '.join(parts)}; "
            + "; ".join(fixes)
        )
    model.load_state_dict(sd, strict=True)


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
            "pruned layout)? A .pt file may hold other entries: see model.checkpoint_key"
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
    ``.safetensors``/``.pt``/``.pth`` file or a kdpipe bundle directory, read through
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
        source = f"checkpoint {cfg.checkpoint}"
        state_dict, bundle_arch = load_checkpoint_state_dict(cfg.checkpoint, cfg.checkpoint_key)
        if bundle_arch is not None and bundle_arch != cfg.arch:
            raise ValueError(
                f"checkpoint bundle {cfg.checkpoint} holds a {bundle_arch!r} model but "
                f"model.arch is {cfg.arch!r}; make them agree"
            )
        state_dict = remap_keys(state_dict, cfg.strip_prefix, cfg.key_map, source)
        load_state_dict_checked(model, state_dict, source, cfg.reset_classifier)
    return model
