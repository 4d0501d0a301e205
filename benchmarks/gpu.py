"""GPU distillation throughput at CIFAR size: fp32 vs AMP bf16 vs AMP bf16 + channels_last.

One training step = teacher forward (eval, no grad) + student forward + KD loss +
student backward + SGD step, on a synthetic batch (batch 256, 3x32x32, 100 classes)
that already lives on the device: this measures the compute of the distillation step,
not data loading. Pairs (teacher → student): resnet56 → resnet20 and
resnet32x4 → resnet8x4, kdpipe's own CIFAR ResNets.

Achieved TFLOP/s counts 2 FLOPs per multiply-accumulate of the convolutions and linear
layers (counted with forward hooks), with training ≈ 3x the forward MACs for the student
(forward + backward for activations and weights) and 1x for the teacher's forward.

Correctness, before anything is timed:

* every mode's loss is finite;
* the device's fp32 result matches the CPU on a small batch (same weights, TF32 off for
  the check): teacher and student logits, the KD loss and the student's gradients,
  within an explicit tolerance;
* the bf16 AMP loss is within a loose tolerance of the fp32 loss.

Dependencies: torch only (torchvision, onnx, onnxruntime are not needed), so it runs on
a GPU machine without zenml, mlflow or pydantic. It imports ``kdpipe.models`` and
``kdpipe.losses`` straight from this checkout's ``src/`` (a sys.path entry: acceptable
in a standalone benchmark script, never in the package), and fails if they started
pulling in one of those packages.

    python benchmarks/gpu.py                          # CUDA; JSON to $OUT/gpu.json or benchmarks/results/gpu.json
    python benchmarks/gpu.py --device cpu --quick     # a smoke test of the script on a CPU
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "src"))  # kdpipe from this checkout, not installed

from common import RESULTS_DIR, envelope, write_json  # noqa: E402

from kdpipe.losses import kd_loss  # noqa: E402
from kdpipe.models import create_model  # noqa: E402

_FORBIDDEN = ("zenml", "mlflow", "pydantic")
_leaked = sorted({m.split(".")[0] for m in sys.modules} & set(_FORBIDDEN))
if _leaked:
    raise ImportError(f"kdpipe.models / kdpipe.losses now import {_leaked}; gpu.py must run on a "
                      "machine without them: keep those imports lazy in src/kdpipe")

NAME = "gpu"
PAIRS = (("resnet56", "resnet20"), ("resnet32x4", "resnet8x4"))
MODES = ("fp32", "amp_bf16", "amp_bf16_channels_last")
NUM_CLASSES, SHAPE = 100, (3, 32, 32)
TEMPERATURE, KD_WEIGHT = 4.0, 0.9
# Device vs CPU in fp32 (TF32 off): different kernels sum in different orders.
LOGITS_ATOL, LOSS_RTOL, GRAD_RTOL = 1e-3, 1e-4, 1e-3
AMP_LOSS_RTOL = 5e-2  # bf16 keeps ~3 significant digits


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--quick`` shrinks everything to a smoke test."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per mode")
    p.add_argument("--steps", type=int, default=50, help="timed steps per mode")
    p.add_argument("--check-batch", type=int, default=16, help="batch of the device-vs-CPU check")
    p.add_argument("--quick", action="store_true", help="batch 8, 1 warm-up + 2 timed steps")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default: $OUT/gpu.json if $OUT is set, else benchmarks/results/gpu.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.warmup, args.steps, args.check_batch = 8, 1, 2, 4
    if args.out is None:
        args.out = Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else RESULTS_DIR / "gpu.json"
    return args


# ------------------------------------------------------------------------- MACs
def count_forward_macs(model: nn.Module, shape: Sequence[int]) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one sample (forward hooks).

    Dependency-free stand-in for kdpipe.metrics.count_macs (Torch-Pruning), which also
    counts BN / pooling elements; the convolutions and linear layers are the FLOPs that
    matter for TFLOP/s.
    """
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += out[0].numel() * k

    def linear_hook(m: nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * m.in_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total


# ------------------------------------------------------------------ one step
def autocast_for(mode: str, device: torch.device) -> Any:
    """bf16 autocast for the AMP modes, nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if mode.startswith("amp") else nullcontext()


def train_step(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, mode: str) -> torch.Tensor:
    """One distillation step; returns the (detached) loss without a host sync."""
    with autocast_for(mode, x.device):
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
    # The loss in fp32: softmax with T = 4 over 100 classes is where bf16 would hurt.
    loss = kd_loss(s_logits.float(), t_logits.float(), y, TEMPERATURE, KD_WEIGHT)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def make_pair(teacher_arch: str, student_arch: str) -> tuple[nn.Module, nn.Module]:
    """Teacher (eval, frozen) and student (train) with seeded weights, on the CPU."""
    torch.manual_seed(0)
    teacher = create_model(teacher_arch, NUM_CLASSES, SHAPE[0]).eval().requires_grad_(False)
    student = create_model(student_arch, NUM_CLASSES, SHAPE[0]).train()
    return teacher, student


def synthetic_batch(batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking images and labels, generated on the CPU (same values on any device)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *SHAPE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return x.to(device), y.to(device)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------- checks
def _fp32_pass(teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    t_logits = teacher(x)
    s_logits = student(x)
    loss = kd_loss(s_logits, t_logits, y, TEMPERATURE, KD_WEIGHT)["loss"]
    student.zero_grad(set_to_none=True)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in student.parameters()])
    return {"t": t_logits.detach().cpu(), "s": s_logits.detach().cpu(), "loss": float(loss.detach()), "grads": grads.cpu()}


def check_against_cpu(teacher_arch: str, student_arch: str, device: torch.device, batch: int) -> dict[str, Any]:
    """fp32 on ``device`` vs fp32 on the CPU, same weights and batch (TF32 off)."""
    teacher, student = make_pair(teacher_arch, student_arch)
    x, y = synthetic_batch(batch, torch.device("cpu"), seed=1)
    ref = _fp32_pass(teacher, student, x, y)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        got = _fp32_pass(copy.deepcopy(teacher).to(device), copy.deepcopy(student).to(device),
                         x.to(device), y.to(device))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    scale = max(1.0, float(ref["s"].abs().max()), float(ref["t"].abs().max()))
    diff = {
        "teacher_logits_max_abs": float((got["t"] - ref["t"]).abs().max()),
        "student_logits_max_abs": float((got["s"] - ref["s"]).abs().max()),
        "loss_rel": abs(got["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12),
        "grad_rel": float((got["grads"] - ref["grads"]).norm() / ref["grads"].norm().clamp_min(1e-12)),
    }
    passed = (diff["teacher_logits_max_abs"] <= LOGITS_ATOL * scale
              and diff["student_logits_max_abs"] <= LOGITS_ATOL * scale
              and diff["loss_rel"] <= LOSS_RTOL and diff["grad_rel"] <= GRAD_RTOL)
    return {**diff, "cpu_loss": ref["loss"], "device_loss": got["loss"], "passed": passed,
            "tolerances": {"logits_atol_x_scale": LOGITS_ATOL, "scale": scale, "loss_rtol": LOSS_RTOL,
                           "grad_rtol": GRAD_RTOL}}


def check_amp_loss(teacher_arch: str, student_arch: str, device: torch.device, batch: int) -> dict[str, Any]:
    """The bf16-autocast KD loss against the fp32 one on the same batch and weights."""
    teacher, student = make_pair(teacher_arch, student_arch)
    teacher, student = teacher.to(device), student.to(device)
    x, y = synthetic_batch(batch, device, seed=2)
    losses = {}
    for mode in ("fp32", "amp_bf16"):
        with torch.no_grad(), autocast_for(mode, device):
            s, t = student(x), teacher(x)
        losses[mode] = float(kd_loss(s.float(), t.float(), y, TEMPERATURE, KD_WEIGHT)["loss"])
    rel = abs(losses["amp_bf16"] - losses["fp32"]) / max(abs(losses["fp32"]), 1e-12)
    return {"fp32_loss": losses["fp32"], "bf16_loss": losses["amp_bf16"], "rel": rel,
            "rtol": AMP_LOSS_RTOL, "passed": rel <= AMP_LOSS_RTOL}


# --------------------------------------------------------------------- timing
def time_mode(teacher_arch: str, student_arch: str, mode: str, device: torch.device,
              args: argparse.Namespace, flops_per_image: float) -> dict[str, Any]:
    """Images/s and achieved TFLOP/s of ``args.steps`` training steps in one mode."""
    teacher, student = make_pair(teacher_arch, student_arch)
    teacher, student = teacher.to(device), student.to(device)
    x, y = synthetic_batch(args.batch_size, device)
    if mode.endswith("channels_last"):
        teacher = teacher.to(memory_format=torch.channels_last)
        student = student.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        train_step(student, teacher, optimizer, x, y, mode)
    sync(device)
    start = time.perf_counter()
    losses = [train_step(student, teacher, optimizer, x, y, mode) for _ in range(args.steps)]
    sync(device)
    seconds = time.perf_counter() - start
    loss_values = torch.stack(losses).float().cpu()
    images_per_s = args.steps * args.batch_size / seconds
    row = {"mode": mode, "images_per_s": images_per_s, "ms_per_step": seconds / args.steps * 1e3,
           "tflops": images_per_s * flops_per_image / 1e12,
           "first_loss": float(loss_values[0]), "last_loss": float(loss_values[-1]),
           "loss_finite": bool(torch.isfinite(loss_values).all())}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"  {teacher_arch}->{student_arch} {mode:24s} {images_per_s:10.0f} img/s "
          f"{row['tflops']:7.2f} TFLOP/s  loss {row['last_loss']:.3f}", flush=True)
    return row


def bench_pair(teacher_arch: str, student_arch: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Checks, then every mode, for one teacher → student pair."""
    teacher, student = make_pair(teacher_arch, student_arch)
    t_macs, s_macs = count_forward_macs(teacher, SHAPE), count_forward_macs(student, SHAPE)
    flops_per_image = 2.0 * (3 * s_macs + t_macs)
    checks = {"device_vs_cpu_fp32": check_against_cpu(teacher_arch, student_arch, device, args.check_batch),
              "amp_bf16_vs_fp32": check_amp_loss(teacher_arch, student_arch, device, args.check_batch)}
    rows = [time_mode(teacher_arch, student_arch, mode, device, args, flops_per_image) for mode in MODES]
    fp32 = rows[0]["images_per_s"]
    for row in rows:
        row["speedup_vs_fp32"] = row["images_per_s"] / fp32
    checks["all_losses_finite"] = all(r["loss_finite"] for r in rows)
    passed = checks["all_losses_finite"] and all(c["passed"] for c in checks.values() if isinstance(c, dict))
    return {"teacher": teacher_arch, "student": student_arch,
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_params": sum(p.numel() for p in student.parameters()),
            "teacher_macs": t_macs, "student_macs": s_macs, "flops_per_train_image": flops_per_image,
            "checks": checks, "checks_passed": passed, "modes": rows}


def device_info(device: torch.device) -> dict[str, Any]:
    """What ran it: the card, CUDA, cuDNN, and the TF32 settings fp32 ran with."""
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every pair; write the JSON result (also when a check fails) and return it."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("CUDA is not available here; run on a GPU machine or pass --device cpu --quick")
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    start = time.perf_counter()
    pairs = [bench_pair(t, s, device, args) for t, s in PAIRS]
    results = {"device": device_info(device), "pairs": pairs,
               "checks_passed": all(p["checks_passed"] for p in pairs),
               "total_seconds": time.perf_counter() - start}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings.update(num_classes=NUM_CLASSES, input_shape=list(SHAPE), temperature=TEMPERATURE,
                    kd_weight=KD_WEIGHT, optimizer="sgd lr 0.05 momentum 0.9 wd 5e-4", data="synthetic, on device")
    doc = envelope(NAME, settings, results)
    write_json(args.out, doc)
    print(f"checks passed: {results['checks_passed']}; wrote {args.out}")
    if not results["checks_passed"]:
        raise SystemExit("a correctness check failed (see 'checks' in the JSON)")
    return doc


if __name__ == "__main__":
    main()
