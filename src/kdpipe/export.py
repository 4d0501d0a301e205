"""ONNX export of a model bundle, with preprocessing inside the graph, and parity checks.

The exported graph takes raw pixels scaled to [0, 1] (input ``pixels``, shape
``(N, C, H, W)`` with a dynamic batch axis) and returns ``logits`` ``(N, classes)``:
the bundle's per-channel normalisation is the first op of the graph, so a client never
needs to know mean and std. The file is one self-contained ``.onnx`` (weights inside,
no external-data sidecar) that passes ``onnx.checker`` and carries metadata: classes,
input shape, mean/std, kdpipe version, the bundle's weights sha256 and the source run.

Exporter choice (PyTorch 2.14): ``torch.onnx.export(dynamo=True)`` -- the torch.export
based exporter (ONNX Script) -- is the default and the maintained path; the TorchScript
exporter (``dynamo=False``) still works but warns that it is deprecated and will be
removed. kdpipe uses dynamo unless ``export.exporter: torchscript`` is set explicitly
(no silent fallback: an exporter failure is an :class:`ExportError` naming the exporter).

Parity: :func:`check_parity` runs ONNX Runtime (CPU) and PyTorch eager on random
pixels drawn with a different seed from the export example, at two batch sizes, and
checks ``|onnx - torch| <= atol + rtol * |torch|`` element-wise (numpy's ``allclose``).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

import kdpipe
from kdpipe.config import ExportConfig
from kdpipe.export_report import (
    ExportError,
    ExportResult,
    ParityBatch,
    ParityError,
    ParityReport,
)

if TYPE_CHECKING:
    import onnx

    from kdpipe.bundle import Bundle

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportError",
    "ExportResult",
    "Normalize",
    "ParityBatch",
    "ParityError",
    "ParityReport",
    "check_parity",
    "export_onnx",
    "read_metadata",
    "with_preprocessing",
]

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
EXPORT_SEED = 0
PARITY_SEED = 1  # differs from EXPORT_SEED: parity must not reuse the traced example
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ------------------------------------------------------------------- wrapping
class Normalize(nn.Module):
    """``(x - mean) / std`` per channel: raw [0, 1] pixels in, model inputs out.

    The same formula as :class:`kdpipe.data.SplitDataset` uses, so the exported graph
    sees exactly what the model saw in training.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std


class _Preprocessed(nn.Module):
    def __init__(self, normalize: Normalize, model: nn.Module) -> None:
        super().__init__()
        self.normalize, self.model = normalize, model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(pixels))


def with_preprocessing(bundle: Bundle) -> nn.Module:
    """An eval-mode CPU copy of the bundle's model that takes raw [0, 1] pixels."""
    model = copy.deepcopy(bundle.model).cpu().eval()
    return _Preprocessed(Normalize(bundle.spec.mean, bundle.spec.std), model).eval()


def _random_pixels(batch: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------- export
def _clean(err: BaseException) -> str:
    """The informative part of an exporter error, without terminal colour codes.

    The dynamo exporter's messages start with generic "next steps" and put the cause
    (e.g. "No ONNX function found for aten.linalg_eig") under "## Exception summary".
    """
    text = _ANSI.sub("", str(err)).strip()
    marker = "## Exception summary"
    if marker in text:
        text = text.split(marker, 1)[1].split("(Refer to the full stack trace", 1)[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip() != "⬆️"]
    summary = " | ".join(lines[:4]) + (" ..." if len(lines) > 4 else "")
    return f"{type(err).__name__}: {summary}"


def _export_dynamo(module: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    program = torch.onnx.export(
        module,
        (example,),
        None,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamo=True,
        dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
        external_data=False,
        verbose=False,
    )
    return program.model_proto


def _export_torchscript(module: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Chosen explicitly by the user (export.exporter: torchscript); not news to them.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(
            module,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return onnx.load_from_string(buffer.getvalue())


_EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _metadata(bundle: Bundle, source_run: str | None) -> dict[str, str]:
    spec = bundle.spec
    return {
        "classes": json.dumps(spec.classes),
        "input_shape": json.dumps(list(spec.input_shape)),
        "input_range": "[0, 1] raw pixels, float32; normalization is inside the graph",
        "mean": json.dumps(list(spec.mean)),
        "std": json.dumps(list(spec.std)),
        "arch": spec.arch,
        "precision": "fp32",  # an INT8 version (kdpipe.quantize) says "int8"
        "kdpipe_version": kdpipe.__version__,
        "weights_sha256": spec.weights_sha256,
        "source_run": source_run or "",
    }


def _write_atomic(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _checked_proto(bundle: Bundle, cfg: ExportConfig, metadata: dict[str, str]) -> Any:
    """The exported graph with kdpipe's metadata, under the size limit and checker-clean."""
    import onnx

    module = with_preprocessing(bundle)
    example = _random_pixels(2, bundle.spec.input_shape, EXPORT_SEED)  # batch 2: not specialised
    try:
        proto = _EXPORTERS[cfg.exporter](module, example, cfg.opset)
    except Exception as err:  # exporters raise many types; all mean "this exporter failed"
        other = "torchscript" if cfg.exporter == "dynamo" else "dynamo"
        raise ExportError(
            f"the {cfg.exporter} ONNX exporter failed on {bundle.spec.arch!r} "
            f"(opset {cfg.opset}): {_clean(err)}\nFix: make the forward pass exportable, "
            f"try export.exporter: {other}, or another export.opset"
        ) from err
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"kdpipe {bundle.spec.arch}: raw [0, 1] pixels in, logits out"
    if proto.ByteSize() >= 2**31:
        raise ExportError(
            f"{bundle.spec.arch!r} is {proto.ByteSize() / 2**30:.1f} GiB as ONNX, above the "
            "2 GB limit of a single self-contained file"
        )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as err:  # ValidationError / InferenceError
        raise ExportError(
            f"the {cfg.exporter} exporter produced a graph onnx.checker rejects: {_clean(err)}"
        ) from err
    return proto


def export_onnx(
    bundle: Bundle,
    path: str | os.PathLike[str],
    cfg: ExportConfig,
    *,
    source_run: str | None = None,
) -> ExportResult:
    """Export a bundle to one self-contained ONNX file and check parity.

    Args:
        bundle: the model and its spec (mean/std, classes, input shape).
        path: the ``.onnx`` file to write (parent directories are created).
        cfg: opset, exporter, parity tolerances and batch sizes, ``check_parity``.
        source_run: the run that produced the model (stored in the metadata).

    Returns:
        Path, sha256, size, metadata and the parity report.

    Raises:
        ExportError: the exporter (named) failed, the checker rejected the graph, or the
            model is too large for a single file (2 GB protobuf limit).
        ParityError: parity failed and ``cfg.check_parity`` is True; the file is removed
            so the model is not handed on. With ``check_parity: false`` the failure is
            recorded in the result (``parity.passed`` is False) instead.
    """
    target = Path(path)
    metadata = _metadata(bundle, source_run)
    proto = _checked_proto(bundle, cfg, metadata)
    data = proto.SerializeToString()
    _write_atomic(data, target)
    parity = check_parity(bundle, target, cfg)
    if not parity.passed and cfg.check_parity:
        target.unlink(missing_ok=True)
        raise ParityError(
            f"ONNX Runtime disagrees with PyTorch for {bundle.spec.arch!r}: {parity.describe()}. "
            f"{target} was removed so it is not handed on; investigate the export, widen "
            "export.atol / export.rtol if the difference is acceptable, or set "
            "export.check_parity: false to keep the model and record the failure",
            parity,
        )
    return ExportResult(
        path=str(target),
        filename=target.name,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        opset=cfg.opset,
        exporter=cfg.exporter,
        metadata=metadata,
        parity=parity,
    )


# -------------------------------------------------------------------- parity
def _compare(onnx_out: np.ndarray, torch_out: np.ndarray, atol: float, rtol: float) -> tuple[float, float, bool]:
    diff = np.abs(onnx_out.astype(np.float64) - torch_out.astype(np.float64))
    ref = np.abs(torch_out.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    nonzero = ref > 0
    max_rel = float((diff[nonzero] / ref[nonzero]).max()) if nonzero.any() else 0.0
    finite = bool(np.isfinite(onnx_out).all() and np.isfinite(torch_out).all())
    passed = finite and bool(np.all(diff <= atol + rtol * ref))
    return max_abs, max_rel, passed


def check_parity(
    bundle: Bundle,
    onnx_path: str | os.PathLike[str],
    cfg: ExportConfig,
    *,
    inputs: torch.Tensor | None = None,
) -> ParityReport:
    """Compare ONNX Runtime (CPU) with PyTorch eager on the same raw-pixel batches.

    Args:
        bundle: the model the file was exported from.
        onnx_path: the exported file.
        cfg: ``atol``, ``rtol`` and ``parity_batch_sizes``.
        inputs: raw [0, 1] pixels ``(N, C, H, W)`` with N >= the largest batch size; its
            first rows are used. Default: uniform noise seeded with ``PARITY_SEED``,
            different from the export example.

    Returns:
        Max absolute / relative error and a verdict per batch size; never raises on a
        mismatch (the caller decides).
    """
    import onnxruntime as ort

    shape = tuple(bundle.spec.input_shape)
    largest = max(cfg.parity_batch_sizes)
    if inputs is None:
        inputs = _random_pixels(largest, shape, PARITY_SEED)
    elif inputs.shape[0] < largest or tuple(inputs.shape[1:]) != shape:
        raise ValueError(
            f"parity inputs must have shape (>= {largest}, {', '.join(map(str, shape))}); "
            f"got {tuple(inputs.shape)}"
        )
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    module = with_preprocessing(bundle)
    batches = []
    for bs in cfg.parity_batch_sizes:
        x = inputs[:bs].float().contiguous()
        with torch.inference_mode():
            expected = module(x).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        if got.shape != expected.shape:
            max_abs, max_rel, passed = float("inf"), float("inf"), False
        else:
            max_abs, max_rel, passed = _compare(got, expected, cfg.atol, cfg.rtol)
        batches.append(ParityBatch(batch_size=bs, max_abs_error=max_abs, max_rel_error=max_rel, passed=passed))
    return ParityReport(atol=cfg.atol, rtol=cfg.rtol, seed=PARITY_SEED, batches=batches)


def read_metadata(onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The kdpipe metadata of an exported file, JSON fields decoded."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    for key in ("classes", "input_shape", "mean", "std"):
        if key in props:
            props[key] = json.loads(props[key])
    return props
