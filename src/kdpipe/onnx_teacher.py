"""A teacher from any framework, as an ONNX file run by ONNX Runtime.

``teacher.onnx: path/to/model.onnx`` in a config makes :class:`OnnxTeacher` the teacher: an
``nn.Module`` without parameters whose forward runs the graph on ONNX Runtime's CPU
provider, behind the :class:`~kdpipe.preprocess.InputTransform` of the model's declared
preprocessing. :class:`~kdpipe.tasks.DistillationTask`, its logit cache and the evaluation
treat it as any teacher; feature losses (which hook a PyTorch module) are refused by
:mod:`kdpipe.validate`.

Everything about the file is checked when it is opened (:func:`open_onnx_teacher`), before
any training: a file that is not a valid ONNX model, ops from custom domains that ONNX
Runtime does not provide, an input whose shape or channel count does not fit the dataset,
an ambiguous or unknown logits output, and logits that are not one per class.

The teacher artifact is :class:`OnnxTeacherBundle`: a :class:`~kdpipe.bundle.Bundle` whose
directory holds ``bundle.json`` (``arch: onnx``; ``weights_sha256`` is the .onnx file's
sha256) and the graph itself as ``teacher.onnx`` (:func:`save_onnx_teacher`,
:func:`load_onnx_teacher`); nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdpipe.bundle import SPEC_FILE, Bundle, BundleError, ModelSpec
from kdpipe.config import Preprocessing, TeacherConfig
from kdpipe.preprocess import PREPROCESSING_KEY, InputTransform, model_input_shape

__all__ = ["ONNX_ARCH", "ONNX_FILE", "OnnxTeacher", "OnnxTeacherBundle", "OnnxTeacherError",
           "is_onnx_teacher_dir", "load_onnx_teacher", "onnx_file_problem", "onnx_teacher_for",
           "open_onnx_teacher",
           "save_onnx_teacher", "teacher_config_of"]

ONNX_ARCH = "onnx"
"""``spec.arch`` of an ONNX teacher's bundle (no registered architecture has this name)."""
ONNX_FILE = "teacher.onnx"
_STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training"}


class OnnxTeacherError(ValueError):
    """An ONNX teacher that cannot be used, with the file and the fix."""


# ----------------------------------------------------------------------- the file
def _load_graph(data: bytes, source: str) -> Any:
    """Parse and check the model; custom-domain ops are refused by name."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
        onnx.checker.check_model(model)
    except Exception as err:  # onnx raises DecodeError, ValidationError, ...
        raise OnnxTeacherError(f"{source} is not a valid ONNX model ({type(err).__name__}: "
                               f"{str(err).strip()[:300]}); export it again (torch.onnx.export, "
                               "tf2onnx, ...) and check it with onnx.checker.check_model") from err
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                     if n.domain not in _STANDARD_DOMAINS})
    if custom:
        raise OnnxTeacherError(f"{source} uses custom ops {', '.join(custom)}, which ONNX "
                               "Runtime does not provide; export the teacher with standard "
                               "ONNX ops only")
    return model


def _session(data: bytes, source: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # No busy-waiting of ORT's threads after each call: the student's forward and backward
    # run on the same cores right after the teacher's (ORT spins by default).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises private exception types (Fail, InvalidGraph...)
        raise OnnxTeacherError(f"ONNX Runtime cannot open {source}: {str(err).strip()[:400]}; "
                               "custom or unsupported ops need a standard-op export") from err


def _read(path: str | os.PathLike[str]) -> bytes:
    p = Path(path).expanduser()
    if not p.is_file():
        raise OnnxTeacherError(f"ONNX teacher file not found: {p}; set teacher.onnx to an "
                               ".onnx file")
    return p.read_bytes()


def onnx_file_problem(path: str | os.PathLike[str], in_channels: int | None = None,
                      layout: str = "NCHW") -> str | None:
    """Why ``path`` cannot be an ONNX teacher, as far as the file alone tells; else None.

    Used by :mod:`kdpipe.preflight`: existence, validity, custom ops, ONNX Runtime, and
    the channel count when the dataset's is known without loading it.
    """
    try:
        data = _read(path)
        _load_graph(data, str(path))
        session = _session(data, str(path))
    except OnnxTeacherError as err:
        return str(err)
    if in_channels is not None and len(session.get_inputs()) == 1:
        dims = session.get_inputs()[0].shape
        c = dims[3 if layout == "NHWC" else 1] if len(dims) == 4 else None
        if isinstance(c, int) and c != in_channels:
            return (f"{path} takes input {_shape_text(dims)} with {c} channel(s) ({layout}) but "
                    f"the dataset has {in_channels}; use a teacher for this data or set "
                    "model.preprocessing.layout to the graph's layout")
    return None


def _shape_text(dims: list[Any]) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in dims) + ")"


# ------------------------------------------------------------------------- module
class OnnxTeacher(nn.Module):
    """A frozen teacher whose forward runs an ONNX graph (ONNX Runtime, CPU).

    Takes the loader's dataset-normalised NCHW batch on any device, applies the declared
    preprocessing, runs the graph and returns float32 logits on the input's device.

    Args:
        data: the .onnx file's bytes.
        input_shape: the dataset's (C, H, W).
        num_classes: the dataset's class count (the logits' width).
        dataset_mean, dataset_std: the loader's normalisation.
        preprocessing: how the graph expects its input (None = the dataset's).
        output: name or index of the logits output (None: the graph's only output).
        source: the file's name, for messages.

    Raises:
        OnnxTeacherError: see the module docstring.
    """

    has_input_transform = True
    """:func:`kdpipe.preprocess.adapted_model` leaves this module as it is."""

    def __init__(self, data: bytes, *, input_shape: tuple[int, int, int], num_classes: int,
                 dataset_mean: tuple[float, ...], dataset_std: tuple[float, ...],
                 preprocessing: Preprocessing | None = None, output: str | int | None = None,
                 source: str = "the ONNX teacher") -> None:
        super().__init__()
        graph = _load_graph(data, source)
        self._data, self.source, self.preprocessing = data, source, preprocessing
        self._init = dict(input_shape=tuple(input_shape), num_classes=num_classes,
                          dataset_mean=tuple(dataset_mean), dataset_std=tuple(dataset_std),
                          preprocessing=preprocessing, output=output, source=source)
        try:
            self.transform = InputTransform(preprocessing, dataset_mean, dataset_std)
        except ValueError as err:
            raise OnnxTeacherError(f"{source}: {err}") from None
        self.session = _session(data, source)
        self.input_name, self.batch_size = self._check_input(tuple(input_shape))
        self.output_name = self._pick_output(output)
        self.params = sum(int(np.prod(t.dims)) for t in graph.graph.initializer)
        # The digest as a buffer: state_dict-based fingerprints (checkpoint identity)
        # then tell two ONNX teachers apart.
        digest = hashlib.sha256(data).digest()
        self.register_buffer("onnx_sha256", torch.tensor(list(digest), dtype=torch.uint8))
        self._check_logits(num_classes)

    @property
    def onnx_bytes(self) -> bytes:
        """The .onnx file this teacher runs."""
        return self._data

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxTeacher:
        # An InferenceSession cannot be copied: open a second one on the same bytes.
        clone = OnnxTeacher(self._data, **self._init)
        memo[id(self)] = clone
        return clone.train(self.training)

    def _check_input(self, input_shape: tuple[int, int, int]) -> tuple[str, int | None]:
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise OnnxTeacherError(f"{self.source} has {len(inputs)} inputs "
                                   f"({', '.join(i.name for i in inputs)}); an ONNX teacher "
                                   "takes one image batch")
        inp = inputs[0]
        if inp.type != "tensor(float)":
            raise OnnxTeacherError(f"{self.source} takes {inp.type} input; an ONNX teacher takes "
                                   "float32 images (tensor(float))")
        layout = "NHWC" if self.preprocessing and self.preprocessing.layout == "NHWC" else "NCHW"
        want = model_input_shape(self.preprocessing, input_shape)
        dims = list(inp.shape)
        fits = len(dims) == 4 and all(not isinstance(d, int) or d == w
                                      for d, w in zip(dims[1:], want, strict=True))
        if not fits:
            raise OnnxTeacherError(
                f"{self.source} takes input {_shape_text(dims)} but the dataset gives batches of "
                f"(N, {', '.join(map(str, want))}) ({layout}, {input_shape[0]} channel(s), "
                f"{input_shape[1]}x{input_shape[2]} px); use a teacher for this data, or set "
                "teacher.model.preprocessing.layout to the graph's layout")
        batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
        return inp.name, batch

    def _pick_output(self, output: str | int | None) -> str:
        names = [o.name for o in self.session.get_outputs()]
        if output is None:
            if len(names) > 1:
                raise OnnxTeacherError(f"{self.source} has {len(names)} outputs ({', '.join(names)});"
                                       " set teacher.onnx_output to the one holding the logits")
            return names[0]
        if isinstance(output, int):
            if not 0 <= output < len(names):
                raise OnnxTeacherError(f"teacher.onnx_output {output} is out of range: "
                                       f"{self.source} has outputs {names}")
            return names[output]
        if output not in names:
            raise OnnxTeacherError(f"teacher.onnx_output {output!r} is not an output of "
                                   f"{self.source}; its outputs are {names}")
        return output

    def _check_logits(self, num_classes: int) -> None:
        c, h, w = self._init["input_shape"]
        probe = self(torch.zeros(self.batch_size or 2, c, h, w))
        if probe.dim() != 2 or probe.shape[1] != num_classes:
            raise OnnxTeacherError(
                f"{self.source} output {self.output_name!r} has shape {tuple(probe.shape)} for "
                f"a batch of {probe.shape[0] if probe.dim() else '?'}; expected (N, "
                f"{num_classes}) logits, one per class of the dataset (pick another output "
                "with teacher.onnx_output)")

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def forward(self, x: Tensor) -> Tensor:
        device = x.device
        with torch.autocast(device.type, enabled=False):
            inp = self.transform(x.float()).detach().cpu().contiguous().numpy()
        if self.batch_size is None or len(inp) == self.batch_size:
            out = self._run(inp)
        else:  # a graph exported with a fixed batch size runs chunk by chunk
            b = self.batch_size
            chunks = [inp[i:i + b] for i in range(0, len(inp), b)]
            if len(chunks[-1]) < b:
                pad = np.zeros((b - len(chunks[-1]), *inp.shape[1:]), dtype=inp.dtype)
                chunks[-1] = np.concatenate([chunks[-1], pad])
            out = np.concatenate([self._run(c) for c in chunks])[:len(inp)]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(device)

    def onnx_stats(self) -> dict[str, int | None]:
        """What the evaluation reports for it: params (initializer elements), file size."""
        return {"params": self.params, "macs": None, "size_bytes": len(self._data)}


# ------------------------------------------------------------------------- bundle
@dataclass
class OnnxTeacherBundle(Bundle):
    """A :class:`~kdpipe.bundle.Bundle` whose model is an :class:`OnnxTeacher`."""

    model: OnnxTeacher

    def with_extra(self, **updates: Any) -> OnnxTeacherBundle:
        """The same teacher with ``updates`` merged into ``spec.extra``."""
        spec = self.spec.model_copy(update={"extra": {**self.spec.extra, **updates}})
        return OnnxTeacherBundle(self.model, ModelSpec.model_validate(spec.model_dump()))


def _teacher_from(data: bytes, spec: ModelSpec, source: str) -> OnnxTeacher:
    onnx_info = spec.extra.get("onnx", {})
    raw = spec.extra.get(PREPROCESSING_KEY)
    return OnnxTeacher(
        data, input_shape=spec.input_shape, num_classes=spec.num_classes,
        dataset_mean=spec.mean, dataset_std=spec.std,
        preprocessing=None if raw is None else Preprocessing.model_validate(raw),
        output=onnx_info.get("output"), source=source)


def open_onnx_teacher(path: str | os.PathLike[str], dataset: Any, *,
                      preprocessing: Preprocessing | None = None,
                      output: str | int | None = None) -> OnnxTeacherBundle:
    """Open and check ``path`` as the teacher for ``dataset`` (a DatasetSpec).

    Returns:
        The bundle: ``spec.extra`` holds ``role: teacher``, ``onnx`` (file name, chosen
        output) and the declared ``preprocessing``.

    Raises:
        OnnxTeacherError: see the module docstring.
    """
    data = _read(path)
    extra: dict[str, Any] = {"role": "teacher", "onnx": {"file": str(path), "output": output}}
    if preprocessing is not None:
        extra[PREPROCESSING_KEY] = preprocessing.model_dump(mode="json")
    spec = ModelSpec(arch=ONNX_ARCH, num_classes=dataset.num_classes,
                     in_channels=dataset.in_channels, classes=list(dataset.classes),
                     input_shape=tuple(dataset.input_shape), mean=tuple(dataset.mean),
                     std=tuple(dataset.std), weights_sha256=hashlib.sha256(data).hexdigest(),
                     extra=extra)
    teacher = _teacher_from(data, spec, str(path))
    spec = spec.model_copy(update={"extra": {**extra, "onnx": {**extra["onnx"],
                                                               "output": teacher.output_name}}})
    return OnnxTeacherBundle(teacher, spec)


def is_onnx_teacher_dir(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds an ONNX teacher (rather than a safetensors bundle)."""
    return (Path(directory) / ONNX_FILE).is_file()


def save_onnx_teacher(bundle: OnnxTeacherBundle, directory: str | os.PathLike[str]) -> Path:
    """Write ``bundle.json`` + ``teacher.onnx`` into ``directory`` (created; files replaced)."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    (target / ONNX_FILE).write_bytes(bundle.model.onnx_bytes)
    (target / SPEC_FILE).write_text(json.dumps(bundle.spec.model_dump(mode="json"), indent=2))
    return target


def load_onnx_teacher(directory: str | os.PathLike[str]) -> OnnxTeacherBundle:
    """Read what :func:`save_onnx_teacher` wrote; the file must match the recorded sha256.

    Raises:
        BundleError: a missing or altered file.
    """
    root = Path(directory)
    try:
        spec = ModelSpec.model_validate_json((root / SPEC_FILE).read_bytes())
        data = (root / ONNX_FILE).read_bytes()
    except (OSError, ValueError) as err:
        raise BundleError(f"{root} is not a readable ONNX teacher bundle: {err}") from None
    if hashlib.sha256(data).hexdigest() != spec.weights_sha256:
        raise BundleError(f"{root / ONNX_FILE} does not match the sha256 in {SPEC_FILE}: the "
                          "file was changed; save the teacher again")
    return OnnxTeacherBundle(_teacher_from(data, spec, str(root / ONNX_FILE)), spec)



def onnx_teacher_for(dataset: Any, cfg: TeacherConfig) -> OnnxTeacherBundle:
    """``cfg.onnx`` opened for ``dataset`` and measured on its val and test splits.

    What ``finetune_teacher`` does with an ONNX teacher: nothing is trained; ``spec.extra``
    gets ``metrics`` (``val_accuracy``, ``test_accuracy``, ``test_loss``, ``params``,
    ``size_bytes``), ``test_confusion``, an empty ``history`` and the dataset fingerprint.
    """
    from kdpipe.data import make_loader
    from kdpipe.eval_loop import evaluate
    from kdpipe.runtime import resolve_device

    if cfg.onnx is None:
        raise ValueError("onnx_teacher_for needs teacher.onnx (the path of an .onnx file)")
    bundle = open_onnx_teacher(cfg.onnx, dataset, preprocessing=cfg.model.preprocessing,
                               output=cfg.onnx_output)
    dev = resolve_device(cfg.train.device)
    val = evaluate(bundle.model, make_loader(dataset, "val", train=False, device=dev), dev)
    test = evaluate(bundle.model, make_loader(dataset, "test", train=False, device=dev), dev)
    stats = bundle.model.onnx_stats()
    metrics = {"val_accuracy": val.accuracy, "test_accuracy": test.accuracy,
               "test_loss": test.loss, "params": stats["params"], "size_bytes": stats["size_bytes"]}
    return bundle.with_extra(history=[], metrics=metrics, test_confusion=test.confusion,
                             dataset_fingerprint=dataset.fingerprint)


def teacher_config_of(teacher: Bundle) -> TeacherConfig:
    """The teacher config a teacher bundle stands for (what a recipe validates it as): an
    ONNX teacher's file, or a PyTorch teacher's architecture; its declared preprocessing."""
    from kdpipe.preprocess import preprocessing_of
    from kdpipe.validate import as_model_config

    declared = preprocessing_of(teacher.spec.extra)
    if isinstance(teacher, OnnxTeacherBundle):
        model = TeacherConfig().model.model_copy(update={"preprocessing": declared})
        return TeacherConfig(onnx=str(teacher.spec.extra["onnx"]["file"]), model=model)
    return TeacherConfig(model=as_model_config(teacher.spec).model_copy(
        update={"preprocessing": declared}))
