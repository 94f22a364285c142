"""What a run ran on: versions, devices, world size, git commit, command line (`env.json`)."""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
import sys
from typing import Optional

import torch

import fasttrain


def git_commit() -> Optional[str]:
    """HEAD of the checkout in the current folder (+dirty with uncommitted changes), or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _version(*distributions: str) -> Optional[str]:
    """The installed version of the first of these packages, read from its metadata: importing
    torchvision or DALI only to ask would cost seconds of startup."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's (the processor, where the platform tells it)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def describe(device: torch.device, world_size: int, backend: str) -> dict:
    """env.json of a run; the benchmarks' environment is this too (benchmarks.report.environment)."""
    cuda = device.type == "cuda"
    return {
        "fasttrain": fasttrain.__version__,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "dali": _version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": str(device),
        "device_name": device_name(device),
        "world_size": world_size,
        "backend": backend,
        "hostname": socket.gethostname(),
        "git_commit": git_commit(),
        "command": sys.argv,
    }
