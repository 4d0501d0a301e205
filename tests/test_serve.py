"""MLflow's own model server serves the champion: its answer equals ONNX Runtime's.

The champion here is an INT8 file (kdpipe.quantize, the pipeline's INT8 candidate):
served exactly as an FP32 one (float32 raw pixels in, float32 logits out).

    make serve MODEL=<name> PORT=<port>
    (= mlflow models serve -m "models:/<name>@champion" --env-manager local, venv on PATH)

runs as a subprocess on a free loopback port against the test session's SQLite tracking
database (MLFLOW_TRACKING_URI from conftest); it is always killed at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from kdpipe.bundle import Bundle
from kdpipe.config import ExportConfig, QuantizeConfig
from kdpipe.export import export_onnx
from kdpipe.models import create_model
from kdpipe.promotion import register_onnx_model, set_champion
from kdpipe.quantize import quantize_model

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
NAME = "kdpipe-test-serve"
SHAPE = (1, 8, 8)
STARTUP_TIMEOUT_S = 300.0  # a safety limit for a loaded machine, not a check


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def champion(session_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ONNX student, quantised to INT8, registered and aliased ``champion``;
    returns its file."""
    client = MlflowClient()
    if client.get_experiment_by_name(NAME) is None:  # artifacts in the session folder
        client.create_experiment(NAME, artifact_location=str(session_dir / "mlartifacts-serve"))
    torch.manual_seed(0)
    model = create_model("cnn_tiny", 10, 1).eval()
    bundle = Bundle.from_model(model, arch="cnn_tiny", classes=[str(i) for i in range(10)],
                               input_shape=SHAPE, mean=(0.3,), std=(0.2,))
    folder = tmp_path_factory.mktemp("serve")
    onnx = export_onnx(bundle, folder / "student.onnx", ExportConfig(exporter="torchscript"))
    calibration = np.random.default_rng(0).random((32, *SHAPE), dtype=np.float32)
    int8 = quantize_model(onnx.path, folder / "student.int8.onnx", calibration,
                          QuantizeConfig(enabled=True, max_drop=None))
    version = register_onnx_model(int8.path, NAME, input_shape=SHAPE,
                                  metadata={"classes": bundle.spec.classes,
                                            "input_shape": list(SHAPE), "precision": "int8"},
                                  tags={"precision": "int8"}, experiment=NAME)
    set_champion(NAME, version.version)
    return Path(int8.path)


def _wait_until_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    pytest.fail(f"mlflow models serve not up after {STARTUP_TIMEOUT_S:.0f} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(champion: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``make serve`` as the README gives it, from a shell whose PATH lacks the venv.

    MLflow's server execs ``uvicorn`` by name: the target must put the venv's bin on PATH
    itself (a plain ``.venv/bin/mlflow models serve`` fails there with "Return code = 127").
    ``-o <stamp>`` keeps make from reinstalling the package during the test.
    """
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    venv = Path(sys.executable).parent.parent
    bin_dir = Path(sys.executable).parent
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != bin_dir.resolve())
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"PATH": path}
    cmd = ["make", "--no-print-directory", "-o", str(venv / ".installed"), "serve",
           f"VENV={venv}", f"MODEL={NAME}", f"PORT={port}", "HOST=127.0.0.1"]
    with log.open("w") as out:
        # Own process group: make, the server and its workers die with it.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(proc, url, log)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # already gone
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def test_served_champion_matches_onnx_runtime(server: str, champion: Path) -> None:
    import onnxruntime as ort

    pixels = np.random.default_rng(42).random((5, *SHAPE), dtype=np.float32)
    answer = _post(server, {"inputs": pixels.tolist()})
    session = ort.InferenceSession(str(champion), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    # The ONNX flavor answers {"predictions": {<output name>: [[...], ...]}}.
    served = np.asarray(answer["predictions"]["logits"], dtype=np.float32)
    assert served.shape == (5, 10)
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)


def test_served_champion_rejects_a_wrong_shape(server: str) -> None:
    bad = np.zeros((2, 3, 8, 8), np.float32).tolist()
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(server, {"inputs": bad})
    assert err.value.code in (400, 422, 500)
    body = err.value.read().decode()
    assert "shape" in body.lower()
