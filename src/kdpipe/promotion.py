"""The MLflow side of promotion: register the ONNX student, move and read the champion.

The registered model (``tracking.registered_model``) holds one version per *promoted*
student; the alias ``champion`` points at the one in production. That alias is the
serving contract: ``mlflow models serve -m "models:/<name>@champion"`` and the batch
predict pipeline both resolve it (see :func:`get_champion`).

Promotion is done in an order that can always be undone exactly:

1. :func:`register_onnx_model` adds a version (the alias does not move yet), so a registry
   that is down fails here, before anything visible changed;
2. :func:`set_champion` moves the alias in one call and returns the previous target;
3. the caller (:func:`kdpipe.champion.promote_candidate`) moves the production stage, and
   on failure calls :func:`restore_champion` with the previous target.

Two pipeline runs that promote at the same time must not interleave these calls (run A's
alias with run B's stage): the caller holds :func:`promotion_lock` from reading the
current champion to moving the stage, which makes compare-and-promote atomic across
processes on one machine.

Stages are deprecated in MLflow 3; aliases replace them. This module never imports zenml.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

__all__ = [
    "CHAMPION_ALIAS",
    "MODEL_ARTIFACT_NAME",
    "NO_CHAMPION_HINT",
    "ChampionModel",
    "NoChampionError",
    "PromotionError",
    "PromotionResult",
    "RegisteredVersion",
    "download_version",
    "get_champion",
    "promotion_lock",
    "promotion_lock_path",
    "register_onnx_model",
    "require_champion",
    "restore_champion",
    "set_champion",
]

CHAMPION_ALIAS = "champion"
MODEL_ARTIFACT_NAME = "promoted_student"
"""Name of the MLflow model logged (in the pipeline's run) when a student is promoted."""
NO_CHAMPION_HINT = ("no student has been promoted yet; run `python run_pipeline.py` "
                    "(or make run) until the gate passes")
PROMOTION_LOCK_TIMEOUT_S = 600.0
"""How long a promotion waits for another one to finish (a promotion takes seconds)."""


class PromotionError(RuntimeError):
    """Promotion failed; the message says what was changed and what was restored."""


class NoChampionError(LookupError):
    """The registered model has no ``champion`` alias (nothing promoted yet)."""


class RegisteredVersion(BaseModel):
    """One version of the registered model (also the predict pipeline's ``champion``).

    Attributes:
        name: the registered model's name.
        version: MLflow's version number, as a string (MLflow's own type).
        run_id: the run the model was logged in.
        tags: the version's tags (``onnx_sha256``, ``zenml_model_version``...).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    run_id: str | None = None
    tags: dict[str, str] = {}

    @property
    def model_uri(self) -> str:
        """A URI pinned to this version (unlike the alias, it never moves)."""
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class ChampionModel:
    """A registered version downloaded to local disk.

    Attributes:
        version: the registry entry.
        onnx_path: the .onnx file.
        metadata: the MLmodel metadata written at registration (classes, input_shape...).
        sha256: of the .onnx file.
    """

    version: RegisteredVersion
    onnx_path: Path
    metadata: dict[str, Any]
    sha256: str


def _client(tracking_uri: str | None) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _version_from(mv: Any) -> RegisteredVersion:
    return RegisteredVersion(name=mv.name, version=str(mv.version), run_id=mv.run_id or None,
                             tags={str(k): str(v) for k, v in (mv.tags or {}).items()})


def register_onnx_model(
    onnx_path: str | Path,
    registered_model: str,
    *,
    input_shape: Sequence[int],
    metadata: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    experiment: str = "kdpipe",
    tracking_uri: str | None = None,
) -> RegisteredVersion:
    """Log ``onnx_path`` with the mlflow.onnx flavor as a new version of ``registered_model``.

    The model is logged into the active MLflow run (the pipeline run, opened by the step
    with :func:`kdpipe.tracking.pipeline_run`), or into a new run named ``promote`` in
    ``experiment`` when none is active, then registered. The ``champion`` alias is *not*
    moved: call :func:`set_champion` for that.

    Args:
        onnx_path: the self-contained ONNX student (raw pixels in, logits out).
        registered_model: the registered model's name (created on first use).
        input_shape: (C, H, W), for the signature and the input example.
        metadata: written into the MLmodel file (JSON-serialisable: classes, input_shape,
            mean, std...); the predict pipeline reads ``classes`` and ``input_shape`` back.
        tags: set on the new model version.
        experiment: experiment of a new run when no run is active.
        tracking_uri: the tracking store, also used as the registry (as everywhere in
            kdpipe); default: MLflow's current tracking URI. Set explicitly because MLflow
            would otherwise take ``$MLFLOW_REGISTRY_URI``, which ``mlflow.set_registry_uri``
            exports to every child process: a stale value registered the version in one
            store while :func:`set_champion` looked for it in another.

    Returns:
        The new version.

    Raises:
        PromotionError: the registry could not be written (nothing was promoted).
    """
    import mlflow

    from kdpipe.tracking import log_onnx_model, redact_uri

    path = Path(onnx_path)
    json.dumps(dict(metadata))  # fail here, not half-way through logging, on a bad value
    example = np.random.default_rng(0).random((2, *input_shape), dtype=np.float32)
    mlflow.set_registry_uri(tracking_uri or mlflow.get_tracking_uri())
    try:
        with _run(mlflow, experiment):
            model_uri = log_onnx_model(path, name=MODEL_ARTIFACT_NAME, input_example=example,
                                       metadata=metadata)
            mv = mlflow.register_model(model_uri, registered_model,
                                       tags={k: str(v) for k, v in (tags or {}).items()})
    except Exception as err:  # MlflowException, SQLAlchemy and HTTP errors alike
        raise PromotionError(
            f"could not register {path.name} as a new version of {registered_model!r} in the "
            f"MLflow registry {redact_uri(mlflow.get_registry_uri())}: "
            f"{redact_uri(str(err))}. Nothing was "
            "promoted; check that the tracking database / server is reachable and writable"
        ) from err
    return _version_from(mv)


def _run(mlflow: Any, experiment: str) -> Any:
    """The active run (left open), or a new ``promote`` run closed at the end."""
    if mlflow.active_run() is not None:
        return nullcontext(mlflow.active_run())
    mlflow.set_experiment(experiment)
    return mlflow.start_run(run_name="promote")


def get_champion(registered_model: str, *, tracking_uri: str | None = None
                 ) -> RegisteredVersion | None:
    """The version the ``champion`` alias points at, or None when there is none.

    A registered model that does not exist yet also gives None; any other registry error
    (unreachable, locked) propagates.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    client = _client(tracking_uri)
    try:
        model = client.get_registered_model(registered_model)
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    version = (model.aliases or {}).get(CHAMPION_ALIAS)
    if version is None:
        return None
    return _version_from(client.get_model_version(registered_model, str(version)))


def require_champion(registered_model: str, *, tracking_uri: str | None = None
                     ) -> RegisteredVersion:
    """Like :func:`get_champion`, but a missing champion is a :class:`NoChampionError`."""
    champion = get_champion(registered_model, tracking_uri=tracking_uri)
    if champion is None:
        raise NoChampionError(
            f"registered model {registered_model!r} has no {CHAMPION_ALIAS!r} alias: "
            f"{NO_CHAMPION_HINT}")
    return champion


def set_champion(registered_model: str, version: str, *, tracking_uri: str | None = None
                 ) -> str | None:
    """Point the ``champion`` alias at ``version``.

    Returns:
        The version the alias pointed at before (None when it did not exist), which is
        what :func:`restore_champion` needs to undo this call.
    """
    previous = get_champion(registered_model, tracking_uri=tracking_uri)
    _client(tracking_uri).set_registered_model_alias(registered_model, CHAMPION_ALIAS,
                                                     str(version))
    return None if previous is None else previous.version


def restore_champion(registered_model: str, previous_version: str | None, *,
                     tracking_uri: str | None = None) -> None:
    """Undo :func:`set_champion`: point the alias back, or delete it when there was none."""
    client = _client(tracking_uri)
    if previous_version is None:
        client.delete_registered_model_alias(registered_model, CHAMPION_ALIAS)
    else:
        client.set_registered_model_alias(registered_model, CHAMPION_ALIAS, previous_version)


def promotion_lock_path(registered_model: str, tracking_uri: str | None) -> Path:
    """The lock file that serialises promotions of ``registered_model``.

    Beside the database for a SQLite tracking URI (every process that can write that
    database can see the file); otherwise in the system temp directory, which serialises
    the runs of one machine only: runs on several machines against one tracking server
    need an orchestrator that runs one promotion at a time.
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", registered_model)
    name = f".kdpipe-promote-{safe}.lock"
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).expanduser().resolve()
        return db.parent / name
    return Path(tempfile.gettempdir()) / "kdpipe-locks" / name


@contextlib.contextmanager
def promotion_lock(registered_model: str, *, tracking_uri: str | None,
                   timeout_s: float = PROMOTION_LOCK_TIMEOUT_S,
                   poll_s: float = 0.2) -> Iterator[Path]:
    """Hold the exclusive promotion lock of ``registered_model`` for the block.

    An ``flock`` on :func:`promotion_lock_path`: the kernel releases it when the holder
    exits, even on SIGKILL, so a crashed promotion never leaves a stale lock behind.

    Args:
        registered_model: the MLflow registered model being promoted.
        tracking_uri: the tracking URI in use (decides where the lock file lives).
        timeout_s: how long to wait for another process's promotion.
        poll_s: how often to try again while waiting.

    Yields:
        The lock file's path.

    Raises:
        PromotionError: another process held the lock for more than ``timeout_s``.
    """
    path = promotion_lock_path(registered_model, tracking_uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PromotionError(
                        f"another process has been promoting {registered_model!r} for more "
                        f"than {timeout_s:.0f} s (lock {path}); nothing was promoted. Wait for "
                        "that pipeline run to finish, then re-run this one") from None
                time.sleep(poll_s)
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def download_version(version: RegisteredVersion, dst: str | Path, *,
                     tracking_uri: str | None = None) -> ChampionModel:
    """Download a registered version (its MLmodel directory) and find its .onnx file.

    Args:
        version: e.g. from :func:`require_champion`; the pinned version URI is used, so an
            alias moved meanwhile cannot swap the model under the caller.
        dst: a local directory.
        tracking_uri: None = MLflow's current tracking URI.
    """
    import mlflow
    from mlflow.models import Model

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.model_uri,
                                                     dst_path=str(dst)))
    files = sorted(local.rglob("*.onnx"))
    if len(files) != 1:
        raise PromotionError(
            f"{version.model_uri} should hold exactly one .onnx file; found "
            f"{[f.name for f in files]} in {local}")
    meta = Model.load(str(local)).metadata or {}
    digest = hashlib.sha256(files[0].read_bytes()).hexdigest()
    return ChampionModel(version=version, onnx_path=files[0], metadata=dict(meta), sha256=digest)


class PromotionResult(BaseModel):
    """What the promotion step did: the ``promotion`` artifact.

    Attributes:
        promoted: True when this run's candidate became production and champion.
        model_version: the ZenML model version of this run (its name).
        registered_model: the MLflow registered model.
        mlflow_version: the new MLflow version (None when not promoted).
        previous_production: the ZenML version that was production before (None if none).
        previous_champion: the MLflow version the alias pointed at before (None if none).
        reasons: why not promoted (the gate's failed checks), or what happened.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    promoted: bool
    model_version: str
    registered_model: str
    mlflow_version: str | None = None
    previous_production: str | None = None
    previous_champion: str | None = None
    reasons: list[str] = []
    precision: str | None = None
    """``fp32`` or ``int8``: the precision of the promoted ONNX file (None: not promoted)."""

    def summary(self) -> str:
        """One line for the terminal."""
        if self.promoted:
            what = f" ({self.precision.upper()})" if self.precision else ""
            return (f"promoted: model version {self.model_version}{what} is production; "
                    f"{self.registered_model}@{CHAMPION_ALIAS} -> version {self.mlflow_version}"
                    f" (was {self.previous_champion or 'unset'})")
        return (f"not promoted: model version {self.model_version} ("
                + "; ".join(self.reasons) + "); production unchanged")

    def metadata(self) -> dict[str, float | int | str]:
        """Flat key -> value summary for the ZenML dashboard and MLflow."""
        return {"promoted": int(self.promoted), "model_version": self.model_version,
                "registered_model": self.registered_model,
                "mlflow_version": self.mlflow_version or "",
                "previous_production": self.previous_production or "",
                "previous_champion": self.previous_champion or "",
                "precision": self.precision or "",
                "reasons": "; ".join(self.reasons)}
