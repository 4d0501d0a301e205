"""A pruned model's structure as a diff against its freshly built architecture.

:func:`compute_layout` records, for every module whose tensors or plain attributes
(``in_channels``, ``groups``, ``num_features``...) differ from a fresh build, the new
values; :func:`apply_layout` re-applies them to a fresh build so that a strict
``load_state_dict`` fits. An unpruned model has an empty layout. Torch-Pruning edits
modules in place exactly this way (new tensors, updated attributes), which is why the
diff captures its structural state for the Conv/BN/Linear models kdpipe registers.
:mod:`kdpipe.bundle` stores the layout in a bundle's spec.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["BundleError", "apply_layout", "compute_layout"]

# Plain (non-tensor) attribute types a layout may record. Anything else (a callable,
# a module, a tensor) is either rebuilt by the constructor or is not structural.
_LAYOUT_SCALARS = (bool, int, float, str)


class BundleError(ValueError):
    """A bundle that cannot be written or read, naming the file and the fix."""


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    """Public scalar / tuple-of-scalar attributes (structural hyper-parameters)."""
    out: dict[str, Any] = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training":
            continue
        if isinstance(value, _LAYOUT_SCALARS) or (
            isinstance(value, (tuple, list)) and all(isinstance(v, _LAYOUT_SCALARS) for v in value)
        ):
            out[name] = list(value) if isinstance(value, (tuple, list)) else value
    return out


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers held directly by ``module`` (not by its children)."""
    found = dict(module.named_parameters(recurse=False))
    found.update((n, b) for n, b in module.named_buffers(recurse=False) if b is not None)
    return found


def compute_layout(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, Any]]:
    """The per-module changes that turn ``reference`` (a fresh build) into ``model``.

    Args:
        model: the (possibly pruned) model.
        reference: ``create_model(arch, ...)`` with the same arguments.

    Returns:
        ``{module_path: {"type", "attrs", "tensors"}}`` for modules that differ; attribute
        values and tensor shapes are those of ``model``.

    Raises:
        BundleError: the module trees differ (a module added, removed or replaced by
            another type), so no layout can describe ``model`` in terms of ``arch``.
    """
    mods, refs = dict(model.named_modules()), dict(reference.named_modules())
    if mods.keys() != refs.keys():
        added, removed = sorted(mods.keys() - refs.keys()), sorted(refs.keys() - mods.keys())
        raise BundleError(
            f"the model's module tree differs from a fresh {type(reference).__name__}: "
            f"added {added[:5]}, removed {removed[:5]}; a bundle can hold only models built by "
            "kdpipe.models.create_model (pruning may change shapes, not the module tree)"
        )
    layout: dict[str, dict[str, Any]] = {}
    for path, module in mods.items():
        ref = refs[path]
        if type(module) is not type(ref):
            raise BundleError(
                f"module {path!r} is a {type(module).__name__} but the architecture builds a "
                f"{type(ref).__name__}; a bundle cannot describe a replaced module"
            )
        attrs, ref_attrs = _plain_attrs(module), _plain_attrs(ref)
        changed_attrs = {k: v for k, v in attrs.items() if ref_attrs.get(k) != v}
        tensors, ref_tensors = _own_tensors(module), _own_tensors(ref)
        if tensors.keys() != ref_tensors.keys():
            raise BundleError(
                f"module {path!r} holds tensors {sorted(tensors)} but the architecture's holds "
                f"{sorted(ref_tensors)}"
            )
        changed_shapes = {
            k: list(t.shape) for k, t in tensors.items() if t.shape != ref_tensors[k].shape
        }
        if changed_attrs or changed_shapes:
            layout[path] = {
                "type": type(module).__name__,
                "attrs": changed_attrs,
                "tensors": changed_shapes,
            }
    return layout


def apply_layout(model: nn.Module, layout: dict[str, dict[str, Any]]) -> None:
    """Resize the modules of a fresh build as ``layout`` says (values are loaded later)."""
    for path, change in layout.items():
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            raise BundleError(
                f"the bundle's layout names module {path!r}, which the architecture does not "
                "have; the bundle was written for a different architecture or kdpipe version"
            ) from None
        if type(module).__name__ != change.get("type"):
            raise BundleError(
                f"the bundle's layout expects {path!r} to be a {change.get('type')} but the "
                f"architecture builds a {type(module).__name__}"
            )
        for name, value in change.get("attrs", {}).items():
            current = getattr(module, name, None)
            setattr(module, name, tuple(value) if isinstance(current, tuple) else value)
        for name, shape in change.get("tensors", {}).items():
            old = getattr(module, name)
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module._buffers[name] = new  # keeps persistence flags of the buffer
