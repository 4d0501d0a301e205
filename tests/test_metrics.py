"""Metrics: hand-checked counts, nan for empty classes, MACs/params/size of known layers."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kdpipe.metrics import (
    accuracy,
    confusion_matrix,
    count_macs,
    count_params,
    latency_stats,
    per_class_accuracy,
    serialized_size_bytes,
)


def test_accuracy_from_logits_and_from_predictions():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [9.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 0, 1])
    assert accuracy(logits, targets) == pytest.approx(0.5, abs=1e-12)
    assert accuracy(np.array([0, 1, 2, 0]), [0, 1, 2, 2]) == pytest.approx(0.75, abs=1e-12)


def test_accuracy_errors():
    with pytest.raises(ValueError, match="empty batch"):
        accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must have shape \(3,\).*got \(2,\)"):
        accuracy(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))


def test_confusion_matrix_rows_are_true_classes():
    preds = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    targets = torch.tensor([0, 1, 2, 2, 2, 0, 0])
    cm = confusion_matrix(preds, targets, num_classes=4)
    expected = torch.tensor([[2, 0, 1, 0], [0, 1, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]])
    assert cm.dtype == torch.int64
    assert torch.equal(cm, expected)
    assert cm.sum().item() == 7


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"targets hold labels outside \[0, 3\): min 0, max 3"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), num_classes=3)


def test_per_class_accuracy_with_empty_class_is_nan():
    cm = torch.tensor([[2, 0, 1, 0], [0, 1, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]])
    acc = per_class_accuracy(cm)
    assert acc.dtype == torch.float64
    assert acc[:3].tolist() == pytest.approx([2 / 3, 1.0, 2 / 3], abs=1e-12)
    assert math.isnan(acc[3].item())
    assert torch.nanmean(acc).item() == pytest.approx((2 / 3 + 1 + 2 / 3) / 3, abs=1e-12)
    # ndarray input works too
    assert per_class_accuracy(cm.numpy())[1].item() == pytest.approx(1.0, abs=1e-12)


def test_count_params_and_macs_for_known_layers():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),  # 36 params, 36 * 8 * 8 = 2304 MACs
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),  # 2570 params, 2560 MACs + 10 bias adds
    )
    assert count_params(model) == 36 + 2570
    model[0].weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 2570
    assert count_macs(model, (1, 8, 8)) == 2304 + 2560 + 10
    assert model.training  # the count works on a copy; our model's mode is untouched


def test_count_macs_rejects_batched_shape():
    with pytest.raises(ValueError, match=r"input_shape must be \(C, H, W\); got \(1, 1, 8, 8\)"):
        count_macs(nn.Conv2d(1, 1, 3), (1, 1, 8, 8))


def test_serialized_size_matches_safetensors_file(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    size = serialized_size_bytes(model)
    assert size == path.stat().st_size
    payload = 4 * (36 + 4 + 4 * 4) + 8  # float32 tensors + the int64 num_batches_tracked
    assert payload < size < payload + 1024  # plus a small JSON header


def test_latency_stats_times_each_call_with_the_clock(monkeypatch):
    """A fake clock that only the timed function advances: exact, race-free percentiles."""
    from kdpipe import metrics

    clock = [100.0]  # seconds
    durations_ms = iter([500.0, 3, 1, 4, 1, 5, 9, 2, 6, 5, 3])  # the first is the warm-up call

    def call():
        clock[0] += next(durations_ms) / 1e3

    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    stats = latency_stats(call, repeats=10, warmup=1)
    assert set(stats) == {"p50_ms", "p95_ms", "mean_ms"}
    # Sorted: 1 1 2 3 3 4 5 5 6 9 (the 500 ms warm-up is not timed). Linear interpolation:
    # p50 between the 5th and 6th = 3.5; p95 at rank 0.95 * 9 = 8.55: 6 + 0.55 * 3 = 7.65.
    assert stats["p50_ms"] == pytest.approx(3.5, abs=1e-6)
    assert stats["p95_ms"] == pytest.approx(7.65, abs=1e-6)
    assert stats["mean_ms"] == pytest.approx(3.9, abs=1e-6)
    assert next(durations_ms, None) is None  # exactly warm-up + repeats calls


def test_latency_stats_counts_calls_and_synchronizes():
    calls: list[str] = []
    latency_stats(
        lambda: calls.append("f"), repeats=4, warmup=2, synchronize=lambda: calls.append("s")
    )
    assert calls.count("f") == 6
    assert calls[-2:] == ["f", "s"]
    with pytest.raises(ValueError, match="need repeats >= 1"):
        latency_stats(lambda: None, repeats=0)
