"""Architectures by import path (kdpipe.user_code): resolution, errors, the signature
rule for num_classes / in_channels, the output-width check, the trust rule for bundles,
and prune → bundle → export → reload for a class kdpipe has never seen."""

from __future__ import annotations

import json
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kdpipe import user_code
from kdpipe.build import build_model
from kdpipe.bundle import SPEC_FILE, Bundle, BundleError, load_bundle, save_bundle
from kdpipe.config import ExportConfig, ModelConfig, PipelineConfig, PruneConfig
from kdpipe.export import export_onnx
from kdpipe.models import create_model
from kdpipe.prune import prune_model
from kdpipe.user_code import UserCodeError
from kdpipe.validate import find_problems

NET_SOURCE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes, in_channels=3, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(x.mean(dim=(2, 3)))

def fixed_ten(in_channels):          # no num_classes parameter: always 10 outputs
    return Net(10, in_channels)

def grey_only(num_classes):          # no in_channels parameter: always 1 channel
    return Net(num_classes, 1)

def anything(**kwargs):              # takes options, but not num_classes by name
    return Net(kwargs.get("classes", 3), 1)

def not_a_module(num_classes):
    return {"num_classes": num_classes}

def no_linear(num_classes, in_channels):
    return nn.Conv2d(in_channels, num_classes, 1)

SOMETHING = 3
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """Write modules with unique names into a project folder (the cwd); remove them after."""
    monkeypatch.chdir(tmp_path)
    for var in (user_code.TRUST_ENV, user_code.CODE_DIRS_ENV):
        monkeypatch.setenv(var, "")  # records the value to restore after the test
        monkeypatch.delenv(var)
    names: list[str] = []

    def write(source: str = NET_SOURCE, folder: Path = tmp_path) -> str:
        name = f"byo_{uuid.uuid4().hex[:10]}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)
    for d in {str(tmp_path.resolve()), *(str(p.resolve()) for p in tmp_path.iterdir() if p.is_dir())}:
        while d in sys.path:
            sys.path.remove(d)


# ------------------------------------------------------------------- resolution
def test_import_path_builds_with_kwargs_and_dataset_sizes(project: Callable[..., str]) -> None:
    mod = project()
    model = create_model(f"{mod}:Net", 7, 2, width=4)
    assert type(model).__module__ == mod and type(model).__name__ == "Net"
    assert model.conv1.in_channels == 2 and model.conv1.out_channels == 4
    assert model.head.out_features == 7
    assert model(torch.zeros(2, 2, 8, 8)).shape == (2, 7)


def test_config_directory_is_importable(project: Callable[..., str], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    mod = project(folder=tmp_path / "proj")
    config_path = tmp_path / "proj" / "run.yaml"
    assert user_code.project_dirs(config_path) == [(tmp_path / "proj").resolve(),
                                                   tmp_path.resolve()]
    with pytest.raises(UserCodeError, match="not found"):
        user_code.resolve(f"{mod}:Net")  # the cwd alone does not hold it
    config = PipelineConfig(teacher={"model": {"arch": f"{mod}:Net"}})
    assert user_code.activate(config, config_path) == [f"{mod}:Net"]
    assert user_code.code_dirs()[0] == (tmp_path / "proj").resolve()
    assert user_code.resolve(f"{mod}:Net").__name__ == "Net"
    assert user_code.is_trusted(f"{mod}:Net")


@pytest.mark.parametrize(("factory", "num_classes", "in_channels", "expect"), [
    ("fixed_ten", 10, 3, (10, 3)),      # in_channels passed, num_classes not
    ("grey_only", 5, 1, (5, 1)),        # num_classes passed, in_channels not
])
def test_sizes_are_passed_only_where_the_signature_names_them(
        project: Callable[..., str], factory: str, num_classes: int, in_channels: int,
        expect: tuple[int, int]) -> None:
    model = create_model(f"{project()}:{factory}", num_classes, in_channels)
    assert (model.head.out_features, model.conv1.in_channels) == expect


def test_var_kwargs_callable_gets_options_but_not_sizes(project: Callable[..., str]) -> None:
    model = create_model(f"{project()}:anything", 4, 1, classes=4)
    assert model.head.out_features == 4


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize("arch", ["my models:Net", "mod:", ":Net", "a..b:Net", "mod:Net:x"])
def test_malformed_import_path(arch: str) -> None:
    with pytest.raises(UserCodeError, match="is not an import path.*package.module:callable"):
        user_code.resolve(arch)


def test_missing_module_names_module_attribute_and_dirs(project: Callable[..., str],
                                                        tmp_path: Path) -> None:
    with pytest.raises(UserCodeError) as err:
        create_model("no_such_byo_module.sub:Net", 10, 1)
    msg = str(err.value)
    assert "module 'no_such_byo_module.sub' not found" in msg
    assert "attribute 'Net'" in msg and str(tmp_path.resolve()) in msg
    assert "no_such_byo_module/sub.py" in msg and user_code.CODE_DIRS_ENV in msg


def test_missing_attribute_lists_the_module_callables(project: Callable[..., str]) -> None:
    mod = project()
    with pytest.raises(UserCodeError, match=rf"module '{mod}' \(.*{mod}.py\) has no attribute "
                                            r"'Nett'; its callables: .*Net"):
        create_model(f"{mod}:Nett", 10, 1)
    with pytest.raises(UserCodeError, match="is a int, not a class or function"):
        create_model(f"{mod}:SOMETHING", 10, 1)


def test_module_that_fails_to_import(project: Callable[..., str]) -> None:
    broken = project("import not_installed_dependency_xyz\n")
    with pytest.raises(UserCodeError, match=f"module '{broken}' was found but importing it "
                                            "failed: No module named 'not_installed_dependency"):
        user_code.resolve(f"{broken}:Net")
    raising = project("raise RuntimeError('boom at import')\n")
    with pytest.raises(UserCodeError, match="raised RuntimeError: boom at import"):
        user_code.resolve(f"{raising}:Net")


def test_not_a_module_or_wrong_width_names_the_callable(project: Callable[..., str]) -> None:
    mod = project()
    with pytest.raises(UserCodeError, match=rf"'{mod}:not_a_module' returned builtins.dict .*"
                                            "not a torch.nn.Module"):
        create_model(f"{mod}:not_a_module", 10, 1)
    with pytest.raises(UserCodeError, match=rf"'{mod}:fixed_ten' returned a Net with 10 outputs "
                                            r"\(its classifier 'head'\) but the dataset has 4 "
                                            "classes"):
        create_model(f"{mod}:fixed_ten", 4, 1)
    with pytest.raises(UserCodeError, match="without an nn.Linear"):
        create_model(f"{mod}:no_linear", 4, 1)


def test_bad_kwargs_and_weights(project: Callable[..., str]) -> None:
    mod = project()
    with pytest.raises(UserCodeError, match=r"takes no option\(s\) \['widht'\]; it accepts: width"):
        create_model(f"{mod}:Net", 10, 1, widht=4)
    with pytest.raises(UserCodeError, match="model.kwargs sets \\['num_classes'\\]"):
        user_code.build(f"{mod}:Net", 10, 1, {"num_classes": 10})
    with pytest.raises(ValueError, match="your own code and has no pretrained weights"):
        create_model(f"{mod}:Net", 10, 1, weights="DEFAULT")


def test_validate_reports_import_path_problems_before_any_build(
        project: Callable[..., str]) -> None:
    mod = project()
    config = PipelineConfig(
        data={"source": "digits"},
        teacher={"model": {"arch": "nowhere_byo_mod:Net"}},
        student={"model": {"arch": f"{mod}:Net", "kwargs": {"widht": 4}}},
        distill={"feature_loss": "attention", "student_layer": "conv9",
                 "teacher_layer": "features.stage3"})
    problems = {p.path: p.message for p in find_problems(config)}
    assert "module 'nowhere_byo_mod' not found" in problems["parameters.teacher.model.arch"]
    assert "takes no option(s) ['widht']" in problems["parameters.student.model.kwargs"]
    ok = PipelineConfig(data={"source": "digits"}, student={"model": {"arch": f"{mod}:Net"}},
                        distill={"feature_loss": "attention", "student_layer": "conv9",
                                 "teacher_layer": "features.stage3"})
    problems = {p.path: p.message for p in find_problems(ok)}
    # The user's model is built on the meta device: its layer paths are checked too.
    assert "no module 'conv9' in the student (Net)" in problems["parameters.distill.student_layer"]
    assert "conv1" in problems["parameters.distill.student_layer"]
    bad = PipelineConfig(data={"source": "digits"}, student={"model": {"arch": f"{mod}:not_a_module"}})
    problems = {p.path: p.message for p in find_problems(bad)}
    assert "not a torch.nn.Module" in problems["parameters.student.model.arch"]


# ------------------------------------------------------------------- bundles
def _bundle_of(model: nn.Module, arch: str, **kwargs) -> Bundle:
    return Bundle.from_model(model, arch=arch, classes=[f"c{i}" for i in range(10)],
                             input_shape=(1, 8, 8), mean=[0.5], std=[0.25], kwargs=kwargs)


MARKER_SOURCE = NET_SOURCE + """
import pathlib
pathlib.Path(__file__).with_name("imported.marker").write_text("imported")
"""


def test_untrusted_bundle_is_refused_without_importing(project: Callable[..., str],
                                                       tmp_path: Path) -> None:
    mod, evil = project(), project(MARKER_SOURCE)
    bundle_dir = save_bundle(_bundle_of(create_model(f"{mod}:Net", 10, 1).eval(), f"{mod}:Net"),
                             tmp_path / "b")
    spec = json.loads((bundle_dir / SPEC_FILE).read_text())
    spec["arch"] = f"{evil}:Net"  # only the bundle file names this module
    (bundle_dir / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_dir)
    msg = str(err.value)
    assert f"names the architecture '{evil}:Net'" in msg and "it was not imported" in msg
    assert f"trust_code=['{evil}:Net']" in msg and user_code.TRUST_ENV in msg
    assert evil not in sys.modules and not (tmp_path / "imported.marker").exists()
    # Named explicitly, it is imported (and the weights fit: same class).
    model, _ = load_bundle(bundle_dir, trust_code=[f"{evil}:Net"])
    assert type(model).__module__ == evil and (tmp_path / "imported.marker").exists()


def test_trust_by_environment_and_missing_module(project: Callable[..., str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    mod = project()
    bundle_dir = save_bundle(_bundle_of(create_model(f"{mod}:Net", 10, 1).eval(), f"{mod}:Net"),
                             tmp_path / "b")
    spec = json.loads((bundle_dir / SPEC_FILE).read_text())
    spec["arch"] = "moved_away_byo_models:Net"
    (bundle_dir / SPEC_FILE).write_text(json.dumps(spec))
    monkeypatch.setenv(user_code.TRUST_ENV, "other:Thing, moved_away_byo_models:Net")
    with pytest.raises(BundleError, match="cannot rebuild the bundle's model: cannot import "
                                          "'moved_away_byo_models:Net': module "
                                          "'moved_away_byo_models' not found.*next to the config"):
        load_bundle(bundle_dir)


def test_config_that_names_the_path_trusts_its_checkpoint_bundle(
        project: Callable[..., str], tmp_path: Path) -> None:
    mod = project()
    arch = f"{mod}:Net"
    bundle_dir = tmp_path / "bundle"
    # Written by another process: this one has never imported or trusted the module.
    import subprocess

    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r});"
            "from kdpipe.models import create_model; from kdpipe.bundle import Bundle, save_bundle;"
            f"m = create_model({arch!r}, 10, 1, width=4);"
            f"save_bundle(Bundle.from_model(m, arch={arch!r}, classes=[str(i) for i in range(10)],"
            f" input_shape=(1, 8, 8), mean=[0.5], std=[0.25], kwargs={{'width': 4}}), {str(bundle_dir)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    with pytest.raises(BundleError, match="it was not imported"):
        load_bundle(bundle_dir)
    model = build_model(ModelConfig(arch=arch, kwargs={"width": 4}, checkpoint=str(bundle_dir)),
                        10, 1)
    assert model.conv1.out_channels == 4


@pytest.mark.parametrize("exporter", ["dynamo"])
def test_prune_bundle_export_reload_identical(project: Callable[..., str], tmp_path: Path,
                                              exporter: str) -> None:
    arch = f"{project()}:Net"
    torch.manual_seed(0)
    model = create_model(arch, 10, 1, width=8)
    report = prune_model(model, torch.zeros(1, 1, 8, 8), PruneConfig(ratio=0.5, round_to=4),
                          latency_repeats=2)
    assert report.after_pruning.params < report.before.params
    assert model.conv1.out_channels == 4
    model.eval()
    bundle = _bundle_of(model, arch, width=8)
    assert bundle.spec.layout["conv1"]["attrs"]["out_channels"] == 4
    saved = save_bundle(bundle, tmp_path / "pruned")
    spec = json.loads((saved / SPEC_FILE).read_text())
    assert (spec["arch"], spec["kwargs"]) == (arch, {"width": 8})
    reloaded, _ = load_bundle(saved)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))
    result = export_onnx(Bundle(reloaded, bundle.spec), tmp_path / "m.onnx",
                         ExportConfig(exporter=exporter))
    assert result.parity.passed
    pixels = torch.rand(3, 1, 8, 8)
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0]
    with torch.no_grad():
        eager = reloaded((pixels - 0.5) / 0.25).numpy()
    np.testing.assert_allclose(onnx_out, eager, atol=1e-4, rtol=1e-3)


def test_validate_checks_the_width_when_the_class_count_is_known(
        project: Callable[..., str]) -> None:
    mod = project()
    fits = PipelineConfig(data={"source": "digits"}, student={"model": {"arch": f"{mod}:fixed_ten"}})
    assert not [p for p in find_problems(fits) if "student" in p.path]
    wrong = PipelineConfig(data={"source": "torchvision:CIFAR100"},
                           student={"model": {"arch": f"{mod}:fixed_ten"}})
    problems = {p.path: p.message for p in find_problems(wrong)}
    assert (f"'{mod}:fixed_ten' returned a Net with 10 outputs (its classifier 'head') but the "
            "dataset has 100 classes") in problems["parameters.student.model.arch"]


def test_source_digest_follows_the_module_file(project: Callable[..., str], tmp_path: Path) -> None:
    mod = project()
    before = user_code.source_digest(f"{mod}:Net")
    assert len(before) == 64 and before == user_code.source_digest(f"{mod}:Net")
    (tmp_path / f"{mod}.py").write_text(NET_SOURCE + "\n# width changed\n")
    assert user_code.source_digest(f"{mod}:Net") != before


@pytest.mark.slow
@pytest.mark.integration
def test_ddp_workers_import_and_trust_the_same_code(project: Callable[..., str]) -> None:
    """Two gloo workers rebuild the user's model from the job's bundles: they inherit the
    project directories and the allow-list through the environment."""
    from kdpipe import recipes
    from kdpipe.config import DataConfig, TeacherConfig, TrainConfig
    from kdpipe.data import build_dataset_spec

    arch = f"{project()}:Net"
    dataset = build_dataset_spec(DataConfig(source="digits", batch_size=64))
    bundle = recipes.train_teacher(dataset, TeacherConfig(
        model=ModelConfig(arch=arch, kwargs={"width": 4}),
        train=TrainConfig(epochs=1, lr=0.01, device="cpu", num_processes=2)))
    assert bundle.spec.arch == arch and type(bundle.model).__name__ == "Net"
    assert 0.0 <= bundle.spec.extra["metrics"]["test_accuracy"] <= 1.0


def test_code_that_cannot_run_on_meta_is_validated_on_the_cpu(project: Callable[..., str]) -> None:
    mod = project(NET_SOURCE + """
def data_dependent(num_classes, in_channels):
    width = int(torch.ones(1).sum().item()) * 4   # .item() has no value on the meta device
    return Net(num_classes, in_channels, width)

def always_fails(num_classes):
    raise KeyError("no such preset")
""")
    ok = PipelineConfig(data={"source": "digits"}, student={"model": {"arch": f"{mod}:data_dependent"}})
    assert not [p for p in find_problems(ok) if "student" in p.path]
    bad = PipelineConfig(data={"source": "digits"}, student={"model": {"arch": f"{mod}:always_fails"}})
    problems = {p.path: p.message for p in find_problems(bad)}
    assert (f"calling '{mod}:always_fails' with {{'num_classes': 10}} failed: KeyError: "
            "'no such preset'") in problems["parameters.student.model.arch"]


def test_checkpoint_options_are_checked_for_import_paths_too(project: Callable[..., str]) -> None:
    mod = project()
    config = PipelineConfig(data={"source": "digits"},
                            student={"model": {"arch": f"{mod}:Net", "strip_prefix": "module."}})
    problems = {p.path: p.message for p in find_problems(config)}
    assert "strip_prefix only applies when loading model.checkpoint" in \
        problems["parameters.student.model.strip_prefix"]
