"""Pickle-free model bundles: a JSON spec plus safetensors weights.

A bundle is a directory::

    bundle.json          ModelSpec: architecture + constructor arguments, pruned layout,
                         preprocessing, classes, kdpipe version, sha256 of the weights
    weights.safetensors  the state dict (parameters and buffers), nothing executable

Loading never unpickles anything: :func:`load_bundle` rebuilds the architecture with
:func:`kdpipe.models.create_model`, re-applies the pruned ``layout`` (the channel
counts and tensor shapes that structural pruning changed), then copies the tensors in
with a strict ``load_state_dict``. The rebuilt model has the same module types, the
same shapes and the same bits as the saved one, so its outputs are bit-identical.
An ``arch`` that is an import path (the user's own class, :mod:`kdpipe.user_code`) is
imported only when it is trusted: a bundle file alone never chooses code to run.

The layout (:mod:`kdpipe.layout`) is a *diff* against a freshly built architecture:
what structural pruning changed, so the same architecture can be rebuilt with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

import kdpipe
from kdpipe.layout import BundleError, apply_layout, compute_layout
from kdpipe.models import create_model
from kdpipe.registry import UnknownNameError
from kdpipe.user_code import UserCodeError, check_trusted, is_import_path

__all__ = [
    "BUNDLE_FORMAT",
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "Bundle",
    "BundleError",
    "ModelSpec",
    "compute_layout",
    "load_bundle",
    "save_bundle",
]

SPEC_FILE = "bundle.json"
WEIGHTS_FILE = "weights.safetensors"
BUNDLE_FORMAT = 1

_PICKLE_PROTO = b"\x80"  # PROTO opcode: every pickle of protocol >= 2 starts with it
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format wraps a pickle


def _check_json(value: Any, what: str) -> Any:
    """Reject values that JSON cannot round-trip (so a bundle never needs pickle)."""
    try:
        round_tripped = json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be plain JSON (dicts, lists, str, numbers): {err}") from None
    return round_tripped


class ModelSpec(BaseModel):
    """Everything needed to rebuild a model except its tensors (``bundle.json``).

    ``layout`` maps a module path to the changes a fresh ``create_model(arch, ...)``
    needs to match the saved model: ``{"type": class name, "attrs": {name: value},
    "tensors": {name: shape}}``. It is empty for an unpruned model.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bundle_format: int = BUNDLE_FORMAT
    arch: str
    num_classes: int = Field(gt=0)
    in_channels: int = Field(gt=0)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Constructor options for ``create_model`` (never ``weights``: they are in the file)."""
    classes: list[str]
    input_shape: tuple[int, int, int]
    """(C, H, W) of one input sample."""
    mean: tuple[float, ...]
    """Per-channel mean subtracted from raw [0, 1] pixels."""
    std: tuple[float, ...]
    layout: dict[str, dict[str, Any]] = Field(default_factory=dict)
    kdpipe_version: str = kdpipe.__version__
    weights_sha256: str
    """sha256 hex digest of ``weights.safetensors``."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Free-form JSON: training history, metrics, source run..."""

    @field_validator("kwargs", "extra", "layout")
    @classmethod
    def _json_only(cls, v: dict[str, Any], info: Any) -> dict[str, Any]:
        return _check_json(v, info.field_name)

    @field_validator("bundle_format")
    @classmethod
    def _known_format(cls, v: int) -> int:
        if v != BUNDLE_FORMAT:
            raise ValueError(
                f"bundle format {v} is not supported by kdpipe {kdpipe.__version__} "
                f"(it reads format {BUNDLE_FORMAT}); load it with the kdpipe version that wrote it"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        problems = []
        if len(self.classes) != self.num_classes:
            problems.append(f"{len(self.classes)} class names for num_classes={self.num_classes}")
        if self.input_shape[0] != self.in_channels:
            problems.append(f"input_shape {self.input_shape} for in_channels={self.in_channels}")
        if not (len(self.mean) == len(self.std) == self.in_channels):
            problems.append(
                f"mean/std have {len(self.mean)}/{len(self.std)} entries for "
                f"{self.in_channels} channel(s)"
            )
        if any(s <= 0 for s in self.std):
            problems.append(f"std must be positive (got {self.std})")
        if problems:
            raise ValueError("inconsistent model spec: " + "; ".join(problems))
        return self


# ------------------------------------------------------------------------ bundle
def _weights_bytes(model: nn.Module) -> bytes:
    from safetensors.torch import save

    # Contiguous CPU copies: safetensors refuses views and tensors sharing storage.
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        # One metadata key only: safetensors writes its metadata map in hash order, so two
        # keys would make the bytes (and the sha256) differ between identical saves.
        return save(tensors, metadata={"format": "pt"})
    except Exception as err:  # safetensors raises plain errors for shared/odd tensors
        raise BundleError(f"cannot serialise the model's state dict as safetensors: {err}") from err


def _fresh_model(arch: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return create_model(arch, num_classes, in_channels, **kwargs)
    except (UnknownNameError, UserCodeError) as err:
        raise BundleError(f"cannot rebuild the bundle's model: {err}") from None


@dataclass
class Bundle:
    """A model and the spec that rebuilds it.

    Build one with :meth:`from_model` (computes the layout and weights hash), write it
    with :func:`save_bundle`, read it with :func:`load_bundle`.
    """

    model: nn.Module
    spec: ModelSpec

    def __iter__(self):  # noqa: ANN204 - lets ``model, spec = load_bundle(p)`` unpack
        return iter((self.model, self.spec))

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        arch: str,
        classes: list[str] | tuple[str, ...],
        input_shape: tuple[int, int, int] | list[int],
        mean: tuple[float, ...] | list[float],
        std: tuple[float, ...] | list[float],
        kwargs: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Bundle:
        """Describe ``model`` (built by ``create_model(arch, ...)``, maybe pruned since).

        ``num_classes`` and ``in_channels`` follow from ``classes`` and ``input_shape``;
        pass a :class:`~kdpipe.data.DatasetSpec`'s fields, e.g. ``classes=ds.classes``.

        Raises:
            BundleError: the model is not ``arch`` (module tree differs) or ``arch`` is unknown.
            pydantic.ValidationError: inconsistent classes / shape / mean / std, non-JSON extra.
        """
        kwargs = {k: v for k, v in (kwargs or {}).items() if k != "weights"}
        num_classes, in_channels = len(classes), int(input_shape[0])
        reference = _fresh_model(arch, num_classes, in_channels, kwargs)
        spec = ModelSpec(
            arch=arch,
            num_classes=num_classes,
            in_channels=in_channels,
            kwargs=kwargs,
            classes=list(classes),
            input_shape=tuple(int(s) for s in input_shape),
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            layout=compute_layout(model, reference),
            weights_sha256=hashlib.sha256(_weights_bytes(model)).hexdigest(),
            extra=extra or {},
        )
        return cls(model=model, spec=spec)

    def with_extra(self, **updates: Any) -> Bundle:
        """The same model with ``updates`` merged into ``spec.extra`` (spec is frozen)."""
        spec = self.spec.model_copy(update={"extra": {**self.spec.extra, **updates}})
        return Bundle(self.model, ModelSpec.model_validate(spec.model_dump()))


def save_bundle(bundle: Bundle, directory: str | os.PathLike[str]) -> Path:
    """Write ``bundle.json`` + ``weights.safetensors`` into ``directory``, atomically.

    The layout and weights hash are recomputed from the model as it is now, so a model
    edited after :meth:`Bundle.from_model` is still described correctly. Files are
    written to a temporary sibling directory which then replaces ``directory``: a
    reader never sees a half-written bundle.

    Returns:
        The bundle directory.

    Raises:
        BundleError: ``directory`` exists and holds files that are not a bundle (never
            overwritten), the model cannot be described / serialised, or the files cannot
            be written (no permission, disk full; the previous bundle stays intact).
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise BundleError(f"cannot write a bundle to {target}: it is a file, not a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / SPEC_FILE).is_file():
        raise BundleError(
            f"{target} exists and is not a kdpipe bundle ({SPEC_FILE} missing); refusing to "
            "overwrite it; pick an empty or new directory"
        )
    spec, weights = bundle.spec, _weights_bytes(bundle.model)
    reference = _fresh_model(spec.arch, spec.num_classes, spec.in_channels, spec.kwargs)
    spec = ModelSpec.model_validate(
        {
            **spec.model_dump(),
            "layout": compute_layout(bundle.model, reference),
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
        }
    )
    staging: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        (staging / WEIGHTS_FILE).write_bytes(weights)
        (staging / SPEC_FILE).write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
        _replace_dir(staging, target)
    except OSError as err:
        # A full disk (ENOSPC / EFBIG) or a read-only directory: say where, and that the
        # previous bundle (if any) is untouched, since only the staging dir was written.
        raise BundleError(
            f"cannot write the bundle to {target}: {err.strerror or err}; free disk space or "
            f"make {target.parent} writable (a previous bundle there is left unchanged)"
        ) from err
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _replace_dir(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``; an existing target is swapped out, then deleted."""
    if not target.exists():
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        old.rename(target)  # put the previous bundle back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _read_spec(path: Path) -> ModelSpec:
    if not path.is_file():
        raise BundleError(
            f"{path} not found: {path.parent} is not a kdpipe bundle (expected {SPEC_FILE} and "
            f"{WEIGHTS_FILE}; write one with kdpipe.bundle.save_bundle)"
        )
    raw = path.read_bytes()
    if raw[:1] == _PICKLE_PROTO or raw[:4] == _ZIP_MAGIC:
        raise BundleError(f"{path} holds a pickle payload, not JSON; refusing to load it")
    try:
        return ModelSpec.model_validate_json(raw)
    except ValueError as err:
        raise BundleError(f"{path} is not a valid kdpipe model spec: {err}") from None


def _looks_like_safetensors(raw: bytes) -> bool:
    """safetensors = u64 little-endian header length, then a JSON header starting with '{'.

    Checked before the pickle magic bytes: a header length whose low byte is 0x80 would
    otherwise look like a pickle PROTO opcode.
    """
    if len(raw) < 9:
        return False
    header_len = int.from_bytes(raw[:8], "little")
    return raw[8:9] == b"{" and header_len <= len(raw) - 8


def _read_weights(path: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not path.is_file():
        raise BundleError(f"{path} not found: the bundle has no weights file")
    raw = path.read_bytes()
    if not _looks_like_safetensors(raw) and (raw[:1] == _PICKLE_PROTO or raw[:4] == _ZIP_MAGIC):
        # torch.save files (zip or legacy) and raw pickles can run code when loaded.
        raise BundleError(
            f"{path} holds a pickle payload (a torch.save/pickle file), not safetensors; "
            "refusing to load it because unpickling can execute arbitrary code. Re-save the "
            "model with kdpipe.bundle.save_bundle"
        )
    try:
        tensors = load(raw)
    except (SafetensorError, ValueError, OverflowError) as err:
        raise BundleError(
            f"{path} is not a readable safetensors file (truncated or corrupt: {err}); "
            "re-save the bundle"
        ) from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected_sha256:
        raise BundleError(
            f"{path} has sha256 {digest} but {SPEC_FILE} records {expected_sha256}: the "
            "weights were changed or belong to another bundle; re-save the bundle"
        )
    return tensors


def load_bundle(directory: str | os.PathLike[str], *, trust_code: Sequence[str] = ()) -> Bundle:
    """Rebuild the model a bundle directory holds, in eval mode, on the CPU.

    A bundle whose ``arch`` is an import path (the user's own code) is rebuilt only when
    that path is trusted (:mod:`kdpipe.user_code`: the running config names it, or it is
    in ``trust_code``); otherwise nothing is imported and a :class:`BundleError` says how.

    Raises:
        BundleError: missing files; a pickle payload (refused, never unpickled); truncated
            or corrupt safetensors; a weights hash that differs from the spec; an unknown
            architecture (the message lists the valid names); an untrusted or unimportable
            import path; weights that do not fit.
    """
    root = Path(directory)
    spec = _read_spec(root / SPEC_FILE)
    if is_import_path(spec.arch):
        try:
            check_trusted(spec.arch, f"bundle {root}", also=trust_code)
        except UserCodeError as err:
            raise BundleError(str(err)) from None
    tensors = _read_weights(root / WEIGHTS_FILE, spec.weights_sha256)
    model = _fresh_model(spec.arch, spec.num_classes, spec.in_channels, spec.kwargs)
    apply_layout(model, spec.layout)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise BundleError(
            f"the weights in {root / WEIGHTS_FILE} do not fit the rebuilt {spec.arch!r}: {err}"
        ) from None
    return Bundle(model=model.eval(), spec=spec)
