"""The training loop (kdpipe.train) and its tasks (kdpipe.tasks) on tiny synthetic data."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kdpipe.config import DistillConfig, TrainConfig
from kdpipe.train import (
    CHECKPOINT_NAME,
    ClassificationTask,
    DistillationTask,
    TrainingDivergedError,
    TrainingOOMError,
    evaluate,
    fit,
    lr_factor,
    resolve_device,
    seed_everything,
)

NUM_CLASSES = 3


# ------------------------------------------------------------------- fixtures
class TinyNet(nn.Module):
    """Conv + BN (buffers) + dropout (consumes the RNG while training) + linear."""

    def __init__(self, width: int = 4, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width * 16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.features(x)).flatten(1)))


def make_data(n: int = 48, seed: int = 0) -> TensorDataset:
    """A learnable 3-class problem: noisy 8x8 images, the class's band of rows is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    for i, c in enumerate(y.tolist()):
        x[i, :, 3 * c:3 * c + 2] += 1.5
    return TensorDataset(x, y, torch.arange(n))


def loaders(batch_size: int = 16, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(make_data(48), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(make_data(24, seed=1), batch_size=64)
    return train, val


def cpu_cfg(**kw) -> TrainConfig:
    base = {"epochs": 2, "lr": 0.05, "device": "cpu", "seed": 0}
    return TrainConfig(**{**base, **kw})


def new_model(seed: int = 0, **kw) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kw)


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------- device, schedule
def test_resolve_device_cpu_and_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_unavailable_cuda_names_the_fix() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available; use device: auto or cpu"):
        resolve_device("cuda")


def test_lr_factor_warmup_then_cosine() -> None:
    cfg = TrainConfig(epochs=4, warmup_epochs=1, scheduler="cosine")
    steps = 10
    assert lr_factor(cfg, 0, steps) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, steps) == pytest.approx(1.0)
    assert lr_factor(cfg, 10, steps) == pytest.approx(1.0)  # cosine starts at its peak
    assert lr_factor(cfg, 25, steps) == pytest.approx(0.5)  # halfway through 30 cosine steps
    assert 0.0 < lr_factor(cfg, 39, steps) < 0.01


def test_lr_factor_step_milestones_and_none() -> None:
    cfg = TrainConfig(epochs=6, scheduler="step", step_milestones=(2, 4), step_gamma=0.1)
    assert [lr_factor(cfg, e * 5, 5) for e in range(6)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor(TrainConfig(scheduler="none"), 123, 10) == 1.0


# ------------------------------------------------------------------- evaluate
class Identity(nn.Module):
    """Returns its input as logits, so the test chooses every prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_evaluate_known_confusion_loss_and_absent_class() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1, 1, 0])  # class 2 never occurs
    model = Identity().train()
    res = evaluate(model, DataLoader(TensorDataset(logits, y), batch_size=3), "cpu")
    assert res.confusion == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    assert res.accuracy == pytest.approx(0.5, abs=1e-12)
    assert res.loss == pytest.approx(float(F.cross_entropy(logits, y)), abs=1e-6)
    assert res.per_class[:2] == pytest.approx([0.5, 0.5]) and math.isnan(res.per_class[2])
    assert res.num_samples == 4
    assert model.training  # mode restored


def test_evaluate_empty_loader_is_an_error() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty loader"):
        evaluate(Identity(), empty)


# ------------------------------------------------------------------------ fit
def test_fit_learns_records_history_and_restores_best() -> None:
    train, val = loaders()
    seen: list[tuple[int, dict]] = []
    model = new_model()
    res = fit(model, ClassificationTask(), train, val, cpu_cfg(epochs=4, warmup_epochs=1),
              callbacks=[lambda e, m: seen.append((e, m))])
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4]
    assert set(res.history[0]) == {"epoch", "lr", "train_loss", "train_ce", "val_loss",
                                   "val_accuracy", "seconds"}
    assert [e for e, _ in seen] == [1, 2, 3, 4] and seen[-1][1] == res.history[-1]
    assert res.best_val_accuracy == max(r["val_accuracy"] for r in res.history)
    assert res.best_val_accuracy >= 0.9, res.history
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    # The model holds the best epoch's weights.
    assert evaluate(model, val).accuracy == pytest.approx(res.best_val_accuracy, abs=1e-12)
    assert not res.stopped_early and res.resumed_from_epoch == 0


@pytest.mark.parametrize("kw", [
    {"optimizer": "sgd", "scheduler": "step", "step_milestones": (1,), "grad_clip": 0.5},
    {"optimizer": "adamw", "lr": 1e-2, "scheduler": "none", "weight_decay": 0.0},
])
def test_fit_same_seed_same_metrics(kw: dict) -> None:
    runs = []
    for _ in range(2):
        train, val = loaders()
        model = new_model()
        runs.append((fit(model, ClassificationTask(), train, val, cpu_cfg(**kw)), model))
    (a, ma), (b, mb) = runs
    assert without_time(a.history) == without_time(b.history)
    assert_same_weights(ma, mb)


def test_fit_reseeds_a_reused_loader() -> None:
    train, val = loaders()
    a = fit(new_model(), ClassificationTask(), train, val, cpu_cfg())
    b = fit(new_model(), ClassificationTask(), train, val, cpu_cfg())  # generator already used
    assert without_time(a.history) == without_time(b.history)


def test_early_stopping_stops_after_patience() -> None:
    train, val = loaders()
    # A tiny lr cannot change the predictions, so accuracy never improves after epoch 1.
    res = fit(new_model(), ClassificationTask(), train, val,
              cpu_cfg(epochs=6, lr=1e-9, early_stopping_patience=2))
    assert res.stopped_early and len(res.history) == 3 and res.best_epoch == 1


# ---------------------------------------------------------------- checkpoints
class Crash(Exception):
    pass


def crash_after(epoch: int):
    def callback(e: int, _metrics: dict) -> None:
        if e == epoch:
            raise Crash(f"simulated crash after epoch {e}")
    return callback


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_after_crash_reproduces_uninterrupted_run(tmp_path, optimizer: str) -> None:
    cfg = cpu_cfg(epochs=3, optimizer=optimizer, lr=0.02, warmup_epochs=1)
    train, val = loaders()
    full_model = new_model()
    full = fit(full_model, ClassificationTask(), train, val, cfg)

    train, val = loaders()
    with pytest.raises(Crash):
        fit(new_model(), ClassificationTask(), train, val, cfg, checkpoint_dir=tmp_path,
            callbacks=[crash_after(2)])
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert len(ckpt["history"]) == 2

    train, val = loaders()
    resumed_model = new_model(seed=123)  # different init: the checkpoint must overwrite it
    resumed = fit(resumed_model, ClassificationTask(), train, val, cfg, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_epoch == 2
    assert without_time(resumed.history) == without_time(full.history)
    assert (resumed.best_epoch, resumed.best_val_accuracy) == (full.best_epoch, full.best_val_accuracy)
    assert_same_weights(resumed_model, full_model)


def test_resume_with_other_config_starts_fresh_with_warning(tmp_path, caplog) -> None:
    train, val = loaders()
    fit(new_model(), ClassificationTask(), train, val, cpu_cfg(epochs=1), checkpoint_dir=tmp_path)
    train, val = loaders()
    with caplog.at_level(logging.WARNING, logger="kdpipe.checkpoint"):
        res = fit(new_model(), ClassificationTask(), train, val, cpu_cfg(epochs=1, lr=0.01),
                  checkpoint_dir=tmp_path)
    assert res.resumed_from_epoch == 0 and len(res.history) == 1
    assert "different configuration" in caplog.text and "starting from scratch" in caplog.text


def test_finished_checkpoint_resumes_to_the_same_result(tmp_path) -> None:
    train, val = loaders()
    first = fit(new_model(), ClassificationTask(), train, val, cpu_cfg(), checkpoint_dir=tmp_path)
    model = new_model(seed=7)
    again = fit(model, ClassificationTask(), train, val, cpu_cfg(), checkpoint_dir=tmp_path)
    assert again.resumed_from_epoch == 2 and again.history == first.history
    assert evaluate(model, val).accuracy == pytest.approx(first.best_val_accuracy, abs=1e-12)


def test_resume_false_ignores_checkpoint(tmp_path) -> None:
    train, val = loaders()
    fit(new_model(), ClassificationTask(), train, val, cpu_cfg(epochs=1), checkpoint_dir=tmp_path)
    res = fit(new_model(), ClassificationTask(), train, val, cpu_cfg(epochs=1),
              checkpoint_dir=tmp_path, resume=False)
    assert res.resumed_from_epoch == 0


def test_unreadable_checkpoint_names_the_file_and_fix(tmp_path) -> None:
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    train, val = loaders()
    with pytest.raises(RuntimeError, match=r"cannot read checkpoint .*last\.pt.*resume=False"):
        fit(new_model(), ClassificationTask(), train, val, cpu_cfg(), checkpoint_dir=tmp_path)


# ------------------------------------------------------------ failure modes
class NanAt(ClassificationTask):
    """Cross-entropy that turns NaN at one (1-based) epoch and step."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__()
        self.at, self.calls = (epoch, step), {}

    def loss(self, model, x, y, index, epoch):
        self.calls[epoch] = self.calls.get(epoch, 0) + 1
        loss, parts = super().loss(model, x, y, index, epoch)
        return (loss * float("nan"), parts) if (epoch, self.calls[epoch]) == self.at else (loss, parts)


def test_nan_loss_raises_with_epoch_step_and_fix_keeping_last_good_checkpoint(tmp_path) -> None:
    train, val = loaders()
    with pytest.raises(TrainingDivergedError,
                       match=r"teacher: training diverged at epoch 2, step 3 \(loss = nan.*"
                             r"lower the learning rate \(train.lr\) or set train.grad_clip"
                       ) as info:
        fit(new_model(), NanAt(2, 3), train, val, cpu_cfg(epochs=3),
            checkpoint_dir=tmp_path, desc="teacher")
    assert (info.value.epoch, info.value.step) == (2, 3)
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert [r["epoch"] for r in ckpt["history"]] == [1]
    assert not (tmp_path / (CHECKPOINT_NAME + ".tmp")).exists()


@pytest.mark.parametrize(("batch_size", "at"), [(2, (2, 5)), (1, (1, 31))])
def test_divergence_between_read_backs_names_the_exact_step(batch_size: int, at: tuple) -> None:
    """The loss is read back every LOG_INTERVAL steps only, yet the error names the step."""
    from kdpipe.train import LOG_INTERVAL

    train, val = loaders(batch_size=batch_size)
    assert at[1] % LOG_INTERVAL != 0  # not itself a read-back step
    with pytest.raises(TrainingDivergedError, match=rf"at epoch {at[0]}, step {at[1]} \(loss = nan"):
        fit(new_model(), NanAt(*at), train, val, cpu_cfg(epochs=2))


def test_loss_is_read_back_once_per_log_interval(monkeypatch) -> None:
    from kdpipe import loss_meter

    checks = []
    original = loss_meter.LossMeter.check
    monkeypatch.setattr(loss_meter.LossMeter, "check",
                        lambda self: checks.append(self.unchecked) or original(self))
    train, _ = loaders(batch_size=1)  # 48 steps: read back after 25 and after 48
    fit(new_model(), ClassificationTask(), train, None, cpu_cfg(epochs=1))
    assert checks == [loss_meter.LOG_INTERVAL, 48 - loss_meter.LOG_INTERVAL]


def test_loss_above_max_loss_is_divergence() -> None:
    train, val = loaders()
    with pytest.raises(TrainingDivergedError, match=r"epoch 1, step 1 .*max_loss = 0\.001"):
        fit(new_model(), ClassificationTask(), train, val, cpu_cfg(max_loss=1e-3))


class OOMNet(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_suggests_a_smaller_batch() -> None:
    train, val = loaders(batch_size=16)
    with pytest.raises(TrainingOOMError, match=r"batch size 16; lower data.batch_size \(e.g. to 8\)"):
        fit(OOMNet(), ClassificationTask(), train, val, cpu_cfg())


class OldStyleTask(ClassificationTask):
    def prepare(self, model, train_loader, device):  # returns None, as before issue 13
        return None


def test_prepare_must_return_the_module_to_train() -> None:
    train, _ = loaders()
    with pytest.raises(TypeError, match=r"OldStyleTask.prepare\(\) returned NoneType; it must "
                                        r"return the module to train"):
        fit(new_model(), OldStyleTask(), train, None, cpu_cfg(epochs=1))


def test_empty_train_loader_is_an_error() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long),
                                     torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="train split is empty"):
        fit(new_model(), ClassificationTask(), empty, None, cpu_cfg())


# --------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    train, val = loaders()
    model = new_model(width=8, dropout=0.0)
    fit(model, ClassificationTask(), train, val, cpu_cfg(epochs=2))
    return model


def test_cached_and_uncached_teacher_logits_train_identically(teacher) -> None:
    results, tasks = [], []
    for cache in (True, False):
        train, val = loaders()
        task = DistillationTask(teacher, DistillConfig(temperature=4.0, kd_weight=0.7,
                                                       cache_teacher_logits=cache))
        results.append(fit(new_model(), task, train, val, cpu_cfg(epochs=2)))
        tasks.append(task)
    assert tasks[0].caches_logits and not tasks[1].caches_logits
    cached, uncached = results
    for a, b in zip(cached.history, uncached.history, strict=True):
        assert set(a) >= {"train_ce", "train_kd"}
        for key in ("train_loss", "train_ce", "train_kd", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_kd_loss_combines_ce_and_kd_with_kd_weight(teacher) -> None:
    train, _ = loaders()
    task = DistillationTask(teacher, DistillConfig(temperature=2.0, kd_weight=0.25))
    task.prepare(new_model(), train, torch.device("cpu"))
    x, y, index = next(iter(DataLoader(make_data(48), batch_size=8)))
    total, parts = task.loss(new_model().eval(), x, y, index, epoch=1)
    assert all(not p.requires_grad and p.dim() == 0 for p in parts.values())  # detached, on the device
    assert float(total.detach()) == pytest.approx(
        0.75 * float(parts["ce"]) + 0.25 * float(parts["kd"]), abs=1e-6)


@pytest.mark.parametrize("feature_loss", ["none", "fitnet"])
def test_teacher_runs_before_the_student(teacher, feature_loss: str) -> None:
    """The teacher's no-grad forward comes first, so its activations are freed before the
    student's autograd graph exists (less peak memory)."""
    cfg = DistillConfig(cache_teacher_logits=False, feature_loss=feature_loss,
                        student_layer="features", teacher_layer="features")
    task, student, order = DistillationTask(teacher, cfg), new_model(), []
    train, _ = loaders()
    module = task.prepare(student, train, torch.device("cpu"))
    hooks = [m.register_forward_pre_hook(lambda *_, name=name: order.append(name))
             for name, m in (("teacher", teacher), ("student", student))]
    try:
        x, y, index = next(iter(train))
        task.loss(module, x, y, index, epoch=1)
    finally:
        for h in hooks:
            h.remove()
    assert order == ["teacher", "student"]


class ChangingParts(ClassificationTask):
    def loss(self, model, x, y, index, epoch):
        loss, parts = super().loss(model, x, y, index, epoch)
        self.calls = getattr(self, "calls", 0) + 1
        return loss, (parts if self.calls == 1 else {"other": parts["ce"]})


def test_loss_parts_that_change_within_an_epoch_are_an_error() -> None:
    train, _ = loaders()
    with pytest.raises(ValueError, match=r"loss parts changed within an epoch \(\['ce'\] -> \['other'\]\)"):
        fit(new_model(), ChangingParts(), train, None, cpu_cfg(epochs=1))


class NoisyDataset(Dataset):
    """Random noise on every access, but no ``augment`` attribute declaring it."""

    def __init__(self) -> None:
        self.base = make_data(48)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y, index = self.base[i]
        return x + torch.randn_like(x), y, index


def test_undeclared_augmentation_is_caught_by_the_cache_check(teacher) -> None:
    train = DataLoader(NoisyDataset(), batch_size=16, shuffle=True)
    task = DistillationTask(teacher, DistillConfig())
    with pytest.raises(ValueError, match="train loader seems to augment.*cache_teacher_logits: false"):
        fit(new_model(), task, train, None, cpu_cfg(epochs=1))


def test_declared_augmentation_disables_the_cache(teacher) -> None:
    data = NoisyDataset()
    data.augment = True
    task = DistillationTask(teacher, DistillConfig())
    fit(new_model(), task, DataLoader(data, batch_size=16), None, cpu_cfg(epochs=1))
    assert not task.caches_logits


def test_bad_index_column_is_an_error(teacher) -> None:
    ds = make_data(48)
    bad = TensorDataset(ds.tensors[0], ds.tensors[1], ds.tensors[2] + 100)
    with pytest.raises(ValueError, match="index column holds 100..115 but the split has 48 samples; `index` must be the position"):
        DistillationTask(teacher, DistillConfig()).prepare(
            new_model(), DataLoader(bad, batch_size=16), torch.device("cpu"))


def test_dkd_warmup_scales_the_dkd_term(teacher) -> None:
    train, _ = loaders()
    task = DistillationTask(teacher, DistillConfig(loss="dkd", dkd_warmup_epochs=4))
    task.prepare(new_model(), train, torch.device("cpu"))
    x, y, index = next(iter(DataLoader(make_data(48), batch_size=8)))
    student = new_model().eval()
    for epoch, warm in ((1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)):
        total, parts = task.loss(student, x, y, index, epoch)
        assert set(parts) == {"ce", "dkd"}
        assert float(total.detach()) == pytest.approx(
            float(parts["ce"]) + warm * float(parts["dkd"]), abs=1e-5)


@pytest.mark.parametrize("feature_loss", ["fitnet", "attention"])
def test_feature_losses_train_and_report_feat(tmp_path, teacher, feature_loss: str) -> None:
    cfg = DistillConfig(feature_loss=feature_loss, feature_weight=0.5,
                        student_layer="features", teacher_layer="features")
    task = DistillationTask(teacher, cfg)
    train, val = loaders()
    student = new_model()
    res = fit(student, task, train, val, cpu_cfg(epochs=1), checkpoint_dir=tmp_path)
    assert not task.caches_logits  # the teacher must run every step for its features
    assert res.history[0]["train_feat"] > 0.0
    # fit returns the bare student: no head weights, no hooks left behind.
    assert set(student.state_dict()) == set(new_model().state_dict())
    assert not student.features._forward_hooks and not teacher.features._forward_hooks
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["model"]
    if feature_loss == "fitnet":
        # The regressor (4 -> 8 channels) trains inside one module with the student: the
        # optimiser stepped it and the checkpoint holds it next to the student.
        conv = task.head.regressor.conv.weight
        assert conv.shape == (8, 4, 1, 1) and conv.grad is not None
        assert torch.equal(saved["head.regressor.conv.weight"], conv.detach())
        assert {k for k in saved if k.startswith("head.")} == {
            f"head.regressor.{k}" for k in task.head.regressor.state_dict()}
    else:
        assert list(task.head.parameters()) == []
        assert not any(k.startswith("head.") for k in saved)
    assert {k.removeprefix("student.") for k in saved} >= set(student.state_dict())


def test_student_with_hint_names_a_wrong_layer(teacher) -> None:
    cfg = DistillConfig(feature_loss="attention", student_layer="featurez", teacher_layer="features")
    train, _ = loaders()
    with pytest.raises(ValueError, match=r"TinyNet has no module 'featurez'; nearby valid paths: features"):
        DistillationTask(teacher, cfg).prepare(new_model(), train, torch.device("cpu"))


def test_unknown_loss_names_list_the_registered_ones(teacher) -> None:
    with pytest.raises(KeyError, match=r"unknown logit loss 'kld'; valid names: dkd, kd"):
        DistillationTask(teacher, DistillConfig(loss="kld"))
    with pytest.raises(KeyError, match=r"unknown feature loss 'hint'; valid names: attention, fitnet, none"):
        DistillationTask(teacher, DistillConfig(feature_loss="hint", student_layer="features",
                                                teacher_layer="features"))


def test_fitnet_resume_restores_the_regressor(tmp_path, teacher) -> None:
    cfg = DistillConfig(feature_loss="fitnet", student_layer="features", teacher_layer="features")
    train, val = loaders()
    full_task, full_model = DistillationTask(teacher, cfg), new_model()
    full = fit(full_model, full_task, train, val, cpu_cfg(epochs=2))
    train, val = loaders()
    with pytest.raises(Crash):
        fit(new_model(), DistillationTask(teacher, cfg), train, val, cpu_cfg(epochs=2),
            checkpoint_dir=tmp_path, callbacks=[crash_after(1)])
    train, val = loaders()
    task, model = DistillationTask(teacher, cfg), new_model(seed=3)
    resumed = fit(model, task, train, val, cpu_cfg(epochs=2), checkpoint_dir=tmp_path)
    assert resumed.resumed_from_epoch == 1
    assert without_time(resumed.history) == without_time(full.history)
    assert_same_weights(task.head, full_task.head)
    assert_same_weights(model, full_model)


def test_seed_everything_repeats_all_generators() -> None:
    import random

    import numpy as np

    draws = []
    for _ in range(2):
        seed_everything(5)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
    assert draws[0] == draws[1]


def test_multi_process_fit_needs_a_process_group_of_that_size() -> None:
    from kdpipe.config import TrainConfig
    from kdpipe.train import ClassificationTask, fit

    x = torch.randn(8, 1, 8, 8)
    y = torch.arange(8) % 2
    data = torch.utils.data.TensorDataset(x, y, torch.arange(8))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    # fit() never launches workers itself (the recipes do, through kdpipe.launch).
    with pytest.raises(RuntimeError, match=r"num_processes=2 needs a torch.distributed process "
                                           r"group.*kdpipe.recipes.*or set num_processes: 1"):
        fit(model, ClassificationTask(), loader, loader, TrainConfig(epochs=1, num_processes=2))
