"""What an ONNX export produced: :class:`ExportResult` and its :class:`ParityReport`.

Computed by :mod:`kdpipe.export` (which re-exports these names); read by steps,
evaluation and promotion without importing the exporters.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["ExportError", "ExportResult", "ParityBatch", "ParityError", "ParityReport"]


class ExportError(RuntimeError):
    """The ONNX exporter (named in the message) or the ONNX checker failed."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ParityBatch(_Frozen):
    """ONNX Runtime vs PyTorch on one batch."""

    batch_size: int
    max_abs_error: float
    max_rel_error: float
    """max |onnx - torch| / |torch| over elements with |torch| > 0."""
    passed: bool


class ParityReport(_Frozen):
    """Parity at every checked batch size, against ``atol`` / ``rtol``."""

    atol: float
    rtol: float
    seed: int
    batches: list[ParityBatch]

    @property
    def passed(self) -> bool:
        return all(b.passed for b in self.batches)

    @property
    def max_abs_error(self) -> float:
        return max(b.max_abs_error for b in self.batches)

    @property
    def max_rel_error(self) -> float:
        return max(b.max_rel_error for b in self.batches)

    def describe(self) -> str:
        """One line per batch size, for logs and error messages."""
        return "; ".join(
            f"batch {b.batch_size}: max abs {b.max_abs_error:.3g}, max rel {b.max_rel_error:.3g}"
            f" ({'ok' if b.passed else 'FAILED'})"
            for b in self.batches
        ) + f" [atol {self.atol:g}, rtol {self.rtol:g}]"


class ParityError(RuntimeError):
    """ONNX Runtime's outputs differ from PyTorch's beyond tolerance."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


class ExportResult(_Frozen):
    """The exported file, its identity, metadata and parity."""

    path: str
    filename: str
    sha256: str
    """sha256 hex of the .onnx file."""
    size_bytes: int
    opset: int
    exporter: str
    metadata: dict[str, str]
    parity: ParityReport
