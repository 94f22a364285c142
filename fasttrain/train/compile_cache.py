"""Compile once per machine: where torch.compile keeps what it compiled (train.compile_cache), how much
of a run's compilation came from there, and what else torch.compile counted (graphs, skipped CUDA graphs).

Inductor keeps its compiled graphs (FX graph cache) and AOTAutograd its forward/backward graphs in one
folder, keyed by the graph, the input shapes and the versions of torch and the compilers: a second run of
the same config on the same machine loads them instead of generating and building kernels again, and only
pays Dynamo's tracing and the warm-up steps. '' leaves PyTorch's own default folder
($TORCHINDUCTOR_CACHE_DIR, else /tmp/torchinductor_<user>, which a reboot may empty); a folder of the
user's choice survives reboots, and on a shared file system serves every node of a cluster (a requeued
job lands on another node). `off` compiles from scratch (a cold start, measured on purpose).

The cache holds code that the process runs, like the Python environment itself: it is read only from a
folder the user names, never from a run folder or a checkpoint (which may come from someone else).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

from fasttrain.errors import UserError

ENV = "TORCHINDUCTOR_CACHE_DIR"


@contextmanager
def compile_cache(setting: str, enabled: bool = True) -> Iterator[str]:
    """Within the block, torch.compile uses the cache `setting` says; yields its description for the log.
    `enabled`: whether the run compiles at all (when not, nothing is touched). Everything set is put back."""
    if not enabled:
        yield "not used (train.compile=off)"
        return
    import torch._inductor.config as inductor_config

    if setting == "off":
        saved = inductor_config.force_disable_caches
        inductor_config.force_disable_caches = True
        try:
            yield "off (train.compile_cache=off): everything is compiled from scratch"
        finally:
            inductor_config.force_disable_caches = saved
        return
    if not setting:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        yield f"{cache_dir()} (PyTorch's default; set train.compile_cache=FOLDER to keep it elsewhere)"
        return
    folder = Path(setting).expanduser().absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UserError(f"train.compile_cache={setting} cannot be used ({err.strerror or err}): give a folder you can "
                        f"write, '' for PyTorch's default, or off") from None
    saved_env = os.environ.get(ENV)
    os.environ[ENV] = str(folder)  # read by Inductor whenever it looks for its cache folder
    try:
        yield str(folder)
    finally:
        if saved_env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved_env


def cache_counts() -> Dict[str, int]:
    """Graphs loaded from the cache and compiled afresh in this process so far (Inductor's FX graphs and
    AOTAutograd's forward/backward pairs)."""
    from torch._dynamo.utils import counters

    return {"fx_graph_hits": int(counters["inductor"]["fxgraph_cache_hit"]),
            "fx_graph_misses": int(counters["inductor"]["fxgraph_cache_miss"]),
            "aot_autograd_hits": int(counters["aot_autograd"]["autograd_cache_hit"]),
            "aot_autograd_misses": int(counters["aot_autograd"]["autograd_cache_miss"])}


def compiled_graph_count() -> int:
    """Graphs torch.compile has produced so far in this process: flat after epoch 1 = no recompiles."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def cudagraph_skip_count() -> int:
    """Times torch.compile's CUDA graphs (mode reduce-overhead) were skipped in this process: each
    such skip also logs "skipping cudagraphs due to <reason>". Zero on the CPU, and under
    train.capture=true, which records its own graph (a failed capture raises)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])
