"""Every path of :func:`kdpipe.champion.promote_candidate`, on in-memory stores.

The two fakes are the protocols' own test doubles: plain dictionaries that behave as
the registries do (an alias points at one version; one version at most is in production,
the previous one is archived), share one call log, and fail on request. Each test asserts
the final state of both stores exactly, and the order of the calls: reads of production
and of the champion must happen under the promotion lock, the alias must move before the
stage. The same order against the real MLflow and ZenML stores: tests/test_promotion.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kdpipe.champion import (
    Candidate,
    GateRejectedError,
    promote_candidate,
    raise_if_rejected,
)
from kdpipe.eval_report import EvaluationReport, ProductionComparison
from kdpipe.gate import GateCheck, GateDecision
from kdpipe.promotion import PromotionError, RegisteredVersion

OLD_SHA, NEW_SHA = "a" * 64, "b" * 64


# ------------------------------------------------------------------ the test doubles
@dataclass
class Log:
    """The calls both stores received, in order; ``[locked]`` marks calls under the lock."""

    calls: list[str] = field(default_factory=list)
    locked: bool = False

    def __call__(self, call: str) -> None:
        self.calls.append(call + (" [locked]" if self.locked else ""))


@dataclass
class MemoryStageStore:
    """The lineage registry: version name -> stage (None, ``production``, ``archived``)."""

    log: Log
    stages: dict[str, str | None]
    tags: dict[str, list[str]] = field(default_factory=dict)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail: set[str] = field(default_factory=set)

    def production_version(self) -> str | None:
        self.log("production_version")
        return next((v for v, s in self.stages.items() if s == "production"), None)

    def set_production(self, version: str) -> None:
        self.log(f"set_production {version}")
        if "set_production" in self.fail:
            raise RuntimeError("injected: the stage store is unreachable")
        self.stages = {v: ("archived" if s == "production" else s) for v, s in self.stages.items()}
        self.stages[version] = "production"

    def tag(self, version: str, tag: str) -> None:
        self.log(f"tag {version} {tag}")
        self.tags.setdefault(version, []).append(tag)

    def log_metadata(self, version: str, metadata: Mapping[str, Any]) -> None:
        self.log(f"log_metadata {version} {','.join(metadata)}")
        self.metadata.setdefault(version, {}).update(metadata)


@dataclass
class MemoryChampionStore:
    """The registered model ``m``: version -> tags, and the alias (None: unset)."""

    log: Log
    versions: dict[str, dict[str, str]] = field(default_factory=dict)
    alias: str | None = None
    fail: dict[str, Exception] = field(default_factory=dict)
    name: str = "m"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        assert not self.log.locked, "the promotion lock is not re-entrant"
        self.log("lock")
        self.log.locked = True
        try:
            yield
        finally:
            self.log.locked = False
            self.log("unlock")

    def _maybe_fail(self, call: str) -> None:
        if call in self.fail:
            raise self.fail[call]

    def champion(self) -> RegisteredVersion | None:
        self.log("champion")
        if self.alias is None:
            return None
        return RegisteredVersion(name=self.name, version=self.alias, tags=self.versions[self.alias])

    def register(self, candidate: Candidate) -> RegisteredVersion:
        self.log(f"register {candidate.version}")
        self._maybe_fail("register")
        version = str(len(self.versions) + 1)
        self.versions[version] = candidate.tags
        return RegisteredVersion(name=self.name, version=version, tags=candidate.tags)

    def set_champion(self, version: str) -> str | None:
        self.log(f"set_champion {version}")
        self._maybe_fail("set_champion")
        previous, self.alias = self.alias, version
        return previous

    def restore_champion(self, previous: str | None) -> None:
        self.log(f"restore_champion {previous}")
        self._maybe_fail("restore_champion")
        self.alias = previous


# ------------------------------------------------------------------------ inputs
def _candidate(sha: str = NEW_SHA) -> Candidate:
    return Candidate(version="v2", onnx_path=Path("/tmp/student.onnx"), sha256=sha,
                     input_shape=(1, 8, 8),
                     metadata={"classes": ["0", "1"], "onnx_sha256": sha,
                               "zenml_model": "kd", "zenml_model_version": "v2"})


def _check(name: str, verdict: str, reason: str) -> GateCheck:
    return GateCheck(name=name, description=name, value=0.5, threshold=0.0, comparison=">=",
                     verdict=verdict, reason=reason)


PASSED = GateDecision(passed=True, disabled=[],
                      checks=[_check("min_gain_vs_production", "pass", "0.0100 >= 0.0000")])
REJECTED = GateDecision(passed=False, disabled=[],
                        checks=[_check("min_accuracy", "fail", "0.5000 < 0.9000")])


def _evaluation(production_version: str | None) -> EvaluationReport:
    """A report whose gate compared against ``production_version`` (None: there was none)."""
    status = "absent" if production_version is None else "evaluated"
    return EvaluationReport(
        split="test", classes=["0", "1"], input_shape=(1, 8, 8), dataset_fingerprint="f",
        models={}, parity_max_abs_diff=0.0,
        production=ProductionComparison(status=status, reason=status, version=production_version))


def _empty() -> tuple[MemoryStageStore, MemoryChampionStore]:
    """No production and no champion yet; this run's version ``v2`` exists."""
    log = Log()
    return MemoryStageStore(log, {"v2": None}), MemoryChampionStore(log)


def _with_champion() -> tuple[MemoryStageStore, MemoryChampionStore]:
    """``v1`` is production and MLflow version 1 is the champion."""
    log = Log()
    stages = MemoryStageStore(log, {"v1": "production", "v2": None})
    champions = MemoryChampionStore(
        log, versions={"1": {"onnx_sha256": OLD_SHA, "zenml_model_version": "v1"}}, alias="1")
    return stages, champions


GATE_META = "log_metadata v2 gate_decision"
PROMOTION_META = "log_metadata v2 promotion"
NEW_TAGS = {"onnx_sha256": NEW_SHA, "zenml_model": "kd", "zenml_model_version": "v2"}


# ------------------------------------------------------------------- promoted
def test_first_candidate_is_promoted() -> None:
    stages, champions = _empty()
    result = promote_candidate(_candidate(), PASSED, stages, champions,
                               evaluation=_evaluation(None))
    assert (result.promoted, result.mlflow_version, result.previous_champion,
            result.previous_production) == (True, "1", None, None)
    assert stages.log.calls == [
        GATE_META, "lock", "production_version [locked]", "champion [locked]",
        "register v2 [locked]", "set_champion 1 [locked]", "set_production v2 [locked]",
        "unlock", PROMOTION_META]
    assert stages.stages == {"v2": "production"} and stages.tags == {}
    assert champions.versions == {"1": NEW_TAGS} and champions.alias == "1"
    assert stages.metadata["v2"]["promotion"] == result.metadata()
    assert stages.metadata["v2"]["gate_decision"] == PASSED.metadata()


def test_better_candidate_replaces_the_champion_and_archives_production() -> None:
    stages, champions = _with_champion()
    result = promote_candidate(_candidate(), PASSED, stages, champions,
                               evaluation=_evaluation("v1"))
    assert (result.promoted, result.mlflow_version, result.previous_champion,
            result.previous_production) == (True, "2", "1", "v1")
    assert result.summary() == ("promoted: model version v2 is production; m@champion -> "
                                "version 2 (was 1)")
    assert stages.stages == {"v1": "archived", "v2": "production"} and stages.tags == {}
    assert set(champions.versions) == {"1", "2"} and champions.alias == "2"


def test_byte_identical_candidate_is_a_no_op() -> None:
    stages, champions = _with_champion()
    result = promote_candidate(_candidate(sha=OLD_SHA), PASSED, stages, champions)
    assert result.promoted is False and result.previous_champion == "1"
    assert result.reasons == ["identical to the champion (MLflow version 1, same ONNX "
                              "sha256): nothing to promote"]
    assert stages.log.calls == [GATE_META, "lock", "production_version [locked]",
                                "champion [locked]", "unlock", PROMOTION_META]
    assert stages.stages == {"v1": "production", "v2": None} and stages.tags == {}
    assert list(champions.versions) == ["1"] and champions.alias == "1"


# -------------------------------------------------------------- registry failures
@pytest.mark.parametrize(("error", "message"), [
    (ConnectionError("connection refused"),
     r"^could not register student\.onnx as a new version of 'm': connection refused\. "
     r"Nothing was promoted; check that the registry is reachable"),
    (PromotionError("could not register (the store's own message)"),  # passed on as is
     r"^could not register \(the store's own message\)$"),
])
def test_register_failure_moves_nothing(error: Exception, message: str) -> None:
    stages, champions = _with_champion()
    champions.fail["register"] = error
    with pytest.raises(PromotionError, match=message):
        promote_candidate(_candidate(), PASSED, stages, champions)
    assert stages.log.calls[-2:] == ["register v2 [locked]", "unlock"]
    assert stages.stages == {"v1": "production", "v2": None} and stages.tags == {}
    assert list(champions.versions) == ["1"] and champions.alias == "1"
    assert set(stages.metadata["v2"]) == {"gate_decision"}  # no outcome: the step failed


def test_alias_failure_moves_nothing() -> None:
    stages, champions = _with_champion()
    champions.fail["set_champion"] = RuntimeError("injected: the registry is locked")
    with pytest.raises(PromotionError, match=r"^moving m@champion to version 2 failed: "
                       r"injected: the registry is locked\. Nothing changed: .*\(version 2 "
                       r"stays registered without the alias\)$"):
        promote_candidate(_candidate(), PASSED, stages, champions)
    assert stages.log.calls[-2:] == ["set_champion 2 [locked]", "unlock"]
    assert stages.stages == {"v1": "production", "v2": None} and stages.tags == {}
    assert champions.versions == {"1": {"onnx_sha256": OLD_SHA, "zenml_model_version": "v1"},
                                  "2": NEW_TAGS}
    assert champions.alias == "1"


def test_stage_failure_restores_the_previous_champion() -> None:
    stages, champions = _with_champion()
    stages.fail.add("set_production")
    with pytest.raises(PromotionError, match=r"^setting model version v2 to production "
                       r"failed: injected: the stage store is unreachable\. m@champion was "
                       r"moved back to 1; nothing changed$") as info:
        promote_candidate(_candidate(), PASSED, stages, champions)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert stages.log.calls[-4:] == ["set_champion 2 [locked]", "set_production v2 [locked]",
                                     "restore_champion 1 [locked]", "unlock"]
    assert stages.stages == {"v1": "production", "v2": None} and stages.tags == {}
    assert set(champions.versions) == {"1", "2"} and champions.alias == "1"


def test_stage_failure_without_a_previous_champion_deletes_the_alias() -> None:
    stages, champions = _empty()
    stages.fail.add("set_production")
    with pytest.raises(PromotionError, match=r"m@champion was moved back to \(none: the "
                                             r"alias was deleted\); nothing changed$"):
        promote_candidate(_candidate(), PASSED, stages, champions)
    assert stages.log.calls[-3:] == ["set_production v2 [locked]",
                                     "restore_champion None [locked]", "unlock"]
    assert stages.stages == {"v2": None} and stages.tags == {}
    assert champions.versions == {"1": NEW_TAGS} and champions.alias is None


@pytest.mark.parametrize(("store", "fix"), [
    (_with_champion, r"MlflowClient\(\)\.set_registered_model_alias\('m', 'champion', '1'\)$"),
    (_empty, r"MlflowClient\(\)\.delete_registered_model_alias\('m', 'champion'\)$"),
])
def test_stage_and_restore_failure_says_how_to_repair(store: Any, fix: str) -> None:
    stages, champions = store()
    stages.fail.add("set_production")
    champions.fail["restore_champion"] = ConnectionError("registry gone")
    with pytest.raises(PromotionError, match=r"failed too \(registry gone\)\. The registries "
                                             r"disagree: fix by hand with " + fix):
        promote_candidate(_candidate(), PASSED, stages, champions)
    # The one state where the two disagree: the alias is on the new version, the stage not.
    assert champions.alias == str(len(champions.versions))
    assert "v2" not in [v for v, s in stages.stages.items() if s == "production"]


# ------------------------------------------------------------ not promoted, by rule
def test_production_moved_since_evaluation_is_superseded() -> None:
    stages, champions = _with_champion()  # v1 became production after the gate saw none
    result = promote_candidate(_candidate(), PASSED, stages, champions,
                               evaluation=_evaluation(None))
    assert result.promoted is False
    assert result.reasons == [
        "production moved from version (none) to v1 while this run was being evaluated (a "
        "concurrent run promoted); the gate compared against no production, so nothing was "
        "promoted: re-run to compare against version v1"]
    assert stages.log.calls == [GATE_META, "lock", "production_version [locked]",
                                "tag v2 superseded [locked]", "unlock", PROMOTION_META]
    assert stages.stages == {"v1": "production", "v2": None}
    assert stages.tags == {"v2": ["superseded"]}
    assert list(champions.versions) == ["1"] and champions.alias == "1"
    raise_if_rejected(result, PASSED, fail_run_on_reject=True)  # the gate passed: no failure


def test_rejected_candidate_is_tagged_and_nothing_moves() -> None:
    stages, champions = _with_champion()
    result = promote_candidate(_candidate(), REJECTED, stages, champions,
                               evaluation=_evaluation("v1"))
    assert result.promoted is False and result.reasons == ["min_accuracy: 0.5000 < 0.9000"]
    assert stages.log.calls == [GATE_META, "tag v2 rejected", PROMOTION_META]  # no lock
    assert stages.stages == {"v1": "production", "v2": None}
    assert stages.tags == {"v2": ["rejected"]}
    assert list(champions.versions) == ["1"] and champions.alias == "1"
    assert stages.metadata["v2"]["gate_decision"]["gate_verdict"] == "rejected"
    assert stages.metadata["v2"]["promotion"]["promoted"] == 0
    raise_if_rejected(result, REJECTED, fail_run_on_reject=False)  # a normal outcome


def test_fail_run_on_reject_raises_after_recording() -> None:
    stages, champions = _with_champion()
    result = promote_candidate(_candidate(), REJECTED, stages, champions)
    with pytest.raises(GateRejectedError, match=r"^not promoted: model version v2 "
                       r"\(min_accuracy: 0\.5000 < 0\.9000\); production unchanged; failing "
                       r"the run because gate\.fail_run_on_reject is true$"):
        raise_if_rejected(result, REJECTED, fail_run_on_reject=True)
    assert stages.tags == {"v2": ["rejected"]}
    assert set(stages.metadata["v2"]) == {"gate_decision", "promotion"}
    assert stages.stages == {"v1": "production", "v2": None}
    assert list(champions.versions) == ["1"] and champions.alias == "1"
