"""In what precision and memory layout the training and evaluation loops run.

:class:`Precision` holds the autocast dtype and the grad scaler of ``amp`` training, and
:func:`to_device` moves an input batch (channels-last on CUDA when asked). Which device
to run on is :func:`kdpipe.runtime.resolve_device`'s choice.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Precision", "to_device"]


@dataclass
class Precision:
    """Autocast dtype (None = fp32) and the grad scaler (enabled only for fp16)."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    @classmethod
    def create(cls, amp: bool, device: torch.device) -> Precision:
        """bf16 autocast where the GPU supports it, else fp16 with loss scaling; fp32 off CUDA."""
        dtype = None
        if amp and device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # bf16 has fp32's range: only fp16 needs loss scaling.
        return cls(device, dtype, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16))

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for forward passes (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """``x`` on ``device`` (non-blocking from pinned memory), channels-last for 4-D input if asked."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x
