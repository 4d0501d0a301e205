"""Weights files as people have them, read into a state dict with declared options.

:func:`load_checkpoint_state_dict` reads a ``.safetensors`` file, a ``torch.save`` file
(:data:`TORCH_SUFFIXES`) or a kdpipe bundle directory. A torch file may be a plain state
dict or a dict holding one under a common entry (:data:`STATE_DICT_KEYS`, or the
``checkpoint_key`` named) next to epochs, optimizer states and hyper-parameters.
:func:`remap_keys` then applies ``strip_prefix`` and ``key_map`` (DataParallel's
``module.``, a Lightning module's ``model.``, renamed layers).

Torch files are read with ``torch.load(weights_only=True)`` only: tensors, dicts, lists and
plain values load; a pickled object is refused before any of its code can run, with an
error that says how to re-save the weights. :mod:`kdpipe.build` matches the result to a
model.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kdpipe.bundle import load_bundle

__all__ = [
    "SHOWN_KEYS",
    "STATE_DICT_KEYS",
    "TORCH_SUFFIXES",
    "first_keys",
    "load_checkpoint_state_dict",
    "load_weights_only",
    "remap_keys",
]

logger = logging.getLogger(__name__)

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "ema")
"""Where a torch file's weights are looked for when ``checkpoint_key`` is unset."""

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".pth.tar", ".bin")
"""``torch.save`` files, read with ``weights_only=True`` (``.ckpt``: PyTorch Lightning's,
``.pth.tar``: timm's train.py's, ``.bin``: Hugging Face's ``pytorch_model.bin``)."""

# Classes a weights-only load may rebuild besides tensors and plain values: plain attribute
# bags whose rebuilding runs no code of theirs. timm's train.py saves its argparse arguments
# next to the weights, so without this every timm training checkpoint would be refused.
_SAFE_GLOBALS = [argparse.Namespace]

SHOWN_KEYS = 5
"""How many keys an error message lists."""


def first_keys(keys: list[str], n: int = SHOWN_KEYS) -> list[str]:
    """The first ``n`` keys for a message, BatchNorm counters last (safetensors files list
    int64 tensors first, and ``num_batches_tracked`` says little about a layout)."""
    return sorted(keys, key=lambda k: k.endswith("num_batches_tracked"))[:n]


def load_checkpoint_state_dict(
    path: str | Path, key: str | None = None
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read weights from a ``.safetensors`` file, a ``torch.save`` file or a kdpipe bundle.

    Args:
        path: the file or bundle directory.
        key: for ``torch.save`` files (:data:`TORCH_SUFFIXES`), the entry holding the
            state dict. ``None``: the file itself when it is a dict of tensors, else the
            first of :data:`STATE_DICT_KEYS` that holds one (a Lightning checkpoint's
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
            ".safetensors / torch.save file or kdpipe bundle directory)"
        )
    if p.name.endswith(TORCH_SUFFIXES) and not p.is_dir():
        return _select_state_dict(load_weights_only(p), key, p), None
    if p.is_dir() or p.suffix == ".safetensors":
        if key is not None:
            raise ValueError(
                f"model.checkpoint_key={key!r} only applies to torch.save files, but {p} is "
                f"{'a kdpipe bundle' if p.is_dir() else 'a .safetensors file'} holding one "
                "flat state dict; remove checkpoint_key (strip_prefix / key_map rename keys)"
            )
        if p.is_dir():
            model, spec = load_bundle(p)
            return dict(model.state_dict()), spec.arch
        from safetensors.torch import load_file

        return load_file(str(p)), None
    raise ValueError(
        f"unsupported checkpoint {p}: use a .safetensors file, a torch.save file "
        f"({', '.join(TORCH_SUFFIXES)}) or a kdpipe bundle directory"
    )


def load_weights_only(p: Path, *, mmap: bool = False) -> Any:
    """``torch.load(p, weights_only=True)`` (plus ``argparse.Namespace``), refusals re-worded.

    Args:
        p: a ``torch.save`` file.
        mmap: memory-map the file instead of reading it (a cheap check of a large file).

    Raises:
        ValueError: the file holds a pickled object (named; it never ran) or cannot be
            read, with how to re-save the weights.
    """
    torch.serialization.add_safe_globals(_SAFE_GLOBALS)  # idempotent; torch>=2.4
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # a pickled object: refused before it ran
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        raise ValueError(
            f"{p} holds {what}, and kdpipe loads torch.save files with "
            "torch.load(weights_only=True) only (a pickle can run any code); save a plain "
            "state dict, torch.save(model.state_dict(), path), or better a .safetensors "
            "file, safetensors.torch.save_file(model.state_dict(), path)"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:  # truncated or not a torch file
        reason = (str(err).splitlines() or [repr(err)])[0]
        raise ValueError(
            f"{p} cannot be read by torch.load ({reason}); is it a complete file written by "
            "torch.save? A .safetensors file is safer to ship"
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
    """The state dict inside a loaded torch file (see :func:`load_checkpoint_state_dict`)."""
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
                f"{source} (first: {first_keys(list(sd), 3)}); fix it or remove it"
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
            f"keys of {source} (first: {first_keys(list(sd), 3)}); fix it or remove it"
        )
    return renamed
