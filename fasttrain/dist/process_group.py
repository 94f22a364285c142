"""One distributed setup for every launcher, driven by the environment.

torchrun and `accelerate launch` export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
SLURM's `srun` (one task per GPU, no torchrun) exports SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS
and the node list, which are mapped onto the same names. A plain `python -m fasttrain.run` has
none of them and is world size 1 - which takes the same path: a process group is created (over
an in-memory store, no network), the model is wrapped in DDP, and metrics are all-reduced.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Mapping, Optional

import torch
import torch.distributed as torch_dist

from fasttrain.dist.device import quiet_on_cpu, resolve_device
from fasttrain.errors import UserError, incomplete_launch
from fasttrain.dist.hostlist import first_host
from fasttrain.dist.launcher import check_launch

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: Optional[str]
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Rank, local rank, world size and rendezvous address from torchrun's or SLURM's variables."""
    problem = incomplete_launch(environ)
    if problem:
        raise UserError(problem)

    def number(name: str) -> int:
        try:
            return int(environ[name])
        except ValueError:
            raise UserError(f"environment variable {name}={environ[name]!r} is not an integer") from None

    if "WORLD_SIZE" in environ and "RANK" in environ:  # torchrun, accelerate launch, torch.distributed.run
        rank, world = number("RANK"), number("WORLD_SIZE")
        local = number("LOCAL_RANK") if "LOCAL_RANK" in environ else rank
        addr = environ.get("MASTER_ADDR")
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:  # srun with one task per GPU
        rank, world, local = number("SLURM_PROCID"), number("SLURM_NTASKS"), number("SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        try:
            addr = environ.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
        except ValueError as err:
            raise UserError(f"{err}: export MASTER_ADDR with the first node's address") from None
    else:
        rank, world, local, addr = 0, 1, 0, None
    port = _port(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else DEFAULT_MASTER_PORT
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside world size {world}: check the launcher's environment")
    if world > 1 and not addr:
        raise UserError("world size > 1 but no MASTER_ADDR (nor SLURM node list): launch with torchrun, srun or "
                        "accelerate launch, or export MASTER_ADDR and MASTER_PORT")
    return DistEnv(rank, local, world, addr, port)


PORT_FIX = ("choose a free port: MASTER_PORT=<port> (1024-65535, free on rank 0's node), or let torchrun choose one "
            "(torchrun --standalone) or name it (torchrun --master-port <port>, --rdzv-endpoint <host>:<port>)")


def _port(value: str) -> int:
    """MASTER_PORT as a TCP port, or one line saying why it is none (torch would fail with a traceback, or,
    given 0, serve the store on a random port the other ranks cannot know)."""
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise UserError(f"environment variable MASTER_PORT={value!r} is not a TCP port (1-65535): {PORT_FIX}")
    return port


@dataclass(frozen=True)
class Dist:
    """The running process group: who we are, and where we compute."""
    env: DistEnv
    device: torch.device
    backend: str

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main


def pick_device(device_name: str, env: DistEnv) -> torch.device:
    """cpu, or cuda:LOCAL_RANK (one GPU per process); an explicit cuda:N is only valid alone."""
    device = resolve_device(device_name)
    if device.type != "cuda":
        return device
    if device.index is not None and env.world_size > 1:
        raise UserError(f"train.device={device_name} names one GPU but {env.world_size} processes were launched: use "
                        f"train.device=cuda or auto (each process takes cuda:LOCAL_RANK)")
    index = device.index if device.index is not None else env.local_rank
    if index >= torch.cuda.device_count():
        raise UserError(f"local rank {env.local_rank} needs cuda:{index} but this node has "
                        f"{torch.cuda.device_count()} GPU(s): launch at most that many processes per node")
    return torch.device("cuda", index)


ANNOUNCE_WAIT_S = 5.0  # a rank still waiting for the others after this long says so (once)
POLL_S = 0.05  # between two looks at the store or the port: a signal is acted on within this


def _join_store(env: DistEnv, timeout_s: int, stop_requested: Callable[[], Optional[str]]) -> torch_dist.Store:
    """env://'s rendezvous in steps that a signal can interrupt. torch's own (`rendezvous("env://")`) waits
    inside C++ until every rank has connected, for up to dist.timeout_s (1800 s by default), and Python runs
    signal handlers only between bytecodes: a rank whose peers never came ignored SIGTERM and Ctrl-C for that
    long. Here rank 0 serves the store without waiting for the others, the others poll its port, and every
    rank counts itself in under a key of the store; each wait is a short sleep, after which a preemption
    signal (`stop_requested`: its name) stops the process and Ctrl-C's KeyboardInterrupt is raised."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    timeout = datetime.timedelta(seconds=timeout_s)
    started = time.monotonic()
    announced = False

    def wait(joined: str) -> None:
        nonlocal announced
        name = stop_requested()
        if name is not None:
            from fasttrain.dist.preemption import PreemptedBeforeStart

            raise PreemptedBeforeStart(name, f"while waiting for the other ranks to join at {host}:{port} ({joined})")
        waited = time.monotonic() - started
        if waited > timeout_s:
            raise UserError(f"the ranks did not all join at {host}:{port} within dist.timeout_s={timeout_s} "
                            f"({joined}): start all {env.world_size} processes with the same MASTER_ADDR and "
                            f"MASTER_PORT (torchrun, srun), or check that this address is reachable")
        if waited > ANNOUNCE_WAIT_S and not announced:
            prefix = "" if env.is_main else f"[rank {env.rank}] "
            sys.stderr.write(f"{prefix}fasttrain: waiting for the other ranks to join at {host}:{port} ({joined}; "
                             f"dist.timeout_s={timeout_s}; SIGTERM or Ctrl-C stops the wait)\n")
            sys.stderr.flush()
            announced = True
        time.sleep(POLL_S)

    _check_address(host, port)
    # under torchrun the agent already serves the store at MASTER_ADDR:MASTER_PORT, and every rank is its client
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if env.rank == 0 and not agent:
        try:
            store = torch_dist.TCPStore(host, port, env.world_size, is_master=True, timeout=timeout,
                                        multi_tenant=True, wait_for_workers=False)
        except torch_dist.DistNetworkError as err:
            raise UserError(_serve_failure(host, port, err)) from None
    else:
        while not agent and not _port_open(host, port):  # the client's own connect would block in C++
            wait("rank 0 not reachable yet")
        store = torch_dist.TCPStore(host, port, env.world_size, is_master=False, timeout=timeout)
    # torchrun keeps its store across `--max-restarts` restarts: each attempt counts its ranks apart
    key = f"fasttrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/joined"
    joined = store.add(key, 1)
    while joined < env.world_size:
        wait(f"{joined} of {env.world_size} ranks in")
        joined = store.add(key, 0)
    return store


def _check_address(host: str, port: int) -> None:
    """MASTER_ADDR must name a host: without this check rank 0's store fails with torch's traceback, and the
    other ranks would take an unknown name for a rank 0 not up yet and wait for dist.timeout_s."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        why = err.strerror if isinstance(err, socket.gaierror) and err.strerror else str(err)
        raise UserError(f"environment variable MASTER_ADDR={host!r} cannot be resolved ({why}): check MASTER_ADDR: "
                        f"the host name or IP address of the node that runs rank 0 (127.0.0.1 on one node), as "
                        f"every node can resolve it") from None


def _serve_failure(host: str, port: int, err: Exception) -> str:
    """Rank 0 could not serve the store at MASTER_PORT: torch's message, as one line that names the fix."""
    text = str(err)
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        return (f"MASTER_PORT={port} is already in use on this node (another job, or another run's rank 0, "
                f"listens on it), so rank 0 cannot serve the rendezvous at {host}:{port}: {PORT_FIX}")
    said = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return (f"rank 0 cannot serve the rendezvous at MASTER_ADDR={host} MASTER_PORT={port} ({said}): check that "
            f"MASTER_ADDR names this node, or {PORT_FIX}")


def _port_open(host: str, port: int) -> bool:
    """Whether something accepts connections at host:port (rank 0's store, once it serves)."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def setup(device_name: str, backend: str = "auto", timeout_s: int = 1800, precision: Optional[str] = None,
          compile_mode: Optional[str] = None, stop_requested: Callable[[], Optional[str]] = lambda: None) -> Dist:
    """Check the launch against the machine and the config (train.precision, train.compile: None when the
    caller has none), pick the device and backend, then join the process group (world size 1 included).
    `stop_requested`: the name of a preemption signal that came meanwhile (see `_join_store`), or None."""
    check_launch(device_name, precision, compile_mode)
    env = read_env()
    device = pick_device(device_name, env)
    quiet_on_cpu(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before init, so NCCL binds the right GPU
    chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if chosen == "nccl" and device.type != "cuda":
        raise UserError("dist.backend=nccl needs CUDA devices: use dist.backend=gloo or auto on CPU")
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch_dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process")
    if env.world_size == 1 and env.master_addr is None:
        # the same path as a multi-process run, over an in-process store: no port to find or collide on
        torch_dist.init_process_group(chosen, store=torch_dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        os.environ.setdefault("MASTER_ADDR", env.master_addr or "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        store = _join_store(env, timeout_s, stop_requested)
        # torchrun keeps its store across `--max-restarts` restarts: the restarted group meets under a
        # key prefix of its own, or it would read the dead ranks' addresses from the attempt before
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        torch_dist.init_process_group(chosen, store=torch_dist.PrefixStore(f"fasttrain/attempt_{attempt}/", store),
                                rank=env.rank, world_size=env.world_size, timeout=timeout)
    return Dist(env, device, chosen)


def teardown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def get_world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def all_reduce_sum_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a device tensor over all ranks, in place, without reading it on the host."""
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks.

    DDP keeps parameters identical, but each rank updates its BN running statistics from its own
    last batch; evaluating or saving without this would depend on the rank.
    """
    average_floating(list(module.buffers()))


@torch.no_grad()
def average_floating(tensors: List[torch.Tensor]) -> None:
    """Average the floating-point ones of `tensors` over ranks, in place (nothing with one rank)."""
    world = torch_dist.get_world_size()
    if world == 1:
        return
    for tensor in tensors:
        if tensor.is_floating_point():
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
            tensor.div_(world)


def failure_message(err: Exception, doing: str, rank: int) -> str:
    """The line every rank fails with when `err` was raised on one of them in a section the ranks then
    agree on (`agree_on_error`): a UserError's own line; any other exception (a bug, a file cut short by
    a full disk) as one line too, naming what was being done, so that every rank stops at the agreement
    instead of the others waiting for the failed one in a collective until dist.timeout_s."""
    if isinstance(err, UserError):
        return str(err)
    frames = traceback.extract_tb(err.__traceback__)
    # where it was raised, so that a bug stays findable without the traceback the line replaces
    where = f" (raised at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{doing} failed on rank {rank}: {type(err).__name__}: {first}{where}"


def agree_on_error(message: Optional[str]) -> None:
    """Raise the same UserError on every rank when any rank has one (rank order decides which)."""
    messages: List[Optional[str]] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(messages, message)
    first = next((m for m in messages if m), None)
    if first:
        raise UserError(first)


def broadcast_object(box: List) -> None:
    """Rank 0's list of picklable objects, copied into `box` on every rank."""
    torch_dist.broadcast_object_list(box, src=0)


def barrier() -> None:
    torch_dist.barrier()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers, byte for byte."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def digests_match(model: torch.nn.Module) -> tuple[bool, List[str]]:
    """Whether every rank holds byte-identical weights (one gather of a short string)."""
    digests: List[str] = [""] * torch_dist.get_world_size()
    torch_dist.all_gather_object(digests, weights_digest(model))
    return len(set(digests)) == 1, digests
