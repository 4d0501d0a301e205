"""Distil the default teacher into the default student on mnist5k, with the core only.

No ZenML, no MLflow: the data spec, the model registry and the one training loop.
Hyper-parameters come from a run-configuration YAML's ``parameters:`` section
(configs/default.yaml when it exists), else from kdpipe.config's defaults, so this script
holds no defaults of its own.

    python examples/distill_mnist5k.py [--config configs/default.yaml]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kdpipe.config import DataConfig, PipelineConfig
from kdpipe.configfile import load_config
from kdpipe.data import build_dataset_spec, make_loader
from kdpipe.metrics import count_params
from kdpipe.models import create_model
from kdpipe.train import ClassificationTask, DistillationTask, evaluate, fit, seed_everything

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def load(path: Path | None) -> PipelineConfig:
    """The given config, else configs/default.yaml if present, else the built-in defaults."""
    path = path or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    cfg = load_config(path) if path else PipelineConfig()
    # This example is about mnist5k whatever the config's data source says.
    data = DataConfig(**{**cfg.data.model_dump(), "source": "mnist5k"})
    return cfg.model_copy(update={"data": data})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="run-configuration YAML")
    cfg = load(parser.parse_args().config)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    spec = build_dataset_spec(cfg.data)
    train, val, test = (make_loader(spec, s, train=s == "train") for s in ("train", "val", "test"))
    print(f"mnist5k: {spec.split_sizes}, input {spec.input_shape}")

    seed_everything(cfg.teacher.train.seed)
    teacher = create_model(cfg.teacher.model.arch, spec.num_classes, spec.in_channels,
                           **cfg.teacher.model.kwargs)
    fit(teacher, ClassificationTask(), train, val, cfg.teacher.train, desc="teacher")

    seed_everything(cfg.student.train.seed)
    student = create_model(cfg.student.model.arch, spec.num_classes, spec.in_channels,
                           **cfg.student.model.kwargs)
    fit(student, DistillationTask(teacher, cfg.distill), train, val, cfg.student.train,
        desc="student")

    for name, model in (("teacher", teacher), ("student", student)):
        arch = cfg.teacher.model.arch if name == "teacher" else cfg.student.model.arch
        acc = evaluate(model, test).accuracy
        print(f"{name:8s} {arch:10s} test accuracy {acc:.4f}  params {count_params(model):,}")


if __name__ == "__main__":
    main()
