"""Config rules for an ONNX teacher or a teacher's declared preprocessing.

Called by :func:`kdpipe.validate.find_problems` (which turns each ``(key path, message)``
into a :class:`~kdpipe.validate.Problem`); imports only :mod:`kdpipe.config`.
"""

from __future__ import annotations

from typing import Any

from kdpipe.config import PipelineConfig

__all__ = ["teacher_input_problems"]


def teacher_input_problems(config: PipelineConfig, chain: list[tuple[str, Any]],
                           prefix: str) -> list[tuple[str, str]]:
    """An ONNX teacher or a declared preprocessing: what does not go with it. ``chain`` is
    teacher, assistants..., student; ``chain[1]`` is the model the teacher teaches."""
    teacher, path = config.teacher, f"{prefix}teacher"
    found: list[tuple[str, str]] = []
    (pupil_path, pupil), last_hop = chain[1], len(chain) == 2
    for p_path, p_cfg in chain[1:]:
        if p_cfg.model.preprocessing is not None:
            found.append((f"{p_path}.model.preprocessing", "students and assistants take "
                                 "the dataset's normalisation (it goes into the ONNX graph); "
                                 "declare preprocessing for the teacher only"))
    if teacher.onnx is None and teacher.onnx_output is not None:
        found.append((f"{path}.onnx_output", "onnx_output needs teacher.onnx"))
    if teacher.onnx is None and teacher.model.preprocessing is None:
        return found
    what = "an ONNX teacher" if teacher.onnx is not None else "teacher.model.preprocessing"
    if teacher.onnx is not None:
        if not teacher.onnx.endswith(".onnx"):
            found.append((f"{path}.onnx", f"expected a path to an .onnx file "
                                                 f"(got {teacher.onnx!r})"))
        for key in ("checkpoint", "weights"):
            if getattr(teacher.model, key) is not None:
                found.append((f"{path}.model.{key}", f"an ONNX teacher is not built "
                                     f"from model.{key}; remove it or remove teacher.onnx"))
        if teacher.init != "scratch":
            found.append((f"{path}.init", "an ONNX teacher is not trained, so it cannot "
                                                 "warm-start from production; use init: scratch"))
        if pupil.init != "scratch":
            found.append((f"{pupil_path}.init", f"init {pupil.init!r} copies a PyTorch "
                                 "teacher's weights; an ONNX teacher has none to copy: use "
                                 "init: scratch"))
        if config.distill.feature_loss != "none":
            found.append((f"{prefix}distill.feature_loss", "feature losses need a "
                                 "PyTorch teacher (they hook its layers); with teacher.onnx use "
                                 "feature_loss: none"))
    trains = [(f"{pupil_path}.train", pupil.train)]  # the runs this teacher teaches
    trains += [(f"{prefix}prune.recovery", config.prune.recovery)] if (
        config.prune.enabled and last_hop) else []
    trains += [(f"{path}.train", teacher.train)] if teacher.onnx is None else []
    for key, train in trains:
        if train.num_processes > 1:
            found.append((f"{key}.num_processes", f"DDP workers do not support {what} "
                                 "yet; use num_processes: 1"))
    return found
