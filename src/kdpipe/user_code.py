"""Architectures from the user's own code: ``model.arch: "package.module:callable"``.

Beside the registered names (:func:`kdpipe.models.list_models`), ``model.arch`` may be an
import path to a class or factory function that returns an ``nn.Module``.
:func:`build` calls it with ``model.kwargs``, adding ``num_classes`` / ``in_channels``
only where the callable's signature has parameters of those names, and checks that the
model's classifier (its last ``nn.Linear``) has one output per class.

Where the code is found: the installed packages, plus the *project directories* (the
directory of the config file and the working directory, :func:`project_dirs`), which
are importable without installing anything. The directories are kept in the
``KDPIPE_CODE_DIRS`` environment variable so that step processes and DDP workers started
from the CLI's process find the same code.

When code is imported: building by import path (:func:`build`, ``create_model``) imports
it, since the code or config asking for it names it. A bundle file
(:func:`kdpipe.bundle.load_bundle`) is data, and data must not choose which code runs: a
bundle's import path is imported only when it is *trusted*: the running config names it
(:func:`activate`, called by the CLI), a model was built from it in this process
(:func:`build` trusts what it imports, so ``build_model`` of a config trusts its own
``arch``), or it is trusted explicitly (``load_bundle(..., trust_code=[...])``,
:func:`trust`, or the ``KDPIPE_TRUST_CODE`` environment variable, comma-separated). The
allow-list lives in the environment for the same reason as the directories.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kdpipe.model_registry import named_classifier

__all__ = ["CODE_DIRS_ENV", "TRUST_ENV", "UserCodeError", "activate", "add_code_dirs", "build",
           "call_arguments", "check_model", "check_trusted", "code_dirs", "is_import_path",
           "is_trusted", "option_names", "project_dirs", "resolve", "source_digest",
           "split_import_path", "trust", "trusted_paths", "trusting"]

TRUST_ENV = "KDPIPE_TRUST_CODE"
"""Comma-separated import paths that bundles may import (the process-wide allow-list)."""
CODE_DIRS_ENV = "KDPIPE_CODE_DIRS"
"""``os.pathsep``-separated project directories that import paths are searched in."""

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_SET_BY_KDPIPE = ("num_classes", "in_channels")


class UserCodeError(ValueError):
    """An import-path architecture that cannot be imported, built or trusted."""


# ------------------------------------------------------------------- names, dirs
def is_import_path(arch: str) -> bool:
    """Whether ``arch`` is an import path (``module:callable``), not a registered name."""
    return ":" in arch


def split_import_path(path: str) -> tuple[str, str]:
    """``"pkg.mod:Factory"`` → ``("pkg.mod", "Factory")``.

    Raises:
        UserCodeError: not of the form ``package.module:callable``.
    """
    module, _, attr = path.partition(":")
    if not (_DOTTED.fullmatch(module) and _DOTTED.fullmatch(attr)):
        raise UserCodeError(
            f"{path!r} is not an import path: write 'package.module:callable' (a module "
            "importable from the project directory, a colon, then a class or function in it, "
            "e.g. 'my_models:TinyNet'), or use a registered name (kdpipe.models.list_models())")
    return module, attr


def project_dirs(config_path: str | os.PathLike[str] | None = None) -> list[Path]:
    """The directories a project's code is imported from: the config's, then the cwd."""
    dirs = [Path(config_path).resolve().parent] if config_path is not None else []
    dirs.append(Path.cwd().resolve())
    return list(dict.fromkeys(dirs))


def code_dirs() -> list[Path]:
    """The project directories recorded in :data:`CODE_DIRS_ENV`, then the cwd."""
    recorded = [Path(d) for d in os.environ.get(CODE_DIRS_ENV, "").split(os.pathsep) if d]
    return list(dict.fromkeys([*recorded, Path.cwd().resolve()]))


def add_code_dirs(dirs: Iterable[str | os.PathLike[str]]) -> None:
    """Record more project directories (in the environment, so child processes see them)."""
    recorded = [d for d in os.environ.get(CODE_DIRS_ENV, "").split(os.pathsep) if d]
    merged = dict.fromkeys([*recorded, *(str(Path(d).resolve()) for d in dirs)])
    os.environ[CODE_DIRS_ENV] = os.pathsep.join(merged)


# ------------------------------------------------------------------------- trust
def trusted_paths() -> set[str]:
    """The import paths bundles may import now."""
    return {p.strip() for p in os.environ.get(TRUST_ENV, "").split(",") if p.strip()}


def is_trusted(path: str) -> bool:
    """Whether a bundle naming ``path`` may import it."""
    return path in trusted_paths()


def trust(paths: Iterable[str]) -> None:
    """Add import paths to the process-wide allow-list (registered names are ignored)."""
    new = [p for p in paths if is_import_path(p)]
    if new:
        os.environ[TRUST_ENV] = ",".join(sorted(trusted_paths() | set(new)))


@contextlib.contextmanager
def trusting(paths: Iterable[str]) -> Iterator[None]:
    """Trust ``paths`` inside a ``with`` block only."""
    before = os.environ.get(TRUST_ENV)
    trust(paths)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TRUST_ENV, None)
        else:
            os.environ[TRUST_ENV] = before


def check_trusted(path: str, source: str, also: Sequence[str] = ()) -> None:
    """Refuse, without importing anything, an import path that is neither trusted nor in ``also``.

    Raises:
        UserCodeError: naming the path, where it came from and the two ways to trust it.
    """
    if path in also or is_trusted(path):
        return
    raise UserCodeError(
        f"{source} names the architecture {path!r}, code from outside kdpipe; it was not "
        "imported, because kdpipe imports code only when the running config names it "
        f"(model.arch: {path!r}) or it is trusted explicitly: load_bundle(..., "
        f"trust_code=[{path!r}]) from Python, or the environment variable {TRUST_ENV}={path}")


def activate(config: Any, config_path: str | os.PathLike[str] | None = None) -> list[str]:
    """Make a running config's project importable and trust the import paths it names.

    Args:
        config: a :class:`~kdpipe.config.PipelineConfig` (its teacher and student models).
        config_path: the config file; its directory becomes a project directory.

    Returns:
        The import paths now trusted because of ``config``.
    """
    add_code_dirs(project_dirs(config_path))
    paths = [getattr(config, role).model.arch for role in ("teacher", "student")]
    named = [p for p in paths if is_import_path(p)]
    trust(named)
    return named


# ------------------------------------------------------------------- importing
def _import(module_name: str, path: str, dirs: list[str]) -> Any:
    for d in dirs:
        if d not in sys.path:
            sys.path.append(d)  # after the installed packages: they are never shadowed
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(f"{err.name}.")):
            raise UserCodeError(
                f"cannot import {path!r}: module {module_name!r} not found (so attribute "
                f"{path.partition(':')[2]!r} was not looked up); searched the installed "
                f"packages and the project directories {dirs}; put "
                f"{module_name.replace('.', '/')}.py next to the config file or in the "
                f"working directory, install its package (pip install -e .), or add its "
                f"folder to {CODE_DIRS_ENV}") from None
        raise UserCodeError(f"cannot import {path!r}: module {module_name!r} was found but "
                            f"importing it failed: {err} (install what it needs)") from err
    except Exception as err:  # the user's module raised while being imported
        raise UserCodeError(f"cannot import {path!r}: importing module {module_name!r} raised "
                            f"{type(err).__name__}: {err}") from err


def resolve(path: str, search_dirs: Iterable[str | os.PathLike[str]] | None = None
            ) -> Callable[..., Any]:
    """The callable an import path names, imported from the installed packages and
    ``search_dirs`` (default: :func:`code_dirs`).

    Raises:
        UserCodeError: a malformed path; the module is not found or fails to import; the
            attribute is missing or not callable. Messages name the module, the attribute
            and the directories searched.
    """
    module_name, attr = split_import_path(path)
    dirs = [str(Path(d).resolve()) for d in (code_dirs() if search_dirs is None else search_dirs)]
    module = _import(module_name, path, dirs)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items()
                            if callable(v) and not n.startswith("_"))
            raise UserCodeError(
                f"cannot import {path!r}: module {module_name!r} "
                f"({getattr(module, '__file__', '?')}) has no attribute {attr!r}; its callables: "
                f"{', '.join(public) or '(none)'} (searched the installed packages and {dirs})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserCodeError(f"{path!r} is a {type(obj).__name__}, not a class or function")
    return obj


def source_digest(path: str) -> str:
    """sha256 of the source file of the module ``path`` names (for cache keys: a changed
    class must not reuse a model trained with the old one). Imports the module (call it
    for trusted paths only); the files that module imports are not included.

    Raises:
        UserCodeError: as :func:`resolve`, or the module has no source file.
    """
    resolve(path)  # imports the module (and checks the attribute)
    module = sys.modules[split_import_path(path)[0]]
    source = getattr(module, "__file__", None)
    if not source or not Path(source).is_file():
        raise UserCodeError(f"module {module.__name__!r} of {path!r} has no source file to hash")
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()


def option_names(factory: Callable[..., Any]) -> list[str] | None:
    """The keyword options ``factory`` takes (``None``: it takes ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


# ---------------------------------------------------------------------- building
def call_arguments(path: str, factory: Callable[..., Any], num_classes: int, in_channels: int,
                   kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus ``num_classes`` / ``in_channels`` where the signature names them.

    Raises:
        UserCodeError: ``kwargs`` sets one of those two (kdpipe sets them from the data),
            or names an option the callable does not take.
    """
    taken = sorted(set(kwargs) & set(_SET_BY_KDPIPE))
    if taken:
        raise UserCodeError(f"{path!r}: model.kwargs sets {taken}, which kdpipe passes from the "
                            "dataset (when the callable takes them); remove them from kwargs")
    options = option_names(factory)
    unknown = sorted(set(kwargs) - set(options)) if options is not None else []
    if unknown:
        accepted = [o for o in options or () if o not in _SET_BY_KDPIPE]
        raise UserCodeError(f"{path!r} takes no option(s) {unknown}; it accepts: "
                            f"{', '.join(accepted) or 'no options'}")
    args = dict(kwargs)
    names = option_names(factory) or []
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if name in names:
            args[name] = value
    return args


def check_model(path: str, model: Any, num_classes: int | None) -> nn.Module:
    """``model`` if it is an ``nn.Module`` whose classifier has ``num_classes`` outputs.

    Raises:
        UserCodeError: naming the callable and what it returned.
    """
    if not isinstance(model, nn.Module):
        raise UserCodeError(f"{path!r} returned {type(model).__module__}."
                            f"{type(model).__qualname__} ({str(model)[:60]!r}), not a "
                            "torch.nn.Module; point model.arch at a module class or a function "
                            "returning one")
    try:
        head_name, head = named_classifier(model)
    except ValueError:
        raise UserCodeError(f"{path!r} returned a {type(model).__name__} without an nn.Linear; "
                            "kdpipe needs the model to end in an nn.Linear classifier") from None
    if num_classes is not None and head.out_features != num_classes:
        raise UserCodeError(
            f"{path!r} returned a {type(model).__name__} with {head.out_features} outputs (its "
            f"classifier {head_name!r}) but the dataset has {num_classes} classes; give the "
            "callable a num_classes parameter, or set its width in model.kwargs")
    return model


def build(path: str, num_classes: int, in_channels: int, kwargs: dict[str, Any] | None = None,
          *, check_width: bool = True) -> nn.Module:
    """Import ``path``, call it and check what it returned (see :func:`call_arguments`).

    ``check_width=False`` skips the class-count check (meta builds with a placeholder count).

    Raises:
        UserCodeError: the path does not resolve, the call fails, the result is not an
            ``nn.Module`` or its output width is not ``num_classes``.
    """
    factory = resolve(path)
    trust([path])  # code (or a config) named it: bundles of it may now be loaded
    args = call_arguments(path, factory, num_classes, in_channels, dict(kwargs or {}))
    try:
        model = factory(**args)
    except Exception as err:  # the user's code may raise anything: name it, keep the cause
        raise UserCodeError(f"calling {path!r} with {args} failed: {type(err).__name__}: "
                            f"{err}") from err
    return check_model(path, model, num_classes if check_width else None)
