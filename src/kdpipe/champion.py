"""Promotion: act on the gate so the champion alias and the production stage always agree.

Two registries say which student is in production, and both must move, or neither:

* the **champion store** (:class:`ChampionStore`): the MLflow registered model whose alias
  ``champion`` is the serving contract (:class:`MlflowChampionStore`, over
  :mod:`kdpipe.promotion`);
* the **stage store** (:class:`StageStore`): the lineage registry, where this run's model
  version goes to stage ``production`` (ZenML's Model Control Plane; its implementation
  lives in ``steps/zenml_stage_store.py`` because the core never imports zenml).

:func:`promote_candidate` holds the whole order; behind the two protocols every path is
tested on in-memory stores (``tests/test_promotion_core.py``). On a passed gate, under
:meth:`ChampionStore.lock` (two runs promoting at once cannot interleave):

1. the production version is read again; when the gate compared the candidate against
   production (``gate.min_gain_vs_production`` set) and production is no longer the
   version it was measured against (a concurrent run promoted meanwhile), the candidate
   is tagged ``superseded`` with the reason and nothing moves;
2. a candidate whose ONNX sha256 equals the champion's (a re-run with nothing changed) is
   not registered again: nothing moves;
3. the ONNX is registered as a new version (the alias does not move yet): a registry that
   is down fails here, before anything visible changed;
4. the alias moves to it (one call; the previous target is kept);
5. the candidate's version moves to stage production (the previous one is archived).
   When that fails the alias is moved back, or deleted when there was none, and
   :class:`~kdpipe.promotion.PromotionError` names the cause. Stages cannot be restored
   exactly (a version cannot go back to "no stage"), aliases can: hence alias first.

On a rejected gate nothing moves: the candidate is tagged ``rejected``.
:func:`raise_if_rejected` then fails the run when ``gate.fail_run_on_reject`` is true.
The gate decision is logged on the candidate's version first (it holds whatever follows),
the promotion outcome last (not when promotion raised).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kdpipe.promotion import (
    CHAMPION_ALIAS,
    PromotionError,
    PromotionResult,
    RegisteredVersion,
    get_champion,
    promotion_lock,
    register_onnx_model,
    restore_champion,
    set_champion,
)

if TYPE_CHECKING:
    from kdpipe.bundle import Bundle
    from kdpipe.eval_report import EvaluationReport
    from kdpipe.export_report import ExportResult
    from kdpipe.gate import GateDecision
    from kdpipe.quantize_report import QuantizeResult

__all__ = [
    "REJECTED_TAG",
    "SUPERSEDED_TAG",
    "Candidate",
    "ChampionStore",
    "GateRejectedError",
    "MlflowChampionStore",
    "StageStore",
    "build_candidate",
    "promote_candidate",
    "raise_if_rejected",
    "stale_comparison",
]

REJECTED_TAG = "rejected"
SUPERSEDED_TAG = "superseded"
"""Tag of a version not promoted because a concurrent run moved production first."""
_TAG_KEYS = ("onnx_sha256", "precision", "zenml_model", "zenml_model_version")


class GateRejectedError(RuntimeError):
    """The gate rejected the candidate and ``gate.fail_run_on_reject`` is true."""


@dataclass(frozen=True)
class Candidate:
    """This run's student, as promotion needs it.

    Attributes:
        version: its version in the stage store (the ZenML model version's name).
        onnx_path: the .onnx file to register.
        sha256: of that file (the byte-identical check compares it with the champion's).
        input_shape: (C, H, W), for the registered model's signature.
        metadata: written into the registered version (classes, mean, std, precision...);
            the keys ``onnx_sha256``, ``precision``, ``zenml_model`` and
            ``zenml_model_version`` also become tags.
    """

    version: str
    onnx_path: Path
    sha256: str
    input_shape: tuple[int, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tags(self) -> dict[str, str]:
        """The registered version's tags."""
        return {k: str(self.metadata[k]) for k in _TAG_KEYS if k in self.metadata}


def build_candidate(onnx: ExportResult, pruned: Bundle, teacher: Bundle, *,
                    lineage_model: str, version: str, int8: QuantizeResult | None = None
                    ) -> Candidate:
    """The candidate with the metadata the predict pipeline and a person reading the
    registry need (``lineage_model``/``version``: the ZenML model and version names).

    ``int8``: promote this INT8 version of ``onnx`` (the gate chose it) instead of the
    FP32 file; its precision and settings go into the metadata and tags.
    """
    spec = pruned.spec
    path, sha256 = (Path(onnx.path), onnx.sha256) if int8 is None else (Path(int8.path),
                                                                        int8.sha256)
    meta = {"classes": list(spec.classes), "input_shape": list(spec.input_shape),
            "mean": list(spec.mean), "std": list(spec.std), "arch": spec.arch,
            "teacher_arch": teacher.spec.arch, "onnx_sha256": sha256,
            "precision": "fp32" if int8 is None else "int8",
            "zenml_model": lineage_model, "zenml_model_version": version}
    if int8 is not None:
        meta |= {"fp32_onnx_sha256": onnx.sha256, "quantization": int8.settings.short,
                 "quantization_excluded": list(int8.excluded_nodes)}
    return Candidate(version=version, onnx_path=path, sha256=sha256,
                     input_shape=tuple(spec.input_shape), metadata=meta)


class StageStore(Protocol):
    """The lineage registry's versions of one model and its ``production`` stage."""

    def production_version(self) -> str | None:
        """The name of the version in production now (None: there is none)."""

    def set_production(self, version: str) -> None:
        """Move ``version`` to production; the previous production version is archived."""

    def tag(self, version: str, tag: str) -> None:
        """Add ``tag`` to ``version``."""

    def log_metadata(self, version: str, metadata: Mapping[str, Any]) -> None:
        """Attach ``metadata`` (JSON-like values) to ``version``."""


class ChampionStore(Protocol):
    """The registered model whose ``champion`` alias is the serving contract."""

    name: str
    """The registered model's name."""

    def lock(self) -> AbstractContextManager[object]:
        """Exclusive across the processes promoting this registered model."""

    def champion(self) -> RegisteredVersion | None:
        """The version the alias points at (None: no alias, or no registered model)."""

    def register(self, candidate: Candidate) -> RegisteredVersion:
        """Add ``candidate`` as a new version; the alias does not move."""

    def set_champion(self, version: str) -> str | None:
        """Point the alias at ``version``; return its previous target (None: unset)."""

    def restore_champion(self, previous: str | None) -> None:
        """Point the alias back at ``previous``, or delete it when ``previous`` is None."""


class MlflowChampionStore:
    """:class:`ChampionStore` over an MLflow registry (see :mod:`kdpipe.promotion`).

    Args:
        name: the registered model (``tracking.registered_model``).
        tracking_uri: the tracking store, also used as the registry.
        experiment: where a ``promote`` run is opened when no MLflow run is active.
    """

    def __init__(self, name: str, *, tracking_uri: str | None, experiment: str = "kdpipe"):
        self.name, self.tracking_uri, self.experiment = name, tracking_uri, experiment

    def lock(self) -> AbstractContextManager[object]:
        return promotion_lock(self.name, tracking_uri=self.tracking_uri)

    def champion(self) -> RegisteredVersion | None:
        return get_champion(self.name, tracking_uri=self.tracking_uri)

    def register(self, candidate: Candidate) -> RegisteredVersion:
        return register_onnx_model(
            candidate.onnx_path, self.name, input_shape=candidate.input_shape,
            metadata=candidate.metadata, tags=candidate.tags, experiment=self.experiment,
            tracking_uri=self.tracking_uri)

    def set_champion(self, version: str) -> str | None:
        return set_champion(self.name, version, tracking_uri=self.tracking_uri)

    def restore_champion(self, previous: str | None) -> None:
        restore_champion(self.name, previous, tracking_uri=self.tracking_uri)


def stale_comparison(decision: GateDecision, evaluation: EvaluationReport | None,
                     production_now: str | None) -> str | None:
    """Why the gate's comparison with production no longer holds (None: it holds).

    Args:
        decision: the gate's decision; no claim about production when
            ``min_gain_vs_production`` was disabled.
        evaluation: the report the gate decided on (None: not checked).
        production_now: the production version, read under the promotion lock.
    """
    if evaluation is None or "min_gain_vs_production" in decision.disabled:
        return None
    seen = evaluation.production.version
    if production_now == seen:
        return None
    return (f"production moved from version {seen or '(none)'} to {production_now} while "
            f"this run was being evaluated (a concurrent run promoted); the gate compared "
            f"against {seen or 'no production'}, so nothing was promoted: re-run to compare "
            f"against version {production_now}")


def promote_candidate(candidate: Candidate, decision: GateDecision, stages: StageStore,
                      champions: ChampionStore, *, evaluation: EvaluationReport | None = None
                      ) -> PromotionResult:
    """Promote ``candidate`` when ``decision`` passed; record why not otherwise.

    Args:
        evaluation: the report the gate decided on; its ``production.version`` is checked
            against the production version at promotion time (None: not checked).

    Raises:
        PromotionError: a registry failed; the message says what was restored.
    """
    stages.log_metadata(candidate.version, {"gate_decision": dict(decision.metadata())})
    if decision.passed:
        with champions.lock():
            result = _promote_locked(candidate, decision, stages, champions, evaluation)
    else:
        stages.tag(candidate.version, REJECTED_TAG)
        result = _not_promoted(candidate, champions,
                               decision.reasons or ["the gate rejected the candidate"])
    stages.log_metadata(candidate.version, {"promotion": dict(result.metadata())})
    return result


def raise_if_rejected(result: PromotionResult, decision: GateDecision, *,
                      fail_run_on_reject: bool) -> None:
    """Fail the run after a rejection (once recorded) when ``gate.fail_run_on_reject``.

    Raises:
        GateRejectedError: the gate rejected and ``fail_run_on_reject`` is true.
    """
    if not decision.passed and fail_run_on_reject:
        raise GateRejectedError(
            f"{result.summary()}; failing the run because gate.fail_run_on_reject is true")


def _not_promoted(candidate: Candidate, champions: ChampionStore, reasons: list[str],
                  previous_champion: str | None = None) -> PromotionResult:
    return PromotionResult(promoted=False, model_version=candidate.version,
                           registered_model=champions.name,
                           previous_champion=previous_champion, reasons=reasons)


def _promote_locked(candidate: Candidate, decision: GateDecision, stages: StageStore,
                    champions: ChampionStore, evaluation: EvaluationReport | None
                    ) -> PromotionResult:
    """Steps 1-5 of the module docstring; the caller holds the promotion lock."""
    production = stages.production_version()
    stale = stale_comparison(decision, evaluation, production)
    if stale is not None:
        stages.tag(candidate.version, SUPERSEDED_TAG)
        return _not_promoted(candidate, champions, [stale])
    current = champions.champion()
    if current is not None and current.tags.get("onnx_sha256") == candidate.sha256:
        return _not_promoted(
            candidate, champions, previous_champion=current.version,
            reasons=[f"identical to the champion (MLflow version {current.version}, same "
                     "ONNX sha256): nothing to promote"])
    version = _register(candidate, champions)
    try:
        previous = champions.set_champion(version.version)
    except Exception as err:  # the alias did not move: nothing to undo
        raise PromotionError(
            f"moving {champions.name}@{CHAMPION_ALIAS} to version {version.version} failed: "
            f"{err}. Nothing changed: the alias and the production stage are as before "
            f"(version {version.version} stays registered without the alias)") from err
    _move_stage(candidate, stages, champions, version.version, previous)
    chose = f"; promoted {decision.chosen}: {decision.choice}" if decision.chosen else ""
    return PromotionResult(
        promoted=True, model_version=candidate.version, registered_model=champions.name,
        mlflow_version=version.version, previous_champion=previous,
        previous_production=production, reasons=[f"the gate passed{chose}"],
        precision=candidate.metadata.get("precision"))


def _register(candidate: Candidate, champions: ChampionStore) -> RegisteredVersion:
    try:
        return champions.register(candidate)
    except PromotionError:  # already says what happened (kdpipe.promotion's own)
        raise
    except Exception as err:
        raise PromotionError(
            f"could not register {candidate.onnx_path.name} as a new version of "
            f"{champions.name!r}: {err}. Nothing was promoted; check that the registry is "
            "reachable and writable") from err


def _move_stage(candidate: Candidate, stages: StageStore, champions: ChampionStore,
                version: str, previous: str | None) -> None:
    """Stage -> production; on failure move the alias back (or delete it), then raise."""
    alias = f"{champions.name}@{CHAMPION_ALIAS}"
    try:
        stages.set_production(candidate.version)
    except Exception as err:
        try:
            champions.restore_champion(previous)
        except Exception as undo_err:
            fix = (f"MlflowClient().delete_registered_model_alias({champions.name!r}, "
                   f"{CHAMPION_ALIAS!r})" if previous is None else
                   f"MlflowClient().set_registered_model_alias({champions.name!r}, "
                   f"{CHAMPION_ALIAS!r}, {previous!r})")
            raise PromotionError(
                f"setting model version {candidate.version} to production failed ({err}), "
                f"and moving {alias} back from version {version} to {previous or '(none)'} "
                f"failed too ({undo_err}). The registries disagree: fix by hand with "
                f"{fix}") from err
        raise PromotionError(
            f"setting model version {candidate.version} to production failed: {err}. "
            f"{alias} was moved back to "
            f"{previous or '(none: the alias was deleted)'}; nothing changed") from err
