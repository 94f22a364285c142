"""The launcher's request checked against the machine and the config, before any process group.

`accelerate launch` only starts the processes here (its GPU launcher is torchrun): fasttrain picks the
device, wraps DDP and applies precision and compile itself. What accelerate was asked for and fasttrain
does not do would pass silently - eight CPU processes training at chance on a machine without GPUs, or
fp32 where the accelerate config says bf16 - so a mismatch stops the run with one line that says how to
fix it. The same goes for more processes on a node than it has GPUs, whichever launcher started them.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import torch

from fasttrain.errors import ConfigError, UserError

_TRUE = ("y", "yes", "t", "true", "on", "1")  # accelerate's str_to_bool
# accelerate's GPU launchers (MULTI_GPU, FSDP, Megatron-LM, DeepSpeed) run the processes under torchrun;
# its simple launcher (one process, or --cpu) does not, and always sets ACCELERATE_USE_CPU
_GPU_KINDS = (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_MEGATRON_LM", "MEGATRON_LM"),
              ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED"))


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in _TRUE


def accelerate_gpu_launch(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """accelerate's distributed type ('MULTI_GPU', 'FSDP', ...) when its GPU launcher started this
    process, else None (not accelerate, its simple launcher, or ACCELERATE_USE_CPU=true)."""
    by_accelerate = "ACCELERATE_MIXED_PRECISION" in environ or "ACCELERATE_DYNAMO_BACKEND" in environ
    under_torchrun = "TORCHELASTIC_RUN_ID" in environ or "LOCAL_WORLD_SIZE" in environ
    if not (by_accelerate and under_torchrun) or _flag(environ, "ACCELERATE_USE_CPU"):
        return None
    return next((kind for name, kind in _GPU_KINDS if _flag(environ, name)), "MULTI_GPU")


def _local_processes(environ: Mapping[str, str]) -> Optional[int]:
    """Processes on this node as torchrun (and accelerate through it) says, else None."""
    if "LOCAL_WORLD_SIZE" not in environ:
        return None
    try:
        return int(environ["LOCAL_WORLD_SIZE"])
    except ValueError:
        raise UserError(f"environment variable LOCAL_WORLD_SIZE={environ['LOCAL_WORLD_SIZE']!r} is not an "
                        f"integer") from None


def check_accelerate_settings(precision: Optional[str], compile_mode: Optional[str],
                              environ: Mapping[str, str] = os.environ) -> None:
    """accelerate's mixed_precision and dynamo_backend reach the processes as environment variables that
    fasttrain does not apply: either they agree with train.precision / train.compile or the run stops.
    None (the caller did not say) agrees with nothing but accelerate's defaults ('no', 'NO')."""
    mixed = environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if mixed not in ("", "no") and mixed != precision:
        to = f"train.precision={mixed}" if mixed in ("bf16", "fp16") else "train.precision (fp32 | bf16 | fp16)"
        raise ConfigError(f"accelerate's mixed_precision={mixed} (ACCELERATE_MIXED_PRECISION) is not applied by "
                          f"fasttrain" + (f", which trains in train.precision={precision}" if precision else "")
                          + f": keep mixed_precision 'no' in the accelerate config (or --mixed_precision no) and set "
                          f"{to} instead")
    backend = environ.get("ACCELERATE_DYNAMO_BACKEND", "NO").strip().upper()
    compiled = compile_mode is not None and compile_mode != "off"
    if backend not in ("", "NO") and not (backend == "INDUCTOR" and compiled):
        raise ConfigError(f"accelerate's dynamo_backend={backend} (ACCELERATE_DYNAMO_BACKEND) is not applied by "
                          f"fasttrain" + (f", which runs with train.compile={compile_mode}" if compile_mode else "")
                          + ": keep dynamo_backend 'NO' in the accelerate config (or --dynamo_backend no) and set "
                          "train.compile=default (inductor) instead")


def check_devices(device_name: str, environ: Mapping[str, str] = os.environ) -> None:
    """The launcher's processes against this machine's GPUs: an accelerate launch for GPUs needs CUDA
    and a GPU device; one for the CPU a CPU device; no launcher may start more processes per node
    than there are GPUs to give them. torchrun on a CPU machine (gloo) is fine with any count."""
    local = _local_processes(environ)
    processes = f"{local} processes on this node" if local is not None else "processes"
    has_cuda = torch.cuda.is_available()
    gpu_launch = accelerate_gpu_launch(environ)
    if gpu_launch and not has_cuda:
        raise ConfigError(f"launched by accelerate for GPUs ({gpu_launch}, {processes}) but this machine has no "
                          f"CUDA GPU: on the CPU launch with torchrun --standalone --nproc_per_node=N -m fasttrain.run "
                          f"... (or accelerate launch --cpu, one process; export ACCELERATE_USE_CPU=true to run this "
                          f"launch on the CPU anyway)")
    if gpu_launch and device_name == "cpu":
        raise ConfigError(f"launched by accelerate for GPUs ({gpu_launch}, {processes}) but train.device=cpu: use "
                          f"train.device=auto (each process takes cuda:LOCAL_RANK), or export ACCELERATE_USE_CPU=true "
                          f"to run this launch on the CPU")
    wants_cuda = device_name.startswith("cuda") or (device_name == "auto" and has_cuda)
    if _flag(environ, "ACCELERATE_USE_CPU") and "ACCELERATE_MIXED_PRECISION" in environ and wants_cuda:
        raise ConfigError(f"launched by accelerate for the CPU (--cpu / use_cpu, ACCELERATE_USE_CPU) but "
                          f"train.device={device_name} trains on CUDA: set train.device=cpu, or launch without --cpu")
    # cuda:N under several processes has its own error in dist.pick_device
    if wants_cuda and device_name in ("auto", "cuda") and local is not None and local > torch.cuda.device_count():
        raise ConfigError(f"{local} processes were launched on this node but it has {torch.cuda.device_count()} CUDA "
                          f"GPU(s) and train.device={device_name} gives each process one: launch at most "
                          f"{torch.cuda.device_count()} per node (torchrun --nproc_per_node, accelerate --num_processes), "
                          f"or train on the CPU with train.device=cpu")


def check_launch(device_name: str, precision: Optional[str] = None, compile_mode: Optional[str] = None,
                 environ: Mapping[str, str] = os.environ) -> None:
    """Every check above; called by dist.setup before it picks the device or joins a group."""
    check_devices(device_name, environ)
    check_accelerate_settings(precision, compile_mode, environ)
