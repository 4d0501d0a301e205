"""The CPU's instruction-set features that decide how INT8 inference should be quantised.

ONNX Runtime's INT8 kernels on x86 use VNNI dot-product instructions (AVX-512 VNNI or
AVX-VNNI) when the CPU has them; without VNNI, 8-bit products are accumulated through
16-bit intermediates that can saturate, and INT8 is often no faster than FP32. ARM cores
handle signed INT8 activations natively. :func:`cpu_features` reads the flags once
(``/proc/cpuinfo`` on Linux, ``platform`` elsewhere); nothing here needs ONNX Runtime.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuFeatures", "cpu_features", "parse_cpuinfo"]

_FLAGS_OF_INTEREST = ("avx512_vnni", "avx_vnni", "avx512f", "avx2", "asimddp")


@dataclass(frozen=True)
class CpuFeatures:
    """What kdpipe needs to know about the CPU it runs on.

    Attributes:
        machine: ``platform.machine()`` (``x86_64``, ``aarch64``, ``arm64``, ...).
        model_name: the CPU model as the OS reports it ("" when unknown).
        flags: the instruction-set flags of interest the CPU has (subset of
            ``avx512_vnni``, ``avx_vnni``, ``avx512f``, ``avx2``, ``asimddp``).
    """

    machine: str
    model_name: str
    flags: frozenset[str]

    @property
    def is_arm(self) -> bool:
        return self.machine.lower().startswith(("aarch64", "arm"))

    @property
    def has_vnni(self) -> bool:
        """x86 VNNI (AVX-512 or AVX): INT8 dot products without 16-bit saturation."""
        return bool(self.flags & {"avx512_vnni", "avx_vnni"})

    def describe(self) -> str:
        flags = ", ".join(sorted(self.flags)) or "none of avx2/avx512f/vnni"
        return f"{self.model_name or 'unknown CPU'} ({self.machine}; {flags})"

    def as_metadata(self) -> dict[str, str]:
        return {"cpu_model": self.model_name, "cpu_machine": self.machine,
                "cpu_flags": ",".join(sorted(self.flags))}


def parse_cpuinfo(text: str, machine: str) -> CpuFeatures:
    """Features from the text of ``/proc/cpuinfo`` (first processor block is enough)."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # x86 "flags", ARM "Features"
            flags = frozenset(value.split()) & frozenset(_FLAGS_OF_INTEREST)
    return CpuFeatures(machine=machine, model_name=model, flags=flags)


@functools.cache
def cpu_features() -> CpuFeatures:
    """The running machine's CPU features (cached; empty flags where they cannot be read)."""
    machine = platform.machine()
    info = Path("/proc/cpuinfo")
    try:
        text = info.read_text(errors="replace")
    except OSError:  # not Linux: no flags, only the processor name platform knows
        return CpuFeatures(machine=machine, model_name=platform.processor(), flags=frozenset())
    return parse_cpuinfo(text, machine)
