"""The processes of a run: how they were launched, how they join, and how they are stopped.

    process_group.py  the launcher's environment (torchrun, srun, accelerate) read, the group joined, the
                      collectives every rank calls together, the ranks' weight digests
    launcher.py       the launch checked against the machine and the config, before any group
    device.py         the device a rank trains on, seeding, the RNG states a checkpoint carries
    ddp.py            gradients averaged over ranks: the DDP wrapper, or one flat buffer in a captured step
    preemption.py     a scheduler's signal as a flag the ranks agree on; the exit codes, preempted.json
    hostlist.py       SLURM node lists (`python -m fasttrain.dist.hostlist first 'gpu[07-09]'`)

`fasttrain.dist.setup(...)`, `dist.agree_on_error(...)`, ... are the process group's, imported on first
use: the sbatch scripts run hostlist.py, and the entry points hold preemption signals, before torch is
imported (a second of start-up), so importing this package must not import it.
"""

from typing import TYPE_CHECKING, Any, List

# the process group's names, the only ones imported lazily here
__all__ = ["ANNOUNCE_WAIT_S", "DEFAULT_MASTER_PORT", "Dist", "DistEnv", "POLL_S", "PORT_FIX", "agree_on_error",
           "all_reduce_sum_tensor", "average_buffers", "average_floating", "barrier", "broadcast_object", "digests_match",
           "failure_message", "get_world_size", "pick_device", "read_env", "setup", "teardown", "weights_digest"]

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports it when asked
    from fasttrain.dist.process_group import (ANNOUNCE_WAIT_S, DEFAULT_MASTER_PORT, PORT_FIX, POLL_S, Dist, DistEnv,
                                              agree_on_error, all_reduce_sum_tensor, average_buffers, average_floating, barrier,
                                              broadcast_object, digests_match, failure_message, get_world_size,
                                              pick_device, read_env, setup, teardown, weights_digest)


def __getattr__(name: str) -> Any:
    # only the process group's names: `from fasttrain.dist import preemption` asks for the submodule here
    # first, and must not import torch on the way
    if name in __all__:
        from fasttrain.dist import process_group

        return getattr(process_group, name)
    raise AttributeError(f"module 'fasttrain.dist' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted([*globals(), *__all__])
