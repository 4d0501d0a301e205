"""Evaluate teacher, student, pruned student, the ONNX candidates (FP32, INT8) and production.

Everything is measured on one split (``test`` by default) in a single pass over the
raw-pixel loader: each PyTorch model normalises the batch with its own bundle's mean /
std, while ONNX models take the raw pixels in [0, 1] (their normalisation lives inside
the graph). The same pass gives the parity error: the largest absolute difference
between ONNX Runtime's outputs and the pruned PyTorch model's on every test sample, and
the INT8 candidate's argmax agreement with the FP32 one (the INT8 parity measure).

The current production student is evaluated on the same split when it is compatible
(same classes, same input shape); otherwise the report records why it was not, so that
a dataset change never crashes a scheduled run: it simply disables the production
comparison in the gate.

:class:`EvaluationReport` is a frozen pydantic model: JSON-serialisable (it is the
``evaluation`` artifact), with :meth:`EvaluationReport.metadata` for dashboards and
:meth:`EvaluationReport.to_html` for a human-readable view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kdpipe.config import EvalConfig
from kdpipe.eval_report import (
    CANDIDATE,
    CANDIDATES,
    INT8_CANDIDATE,
    PYTORCH_MODELS,
    EvaluationError,
    EvaluationReport,
    LatencyStats,
    ModelEvaluation,
    ProductionComparison,
)
from kdpipe.preprocess import adapted_model

__all__ = [
    "CANDIDATE",
    "CANDIDATES",
    "INT8_CANDIDATE",
    "PYTORCH_MODELS",
    "EvaluationError",
    "EvaluationReport",
    "LatencyStats",
    "ModelEvaluation",
    "ProductionCandidate",
    "ProductionComparison",
    "compatibility_problem",
    "evaluate_models",
    "onnx_session",
]

# ---------------------------------------------------------------------- computing
@dataclass(frozen=True)
class ProductionCandidate:
    """The current production student, as the evaluation needs it.

    Built by the evaluate step from the production model version's ``student_onnx``
    artifact; the core never looks the registry up itself.

    Attributes:
        onnx_path: the production .onnx file (raw-pixel input, logits output).
        version: registry version label, for the report.
        classes: the class names it was trained on, in output order.
        input_shape: its (C, H, W).
        params: parameter count, when known.
        macs: MACs per sample, when known.
    """

    onnx_path: Path
    version: str
    classes: list[str]
    input_shape: tuple[int, int, int]
    params: int | None = None
    macs: int | None = None


def compatibility_problem(classes: Sequence[str], input_shape: Sequence[int],
                          expected_classes: Sequence[str],
                          expected_shape: Sequence[int]) -> str | None:
    """Why a model cannot be evaluated on a dataset, or None when it can.

    Returns:
        e.g. ``"classes differ: production ['0', '1'] vs dataset ['0', '1', '2']"``.
    """
    if list(classes) != list(expected_classes):
        return f"classes differ: production {list(classes)} vs dataset {list(expected_classes)}"
    if tuple(input_shape) != tuple(expected_shape):
        return (f"input shapes differ: production {tuple(input_shape)} vs dataset "
                f"{tuple(expected_shape)}")
    return None


def onnx_session(path: str | Path) -> Any:
    """An ONNX Runtime CPU session for ``path``, with an error naming the file."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises several private exception types
        raise EvaluationError(f"ONNX Runtime cannot load {path}: {err}") from err


@dataclass
class _Tally:
    """Predictions and targets of one model, accumulated batch by batch."""

    preds: list[np.ndarray] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)

    def add(self, logits: np.ndarray, y: np.ndarray) -> None:
        self.preds.append(logits.argmax(axis=1))
        self.targets.append(y)

    def result(self, name: str, runtime: Literal["pytorch", "onnxruntime"], num_classes: int,
               **extra: Any) -> ModelEvaluation:
        from kdpipe import metrics

        preds, targets = np.concatenate(self.preds), np.concatenate(self.targets)
        cm = metrics.confusion_matrix(torch.from_numpy(preds), torch.from_numpy(targets),
                                      num_classes)
        per_class = [None if np.isnan(v) else float(v)
                     for v in metrics.per_class_accuracy(cm).tolist()]
        return ModelEvaluation(name=name, runtime=runtime,
                               accuracy=float((preds == targets).mean()),
                               per_class_accuracy=per_class, confusion=cm.tolist(),
                               num_samples=int(len(targets)), **extra)


def _normalizer(mean: Sequence[float], std: Sequence[float]) -> Callable[[torch.Tensor],
                                                                         torch.Tensor]:
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    return lambda x: (x - m) / s


def _ort_runner(session: Any, label: str = "the ONNX model"
                ) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> first output`` with errors that name the model and the input shape."""
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        try:
            return session.run(None, {name: x})[0]
        except Exception as err:  # ORT raises private exception types
            raise EvaluationError(
                f"{label} failed on an input of shape {tuple(x.shape)}: {err}") from err

    return run


def _latencies(fn_for_batch: Callable[[int], Callable[[], Any]], cfg: EvalConfig
               ) -> list[LatencyStats]:
    from kdpipe.metrics import latency_stats

    out = []
    for b in cfg.latency_batch_sizes:
        stats = latency_stats(fn_for_batch(b), repeats=cfg.latency_repeats,
                              warmup=cfg.latency_warmup)
        out.append(LatencyStats(batch_size=b, **stats))
    return out


def _random_raw(batch: int, shape: Sequence[int]) -> np.ndarray:
    # Latency does not depend on the values; a fixed seed keeps runs comparable.
    return np.random.default_rng(0).random((batch, *shape), dtype=np.float32)


def _torch_latency(model: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int], cfg: EvalConfig
                   ) -> list[LatencyStats]:
    def make(b: int) -> Callable[[], Any]:
        x = torch.from_numpy(_random_raw(b, shape))

        def run() -> Any:
            with torch.inference_mode():
                return model(x)

        return run

    return _latencies(make, cfg)


def _onnx_latency(run: Callable[[np.ndarray], np.ndarray], shape: Sequence[int],
                  cfg: EvalConfig) -> list[LatencyStats]:
    def make(b: int) -> Callable[[], Any]:
        x = _random_raw(b, shape)
        return lambda: run(x)

    return _latencies(make, cfg)


def _check_logits(name: str, out: np.ndarray, batch: int, num_classes: int) -> None:
    if out.shape != (batch, num_classes):
        raise EvaluationError(
            f"{name} returned outputs of shape {tuple(out.shape)} for a batch of {batch}; "
            f"expected ({batch}, {num_classes}) logits (one per class of the dataset)")


def _one_pass(dataset: Any, split: str, bundles: dict[str, torch.nn.Module],
              norms: dict[str, Callable[[torch.Tensor], torch.Tensor]],
              onnx_runs: dict[str, Callable[[np.ndarray], np.ndarray]],
              prod_run: Callable[[np.ndarray], np.ndarray] | None
              ) -> tuple[dict[str, _Tally], float, dict[str, float]]:
    """Every model on every sample of ``split`` once: per-model tallies, the FP32 parity
    error and each other ONNX candidate's argmax agreement with the FP32 one."""
    from kdpipe.data import make_loader

    k = len(dataset.classes)
    tallies = {name: _Tally() for name in (*bundles, *onnx_runs, "production")}
    parity, agree, seen = 0.0, dict.fromkeys(onnx_runs, 0), 0
    loader = make_loader(dataset, split, train=False, normalize=False)
    with torch.inference_mode():
        for x, y, *_ in loader:
            y_np, n = y.numpy(), len(y)
            outs = {name: m(norms[name](x)).float().numpy() for name, m in bundles.items()}
            outs |= {name: run(x.numpy()) for name, run in onnx_runs.items()}
            for name, out in outs.items():
                _check_logits(name, out, n, k)
                tallies[name].add(out, y_np)
            # Parity on every sample of the split, not only on the export's example input.
            parity = max(parity, float(np.abs(outs[CANDIDATE] - outs["pruned_student"]).max()))
            fp32 = outs[CANDIDATE].argmax(axis=1)
            for name in onnx_runs:
                agree[name] += int((outs[name].argmax(axis=1) == fp32).sum())
            seen += n
            if prod_run is not None:
                tallies["production"].add(prod_run(x.numpy()), y_np)
    return tallies, parity, {name: hits / max(seen, 1) for name, hits in agree.items()}


def evaluate_models(
    dataset: Any,
    teacher: Any,
    student: Any,
    pruned_student: Any,
    onnx_path: str | Path,
    cfg: EvalConfig,
    *,
    int8_path: str | Path | None = None,
    production: ProductionCandidate | None = None,
    production_reason: str = "no production model",
    split: str = "test",
) -> EvaluationReport:
    """Evaluate every model on one split in a single pass over the data.

    Args:
        dataset: the :class:`kdpipe.data.DatasetSpec`.
        teacher, student, pruned_student: :class:`kdpipe.bundle.Bundle` values
            (``.model``, ``.spec.mean`` / ``.std``); the ONNX file is the pruned student's.
        onnx_path: the exported student (raw-pixel input, normalisation inside).
        cfg: latency batch sizes, repeats and warm-up.
        int8_path: the INT8 candidate (the quantised ``onnx_path``), evaluated like the
            FP32 one plus its argmax agreement with it; None: no INT8 candidate.
        production: the current production student, or None; ``production_reason``:
            why it is None (recorded in the report).
        split: the split to evaluate on.

    Returns:
        The report; an incompatible or unreadable production model is a recorded reason.

    Raises:
        EvaluationError: a candidate ONNX model is unreadable or not one logit per class.
    """
    shape, k = tuple(dataset.input_shape), len(dataset.classes)
    bundles = {"teacher": teacher, "student": student, "pruned_student": pruned_student}
    norms = {n: _normalizer(b.spec.mean, b.spec.std) for n, b in bundles.items()}
    # Each model behind its declared preprocessing (a teacher trained elsewhere).
    nets = {n: adapted_model(b).eval() for n, b in bundles.items()}
    files = {CANDIDATE: Path(onnx_path)} | ({} if int8_path is None
                                           else {INT8_CANDIDATE: Path(int8_path)})
    runs = {n: _ort_runner(onnx_session(p), f"the ONNX model {p}") for n, p in files.items()}
    prod_run, prod_status = _open_production(production, production_reason, dataset)
    tallies, parity, agreement = _one_pass(dataset, split, nets, norms, runs, prod_run)
    models = {}
    for name, net in nets.items():
        runtime, sizes = _runtime_and_sizes(net, shape)
        models[name] = tallies[name].result(
            name, runtime, k, **sizes,
            latency=_torch_latency(_normalized(net, norms[name]), shape, cfg))
    for name, path in files.items():
        models[name] = _candidate_result(name, path, tallies[name], runs[name],
                                         models["pruned_student"], agreement, shape, cfg)
    if prod_run is not None:
        assert production is not None
        prod_status = prod_status.model_copy(update={"evaluation": _production_result(
            tallies["production"], production, prod_run, shape, k, cfg)})
    return EvaluationReport(split=split, classes=list(dataset.classes), input_shape=shape,
                            dataset_fingerprint=dataset.fingerprint, models=models,
                            parity_max_abs_diff=parity, production=prod_status)


def _candidate_result(name: str, path: Path, tally: _Tally,
                      run: Callable[[np.ndarray], np.ndarray], pruned: ModelEvaluation,
                      agreement: dict[str, float], shape: Sequence[int], cfg: EvalConfig
                      ) -> ModelEvaluation:
    """An ONNX candidate's evaluation: the pruned student's sizes, its own file and speed."""
    return tally.result(name, "onnxruntime", len(pruned.per_class_accuracy),
                        params=pruned.params, macs=pruned.macs,
                        size_bytes=path.stat().st_size, latency=_onnx_latency(run, shape, cfg),
                        precision="fp32" if name == CANDIDATE else "int8",
                        agreement=None if name == CANDIDATE else agreement[name])


def _production_result(tally: _Tally, production: ProductionCandidate,
                       run: Callable[[np.ndarray], np.ndarray], shape: Sequence[int], k: int,
                       cfg: EvalConfig) -> ModelEvaluation:
    return tally.result("production", "onnxruntime", k, params=production.params,
                        macs=production.macs, size_bytes=production.onnx_path.stat().st_size,
                        latency=_onnx_latency(run, shape, cfg))


def _runtime_and_sizes(net: torch.nn.Module, shape: Sequence[int]) -> tuple[str, dict[str, Any]]:
    """``("pytorch", sizes)``, or ``("onnxruntime", the graph's sizes)`` for an ONNX teacher."""
    from kdpipe.metrics import count_macs, count_params, serialized_size_bytes

    if hasattr(net, "onnx_stats"):
        return "onnxruntime", net.onnx_stats()
    return "pytorch", {"params": count_params(net), "macs": count_macs(net, shape),
                       "size_bytes": serialized_size_bytes(net)}


def _normalized(model: torch.nn.Module, norm: Callable[[torch.Tensor], torch.Tensor]
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Raw pixels in, logits out: the same work the ONNX graph does (fair latency)."""
    return lambda x: model(norm(x))


def _open_production(production: ProductionCandidate | None, reason: str, dataset: Any
                     ) -> tuple[Callable[[np.ndarray], np.ndarray] | None, ProductionComparison]:
    """A runner for the production model when it can be evaluated, and its status."""
    if production is None:
        return None, ProductionComparison(status="absent", reason=reason)
    problem = compatibility_problem(production.classes, production.input_shape,
                                    dataset.classes, dataset.input_shape)
    if problem is not None:
        return None, ProductionComparison(status="incompatible", reason=problem,
                                          version=production.version)
    try:
        run = _ort_runner(onnx_session(production.onnx_path), "the production model")
        probe = run(_random_raw(2, dataset.input_shape))
        _check_logits("the production model", probe, 2, len(dataset.classes))
    except EvaluationError as err:
        # A broken production artifact must not block a new candidate: record it.
        return None, ProductionComparison(status="unreadable", reason=str(err),
                                          version=production.version)
    return run, ProductionComparison(status="evaluated", reason="evaluated on the same split",
                                     version=production.version)
