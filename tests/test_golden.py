"""Golden values: the first steps of short distillation runs on the bundled digits.

Each case trains a dropout-carrying ``cnn_tiny`` student against a randomly initialised
``cnn_small`` teacher for two 5-step epochs (seeded) and compares the per-step total loss
and every per-epoch history value with numbers recorded once. A change that moves the
numbers (a loss, the loop, the order in which random numbers are drawn, the optimiser's
parameter groups) fails here even when every run is still deterministic.

The values were recorded on CPU with the code before the loss registry and the
regressor-inside-the-student refactor (issue 13); that refactor left them unchanged
(the teacher's forward now runs first, but it is in eval mode and draws no random
numbers). The tolerance (relative 1e-4) absorbs float differences between CPU kernels and
thread counts, not a changed computation. Re-record only for an intended change, and say
why in the commit.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from kdpipe.config import DataConfig, DistillConfig, TrainConfig
from kdpipe.data import build_dataset_spec, make_loader
from kdpipe.models import create_model
from kdpipe.train import DistillationTask, fit

REL = 1e-4
CASES: dict[str, tuple[dict, bool]] = {  # name -> (DistillConfig fields, augment)
    "kd": ({"loss": "kd", "temperature": 4.0, "kd_weight": 0.7}, False),
    "dkd": ({"loss": "dkd", "dkd_beta": 2.0, "dkd_warmup_epochs": 2}, False),
    "kd+fitnet": ({"feature_loss": "fitnet", "feature_weight": 0.5,
                   "student_layer": "features.stage3", "teacher_layer": "features.stage3"}, False),
    "kd+attention": ({"feature_loss": "attention", "feature_weight": 2.0,
                      "student_layer": "features.stage2", "teacher_layer": "features.stage2"}, True),
}

# name -> per-step total loss and per-epoch history, recorded at 4c71af8 (before the refactor).
GOLDEN: dict[str, dict[str, list]] = {
    "kd": {
        "steps": [
            0.7433342337608337, 0.7497476935386658, 0.7453480362892151, 0.7387136816978455,
            0.7367004752159119, 0.7278926372528076, 0.7192156910896301, 0.7023777961730957,
            0.7100984454154968, 0.7025302052497864,
        ],
        "history": [
            {
                "epoch": 1, "lr": 0.05,
                "train_loss": 0.7428798599193849, "train_ce": 2.381616351143557,
                "train_kd": 0.040564181367579964, "val_loss": 2.318636745876736,
                "val_accuracy": 0.05555555555555555,
            },
            {
                "epoch": 2, "lr": 0.004774575140626317,
                "train_loss": 0.7126039679598599, "train_ce": 2.312262418446507,
                "train_kd": 0.027036042833610385, "val_loss": 2.310818820529514,
                "val_accuracy": 0.08333333333333333,
            },
        ],
    },
    "dkd": {
        "steps": [
            2.422757863998413, 2.442444324493408, 2.4231438636779785, 2.3871583938598633,
            2.3526687622070312, 2.3275556564331055, 2.2745790481567383, 2.2208633422851562,
            2.2294702529907227, 2.199803590774536,
        ],
        "history": [
            {
                "epoch": 1, "lr": 0.05,
                "train_loss": 2.406603786617209, "train_ce": 2.3660539129753384,
                "train_dkd": 0.0810997743595187, "val_loss": 2.3116053263346354,
                "val_accuracy": 0.10555555555555556,
            },
            {
                "epoch": 2, "lr": 0.004774575140626317,
                "train_loss": 2.2513811626221893, "train_ce": 2.2064381264084942,
                "train_dkd": 0.04494301040931742, "val_loss": 2.2792980617947047,
                "val_accuracy": 0.15,
            },
        ],
    },
    "kd+fitnet": {
        "steps": [
            0.7836475372314453, 0.7834348678588867, 0.7814277410507202, 0.7736768126487732,
            0.7693772912025452, 0.7558987736701965, 0.7418391108512878, 0.7276899814605713,
            0.7223218679428101, 0.7179237604141235,
        ],
        "history": [
            {
                "epoch": 1, "lr": 0.05,
                "train_loss": 0.7784763486876598, "train_ce": 2.3831569099578007,
                "train_feat": 1.0075726837702184, "train_kd": 0.040415915344192,
                "val_loss": 2.320473904079861, "val_accuracy": 0.03888888888888889,
            },
            {
                "epoch": 2, "lr": 0.004774575140626317,
                "train_loss": 0.7334130215284458, "train_ce": 2.350121475916205,
                "train_feat": 0.9477397393118131, "train_kd": 0.027256673289345862,
                "val_loss": 2.3192843967013888, "val_accuracy": 0.07222222222222222,
            },
        ],
    },
    "kd+attention": {
        "steps": [
            1.694896936416626, 1.6239150762557983, 1.3392164707183838, 0.9725509881973267,
            0.7837890386581421, 0.7580495476722717, 0.7326993346214294, 0.6906452178955078,
            0.6576343178749084, 0.6377904415130615,
        ],
        "history": [
            {
                "epoch": 1, "lr": 0.05,
                "train_loss": 1.2920057205520363, "train_ce": 2.367095265012937,
                "train_feat": 0.5088617463337588, "train_kd": 0.04174746398116827,
                "val_loss": 2.3278993394639755, "val_accuracy": 0.09444444444444444,
            },
            {
                "epoch": 2, "lr": 0.004774575140626317,
                "train_loss": 0.6964172218750656, "train_ce": 2.34886010393038,
                "train_feat": 0.21799861876236226, "train_kd": 0.02837107832600602,
                "val_loss": 2.337997775607639, "val_accuracy": 0.09444444444444444,
            },
        ],
    },
}


class RecordingTask(DistillationTask):
    """Records each step's total loss (a read-back per step: fine in a test only)."""

    def __init__(self, teacher: nn.Module, cfg: DistillConfig) -> None:
        super().__init__(teacher, cfg)
        self.step_losses: list[float] = []

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor, epoch: int):
        total, parts = super().loss(model, x, y, index, epoch)
        self.step_losses.append(float(total.detach()))
        return total, parts


def run_case(name: str) -> tuple[list[float], list[dict[str, float]]]:
    """Per-step losses and the history (without ``seconds``) of one case."""
    fields, augment = CASES[name]
    spec = build_dataset_spec(DataConfig(source="digits", batch_size=256, augment=augment))
    torch.manual_seed(11)
    teacher = create_model("cnn_small", spec.num_classes, spec.in_channels)
    torch.manual_seed(12)
    student = create_model("cnn_tiny", spec.num_classes, spec.in_channels, dropout=0.2)
    task = RecordingTask(teacher, DistillConfig(**fields))
    cfg = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", scheduler="cosine", warmup_epochs=1,
                      weight_decay=5e-4, device="cpu", seed=5)
    train = make_loader(spec, "train", train=True, seed=cfg.seed)
    val = make_loader(spec, "val", train=False)
    result = fit(student, task, train, val, cfg)
    rows = [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]
    return task.step_losses, rows


@pytest.mark.parametrize("name", list(CASES))
def test_first_steps_match_the_recorded_values(name: str) -> None:
    steps, history = run_case(name)
    golden = GOLDEN[name]
    assert steps == pytest.approx(golden["steps"], rel=REL), "per-step total loss"
    assert [sorted(row) for row in history] == [sorted(row) for row in golden["history"]]
    for row, want in zip(history, golden["history"], strict=True):
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=REL), f"epoch {row['epoch']} {key}"


def test_the_golden_check_can_fail() -> None:
    """A one-percent change of one recorded loss is far outside the tolerance."""
    moved = [v * 1.01 for v in GOLDEN["kd"]["steps"]]
    assert moved != pytest.approx(GOLDEN["kd"]["steps"], rel=REL)
