"""What can be known about files, caches and downloads before the first step starts.

:mod:`kdpipe.validate` checks a config without touching the disk; this module checks what
the run will need from outside the config, so that a missing file is exit 2 in a second,
not a failed step after ZenML has started:

- an image folder that does not exist;
- torchvision or Fashion-MNIST dataset files that are missing while ``data.download``
  is false;
- a ``model.checkpoint`` that does not exist, a ``torch.save`` file that holds a pickle
  (refused by the weights-only loader; its payload never runs), or one whose keys and
  shapes do not fit the model (checked on the meta device, before the teacher trains);
- pretrained weights that are neither in torch.hub's cache nor downloadable (the only
  network access, and only for weights the config asks for: a HEAD request).

Problems are :class:`kdpipe.validate.Problem` values, reported with validate's.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from kdpipe.build import check_checkpoint
from kdpipe.config import DataConfig, ModelConfig, PipelineConfig
from kdpipe.idx import find_idx_pair
from kdpipe.models_tv import pretrained_file
from kdpipe.sources import (
    TORCHVISION_NAMES,
    DataError,
    fashion_mnist_dirs,
    known_class_count,
    open_torchvision_split,
)
from kdpipe.state_dicts import TORCH_SUFFIXES, load_weights_only
from kdpipe.validate import Problem, input_channels

__all__ = ["preflight", "url_reachable"]

_PROBE_TIMEOUT_S = 5.0


def url_reachable(url: str) -> str | None:
    """None when ``url`` answers a HEAD request, else why not (one short try, no retry)."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=_PROBE_TIMEOUT_S):
            return None
    except (urllib.error.URLError, OSError, ValueError) as err:
        return str(getattr(err, "reason", err))


def preflight(config: PipelineConfig, *, prefix: str = "parameters",
              reachable: Callable[[str], str | None] = url_reachable) -> list[Problem]:
    """Every missing file or unavailable download ``config`` needs (empty when none)."""
    found = _data_problems(config.data, f"{prefix}.data")
    for role in ("teacher", "student"):
        path = f"{prefix}.{role}.model"
        model_problems = _model_problems(getattr(config, role).model, path, reachable)
        found += model_problems or _fit_problems(getattr(config, role).model, config.data, path)
    if config.teacher.onnx is not None:
        found += _onnx_teacher_problems(config, f"{prefix}.teacher.onnx")
    return found


def _class_count(cfg: DataConfig) -> int | None:
    """The dataset's class count where it is known without reading the data."""
    kind, _, arg = cfg.source.partition(":")
    if kind == "imagefolder":
        root = Path(arg).expanduser()
        if not root.is_dir():
            return None
        return sum(1 for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return known_class_count(cfg)


def _fit_problems(cfg: ModelConfig, data: DataConfig, path: str) -> list[Problem]:
    """A start checkpoint that does not fit the model (keys, shapes, classes), on meta."""
    classes = _class_count(data)
    if cfg.checkpoint is None or classes is None:
        return []
    try:
        check_checkpoint(cfg, classes, input_channels(data))
    except (ValueError, OSError) as err:
        return [Problem(f"{path}.checkpoint", str(err))]
    return []


def _onnx_teacher_problems(config: PipelineConfig, path: str) -> list[Problem]:
    """The ONNX teacher file: exists, valid, standard ops, opens in ONNX Runtime, and has
    the dataset's channel count (the full shape is checked against the dataset by
    ``finetune_teacher`` before anything else)."""
    from kdpipe.onnx_teacher import onnx_file_problem

    assert config.teacher.onnx is not None
    pre = config.teacher.model.preprocessing
    problem = onnx_file_problem(config.teacher.onnx, input_channels(config.data),
                                pre.layout if pre is not None else "NCHW")
    return [] if problem is None else [Problem(path, problem)]


def _data_problems(cfg: DataConfig, path: str) -> list[Problem]:
    kind, _, arg = cfg.source.partition(":")
    if kind == "imagefolder" and arg and not Path(arg).expanduser().is_dir():
        return [Problem(f"{path}.source", f"image folder {Path(arg).expanduser()} does not "
                                          "exist or is not a folder; point data.source at "
                                          "imagefolder:<folder with one sub-folder per class>")]
    if kind == "fashion_mnist" and not cfg.download:
        dirs = fashion_mnist_dirs(arg, cfg.root)
        if not any(find_idx_pair(d, "train") and find_idx_pair(d, "test") for d in dirs):
            return [Problem(f"{path}.source", (
                f"Fashion-MNIST IDX files not found in {', '.join(map(str, dirs))}; get them "
                "with `apt install dataset-fashion-mnist`, or once with data.download: true, "
                "or give the folder as fashion_mnist:<folder>"))]
    if kind == "torchvision" and arg in TORCHVISION_NAMES and not cfg.download:
        try:  # reads the files (a second for MNIST); only a download would be slow
            for train in (True, False):
                open_torchvision_split(arg, str(Path(cfg.root).expanduser()), train, False)
        except DataError as err:
            return [Problem(f"{path}.source", str(err))]
    return []


def _checkpoint_problems(file: Path, path: str) -> list[Problem]:
    """A missing file, or a ``torch.save`` file the weights-only loader refuses.

    The file is memory-mapped, not read: the check costs the header, and a pickle payload
    is refused by the weights-only unpickler without running (the loader and its messages
    are :mod:`kdpipe.state_dicts`', the same the training step uses).
    """
    if not file.exists():
        return [Problem(path, f"model checkpoint not found: {file}")]
    if file.is_file() and file.name.endswith(TORCH_SUFFIXES):
        try:
            load_weights_only(file, mmap=True)
        except ValueError as err:
            return [Problem(path, str(err))]
    return []


def _model_problems(cfg: ModelConfig, path: str, reachable: Callable[[str], str | None]
                    ) -> list[Problem]:
    found = []
    if cfg.checkpoint is not None:
        found += _checkpoint_problems(Path(cfg.checkpoint).expanduser(), f"{path}.checkpoint")
    if cfg.weights is not None and cfg.arch.startswith("tv_"):
        try:
            url, cached = pretrained_file(cfg.arch, cfg.weights)
        except ValueError as err:
            return [*found, Problem(f"{path}.weights", str(err))]
        if not cached.is_file() and (why := reachable(url)) is not None:
            found.append(Problem(f"{path}.weights", (
                f"pretrained weights {cfg.weights} for {cfg.arch} are not cached ({cached}) "
                f"and cannot be downloaded from {url} ({why}). Fix: run once with internet "
                "access, or copy the file there by hand, or set model.weights: null "
                "(random start) or model.checkpoint (a local file)")))
    return found
