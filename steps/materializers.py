"""ZenML materializers for kdpipe's artifacts: no pickles, content hashes, metadata, pictures.

=================  ====================================  ==================================
type               stored as                             visualizations
=================  ====================================  ==================================
DatasetSpec        ``dataset_spec.json``                 HTML summary (classes, splits)
Bundle             ``bundle.json`` + ``weights.safetensors``  training curves, confusion (PNG)
                   (:func:`kdpipe.bundle.save_bundle`); an ONNX
                   teacher: ``bundle.json`` + ``teacher.onnx``
ExportResult       the ``.onnx`` file under its own name + ``export.json``  HTML summary
QuantizeOutcome    ``quantize.json`` (+ the INT8 ``.onnx`` when there is one)  HTML summary
EvaluationReport   ``evaluation.json``                   HTML table, accuracy-vs-latency
                                                         frontier and confusion (PNG)
GateDecision       ``gate_decision.json``                HTML check table
PromotionResult    ``promotion.json``                    –
ModelCard          ``model_card.json``                   the card (HTML, frontier inline),
                                                         the card (Markdown)
=================  ====================================  ==================================

The content hash (ZenML's cache key uses it for step inputs) is a sha256 over the stored
files, so a step downstream is served from cache exactly when the bytes it would read are
the same. Everything goes through ZenML's file API (``fileio``, the artifact store), so
remote stores work; bundles and ONNX files pass through a local temporary directory
because their readers (safetensors, ONNX Runtime) need local paths.

Never ZenML's built-in PyTorch materializer: it pickles the module and loads it with
``weights_only=False`` (arbitrary code execution on load).
"""

from __future__ import annotations

import hashlib
import html
import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel
from zenml.config.source import Source, SourceType
from zenml.enums import ArtifactType, VisualizationType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer
from zenml.metadata.metadata_types import MetadataType
from zenml.utils.source_utils import ZENML_SOURCE_ATTRIBUTE_NAME

from kdpipe import plots
from kdpipe.bundle import SPEC_FILE, WEIGHTS_FILE, Bundle, load_bundle, save_bundle
from kdpipe.data import DatasetSpec
from kdpipe.evaluation import EvaluationReport
from kdpipe.export import ExportResult
from kdpipe.frontier import frontier_figure, frontier_points
from kdpipe.gate import GateDecision
from kdpipe.model_card import ModelCard
from kdpipe.model_card_view import card_html, card_markdown
from kdpipe.onnx_teacher import ONNX_FILE as ONNX_TEACHER_FILE
from kdpipe.onnx_teacher import OnnxTeacherBundle, load_onnx_teacher, save_onnx_teacher
from kdpipe.promotion import PromotionResult
from kdpipe.quantize_report import QuantizeOutcome


def _pin_import_paths(*classes: type[Any]) -> None:
    """Record kdpipe's artifact types under their real import path (``kdpipe.data``...).

    ZenML names a class defined in a file under the source root (the repository) by its
    path relative to that root, so with the ``src/`` layout ``kdpipe.data.DatasetSpec``
    would be stored as ``src.kdpipe.data.DatasetSpec``; loading the artifact would then
    import kdpipe a second time under another name (two registries, two classes,
    ``isinstance`` failing). ZenML honours a ``__zenml_source__`` attribute instead.
    """
    for cls in classes:
        setattr(cls, ZENML_SOURCE_ATTRIBUTE_NAME,
                Source(module=cls.__module__, attribute=cls.__name__, type=SourceType.UNKNOWN))


_pin_import_paths(DatasetSpec, Bundle, OnnxTeacherBundle, ExportResult, EvaluationReport,
                  GateDecision, PromotionResult, ModelCard, QuantizeOutcome)

_CSS = ("body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}")


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in rows)
    return f"<table>{body}</table>"


def _page(title: str, body: str) -> str:
    return (f"<html><head><meta charset='utf-8'><style>{_CSS}</style></head><body>"
            f"<h3>{html.escape(title)}</h3>{body}</body></html>")


class _FileMaterializer(BaseMaterializer):
    """Shared helpers: read/write files under ``self.uri``, hash what was written."""

    SKIP_REGISTRATION: ClassVar[bool] = True

    def _path(self, name: str) -> str:
        return os.path.join(self.uri, name)

    def _write(self, name: str, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        with self.artifact_store.open(self._path(name), "wb") as f:
            f.write(raw)

    def _read(self, name: str) -> bytes:
        with self.artifact_store.open(self._path(name), "rb") as f:
            return f.read()

    def _verified_local_copy(self, filename: str, sha256: str, what: str) -> Path:
        """A local copy of a stored file (in a folder kept until the step ends), checked
        against the sha256 the artifact records."""
        with self.get_temporary_directory(delete_at_exit=False) as tmp:
            local = Path(tmp) / filename
            fileio.copy(self._path(filename), str(local), overwrite=True)
        digest = hashlib.sha256(local.read_bytes()).hexdigest()
        if digest != sha256:
            raise ValueError(f"{self._path(filename)} has sha256 {digest} but the artifact "
                             f"records {sha256}: the stored {what} was modified")
        return local

    def _hash_files(self, names: list[str]) -> str:
        """sha256 over (name, bytes) of the stored files, in the given order."""
        h = hashlib.sha256()
        for name in names:
            h.update(name.encode() + b"\0")
            h.update(hashlib.sha256(self._read(name)).digest())
        return h.hexdigest()

    def _upload_dir(self, local: Path) -> list[str]:
        """Copy every file of a flat local directory into ``self.uri``; return the names."""
        names = sorted(p.name for p in local.iterdir() if p.is_file())
        for name in names:
            fileio.copy(str(local / name), self._path(name), overwrite=True)
        return names

    def _download(self, names: list[str], local: Path) -> None:
        """Copy the named stored files into a local directory."""
        local.mkdir(parents=True, exist_ok=True)
        for name in names:
            fileio.copy(self._path(name), str(local / name), overwrite=True)

    def _save_png(self, name: str, figure: Any) -> dict[str, VisualizationType]:
        self._write(name, plots.to_png(figure))
        return {self._path(name): VisualizationType.IMAGE}

    def _save_html(self, name: str, page: str) -> dict[str, VisualizationType]:
        self._write(name, page)
        return {self._path(name): VisualizationType.HTML}


class _PydanticJsonMaterializer(_FileMaterializer):
    """A frozen pydantic model as one JSON file (subclasses set ``FILENAME``)."""

    SKIP_REGISTRATION: ClassVar[bool] = True
    FILENAME: ClassVar[str] = "data.json"

    def load(self, data_type: type[BaseModel]) -> BaseModel:
        return data_type.model_validate_json(self._read(self.FILENAME))

    def save(self, data: BaseModel) -> None:
        self._write(self.FILENAME, data.model_dump_json(indent=2))

    def compute_content_hash(self, data: BaseModel) -> str:
        return self._hash_files([self.FILENAME])


# -------------------------------------------------------------------- dataset spec
class DatasetSpecMaterializer(_PydanticJsonMaterializer):
    """:class:`kdpipe.data.DatasetSpec` as JSON: a description of the data, never pixels.

    Its content hash covers the fingerprint (data bytes, labels, split) and the loader
    config, so any change to either re-runs every training step downstream.
    """

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (DatasetSpec,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA
    FILENAME: ClassVar[str] = "dataset_spec.json"

    def extract_metadata(self, data: DatasetSpec) -> dict[str, MetadataType]:
        return {
            "source": data.config.source,
            "fingerprint": data.fingerprint,
            "num_classes": data.num_classes,
            "input_shape": list(data.input_shape),
            **{f"{split}_samples": n for split, n in data.split_sizes.items()},
        }

    def save_visualizations(self, data: DatasetSpec) -> dict[str, VisualizationType]:
        rows = [("source", data.config.source), ("fingerprint", data.fingerprint),
                ("input shape (C, H, W)", data.input_shape),
                ("split sizes", data.split_sizes), ("classes", ", ".join(data.classes)),
                ("mean", [round(m, 4) for m in data.mean]), ("std", [round(s, 4) for s in data.std]),
                ("split seed", data.config.split_seed), ("augment", data.config.augment)]
        return self._save_html("dataset.html", _page("Dataset", _table(rows)))


# ----------------------------------------------------------------------- bundles
class BundleMaterializer(_FileMaterializer):
    """:class:`kdpipe.bundle.Bundle` as a bundle directory (JSON spec + safetensors).

    An ONNX teacher (:class:`kdpipe.onnx_teacher.OnnxTeacherBundle`) is stored as its
    ``bundle.json`` + the graph as ``teacher.onnx`` instead of safetensors."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (Bundle,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL

    def _files(self) -> list[str]:
        is_onnx = fileio.exists(self._path(ONNX_TEACHER_FILE))
        return [SPEC_FILE, ONNX_TEACHER_FILE if is_onnx else WEIGHTS_FILE]

    def load(self, data_type: type[Bundle]) -> Bundle:
        with self.get_temporary_directory(delete_at_exit=True) as tmp:
            local = Path(tmp) / "bundle"
            names = self._files()
            self._download(names, local)
            return load_onnx_teacher(local) if ONNX_TEACHER_FILE in names else load_bundle(local)

    def save(self, data: Bundle) -> None:
        with self.get_temporary_directory(delete_at_exit=True) as tmp:
            save = save_onnx_teacher if isinstance(data, OnnxTeacherBundle) else save_bundle
            self._upload_dir(save(data, Path(tmp) / "bundle"))

    def compute_content_hash(self, data: Bundle) -> str:
        # The spec holds the weights' (or the graph's) sha256, so hashing both files covers
        # the tensors too.
        return self._hash_files(self._files())

    def extract_metadata(self, data: Bundle) -> dict[str, MetadataType]:
        spec, extra = data.spec, data.spec.extra
        meta: dict[str, MetadataType] = {
            "arch": spec.arch,
            "role": str(extra.get("role", "")),
            "num_classes": spec.num_classes,
            "input_shape": list(spec.input_shape),
            "pruned": bool(spec.layout),
            "weights_sha256": spec.weights_sha256,
            "kdpipe_version": spec.kdpipe_version,
        }
        for key, value in extra.get("metrics", {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                meta[key] = value
        if "best_epoch" in extra:
            meta["best_epoch"] = int(extra["best_epoch"])
        if "dataset_fingerprint" in extra:
            meta["dataset_fingerprint"] = str(extra["dataset_fingerprint"])
        return meta

    def save_visualizations(self, data: Bundle) -> dict[str, VisualizationType]:
        extra = data.spec.extra
        role = str(extra.get("role", data.spec.arch))
        out: dict[str, VisualizationType] = {}
        if extra.get("history"):
            out |= self._save_png("training_curves.png", plots.training_curves(
                {role: extra["history"]}, title=f"{role} ({data.spec.arch})"))
        if extra.get("test_confusion"):
            out |= self._save_png("confusion_matrix.png", plots.confusion_matrix_figure(
                extra["test_confusion"], data.spec.classes, title=f"{role}: test confusion matrix"))
        return out


# --------------------------------------------------------------------------- ONNX
class OnnxExportMaterializer(_FileMaterializer):
    """:class:`kdpipe.export.ExportResult`: the ``.onnx`` file under its own name + JSON.

    ``export.json`` stores the result with ``path`` reduced to the file name, so the
    artifact does not depend on where it was written; :meth:`load` copies the file to a
    local temporary folder (kept until the step ends) and points ``path`` at it.
    """

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (ExportResult,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL
    RESULT_FILE: ClassVar[str] = "export.json"

    def load(self, data_type: type[ExportResult]) -> ExportResult:
        result = ExportResult.model_validate_json(self._read(self.RESULT_FILE))
        local = self._verified_local_copy(result.filename, result.sha256, "ONNX file")
        return result.model_copy(update={"path": str(local)})

    def save(self, data: ExportResult) -> None:
        fileio.copy(data.path, self._path(data.filename), overwrite=True)
        self._write(self.RESULT_FILE, data.model_copy(update={"path": data.filename})
                    .model_dump_json(indent=2))

    def compute_content_hash(self, data: ExportResult) -> str:
        return self._hash_files([data.filename, self.RESULT_FILE])

    def extract_metadata(self, data: ExportResult) -> dict[str, MetadataType]:
        return {
            "filename": data.filename,
            "sha256": data.sha256,
            "size_bytes": data.size_bytes,
            "size_mb": data.size_bytes / 1e6,
            "opset": data.opset,
            "exporter": data.exporter,
            "parity_passed": data.parity.passed,
            "parity_max_abs_error": data.parity.max_abs_error,
            "parity_max_rel_error": data.parity.max_rel_error,
            **{f"onnx.{k}": v for k, v in data.metadata.items()},
        }

    def save_visualizations(self, data: ExportResult) -> dict[str, VisualizationType]:
        rows = [("file", data.filename), ("size (MB)", f"{data.size_bytes / 1e6:.3f}"),
                ("sha256", data.sha256), ("opset / exporter", f"{data.opset} / {data.exporter}"),
                ("parity", data.parity.describe()), *data.metadata.items()]
        return self._save_html("export.html", _page("ONNX export", _table(rows)))


class QuantizedOnnxMaterializer(_FileMaterializer):
    """:class:`kdpipe.quantize_report.QuantizeOutcome`: ``quantize.json`` and, when there is
    an INT8 candidate, its ``.onnx`` under its own name (``path`` stored as the file name
    and pointed at a local copy on :meth:`load`, as for :class:`OnnxExportMaterializer`)."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (QuantizeOutcome,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL
    RESULT_FILE: ClassVar[str] = "quantize.json"

    def load(self, data_type: type[QuantizeOutcome]) -> QuantizeOutcome:
        outcome = QuantizeOutcome.model_validate_json(self._read(self.RESULT_FILE))
        if outcome.result is None:
            return outcome
        result = outcome.result
        local = self._verified_local_copy(result.filename, result.sha256, "INT8 ONNX file")
        return outcome.model_copy(update={"result": result.model_copy(update={"path": str(local)})})

    def save(self, data: QuantizeOutcome) -> None:
        stored = data
        if data.result is not None:
            fileio.copy(data.result.path, self._path(data.result.filename), overwrite=True)
            stored = data.model_copy(update={"result": data.result.model_copy(
                update={"path": data.result.filename})})
        self._write(self.RESULT_FILE, stored.model_dump_json(indent=2))

    def _files(self, data: QuantizeOutcome) -> list[str]:
        return ([data.result.filename] if data.result is not None else []) + [self.RESULT_FILE]

    def compute_content_hash(self, data: QuantizeOutcome) -> str:
        return self._hash_files(self._files(data))

    def extract_metadata(self, data: QuantizeOutcome) -> dict[str, MetadataType]:
        return dict(data.metadata())

    def save_visualizations(self, data: QuantizeOutcome) -> dict[str, VisualizationType]:
        rows: list[tuple[str, Any]] = [("INT8 candidate", data.reason)]
        if data.result is not None:
            r = data.result
            rows += [("file", r.filename), ("size (MB)", f"{r.size_bytes / 1e6:.3f}"),
                     ("FP32 size (MB)", f"{r.fp32_size_bytes / 1e6:.3f}"),
                     ("settings", r.settings.short), ("why these types", r.settings.reason),
                     ("calibration", f"{r.settings.calibration_method}, "
                                     f"{r.settings.calibration_size} samples"),
                     ("kept in FP32", ", ".join(r.excluded_nodes) or "none"),
                     *[(f"warning {i + 1}", w) for i, w in enumerate(r.warnings)]]
        return self._save_html("quantize.html", _page("INT8 quantisation", _table(rows)))


# ---------------------------------------------------------- evaluation and gate
class EvaluationReportMaterializer(_PydanticJsonMaterializer):
    """:class:`kdpipe.evaluation.EvaluationReport`: JSON, an HTML table and two charts."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (EvaluationReport,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS
    FILENAME: ClassVar[str] = "evaluation.json"

    def extract_metadata(self, data: EvaluationReport) -> dict[str, MetadataType]:
        return dict(data.metadata())

    def save_visualizations(self, data: EvaluationReport) -> dict[str, VisualizationType]:
        out = self._save_html("evaluation.html", data.to_html())
        out |= self._save_png("frontier.png", frontier_figure(
            frontier_points(data), title=f"{data.split} split: accuracy vs latency"))
        out |= self._save_png("confusion_matrix.png", plots.confusion_matrix_figure(
            data.candidate.confusion, data.classes, title="candidate (ONNX): confusion matrix"))
        return out


class GateDecisionMaterializer(_PydanticJsonMaterializer):
    """:class:`kdpipe.gate.GateDecision`: JSON plus the HTML table of every check."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (GateDecision,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS
    FILENAME: ClassVar[str] = "gate_decision.json"

    def extract_metadata(self, data: GateDecision) -> dict[str, MetadataType]:
        return dict(data.metadata())

    def save_visualizations(self, data: GateDecision) -> dict[str, VisualizationType]:
        return self._save_html("gate_decision.html", data.to_html())


class PromotionResultMaterializer(_PydanticJsonMaterializer):
    """:class:`kdpipe.promotion.PromotionResult` as JSON, its summary as metadata."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (PromotionResult,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA
    FILENAME: ClassVar[str] = "promotion.json"

    def extract_metadata(self, data: PromotionResult) -> dict[str, MetadataType]:
        return {**data.metadata(), "summary": data.summary()}


# ----------------------------------------------------------------------- model card
class ModelCardMaterializer(_PydanticJsonMaterializer):
    """:class:`kdpipe.model_card.ModelCard`: JSON; the card as HTML and as Markdown."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (ModelCard,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS
    FILENAME: ClassVar[str] = "model_card.json"

    def extract_metadata(self, data: ModelCard) -> dict[str, MetadataType]:
        ev = data.candidate_eval
        return {"candidate": data.candidate, "promoted": data.promoted,
                "accuracy": ev.accuracy, "summary": data.summary()}

    def save_visualizations(self, data: ModelCard) -> dict[str, VisualizationType]:
        out = self._save_html("model_card.html", card_html(data))
        self._write("model_card.md", card_markdown(data, with_figure=False))
        return out | {self._path("model_card.md"): VisualizationType.MARKDOWN}
