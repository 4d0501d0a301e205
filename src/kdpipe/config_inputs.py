"""Config fields for models trained elsewhere: declared input preprocessing, ONNX teachers.

Part of the bottom layer with :mod:`kdpipe.config` (which mixes these into ``ModelConfig``
and ``TeacherConfig``); imports no other kdpipe module.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, PositiveFloat, model_validator

__all__ = ["DeclaredPreprocessing", "OnnxTeacherSource", "Preprocessing"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Preprocessing(_Frozen):
    """How a model expects its input, when that differs from the dataset's normalisation.

    The model is fed ``(raw * value_range - mean) / std`` with ``raw`` the pixels in
    [0, 1], the channels in ``channel_order`` and the tensor in ``layout``. ``mean`` /
    ``std`` are in the units of ``value_range`` and in the model's channel order (e.g.
    ``[103.53, 116.28, 123.675]`` for a BGR model with ``value_range: 255``); left out,
    they are the dataset's, scaled to ``value_range``.
    """

    mean: tuple[float, ...] | None = None
    std: tuple[PositiveFloat, ...] | None = None
    value_range: Literal[1, 255] = 1
    """1: pixels in [0, 1]; 255: pixels in [0, 255]."""
    channel_order: Literal["RGB", "BGR"] = "RGB"
    """BGR reverses the channels of 3-channel data (OpenCV / Caffe-trained models)."""
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @model_validator(mode="after")
    def _mean_std(self) -> Preprocessing:
        if (self.mean is None) != (self.std is None) or len(self.mean or ()) != len(self.std or ()):
            raise ValueError("give preprocessing.mean and std, one value per channel each, or "
                             "neither (then the dataset's normalisation is used)")
        return self


class DeclaredPreprocessing(_Frozen):
    """``ModelConfig``'s ``preprocessing`` field."""

    preprocessing: Preprocessing | None = None
    """How this model expects its input (teacher only); None = the dataset's normalisation."""


class OnnxTeacherSource(_Frozen):
    """``TeacherConfig``'s ONNX fields."""

    onnx: str | None = None
    """A teacher from any framework as an ``.onnx`` file: then it is only validated and
    evaluated, not trained (``model.preprocessing`` says how it expects its input;
    ``model.arch`` and ``train`` are not used)."""
    onnx_output: str | int | None = None
    """Name or index of the graph output holding the logits; needed when it has several."""
