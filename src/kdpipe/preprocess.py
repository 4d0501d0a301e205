"""Per-model input preprocessing: what a teacher trained elsewhere expects to see.

kdpipe's loaders hand every model the same tensor: NCHW, float32, normalised with the
dataset's mean / std (:func:`kdpipe.data.get_split`). A model trained elsewhere may
expect pixels in [0, 255], BGR channels, NHWC layout or its own mean / std
(:class:`kdpipe.config.Preprocessing`). :class:`InputTransform` maps the loader's tensor
to exactly that, so the model sees its inputs as in its own training, and
:class:`Preprocessed` puts the transform in front of a PyTorch model.

The map is the channel order, then one per-channel affine step (undo the dataset's
normalisation, scale to the value range, apply the model's mean / std, which are given in
the model's own channel order), then the layout. With nothing
declared it is the identity and costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdpipe.config import Preprocessing

__all__ = ["InputTransform", "Preprocessed", "adapted_model", "model_input_shape",
           "preprocessing_of", "with_declared_preprocessing"]

PREPROCESSING_KEY = "preprocessing"
"""Key of a bundle's ``spec.extra`` that holds its model's declared preprocessing."""


def model_input_shape(preprocessing: Preprocessing | None, input_shape: Sequence[int]
                      ) -> tuple[int, int, int]:
    """One sample's shape as the model takes it: (C, H, W), or (H, W, C) for NHWC."""
    c, h, w = (int(s) for s in input_shape)
    if preprocessing is not None and preprocessing.layout == "NHWC":
        return h, w, c
    return c, h, w


class InputTransform(nn.Module):
    """Dataset-normalised NCHW batches in, the model's declared input out.

    Args:
        preprocessing: what the model expects (None = the dataset's normalisation).
        dataset_mean, dataset_std: the normalisation the loader applied (per channel).

    Raises:
        ValueError: the declared mean / std do not have one entry per channel, or BGR is
            asked for data that does not have 3 channels.
    """

    def __init__(self, preprocessing: Preprocessing | None, dataset_mean: Sequence[float],
                 dataset_std: Sequence[float]) -> None:
        super().__init__()
        p = preprocessing or Preprocessing()
        channels = len(dataset_mean)
        ds_mean = torch.tensor([float(m) for m in dataset_mean])
        ds_std = torch.tensor([float(s) for s in dataset_std])
        if p.channel_order == "BGR" and channels != 3:
            raise ValueError(f"preprocessing.channel_order BGR needs 3-channel data (got "
                             f"{channels} channel(s)); use RGB")
        if p.channel_order == "BGR":  # the declared stats are in the model's channel order
            ds_mean, ds_std = ds_mean.flip(0), ds_std.flip(0)
        vr = float(p.value_range)
        mean = ds_mean * vr if p.mean is None else torch.tensor(p.mean, dtype=torch.float32)
        std = ds_std * vr if p.std is None else torch.tensor(p.std, dtype=torch.float32)
        if len(mean) != channels:
            raise ValueError(f"preprocessing.mean/std have {len(mean)} entries but the data has "
                             f"{channels} channel(s); give one value per channel")
        # model input = (raw * vr - mean) / std with raw = x * ds_std + ds_mean
        scale = ds_std * vr / std
        shift = (ds_mean * vr - mean) / std
        self.bgr, self.nhwc = p.channel_order == "BGR", p.layout == "NHWC"
        self.affine = not (torch.allclose(scale, torch.ones_like(scale), rtol=0, atol=1e-7)
                           and torch.allclose(shift, torch.zeros_like(shift), rtol=0, atol=1e-7))
        self.register_buffer("scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, -1, 1, 1), persistent=False)

    @property
    def is_identity(self) -> bool:
        """True when the model takes the loader's tensors as they are."""
        return not (self.affine or self.bgr or self.nhwc)

    def forward(self, x: Tensor) -> Tensor:
        if self.bgr:
            x = x.flip(1)
        if self.affine:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.nhwc:
            x = x.permute(0, 2, 3, 1)
        return x


class Preprocessed(nn.Module):
    """``model(transform(x))``: a PyTorch model behind its :class:`InputTransform`.

    The transform has no persistent state, so ``state_dict()`` is the model's (prefixed
    ``model.``) and the wrapped model trains, checkpoints and evaluates as usual.
    """

    def __init__(self, model: nn.Module, transform: InputTransform) -> None:
        super().__init__()
        self.model, self.transform = model, transform

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.transform(x))


def preprocessing_of(extra: dict[str, Any]) -> Preprocessing | None:
    """The preprocessing a bundle's ``spec.extra`` records (None when it declares none)."""
    raw = extra.get(PREPROCESSING_KEY)
    return None if raw is None else Preprocessing.model_validate(raw)


def adapted_model(bundle: Any) -> nn.Module:
    """The module that takes dataset-normalised batches for a bundle's model.

    A bundle whose ``spec.extra`` declares a preprocessing gets its model wrapped in
    :class:`Preprocessed`; any other bundle's model (an ONNX teacher's included, whose
    transform is built in) is returned as it is.
    """
    preprocessing = preprocessing_of(bundle.spec.extra)
    if preprocessing is None or getattr(bundle.model, "has_input_transform", False):
        return bundle.model
    transform = InputTransform(preprocessing, bundle.spec.mean, bundle.spec.std)
    return bundle.model if transform.is_identity else Preprocessed(bundle.model, transform)


def with_declared_preprocessing(model: nn.Module, preprocessing: Preprocessing | None,
                                dataset: Any) -> nn.Module:
    """``model`` behind the transform of its declared preprocessing (``model`` itself when
    nothing, or the dataset's own normalisation, is declared)."""
    if preprocessing is None:
        return model
    transform = InputTransform(preprocessing, dataset.mean, dataset.std)
    return model if transform.is_identity else Preprocessed(model, transform)
