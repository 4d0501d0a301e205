"""ONNX teachers: graphs exported by routes other than kdpipe's exporter, as teachers.

Two foreign graphs: one from ``torch.onnx`` with the legacy (TorchScript) exporter taking
NHWC pixels in [0, 255], one built node by node with ``onnx.helper`` (two outputs:
probabilities and logits). The checks on bad files, the artifact round trip, distillation
(cached and per batch), the evaluation and the config rules all run on them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from kdpipe import recipes
from kdpipe.bundle import BundleError
from kdpipe.config import (
    DataConfig,
    DistillConfig,
    ModelConfig,
    PipelineConfig,
    Preprocessing,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from kdpipe.data import build_dataset_spec, make_loader
from kdpipe.onnx_teacher import (
    ONNX_FILE,
    OnnxTeacherBundle,
    OnnxTeacherError,
    load_onnx_teacher,
    open_onnx_teacher,
    save_onnx_teacher,
)
from kdpipe.tasks import DistillationTask
from kdpipe.validate import find_problems

NHWC_255 = Preprocessing(mean=(0.0,), std=(1.0,), value_range=255, layout="NHWC")
FAST = TrainConfig(epochs=2, lr=0.01, scheduler="none", device="cpu")


@pytest.fixture(scope="module")
def digits():  # noqa: ANN201
    return build_dataset_spec(DataConfig(source="digits", batch_size=64))


class _NhwcNet(nn.Module):
    """A 'foreign' model: NHWC input in [0, 255], its own scaling inside."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(16 * 64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2) / 255.0)


def _raw(x: torch.Tensor, ds) -> torch.Tensor:  # noqa: ANN001
    return x * torch.tensor(ds.std).view(1, -1, 1, 1) + torch.tensor(ds.mean).view(1, -1, 1, 1)


@pytest.fixture(scope="module")
def nhwc_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    model = _NhwcNet().eval()
    path = tmp_path_factory.mktemp("onnx") / "nhwc.onnx"
    torch.onnx.export(model, (torch.zeros(1, 8, 8, 1),), str(path), dynamo=False,
                      input_names=["pixels"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"pixels": {0: "n"}, "logits": {0: "n"}})
    return path, model


def _helper_graph(path: Path, *, channels: int = 1, domain: str = "", classes: int = 10,
                  seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """Flatten → Gemm (logits) → Softmax (probs): outputs ``probs`` first, ``logits`` second."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(channels * 64, classes)).astype(np.float32)
    b = rng.normal(size=(classes,)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1, domain=domain)]
    graph = helper.make_graph(
        nodes, "helper_teacher",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", channels, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", classes]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path, w, b


# ------------------------------------------------------------------ the module
def test_legacy_exported_nhwc_teacher_sees_its_own_inputs(digits, nhwc_onnx) -> None:  # noqa: ANN001
    path, model = nhwc_onnx
    teacher = open_onnx_teacher(path, digits, preprocessing=NHWC_255)
    x, _, _ = next(iter(make_loader(digits, "test", train=False)))
    with torch.no_grad():
        want = model((_raw(x, digits) * 255).permute(0, 2, 3, 1))
    torch.testing.assert_close(teacher.model(x), want, rtol=1e-4, atol=1e-4)
    assert list(teacher.model.parameters()) == []  # frozen by construction
    assert teacher.spec.arch == "onnx" and teacher.spec.extra["onnx"]["output"] == "logits"


def test_helper_graph_output_is_picked_by_name_or_index(digits, tmp_path: Path) -> None:  # noqa: ANN001
    path, w, b = _helper_graph(tmp_path / "two.onnx")
    x, _, _ = next(iter(make_loader(digits, "test", train=False)))
    want = x.flatten(1).numpy() @ w + b  # dataset-normalised input: nothing declared
    for output in ("logits", 1):
        t = open_onnx_teacher(path, digits, output=output)
        np.testing.assert_allclose(t.model(x).numpy(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(OnnxTeacherError, match=r"2 outputs \(probs, logits\).*onnx_output"):
        open_onnx_teacher(path, digits)
    with pytest.raises(OnnxTeacherError, match="'scores' is not an output"):
        open_onnx_teacher(path, digits, output="scores")


# ------------------------------------------------------------------ bad files
def test_bad_files_fail_naming_the_file(digits, tmp_path: Path, nhwc_onnx) -> None:  # noqa: ANN001
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(OnnxTeacherError, match=r"junk\.onnx is not a valid ONNX model"):
        open_onnx_teacher(junk, digits)
    custom, _, _ = _helper_graph(tmp_path / "custom.onnx", domain="com.example")
    with pytest.raises(OnnxTeacherError, match=r"custom\.onnx uses custom ops com\.example::Softmax"):
        open_onnx_teacher(custom, digits, output="logits")
    with pytest.raises(OnnxTeacherError, match="not found"):
        open_onnx_teacher(tmp_path / "missing.onnx", digits)


def test_shape_and_class_mismatches_name_both_shapes(digits, tmp_path: Path, nhwc_onnx) -> None:  # noqa: ANN001
    rgb, _, _ = _helper_graph(tmp_path / "rgb.onnx", channels=3)
    with pytest.raises(OnnxTeacherError, match=r"takes input \(n, 3, 8, 8\) but the dataset gives "
                                               r"batches of \(N, 1, 8, 8\)"):
        open_onnx_teacher(rgb, digits, output="logits")
    # The NHWC graph read as NCHW: (n, 8, 8, 1) does not fit (N, 1, 8, 8).
    with pytest.raises(OnnxTeacherError, match=r"\(n, 8, 8, 1\).*\(N, 1, 8, 8\)"):
        open_onnx_teacher(nhwc_onnx[0], digits)
    five, _, _ = _helper_graph(tmp_path / "five.onnx", classes=5)
    with pytest.raises(OnnxTeacherError, match=r"shape \(2, 5\).*\(N, 10\) logits"):
        open_onnx_teacher(five, digits, output="logits")


# ------------------------------------------------------------------ artifact
def test_artifact_keeps_the_onnx_file_and_refuses_a_changed_one(digits, tmp_path: Path,  # noqa: ANN001
                                                                 nhwc_onnx) -> None:
    teacher = open_onnx_teacher(nhwc_onnx[0], digits, preprocessing=NHWC_255)
    out = save_onnx_teacher(teacher, tmp_path / "t")
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", ONNX_FILE]
    back = load_onnx_teacher(out)
    assert isinstance(back, OnnxTeacherBundle) and back.spec == teacher.spec
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(back.model(x), teacher.model(x))
    (out / ONNX_FILE).write_bytes((out / ONNX_FILE).read_bytes() + b"\0")
    with pytest.raises(BundleError, match="does not match the sha256"):
        load_onnx_teacher(out)


# ------------------------------------------------------------------ training
def test_cached_and_per_batch_logits_agree(digits, nhwc_onnx) -> None:  # noqa: ANN001
    teacher = open_onnx_teacher(nhwc_onnx[0], digits, preprocessing=NHWC_255).model
    loader = make_loader(digits, "train", train=True)
    task = DistillationTask(teacher, DistillConfig())
    task.prepare(nn.Identity(), loader, torch.device("cpu"))
    assert task.caches_logits
    x, _, index = next(iter(loader))
    torch.testing.assert_close(task._teacher_outputs(x, index)[0], teacher(x), rtol=0, atol=1e-6)


def test_pytorch_teacher_and_its_onnx_export_distil_the_same_student(digits, tmp_path: Path) -> None:  # noqa: ANN001
    """The done-criterion in small: same teacher twice, same student, same seed."""
    pt = recipes.train_teacher(digits, TeacherConfig(model=ModelConfig(arch="cnn_tiny"), train=FAST))
    path = tmp_path / "teacher.onnx"
    torch.onnx.export(pt.model.eval(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}}, opset_version=17)
    ox = recipes.train_teacher(digits, TeacherConfig(onnx=str(path), train=FAST))
    assert ox.spec.extra["history"] == []  # validated and evaluated, not trained
    assert abs(ox.spec.extra["metrics"]["test_accuracy"]
               - pt.spec.extra["metrics"]["test_accuracy"]) < 1e-9
    x, _, _ = next(iter(make_loader(digits, "train", train=False)))
    with torch.no_grad():
        assert float((ox.model(x) - pt.model(x)).abs().max()) < 1e-4
    student = StudentConfig(model=ModelConfig(arch="cnn_tiny"), train=FAST)
    a = recipes.distill_student(digits, pt, student, DistillConfig())
    b = recipes.distill_student(digits, ox, student, DistillConfig())
    assert abs(a.spec.extra["metrics"]["test_accuracy"]
               - b.spec.extra["metrics"]["test_accuracy"]) <= 0.01
    # Per batch (no cache) as well, and pruning's recovery with the ONNX teacher.
    c = recipes.distill_student(digits, ox, student, DistillConfig(cache_teacher_logits=False))
    assert abs(c.spec.extra["metrics"]["test_accuracy"]
               - b.spec.extra["metrics"]["test_accuracy"]) <= 0.01


def test_evaluation_reports_the_onnx_teacher(digits, tmp_path: Path, nhwc_onnx) -> None:  # noqa: ANN001
    from kdpipe.config import EvalConfig, ExportConfig
    from kdpipe.evaluation import evaluate_models
    from kdpipe.export import export_onnx

    teacher = open_onnx_teacher(nhwc_onnx[0], digits, preprocessing=NHWC_255)
    student = recipes.distill_student(digits, teacher, StudentConfig(
        model=ModelConfig(arch="cnn_tiny"), train=TrainConfig(epochs=1, device="cpu")),
        DistillConfig())
    onnx_path = export_onnx(student, tmp_path / "s.onnx", ExportConfig()).path
    report = evaluate_models(digits, teacher, student, student, onnx_path,
                             EvalConfig(latency_batch_sizes=(1, 4), latency_repeats=3))
    ev = report.models["teacher"]
    assert ev.runtime == "onnxruntime" and ev.params == 16 * 9 + 16 + 16 * 64 * 10 + 10
    assert ev.macs is None and ev.size_bytes == nhwc_onnx[0].stat().st_size
    loader = make_loader(digits, "test", train=False)
    preds = torch.cat([teacher.model(x).argmax(1) == y for x, y, _ in loader])
    assert abs(ev.accuracy - float(preds.double().mean())) < 1e-9


# ------------------------------------------------------------------ config rules
def test_config_rules_for_onnx_teachers() -> None:
    cfg = PipelineConfig(
        teacher=TeacherConfig(onnx="t.onnx", init="production",
                              model=ModelConfig(arch="cnn_large", checkpoint="x.pt")),
        student=StudentConfig(model=ModelConfig(arch="cnn_tiny", preprocessing=Preprocessing()),
                              train=TrainConfig(num_processes=2, device="cpu")),
        distill=DistillConfig(feature_loss="attention", student_layer="features",
                              teacher_layer="features"))
    found = {p.path: p.message for p in find_problems(cfg)}
    assert "PyTorch teacher" in found["parameters.distill.feature_loss"]
    assert "DDP workers do not support an ONNX teacher" in found[
        "parameters.student.train.num_processes"]
    assert "warm-start" in found["parameters.teacher.init"]
    assert "parameters.teacher.model.checkpoint" in found
    assert "teacher only" in found["parameters.student.model.preprocessing"]
    layers = cfg.model_copy(update={"student": StudentConfig(init="teacher_layers"),
                                    "distill": DistillConfig()})
    assert "an ONNX teacher has none" in {p.path: p.message for p in find_problems(layers)}[
        "parameters.student.init"]
    assert not [p for p in find_problems(PipelineConfig(teacher=TeacherConfig(onnx="t.onnx")))]
    # With a teacher assistant, the assistant is the ONNX teacher's only pupil: its training
    # may not use DDP, the student's (taught by the assistant) may.
    ddp = TrainConfig(num_processes=2, device="cpu")
    chain = PipelineConfig(teacher=TeacherConfig(onnx="t.onnx"), distill=DistillConfig(
        assistants=(StudentConfig(model=ModelConfig(arch="cnn_small"), train=ddp),)),
        student=StudentConfig(model=ModelConfig(arch="cnn_tiny"), train=ddp))
    assert [p.path for p in find_problems(chain)] == [
        "parameters.distill.assistants[0].train.num_processes"]


def test_preflight_names_the_file_before_any_step(tmp_path: Path) -> None:
    from kdpipe.preflight import preflight

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x01garbage")
    rgb, _, _ = _helper_graph(tmp_path / "rgb.onnx", channels=3)
    for path, text in ((junk, "junk.onnx is not a valid ONNX model"),
                       (rgb, "3 channel(s) (NCHW) but the dataset has 1"),
                       (tmp_path / "none.onnx", "not found")):
        cfg = PipelineConfig(data=DataConfig(source="digits"), teacher=TeacherConfig(onnx=str(path)))
        problems = preflight(cfg, reachable=lambda url: None)
        assert [p.path for p in problems] == ["parameters.teacher.onnx"], problems
        assert text in problems[0].message


# ------------------------------------------------------------------ pipeline
@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_with_an_onnx_teacher(tmp_path: Path,
                                       run_in_process) -> None:  # noqa: ANN001
    """The smoke pipeline with a helper-built ONNX teacher; a changed file re-runs the step."""
    import yaml
    from zenml.client import Client

    name = "kdpipe-test-onnx-teacher"
    path, _, _ = _helper_graph(tmp_path / "teacher.onnx", seed=1)
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
                          .read_text())
    data["model"]["name"] = name
    data["parameters"]["teacher"] = {"onnx": str(path), "onnx_output": "logits"}
    data["parameters"]["tracking"].update(experiment=name, registered_model=name)
    data["parameters"]["gate"].update(min_accuracy=None, max_drop_vs_teacher=None,
                                      min_compression=None)
    config = tmp_path / "onnx.yaml"
    config.write_text(yaml.safe_dump(data))
    runs = {}
    for run_name in ("onnx-teacher-1", "onnx-teacher-2"):
        code, out, err = run_in_process("--config", str(config), "--run-name", run_name)
        assert code == 0, out[-3000:] + err[-3000:]
        runs[run_name] = Client().get_pipeline_run(run_name)
        _helper_graph(path, seed=2)  # the same path, other weights: not served from cache
    first, second = runs["onnx-teacher-1"], runs["onnx-teacher-2"]
    teacher = first.steps["finetune_teacher"].outputs["teacher"][0].load()
    assert isinstance(teacher, OnnxTeacherBundle)
    report = first.steps["evaluate_models"].outputs["evaluation"][0].load()
    assert report.models["teacher"].runtime == "onnxruntime"
    assert abs(report.models["teacher"].accuracy
               - teacher.spec.extra["metrics"]["test_accuracy"]) < 1e-9
    step2 = second.steps["finetune_teacher"]
    assert str(getattr(step2.status, "value", step2.status)) == "completed"
    assert step2.outputs["teacher"][0].load().spec.weights_sha256 != teacher.spec.weights_sha256


def test_cli_refuses_a_bad_onnx_teacher_before_any_step(tmp_path: Path, run_in_process) -> None:  # noqa: ANN001
    import yaml

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
                          .read_text())
    data["parameters"]["teacher"] = {"onnx": str(junk)}
    data["parameters"]["distill"]["feature_loss"] = "attention"
    data["parameters"]["distill"].update(student_layer="features", teacher_layer="features")
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(data))
    code, out, err = run_in_process("--config", str(config), "--run-name", "onnx-teacher-bad")
    assert code == 2, out[-2000:] + err[-2000:]
    text = out + err
    assert "parameters.teacher.onnx" in text and "junk.onnx is not a valid ONNX model" in text
    assert "feature losses need a PyTorch teacher" in text
