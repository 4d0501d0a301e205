"""Students that start from the teacher's weights instead of random ones.

Two ways (``student.init``), both narrowing the teacher-student gap before distillation
starts:

- ``teacher_pruned``: the student *is* the trained teacher, structurally pruned with the
  project's pruning code (:func:`kdpipe.prune.prune_model`, Torch-Pruning) until it keeps
  ``init_target`` of the teacher's params or MACs. The surviving channels keep their
  trained weights. Its bundle records the teacher's architecture plus the pruned layout,
  so it reloads, exports and prunes again like any student.
- ``teacher_layers``: a shallower member of the teacher's family (CIFAR ResNets and WRNs:
  ``layer1..layer3`` stages of identical blocks) takes the teacher's stem, head and, per
  stage, an evenly spaced selection of its blocks (the first and the last included), e.g.
  resnet56 (9 blocks per stage) -> resnet20 (3): blocks 0, 4 and 8.

:func:`layer_mapping_problem` says, on any pair of models (meta-device ones included),
why ``teacher_layers`` cannot map them; :mod:`kdpipe.validate` reports it before training.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Iterator

import torch
from torch import nn

from kdpipe.config import PruneConfig
from kdpipe.metrics import count_macs, count_params

__all__ = ["block_selection", "from_teacher_layers", "layer_mapping", "layer_mapping_problem",
           "prune_teacher_to"]

log = logging.getLogger(__name__)
_STAGE_KEY = re.compile(r"^(layer\d+)\.(\d+)\.(.+)$")
_BISECTION_STEPS = 12
_TARGET_RTOL = 0.03


# --------------------------------------------------------------------- teacher_layers
def _stage_depths(model: nn.Module) -> dict[str, int]:
    return {name: len(m) for name, m in model.named_children()
            if re.fullmatch(r"layer\d+", name) and isinstance(m, nn.Sequential)}


def block_selection(teacher_blocks: int, student_blocks: int) -> list[int]:
    """Evenly spaced teacher block indices, first and last included (``9, 3 -> [0, 4, 8]``)."""
    if student_blocks == 1:
        return [0]
    step = (teacher_blocks - 1) / (student_blocks - 1)
    return [round(i * step) for i in range(student_blocks)]


def layer_mapping(teacher: nn.Module, student: nn.Module) -> dict[str, str]:
    """Student state-dict key -> the teacher key it copies (raises ValueError if impossible)."""
    problem = layer_mapping_problem(teacher, student)
    if problem is not None:
        raise ValueError(problem)
    t_depth, s_depth = _stage_depths(teacher), _stage_depths(student)
    picks = {stage: block_selection(t_depth[stage], n) for stage, n in s_depth.items()}
    mapping = {}
    for key in student.state_dict():
        m = _STAGE_KEY.match(key)
        mapping[key] = (f"{m[1]}.{picks[m[1]][int(m[2])]}.{m[3]}" if m else key)
    return mapping


def layer_mapping_problem(teacher: nn.Module, student: nn.Module) -> str | None:
    """Why ``teacher_layers`` cannot initialise ``student`` from ``teacher``, or None."""
    possible = ("teacher_layers needs teacher and student of one family with fewer blocks per "
                "stage (resnet56 -> resnet20, resnet110 -> resnet32, wrn_40_2 -> wrn_16_2)")
    t_depth, s_depth = _stage_depths(teacher), _stage_depths(student)
    if not s_depth or not t_depth:
        which = type(student).__name__ if not s_depth else type(teacher).__name__
        return f"{which} has no ResNet-style stages (layer1, layer2, ...); {possible}"
    if set(t_depth) != set(s_depth):
        return (f"{type(student).__name__} and {type(teacher).__name__} do not have the same "
                f"stages ({sorted(s_depth)} vs {sorted(t_depth)}); {possible}")
    deeper = [s for s in s_depth if s_depth[s] > t_depth[s]]
    if deeper:
        return f"the student has more blocks than the teacher in {', '.join(deeper)}; {possible}"
    t_state = teacher.state_dict()
    picks = {stage: block_selection(t_depth[stage], n) for stage, n in s_depth.items()}
    for key, value in student.state_dict().items():
        m = _STAGE_KEY.match(key)
        source = f"{m[1]}.{picks[m[1]][int(m[2])]}.{m[3]}" if m else key
        if source not in t_state or t_state[source].shape != value.shape:
            got = "missing" if source not in t_state else tuple(t_state[source].shape)
            return (f"student tensor {key} {tuple(value.shape)} has no teacher counterpart "
                    f"{source} (teacher: {got}): a wider student, or another family; {possible}")
    return None


def from_teacher_layers(student: nn.Module, teacher: nn.Module) -> dict[str, str]:
    """Copy the mapped teacher tensors into ``student`` in place; return the mapping."""
    mapping = layer_mapping(teacher, student)
    t_state = teacher.state_dict()
    with torch.no_grad():
        student.load_state_dict({k: t_state[v].clone() for k, v in mapping.items()}, strict=True)
    return mapping


# --------------------------------------------------------------------- teacher_pruned
@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _size(model: nn.Module, metric: str, input_shape: tuple[int, ...]) -> int:
    return count_params(model) if metric == "params" else count_macs(model, input_shape)


def prune_teacher_to(teacher: nn.Module, target: float, metric: str,
                     input_shape: tuple[int, ...], *, importance: str = "l2"
                     ) -> tuple[nn.Module, float]:
    """A pruned copy of ``teacher`` keeping about ``target`` of its params or MACs.

    The channel ratio is found by bisection (each probe prunes a fresh copy); the copy
    whose size is closest to the target is returned with the fraction it keeps. Layers are
    never emptied (:class:`~kdpipe.config.PruneConfig`'s ``max_layer_ratio``), so a very
    small target may not be reachable: the closest reachable size is returned and logged.
    """
    from kdpipe.prune import prune_model

    full = _size(teacher, metric, input_shape)
    example = torch.zeros(1, *input_shape)
    lo, hi, best = 0.0, 0.95, (float("inf"), None, 1.0)
    for _ in range(_BISECTION_STEPS):
        ratio = (lo + hi) / 2
        # requires_grad: a teacher that already taught is frozen (DistillationTask), and
        # Torch-Pruning traces the graph through autograd; the student must train anyway.
        candidate = copy.deepcopy(teacher).cpu().eval().requires_grad_(True)
        with _quiet(logging.getLogger("kdpipe.prune")):  # a probe, not the pruning step
            prune_model(candidate, example, PruneConfig(ratio=ratio, importance=importance),
                        latency_repeats=3)
        kept = _size(candidate, metric, input_shape) / full
        if abs(kept - target) < best[0]:
            best = (abs(kept - target), candidate, kept)
        if abs(kept - target) <= _TARGET_RTOL * target:
            break
        lo, hi = (ratio, hi) if kept > target else (lo, ratio)
    _, model, kept = best
    if abs(kept - target) > _TARGET_RTOL * target:
        log.warning("teacher_pruned: the closest reachable size keeps %.3f of the teacher's "
                    "%s (target %.3f)", kept, metric, target)
    return model, kept
