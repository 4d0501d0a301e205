"""kdpipe.preflight: missing files and unavailable downloads are found before any step."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kdpipe.configfile import parse_config
from kdpipe.preflight import preflight, url_reachable

ROOT = Path(__file__).resolve().parents[1]


def offline(url: str) -> str:
    return "offline in this test"


def online(url: str) -> None:
    return None


def test_defaults_need_nothing_from_outside() -> None:
    assert preflight(parse_config({}), reachable=offline) == []


def test_missing_image_folder_and_checkpoint_are_named(tmp_path: Path) -> None:
    cfg = parse_config({"data": {"source": f"imagefolder:{tmp_path / 'photos'}", "image_size": 32},
                        "student": {"model": {"arch": "cnn_small",
                                              "checkpoint": str(tmp_path / "s.pt")}}})
    problems = {p.path: p.message for p in preflight(cfg, reachable=offline)}
    assert sorted(problems) == ["parameters.data.source", "parameters.student.model.checkpoint"]
    assert f"image folder {tmp_path / 'photos'} does not exist" in problems["parameters.data.source"]
    assert problems["parameters.student.model.checkpoint"] == (
        f"model checkpoint not found: {tmp_path / 's.pt'}")


def test_torchvision_files_missing_without_download(tmp_path: Path) -> None:
    cfg = parse_config({"data": {"source": "torchvision:FashionMNIST", "root": str(tmp_path)}})
    (problem,) = preflight(cfg, reachable=offline)
    assert problem.path == "parameters.data.source"
    assert "files are missing" in problem.message and "data.download" in problem.message
    # With download allowed the step may fetch them: nothing to report before it runs.
    cfg = parse_config({"data": {"source": "torchvision:FashionMNIST", "root": str(tmp_path),
                                 "download": True}})
    assert preflight(cfg, reachable=offline) == []


def test_pretrained_weights_neither_cached_nor_downloadable(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    cfg = parse_config({"teacher": {"model": {"arch": "tv_resnet18", "weights": "DEFAULT"}}})
    (problem,) = preflight(cfg, reachable=offline)
    assert problem.path == "parameters.teacher.model.weights"
    assert "not cached" in problem.message and "offline in this test" in problem.message
    assert "model.weights: null" in problem.message  # the fix is named
    assert preflight(cfg, reachable=online) == []  # downloadable: the step will fetch it
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert preflight(cfg, reachable=offline) == []  # cached: no network needed


def test_unknown_weights_name_lists_the_valid_ones() -> None:
    cfg = parse_config({"teacher": {"model": {"arch": "tv_resnet18", "weights": "BEST"}}})
    (problem,) = preflight(cfg, reachable=online)
    assert problem.message == "unknown weights 'BEST' for tv_resnet18; valid: IMAGENET1K_V1, DEFAULT"


class _Weights(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200 if self.path == "/weights.pth" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests to 127.0.0.1 go there directly, not to a proxy from the environment."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def weights_server(no_proxy: None) -> Iterator[str]:
    """A local HTTP server that answers HEAD /weights.pth; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Weights)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_reachable_url_is_none(weights_server: str) -> None:
    assert url_reachable(f"{weights_server}/weights.pth") is None
    assert url_reachable(f"{weights_server}/missing.pth") == "Not Found"  # the HTTP reason


def test_unreachable_url_says_why(no_proxy: None) -> None:
    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reason = url_reachable(f"http://127.0.0.1:{port}/weights.pth")
    assert reason is not None and "refused" in reason.lower(), reason


def test_cli_exits_2_on_missing_dataset_files_before_zenml_starts(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    data["parameters"]["data"] = {"source": "torchvision:FashionMNIST", "root": str(tmp_path / "d")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    env = dict(os.environ, ZENML_CONFIG_PATH=str(tmp_path / "zc"),
               ZENML_LOCAL_STORES_PATH=str(tmp_path / "zs"))
    result = subprocess.run([sys.executable, "run_pipeline.py", "--config", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 2, result.stderr
    assert "parameters.data.source: torchvision:FashionMNIST files are missing" in result.stderr
    assert not (tmp_path / "zc").exists() and not (tmp_path / "zs").exists()


class _Payload:
    """Unpickling this would create the marker file: proof that the payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_pickle_checkpoint_is_refused_before_any_step_and_never_runs(tmp_path: Path,
                                                                     suffix: str) -> None:
    import torch

    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / f"teacher{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": _Payload(marker)}, ckpt)
    cfg = parse_config({"teacher": {"model": {"arch": "cnn_small", "checkpoint": str(ckpt)}}})
    (problem,) = preflight(cfg, reachable=offline)
    assert problem.path == "parameters.teacher.model.checkpoint"
    assert "holds a pickled" in problem.message and "weights_only=True" in problem.message
    assert ".safetensors" in problem.message
    assert not marker.exists()
    # The model's own plain state dict passes the check.
    from kdpipe.models import create_model

    torch.save(create_model("cnn_small", 10, 1).state_dict(), ckpt)
    assert preflight(cfg, reachable=offline) == []


def test_a_start_checkpoint_that_does_not_fit_fails_before_the_teacher_trains(
        tmp_path: Path) -> None:
    import torch

    from kdpipe.models import create_model

    ckpt = tmp_path / "student.pt"
    torch.save(create_model("cnn_tiny", 10, 1).state_dict(), ckpt)  # not the student's arch
    cfg = parse_config({"student": {"model": {"arch": "cnn_small", "checkpoint": str(ckpt)}}})
    (problem,) = preflight(cfg, reachable=offline)
    assert problem.path == "parameters.student.model.checkpoint"
    assert "does not match" in problem.message or "shape" in problem.message
    torch.save(create_model("cnn_small", 10, 1).state_dict(), ckpt)
    assert preflight(cfg, reachable=offline) == []
