"""The GPU check's profile section (issue 24): which side binds a training step, measured on the device.

The captured fast recipe and its eager compiled rung each run fasttrain's real epoch loop (benchmarks.epoch_loop)
past their compilation and warm-up, then >= 20 steps under torch.profiler with CUDA activity: the device's busy
fraction (kernel time over the wall time of the window: a host-bound step leaves the GPU idle between
launches; a GPU-bound one keeps it near 100%), kernel time and kernels per step, the ten kernels that take
the most time, and the host's CPU time per step (the training thread's). Verdict: host-bound when the GPU is
busy less than 85% of the time. Beside it, the bandwidth roofline: the activation bytes a training image moves
(`activation_bytes`, counted on the model) against the card's memory bandwidth. Each window's trace is kept
(DIR/profile-<name>.json, for Perfetto or chrome://tracing). On the CPU (--smoke) the device figures are
"CUDA only" and the plumbing, the host figures and the roofline arithmetic still run.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from benchmarks.gpu_check.plan import FAST, REPO, Plan

HOST_BOUND_BELOW = 0.85  # GPU busy fraction under which the step is host-bound
STEPS, SMOKE_STEPS = 20, 6
# published peak memory bandwidth (TB/s) by the name torch reports, most specific first
BANDWIDTH_TB_S: List[Tuple[str, float]] = [("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100-SXM4-80GB", 2.04),
                                          ("A100", 1.555), ("L40S", 0.864), ("A10G", 0.6), ("V100", 0.9)]
# a training step moves about 3x the forward's activation bytes: the forward writes each layer's output and
# reads its input; the backward reads the saved input and the output's gradient and writes the input's
BACKWARD_FACTOR = 3


def activation_bytes(model: nn.Module, input_shape: Tuple[int, ...], element_bytes: int) -> Dict[str, float]:
    """Per image: the bytes the forward pass's leaf modules read (their inputs) and write (their outputs),
    counted from the tensors' sizes on a batch of 2 (eval mode, no update), and a training step's estimate
    (x BACKWARD_FACTOR). Weights are left out: they are read once per batch, not per image."""
    counted = {"read": 0, "written": 0}

    def hook(module, inputs, output):
        counted["read"] += sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        counted["written"] += sum(t.numel() for t in outputs if isinstance(t, torch.Tensor))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros((2, *input_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    forward = (counted["read"] + counted["written"]) / 2 * element_bytes
    return {"forward_bytes": forward, "training_bytes": BACKWARD_FACTOR * forward}


def bandwidth_tb_s(device_name: str) -> Optional[float]:
    return next((tb for name, tb in BANDWIDTH_TB_S if name in device_name), None)


def roofline_images_per_sec(bytes_per_image: float, tb_per_s: Optional[float]) -> Optional[float]:
    """Images/s if every step moved its activation bytes at the card's peak bandwidth and did nothing else."""
    return tb_per_s * 1e12 / bytes_per_image if tb_per_s and bytes_per_image > 0 else None


def _window(plan: Plan, ctx, name: str, switches: List[str], steps: int) -> dict:
    from benchmarks.epoch_loop import TrainerLoop
    from fasttrain.config import load_config
    from fasttrain.observe.logs import silent_logger
    from fasttrain.train.build import build_parts
    from fasttrain.train.loop import synchronize

    size = ["data.train_size=512", "data.val_size=64"] if plan.smoke else ["train.batch_size=1024"]
    cfg = load_config(str(REPO / FAST), [*plan.data(20480, 2048), *plan.tiny(), *size, *switches, "train.log_every=10",
                                         f"output.dir={plan.out / ('profile-' + name)}", "output.overwrite=true"])
    torch._dynamo.reset()
    parts = build_parts(cfg, ctx, silent_logger())
    loop = TrainerLoop(parts, cfg.train.log_every, ctx.backend, lambda record: None)
    loop.run(max_batches=min(10, len(parts.train_loader)))  # compilation, warm-up, capture: before the window
    on_cuda = ctx.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    synchronize(ctx.device)  # host sync: the window starts with an idle device
    with torch.profiler.profile(activities=activities) as prof:
        wall, host = time.perf_counter(), time.thread_time()
        done = loop.run(max_batches=steps).timed_steps
        synchronize(ctx.device)  # host sync: the window ends when the device's work does
        wall, host = time.perf_counter() - wall, time.thread_time() - host
    trace = plan.out / f"profile-{name}.json"
    prof.export_chrome_trace(str(trace))
    found = {"steps": done, "batch_size": cfg.train.batch_size, "wall_ms_per_step": round(1e3 * wall / done, 3),
             "host_cpu_ms_per_step": round(1e3 * host / done, 3), "trace": str(trace)}
    if not on_cuda:
        return {**found, "device": "CUDA only: no device activity to profile here"}
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.self_device_time_total for e in kernels)
    busy = kernel_us / (1e6 * wall)
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:10]
    return {**found, "gpu_busy_fraction": round(busy, 3), "kernel_ms_per_step": round(kernel_us / 1e3 / done, 3),
            "kernels_per_step": round(sum(e.count for e in kernels) / done, 1),
            "top_kernels": [{"name": e.key[:120], "ms_per_step": round(e.self_device_time_total / 1e3 / done, 4),
                             "calls_per_step": round(e.count / done, 2)} for e in top],
            "verdict": ("host-bound" if busy < HOST_BOUND_BELOW else "GPU-bound") + f": the GPU is busy {100 * busy:.0f}% "
                       f"of the window (host-bound below {100 * HOST_BOUND_BELOW:.0f}%)"}


def device_profile(plan: Plan, deadline: float) -> dict:
    from fasttrain import dist
    from fasttrain.config import ModelConfig
    from fasttrain.models import build_model

    steps = SMOKE_STEPS if plan.smoke else STEPS
    ctx = dist.setup(plan.device)
    result: dict = {}
    try:
        for name, switches in (("captured", []), ("eager-compiled", ["train.capture=false"])):
            if time.monotonic() > deadline:
                result[name] = "skipped: the section's budget is spent"
                continue
            result[name] = _window(plan, ctx, name, switches, steps)
    finally:
        dist.teardown()  # the next section sets up its own
    # the roofline of the fast recipe's model (CIFAR10_CNN, bf16 activations) on this card
    model = build_model(ModelConfig(name="CIFAR10_CNN"), 3, 32, 10)
    traffic = activation_bytes(model, (3, 32, 32), element_bytes=2)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not plan.smoke else "cpu"
    tb_s = bandwidth_tb_s(name)
    roofline = roofline_images_per_sec(traffic["training_bytes"], tb_s)
    captured = result.get("captured") if isinstance(result.get("captured"), dict) else {}
    measured = (1e3 * captured["batch_size"] / captured["wall_ms_per_step"]) if captured.get("wall_ms_per_step") else None
    result["roofline"] = {"model": "CIFAR10_CNN", "activation_bytes_per_training_image": round(traffic["training_bytes"]),
                          "card": name, "bandwidth_tb_s": tb_s,
                          "roofline_images_per_sec": round(roofline) if roofline else "n/a (no known bandwidth)",
                          "captured_images_per_sec": round(measured) if measured else None}
    windows = [result[n] for n in ("captured", "eager-compiled") if isinstance(result[n], dict)]
    return {"ok": bool(windows) and all(w["steps"] > 0 for w in windows), **result}
