"""The model card as a document: Markdown (MLflow) and a standalone HTML page (ZenML).

Both come from one list of :mod:`kdpipe.card_doc` blocks (:func:`card_blocks`), so they
say the same thing. The HTML embeds the accuracy-versus-latency figure as inline SVG; the
Markdown refers to it as an image file beside it (``frontier.png`` in the MLflow run).
"""

from __future__ import annotations

from collections.abc import Sequence

from kdpipe.card_doc import (
    Block,
    Bullets,
    Code,
    Heading,
    Para,
    Table,
    Verbatim,
    to_html,
    to_markdown,
)
from kdpipe.eval_report import ModelEvaluation
from kdpipe.frontier import frontier_figure, frontier_table
from kdpipe.model_card import NOT_STATED, GateRow, ModelCard
from kdpipe.plots import to_svg

__all__ = ["FIGURE_FILE", "card_blocks", "card_html", "card_markdown"]

FIGURE_FILE = "frontier.png"
"""The frontier figure's file name beside the Markdown card."""


def _fmt(value: float | int | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _data(card: ModelCard) -> list[Block]:
    d = card.data
    splits = ", ".join(f"{k} {v:,}" for k, v in d.split_sizes.items())
    return [Heading("Data"), Bullets((
        ("source", d.source), ("fingerprint", d.fingerprint),
        ("split sizes", splits), ("input (C, H, W)", " × ".join(map(str, d.input_shape))),
        (f"classes ({len(d.classes)})", ", ".join(d.classes))))]


def _lineage(card: ModelCard) -> list[Block]:
    lin = card.lineage
    items = [("teacher", lin.teacher),
             ("teacher assistants", " → ".join(lin.assistants) or "none"),
             ("student", lin.student), ("pruning", lin.pruning),
             ("quantisation", lin.quantization),
             ("ZenML", f"pipeline run {lin.zenml_pipeline_run or '–'}, model "
                       f"{lin.zenml_model or '–'} version {lin.zenml_model_version or '–'}"),
             ("MLflow", f"experiment {lin.mlflow_experiment or '–'}, run {lin.mlflow_run_id or '–'}")]
    if lin.mlflow_version:
        items.append(("registered", f"{lin.registered_model} version {lin.mlflow_version} "
                                    "(alias champion)"))
    return [Heading("Lineage"), Bullets(tuple(items))]


def _metrics(card: ModelCard) -> list[Block]:
    batches = sorted({s.batch_size for ev in card.models.values() for s in ev.latency})
    head = ("model", "runtime", "accuracy", "params", "MACs", "size (MB)",
            *(f"p50 / p95 b{b} (ms)" for b in batches))
    rows, classes = [], []
    for name, ev in card.models.items():
        lat = [f"{s.p50_ms:.3g} / {s.p95_ms:.3g}" if (s := ev.latency_at(b)) else "–"
               for b in batches]
        size = None if ev.size_bytes is None else ev.size_bytes / 1e6
        rows.append((name + (" (candidate)" if name == card.candidate else ""), ev.runtime,
                     f"{ev.accuracy:.4f}", _fmt(ev.params, ","), _fmt(ev.macs, ","),
                     _fmt(size, ".3f"), *lat))
        classes.append("hit" if name == card.candidate else "")
    n = card.candidate_eval.num_samples
    return [Heading(f"Metrics ({card.split} split, {n:,} samples)"),
            Table(head, tuple(rows), right=frozenset(range(2, len(head))),
                  row_classes=tuple(classes)),
            Heading("Accuracy per class", 3), _per_class(card)]


def _per_class(card: ModelCard) -> Table:
    models: list[tuple[str, ModelEvaluation]] = list(card.models.items())
    rows = tuple((cls, *(_fmt(ev.per_class_accuracy[i], ".4f") for _, ev in models))
                 for i, cls in enumerate(card.data.classes))
    return Table(("class", *(name for name, _ in models)), rows,
                 right=frozenset(range(1, len(models) + 1)))


def _latency(card: ModelCard, figure_svg: str | None) -> list[Block]:
    blocks: list[Block] = [
        Heading("Latency and the accuracy-vs-latency frontier"),
        Para(f"Measured on {card.cpu.describe()}. Latency is wall-clock per forward pass "
             "(p50 over the configured repeats), single process, after warm-up."),
        Code(frontier_table(card.frontier))]
    if figure_svg is not None:
        blocks.append(Verbatim(markdown=f"![accuracy vs latency]({FIGURE_FILE})",
                               html=f"<figure>{figure_svg}</figure>"))
    return blocks


def _gate_table(gate_rows: Sequence[GateRow]) -> Table:
    rows = tuple((r.check, r.description, _fmt(r.value, ".6g"),
                  f"{r.comparison} {r.threshold:.6g}", r.verdict, r.reason) for r in gate_rows)
    return Table(("check", "measures", "value", "threshold", "verdict", "detail"), rows,
                 right=frozenset({2}), row_classes=tuple(r.verdict for r in gate_rows))


def _gate(card: ModelCard) -> list[Block]:
    blocks: list[Block] = [
        Heading("Gate"),
        Para(f"{'PASSED' if card.gate_passed else 'REJECTED'}: {card.outcome}", strong=True),
        _gate_table(card.gate)]
    if card.choice:
        blocks.append(Para(f"Choice among candidates: {card.choice}"))
    for label, gate_rows in card.other_candidates.items():
        blocks += [Para(f"Other candidate: {label}", strong=True), _gate_table(gate_rows)]
    if card.gate_disabled:
        blocks.append(Para(f"Disabled checks: {', '.join(card.gate_disabled)}."))
    return blocks


def _intended_use(card: ModelCard) -> list[Block]:
    use = card.intended_use
    return [Heading("Intended use and limitations"), Bullets((
        ("license", use.license or NOT_STATED), ("use cases", use.use_cases or NOT_STATED),
        ("limitations", use.limitations or NOT_STATED)))]


def card_blocks(card: ModelCard, figure_svg: str | None = None) -> list[Block]:
    """The card's sections in reading order."""
    title = f"Model card: {card.model_name}" + (f" version {card.version}" if card.version else "")
    status = "PROMOTED" if card.promoted else "NOT PROMOTED"
    return [Heading(title, 1), Para(f"{status} — candidate {card.candidate}", strong=True),
            Para(card.summary()), *_intended_use(card), *_data(card), *_lineage(card),
            *_metrics(card), *_latency(card, figure_svg), *_gate(card),
            Para(f"Generated by kdpipe {card.kdpipe_version}.")]


def card_markdown(card: ModelCard, *, with_figure: bool = True) -> str:
    """The Markdown card (``with_figure``: an image link to ``frontier.png`` beside it)."""
    return to_markdown(card_blocks(card, "" if with_figure else None))


def card_html(card: ModelCard) -> str:
    """A standalone HTML page with the frontier figure inline (SVG)."""
    svg = to_svg(frontier_figure(card.frontier, title=f"{card.model_name}: accuracy vs latency"))
    svg = svg[svg.find("<svg"):]  # drop the XML prolog and doctype: inline in HTML
    return to_html(card_blocks(card, svg), title=f"Model card: {card.model_name}")
