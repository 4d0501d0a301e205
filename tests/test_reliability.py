"""Bad inputs and faults (docs/reliability.md): each test checks one row of that table.

Rows already checked elsewhere (test_data.py, test_train.py, test_bundle.py...) are only
referenced from the table; the tests here cover the rest: configuration values, path
confinement, credential redaction, corrupt files, and the environment (no write
permission, a full disk, a locked MLflow database).

Environment faults run in a subprocess where they would otherwise change this process:
permissions are dropped with ``setpriv`` (root ignores file modes), the file-size limit
is set with RLIMIT_FSIZE.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdpipe import tracking
from kdpipe.bundle import Bundle, BundleError, load_bundle, save_bundle
from kdpipe.config import (
    ConfigError,
    PredictConfig,
    TrackingConfig,
    check_name_component,
    check_write_path,
    local_store_path,
)
from kdpipe.configfile import load_config, parse_config
from kdpipe.models import create_model
from kdpipe.train import CHECKPOINT_NAME, ClassificationTask, fit

SECRET = "s3cret-pw"


# ------------------------------------------------------------------ helpers
def tiny_bundle(arch: str = "cnn_tiny", seed: int = 0, **kwargs) -> Bundle:
    torch.manual_seed(seed)
    model = create_model(arch, 10, 1, **kwargs)
    return Bundle.from_model(model, arch=arch, classes=[str(i) for i in range(10)],
                             input_shape=(1, 28, 28), mean=(0.13,), std=(0.31,), kwargs=kwargs)


def run_python(code: str, *, drop_write_permission: bool = False,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; optionally without root's permission bypass.

    As root, file modes do not stop writes (CAP_DAC_OVERRIDE); ``setpriv`` drops that
    capability for the child, so a 0555 directory is really read-only to it. As another
    user, the mode alone is enough.
    """
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    if drop_write_permission and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot drop the permission bypass")
        cmd = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all",
               "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def last_json(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A directory nobody may write to (0555); restored afterwards so tmp_path cleans up."""
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    yield ro
    ro.chmod(0o755)


@pytest.fixture(scope="module")
def restore_mlflow_uri():
    """pipeline_run sets MLflow's global tracking URI; put the session's back afterwards."""
    yield
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize(("params", "match"), [
    ({"distill": {"temprature": 2.0}}, r"parameters\.distill\.temprature: unknown key"),
    ({"student": {"train": {"epochs": "ten"}}},
     r"parameters\.student\.train\.epochs: Input should be a valid integer.*got 'ten'"),
    ({"student": {"train": {"lr": -0.1}}},
     r"parameters\.student\.train\.lr: Input should be greater than 0 \(got -0\.1\)"),
    ({"distill": {"temperature": 0}},
     r"parameters\.distill\.temperature: Input should be greater than 0 \(got 0\)"),
    ({"distill": {"temperature": -2.0}}, r"parameters\.distill\.temperature: .*greater than 0"),
    ({"distill": {"kd_weight": 1.5}},
     r"parameters\.distill\.kd_weight: Input should be less than or equal to 1 \(got 1\.5\)"),
    ({"distill": {"kd_weight": -0.1}},
     r"parameters\.distill\.kd_weight: Input should be greater than or equal to 0"),
    # Unknown names (prune.importance, data.source...) are kdpipe.validate's: tests/test_validate.py.
])
def test_bad_config_value_names_the_key_and_what_is_allowed(params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(params)


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ConfigError, match=r"\(3 problem\(s\)\)") as info:
        parse_config({"distill": {"temperature": 0, "kd_weight": 2},
                      "student": {"train": {"lr": 0}}})
    assert str(info.value).count("\n  parameters.") == 3


def test_missing_config_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml \(pass an "
                                          r"existing file with --config\)"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters:\n  data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"config file .*bad\.yaml is not valid YAML"):
        load_config(bad)


# ------------------------------------------------------------------ path confinement
@pytest.mark.parametrize(("section", "match"), [
    ({"tracking": {"tracking_uri": "sqlite:///../../etc/mlflow.db"}}, r"parameters\.tracking\.tracking_uri: .*may not contain '\.\.'"),
    ({"tracking": {"tracking_uri": "file:../mlruns"}}, r"parameters\.tracking\.tracking_uri: .*may not contain '\.\.'"),
    ({"tracking": {"tracking_uri": "sqlite:///~/mlflow.db"}}, r"tracking_uri: .*may not start with '~'"),
    ({"tracking": {"registered_model": "../../evil"}}, r"parameters\.tracking\.registered_model: .*may not contain '/'"),
    ({"tracking": {"registered_model": "team:student"}}, r"registered_model: .*may not contain ':'.*models:/ URIs"),
    ({"tracking": {"registered_model": "a@champion"}}, r"registered_model: .*may not contain '@'"),
    ({"tracking": {"registered_model": ".."}}, r"registered_model: .*'\.\.'"),
    ({"tracking": {"experiment": "  "}}, r"tracking\.experiment: .*non-empty printable"),
    ({"tracking": {"experiment": "bad\nname"}}, r"tracking\.experiment: "),
    ({"predict": {"image_folder": "in", "output_path": "../../out.csv"}}, r"predict\.output_path may not contain '\.\.'"),
    ({"predict": {"image_folder": "in", "output_path": "~/out.csv"}}, r"predict\.output_path may not start with '~'"),
])
def test_write_locations_cannot_escape(section: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(section)


@pytest.mark.parametrize("uri", [
    None, "sqlite:///mlflow.db", "sqlite:///runs/mlflow.db", "sqlite:////var/lib/mlflow.db",
    "file:///srv/mlruns", "https://mlflow.example.com", "postgresql://u:p@db/mlflow",
    "databricks",
])
def test_legitimate_tracking_uris_are_accepted(uri: str | None) -> None:
    assert TrackingConfig(tracking_uri=uri).tracking_uri == uri


def test_absolute_and_nested_output_paths_are_a_users_choice() -> None:
    for path in ("/srv/predictions/out.json", "results/today/out.csv", "out.csv"):
        assert PredictConfig(image_folder="in", output_path=path).output_path == path


def test_path_helpers() -> None:
    assert local_store_path("sqlite:///a/b.db?mode=rwc") == "a/b.db"
    assert local_store_path("sqlite:////abs/b.db") == "/abs/b.db"
    assert local_store_path("file:///srv/mlruns") == "/srv/mlruns"
    assert local_store_path("mlruns") == "mlruns"
    assert local_store_path("https://h/x") is None
    with pytest.raises(ValueError, match=r"ckpt must be a relative path .*drop the leading '/'"):
        check_write_path("/tmp/x", "ckpt", absolute_ok=False)
    with pytest.raises(ValueError, match="ckpt must be a non-empty path without control"):
        check_write_path("a\x00b", "ckpt", absolute_ok=True)
    assert check_write_path("a/./b", "ckpt", absolute_ok=False) == "a/./b"
    with pytest.raises(ValueError, match=r"name may not contain '\\\\'"):
        check_name_component("a\\b", "name")


# ------------------------------------------------------------------ credential redaction
@pytest.mark.parametrize(("uri", "expected"), [
    ("https://alice:s3cret-pw@mlflow.example.com/x?y=1", "https://***@mlflow.example.com/x?y=1"),
    ("https://alice:p@ss@host:5000/", "https://***@host:5000/"),
    ("postgresql://me:s3cret-pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("https://host/api?token=s3cret-pw&run=1", "https://host/api?token=***&run=1"),
    ("https://host/?a=1&access_token=s3cret-pw#x", "https://host/?a=1&access_token=***#x"),
    ("https://acct.blob/x?sv=1&sig=s3cret-pw", "https://acct.blob/x?sv=1&sig=***"),
    ("https://h/?API_KEY=s3cret-pw", "https://h/?API_KEY=***"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("https://mlflow.example.com", "https://mlflow.example.com"),
])
def test_redact_uri(uri: str, expected: str) -> None:
    assert tracking.redact_uri(uri) == expected
    assert tracking.has_credentials(uri) == (uri != expected)


def test_rejected_tracking_uri_is_redacted_in_the_config_error() -> None:
    uri = f"file:../mlruns?token={SECRET}"
    with pytest.raises(ConfigError, match=r"tracking_uri: .*\(got 'file:\.\./mlruns\?token=\*\*\*'\)"
                       ) as info:
        parse_config({"tracking": {"tracking_uri": uri}})
    assert SECRET not in str(info.value)


def test_unusable_store_error_and_logs_are_redacted(caplog, capsys, restore_mlflow_uri) -> None:
    # No PostgreSQL driver / server here: the store fails at once, and its error text
    # (which may quote the URI) must not carry the password to the console or the logs.
    uri = f"postgresql://alice:{SECRET}@127.0.0.1:1/mlflow"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(tracking.TrackingError,
                       match=r"cannot use the MLflow tracking store postgresql://\*\*\*@127\.0\.0\.1"
                             r":1/mlflow .*check tracking\.tracking_uri") as info:
        with tracking.pipeline_run(experiment="e", run_key="k", run_name="r", tracking_uri=uri):
            pass
    out = capsys.readouterr()
    assert SECRET not in str(info.value)
    assert SECRET not in out.out + out.err + caplog.text


def test_mlflow_run_link_with_credentials_is_not_printed(monkeypatch) -> None:
    # MLflow prints "View run ... at: <raw tracking URI>" when a run on a server ends;
    # pipeline_run switches that off (MLflow's own variable) for a URI with credentials.
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT as SUPPRESS

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    with tracking._no_raw_url_printing(f"https://alice:{SECRET}@mlflow.example.com"):
        assert SUPPRESS.get() is True
    assert SUPPRESS.get() is False
    with tracking._no_raw_url_printing("https://mlflow.example.com"):
        assert SUPPRESS.get() is False


def test_summary_prints_the_tracking_uri_redacted(monkeypatch, capsys) -> None:
    import run_pipeline

    class _Run:  # the attributes print_summary reads; no artifacts, no model version
        name, status, steps, model_version = "r1", type("S", (), {"value": "completed"})(), {}, None

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://alice:{SECRET}@mlflow.example.com")
    run_pipeline.print_summary(_Run())
    printed = capsys.readouterr().out
    assert "MLflow UI:       https://***@mlflow.example.com" in printed
    assert SECRET not in printed


# ------------------------------------------------------------------ training
def test_resume_from_a_checkpoint_of_another_architecture_starts_fresh(tmp_path, caplog) -> None:
    x = torch.randn(24, 1, 8, 8)
    y = torch.arange(24) % 3
    loader = DataLoader(TensorDataset(x, y, torch.arange(24)), batch_size=8)
    cfg_kw = {"epochs": 1, "lr": 0.01, "device": "cpu", "seed": 0}
    from kdpipe.config import TrainConfig

    narrow = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    fit(narrow, ClassificationTask(), loader, None, TrainConfig(**cfg_kw), checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    with caplog.at_level(logging.WARNING):
        result = fit(wide, ClassificationTask(), loader, None, TrainConfig(**cfg_kw),
                     checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch == 0
    assert "different configuration" in caplog.text
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["model"]["3.weight"].shape == (3, 16)  # overwritten by the new model's


# ------------------------------------------------------------------ corrupt files
@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small valid classifier ONNX file (TorchScript exporter: fast, no dynamo trace)."""
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 2, 2),), str(path), input_names=["pixels"],
                      output_names=["logits"], dynamo=False)
    return path


def test_corrupted_onnx_file_is_named(onnx_file: Path, tmp_path: Path) -> None:
    from kdpipe.evaluation import EvaluationError, onnx_session

    assert onnx_session(onnx_file) is not None
    broken = tmp_path / "broken.onnx"
    raw = onnx_file.read_bytes()
    broken.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(EvaluationError, match=r"ONNX Runtime cannot load .*broken\.onnx"):
        onnx_session(broken)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx model" * 10)
    with pytest.raises(EvaluationError, match=r"ONNX Runtime cannot load .*garbage\.onnx"):
        onnx_session(garbage)


def test_bundle_with_weights_of_another_architecture_is_refused(tmp_path: Path) -> None:
    """Past the hash check (bundle.json re-hashed to match), the shapes must still fit.

    A changed file with the old hash is test_bundle.py::test_changed_weights_fail_the_hash_check.
    """
    small = save_bundle(tiny_bundle("cnn_tiny"), tmp_path / "tiny")
    other = save_bundle(tiny_bundle("cnn_small"), tmp_path / "small")
    shutil.copy(other / "weights.safetensors", small / "weights.safetensors")
    spec = json.loads((small / "bundle.json").read_text())
    spec["weights_sha256"] = json.loads((other / "bundle.json").read_text())["weights_sha256"]
    (small / "bundle.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match=r"(?s)the weights in .*weights\.safetensors do not fit the "
                                              r"rebuilt 'cnn_tiny': .*size mismatch"):
        load_bundle(small)


# ------------------------------------------------------------------ environment
@pytest.mark.slow
def test_no_write_permission_on_the_artifact_directory(read_only_dir: Path) -> None:
    target = read_only_dir / "teacher"
    result = run_python(f"""
        import json, torch
        from kdpipe.bundle import Bundle, BundleError, save_bundle
        from kdpipe.models import create_model
        b = Bundle.from_model(create_model("cnn_tiny", 10, 1), arch="cnn_tiny",
                              classes=[str(i) for i in range(10)], input_shape=(1, 28, 28),
                              mean=(0.1,), std=(0.3,))
        try:
            save_bundle(b, {str(target)!r})
            print(json.dumps({{"error": None}}))
        except BundleError as err:
            print(json.dumps({{"error": str(err)}}))
        """, drop_write_permission=True)
    error = last_json(result)["error"]
    assert error is not None, "the write into a 0555 directory was not refused"
    assert f"cannot write the bundle to {target}: Permission denied" in error
    assert f"make {read_only_dir} writable" in error
    assert list(read_only_dir.iterdir()) == []


@pytest.mark.slow
def test_no_write_permission_on_the_tracking_directory_fails_fast(read_only_dir: Path) -> None:
    db = read_only_dir / "mlflow.db"
    result = run_python(f"""
        import json, time
        from kdpipe import tracking
        start = time.monotonic()
        try:
            with tracking.pipeline_run(experiment="e", run_key="k", run_name="r",
                                       tracking_uri="sqlite:///{db}"):
                pass
            error = None
        except tracking.TrackingError as err:
            error = str(err)
        print(json.dumps({{"error": error, "seconds": time.monotonic() - start}}))
        """, drop_write_permission=True)
    out = last_json(result)
    assert out["error"] == (
        f"cannot write the MLflow tracking database {db} (Permission denied); make "
        f"{read_only_dir} writable, or point tracking.tracking_uri / MLFLOW_TRACKING_URI at a "
        "writable location")
    # MLflow alone retries an unopenable database for about 100 s.
    assert out["seconds"] < 5.0
    assert not db.exists()


@pytest.mark.slow
def test_full_disk_keeps_the_previous_bundle_intact(tmp_path: Path) -> None:
    target = tmp_path / "student"
    first = save_bundle(tiny_bundle("cnn_tiny", seed=1), target)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    limit = max(len(b) for b in before.values()) + 1024
    # RLIMIT_FSIZE makes any write past `limit` bytes fail with EFBIG, like a full disk
    # (SIGXFSZ, which would kill the process, is ignored so the write returns the error).
    result = run_python(f"""
        import json, resource, signal, torch
        from kdpipe.bundle import Bundle, BundleError, save_bundle
        from kdpipe.models import create_model
        torch.manual_seed(2)
        b = Bundle.from_model(create_model("cnn_small", 10, 1), arch="cnn_small",
                              classes=[str(i) for i in range(10)], input_shape=(1, 28, 28),
                              mean=(0.1,), std=(0.3,))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        try:
            save_bundle(b, {str(target)!r})
            print(json.dumps({{"error": None}}))
        except BundleError as err:
            print(json.dumps({{"error": str(err)}}))
        """)
    error = last_json(result)["error"]
    assert error is not None, "a write past RLIMIT_FSIZE was not refused"
    assert f"cannot write the bundle to {target}: File too large; free disk space" in error
    assert "a previous bundle there is left unchanged" in error
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no staging left
    assert load_bundle(target).spec.arch == "cnn_tiny"


def _lock_database(db: Path, seconds: float | None) -> tuple[sqlite3.Connection, threading.Event]:
    """Hold an exclusive SQLite lock on ``db`` (released after ``seconds``, or by the caller)."""
    con = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    con.execute("BEGIN EXCLUSIVE")
    released = threading.Event()
    if seconds is not None:
        def release() -> None:
            time.sleep(seconds)
            con.execute("ROLLBACK")
            released.set()

        threading.Thread(target=release, daemon=True).start()
    return con, released


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory: pytest.TempPathFactory, restore_mlflow_uri) -> tuple[Path, str]:
    """A fresh MLflow SQLite store holding experiment ``e`` (created before any lock)."""
    db = tmp_path_factory.mktemp("tracking") / "mlflow.db"
    uri = f"sqlite:///{db}"
    with tracking.pipeline_run(experiment="e", run_key="setup", run_name="setup",
                               tracking_uri=uri):
        tracking.log_metrics({"x": 1.0}, "setup")
    return db, uri


@pytest.mark.slow
def test_briefly_locked_mlflow_database_waits_and_succeeds(tracking_db) -> None:
    db, uri = tracking_db
    con, released = _lock_database(db, seconds=1.5)
    start = time.monotonic()
    with tracking.pipeline_run(experiment="e", run_key="k1", run_name="r1", tracking_uri=uri):
        tracking.log_metrics({"acc": 0.5}, "eval")
    waited = time.monotonic() - start
    con.close()
    assert released.is_set() and waited >= 1.0
    import mlflow

    run = mlflow.search_runs(experiment_names=["e"], filter_string="tags.`kdpipe.run_key` = 'k1'",
                             output_format="list")[0]
    assert run.data.metrics["eval/acc"] == pytest.approx(0.5, abs=0)


def test_the_busy_timeout_in_the_message_is_mlflows() -> None:
    """The '20 s' that the locked-database message names is what MLflow's store waits."""
    import inspect

    from mlflow.store.db import utils

    pragma = f"PRAGMA busy_timeout = {tracking._SQLITE_BUSY_TIMEOUT_S * 1000};"
    assert pragma in inspect.getsource(utils._get_managed_session_maker), (
        "MLflow changed its SQLite busy timeout: update tracking._SQLITE_BUSY_TIMEOUT_S")


@contextlib.contextmanager
def _mlflow_busy_timeout(ms: int):
    """MLflow's SQLite sessions wait ``ms`` instead of 20 s for a lock, within the block.

    MLflow sets ``PRAGMA busy_timeout = 20000`` on every session and has no setting for
    it; the statement is rewritten on its way to SQLite, so that a test of the locked
    path runs MLflow's real store against a real lock without sitting out 20 s.
    """
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    pragma = f"PRAGMA busy_timeout = {tracking._SQLITE_BUSY_TIMEOUT_S * 1000};"
    rewritten = []

    def shorten(conn, cursor, statement, parameters, context, executemany):
        if statement.strip() == pragma:
            rewritten.append(statement)
            statement = f"PRAGMA busy_timeout = {ms};"
        return statement, parameters

    event.listen(Engine, "before_cursor_execute", shorten, retval=True)
    try:
        yield rewritten
    finally:
        event.remove(Engine, "before_cursor_execute", shorten)


@pytest.mark.slow
def test_locked_mlflow_database_fails_with_a_clear_message(tracking_db) -> None:
    db, uri = tracking_db
    con, _ = _lock_database(db, seconds=None)  # held until the failure has been seen
    start = time.monotonic()
    try:
        with _mlflow_busy_timeout(ms=500) as rewritten, pytest.raises(
                tracking.TrackingError,
                match=r"cannot use the MLflow tracking store sqlite:///.*mlflow\.db "
                      r"\(MlflowException: \(sqlite3\.OperationalError\) database is "
                      r"locked\); another process held a write lock on the SQLite "
                      r"database for more than 20 s; retry when it finishes, or use "
                      r"an MLflow tracking server"):
            with tracking.pipeline_run(experiment="e", run_key="k2", run_name="r2",
                                       tracking_uri=uri):
                pass
    finally:
        con.execute("ROLLBACK")
        con.close()
    waited = time.monotonic() - start
    assert rewritten, "MLflow no longer sets its busy timeout with this PRAGMA"
    # The store waited out its busy timeout once (0.5 s here, 20 s in production, see
    # test_the_busy_timeout_in_the_message_is_mlflows) and kdpipe added no retries of its
    # own: well under the 20 s a second MLflow wait would take at production settings.
    assert 0.5 <= waited < 15.0
