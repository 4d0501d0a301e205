"""kdpipe.validate: every name, option and layer path checked at once, before any work."""

from __future__ import annotations

import pytest

from kdpipe.config import PipelineConfig
from kdpipe.configfile import parse_config
from kdpipe.validate import ConfigProblems, find_problems, meta_model, validate


def paths(config: PipelineConfig) -> list[str]:
    return [p.path for p in find_problems(config)]


def test_shipped_defaults_have_no_problem() -> None:
    assert find_problems(PipelineConfig()) == []


@pytest.mark.parametrize(("section", "expected"), [
    ({"data": {"source": "tfds:mnist"}}, "parameters.data.source"),
    ({"data": {"source": "torchvision:SVHN"}}, "parameters.data.source"),
    ({"data": {"source": "imagefolder:/x"}}, "parameters.data.image_size"),
    ({"data": {"source": "mnist5k", "image_size": 32}}, "parameters.data"),
    ({"teacher": {"model": {"arch": "resnet21"}}}, "parameters.teacher.model.arch"),
    ({"student": {"model": {"arch": "cnn_small", "weights": "DEFAULT"}}},
     "parameters.student.model.weights"),
    ({"teacher": {"model": {"arch": "tv_resnet18", "weights": "DEFAULT", "checkpoint": "t.pt"}}},
     "parameters.teacher.model.weights"),
    ({"student": {"train": {"optimizer": "adam"}}}, "parameters.student.train.optimizer"),
    ({"teacher": {"train": {"scheduler": "linear"}}}, "parameters.teacher.train.scheduler"),
    ({"student": {"train": {"scheduler": "step"}}}, "parameters.student.train.step_milestones"),
    ({"student": {"train": {"num_processes": 3}}}, "parameters.student.train.num_processes"),
    ({"distill": {"loss": "crd"}}, "parameters.distill.loss"),
    ({"distill": {"feature_loss": "crd", "student_layer": "a", "teacher_layer": "b"}},
     "parameters.distill.feature_loss"),
    ({"prune": {"importance": "hessian"}}, "parameters.prune.importance"),
    ({"prune": {"recovery": {"optimizer": "lion"}}}, "parameters.prune.recovery.optimizer"),
])
def test_each_mistake_is_reported_at_its_key_path(section: dict, expected: str) -> None:
    assert paths(parse_config(section)) == [expected]


def test_unknown_name_lists_the_valid_ones() -> None:
    (problem,) = find_problems(parse_config({"student": {"train": {"optimizer": "adam"}}}))
    assert problem.message == "unknown optimizer 'adam'; valid names: adamw, sgd"


def test_kwargs_are_bound_to_the_factory_signature() -> None:
    cfg = parse_config({"student": {"model": {"arch": "cnn_small",
                                              "kwargs": {"widht": 2, "dropout": 0.1}}}})
    (problem,) = find_problems(cfg)
    assert problem.path == "parameters.student.model.kwargs.widht"
    assert problem.message == ("'cnn_small' takes no option 'widht' (did you mean width?); "
                               "it accepts: width, dropout")
    cfg = parse_config({"student": {"model": {"arch": "resnet20", "kwargs": {"width": 2}}}})
    assert [p.message for p in find_problems(cfg)] == [
        "'resnet20' takes no option 'width'; it accepts: no options"]
    # A known option with a bad value is caught by building the model on the meta device.
    cfg = parse_config({"student": {"model": {"arch": "cnn_small", "kwargs": {"width": 0}}}})
    (problem,) = find_problems(cfg)
    assert problem.path == "parameters.student.model.kwargs"
    assert "width must be >= 1" in problem.message


def test_layer_paths_are_checked_on_meta_models_even_beside_a_bad_option() -> None:
    cfg = parse_config({
        "student": {"model": {"arch": "cnn_small", "kwargs": {"widht": 8}}},
        "teacher": {"model": {"arch": "resnet56"}},
        "distill": {"feature_loss": "fitnet", "student_layer": "features.stage3",
                    "teacher_layer": "layer9"},
        "prune": {"ignored_layers": ["fc", "features.stage0"]},
    })
    problems = {p.path: p.message for p in find_problems(cfg)}
    assert sorted(problems) == ["parameters.distill.teacher_layer",
                                "parameters.prune.ignored_layers[1]",
                                "parameters.student.model.kwargs.widht"]
    assert "no module 'layer9' in the teacher (CifarResNet)" in problems[
        "parameters.distill.teacher_layer"]
    assert "layer3" in problems["parameters.distill.teacher_layer"]  # a nearby path


def test_disabled_pruning_is_not_checked() -> None:
    cfg = parse_config({"prune": {"enabled": False, "importance": "nope"}})
    assert find_problems(cfg) == []


def test_meta_model_has_the_module_tree_and_no_storage() -> None:
    model = meta_model(PipelineConfig().teacher.model, in_channels=1)
    weights = list(model.parameters())
    assert weights and all(w.device.type == "meta" for w in weights)


def test_validate_raises_one_error_with_every_problem() -> None:
    cfg = parse_config({"distill": {"loss": "crd"}, "prune": {"importance": "hessian"}})
    with pytest.raises(ConfigProblems) as info:
        validate(cfg, source="my.yaml")
    assert len(info.value.problems) == 2
    assert str(info.value).startswith("invalid configuration my.yaml (2 problems):\n  ")
    assert validate(PipelineConfig()) == PipelineConfig()


def test_recipes_validate_before_building_anything() -> None:
    """A recipe called from Python runs the same check, with relative key paths."""
    from kdpipe.bundle import Bundle
    from kdpipe.config import DataConfig, DistillConfig, StudentConfig
    from kdpipe.data import build_dataset_spec
    from kdpipe.models import create_model
    from kdpipe.recipes import distill_student

    spec = build_dataset_spec(DataConfig(source="digits"))
    teacher = Bundle.from_model(create_model("cnn_tiny", 10, 1), arch="cnn_tiny",
                                classes=spec.classes, input_shape=spec.input_shape,
                                mean=spec.mean, std=spec.std)
    student = parse_config({"student": {"model": {"arch": "cnn_tiny", "kwargs": {"widht": 4}}}})
    with pytest.raises(ConfigProblems) as info:
        distill_student(spec, teacher, student.student,
                        DistillConfig(feature_loss="fitnet", student_layer="features",
                                      teacher_layer="featurez"))
    assert [p.path for p in info.value.problems] == ["student.model.kwargs.widht",
                                                     "distill.teacher_layer"]
    assert isinstance(student.student, StudentConfig)


@pytest.mark.integration
def test_pipeline_called_from_python_validates_before_a_run_exists() -> None:
    """The pipeline function itself validates while ZenML compiles it: no run is created."""
    from zenml.client import Client

    from kdpipe.config import DistillConfig
    from pipelines.distillation import distillation_pipeline

    client = Client()
    before = client.list_pipeline_runs().total
    with pytest.raises(ConfigProblems, match=r"distill\.loss: unknown logit loss 'crd'"):
        distillation_pipeline.with_options(run_name="kd-invalid-from-python")(
            distill=DistillConfig(loss="crd"))
    assert client.list_pipeline_runs().total == before


def test_assistants_are_checked_like_students_and_every_hop_like_a_pair() -> None:
    from kdpipe.validate import find_warnings

    cfg = parse_config({
        "teacher": {"model": {"arch": "resnet56"}},
        "distill": {"assistants": [{"model": {"arch": "resnet32", "kwargs": {"width": 2}}},
                                   {"model": {"arch": "resnet20"}, "train": {"optimizer": "adam"}}],
                    "feature_loss": "attention", "student_layer": "layer3",
                    "teacher_layer": "layer3"},
        "student": {"model": {"arch": "cnn_small"}},  # no layer3: the last hop's pupil
        "prune": {"enabled": False}})
    problems = {p.path: p.message for p in find_problems(cfg)}
    assert sorted(problems) == ["parameters.distill.assistants[0].model.kwargs.width",
                                "parameters.distill.assistants[1].train.optimizer",
                                "parameters.distill.student_layer"]
    assert "no module 'layer3' in the student (SmallCNN)" in problems["parameters.distill.student_layer"]
    assert find_warnings(cfg) == []
    bigger = parse_config({"teacher": {"model": {"arch": "resnet20"}},
                           "distill": {"assistants": [{"model": {"arch": "resnet56"}}]}})
    (warning,) = find_warnings(bigger)
    assert warning.startswith("distill.assistants[0] (resnet56, ") and "larger than" in warning


# ------------------------------------------------------- the gate over candidates
@pytest.mark.parametrize(("gate", "key"), [
    ({"prefer": "cheapest"}, "parameters.gate.prefer"),
    ({"prefer_tolerance": -0.1}, "parameters.gate.prefer_tolerance"),
    ({"min_agreement": 1.5}, "parameters.gate.min_agreement"),
])
def test_bad_gate_preference_is_a_config_error_naming_the_key(gate: dict, key: str) -> None:
    from kdpipe.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        parse_config({"gate": gate})
    if "prefer" in gate:
        assert "fastest" in str(err.value) and "most_accurate" in str(err.value)


def test_fastest_without_a_batch_1_latency_is_a_problem_only_with_int8() -> None:
    fp32_only = parse_config({"evaluate": {"latency_batch_sizes": [8, 64]}})
    assert find_problems(fp32_only) == []
    cfg = parse_config({"quantize": {"enabled": True, "calibration_size": 100},
                        "evaluate": {"latency_batch_sizes": [8, 64]}})
    (problem,) = find_problems(cfg)
    assert problem.path == "parameters.gate.prefer"
    assert "add 1 to evaluate.latency_batch_sizes" in problem.message
    smallest = parse_config({"quantize": {"enabled": True, "calibration_size": 100},
                             "evaluate": {"latency_batch_sizes": [8, 64]},
                             "gate": {"prefer": "smallest"}})
    assert find_problems(smallest) == []


def test_deployment_sections_live_in_config_deploy_and_are_re_exported() -> None:
    from kdpipe import config, config_deploy

    for name in ("ExportConfig", "QuantizeConfig", "EvalConfig", "GateConfig"):
        assert getattr(config, name) is getattr(config_deploy, name)
        assert name in config.__all__
