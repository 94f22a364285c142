"""Train: `python -m fasttrain.run --config configs/cifar10_cnn.yaml [key.sub=value ...]`.

Parse, build, train, clean up; everything else lives in the components.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Optional, Sequence

from fasttrain import preemption, timing
from fasttrain.config import describe_keys, load_config
from fasttrain.errors import EXIT_USER_ERROR, UserError, launcher_rank, report


def train_parser(prog: str = "python -m fasttrain.run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train an image classifier.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the YAML file or as key.sub=value overrides; defaults shown):\n"
               + "\n".join(describe_keys()))
    parser.add_argument("--config", help="YAML recipe, e.g. configs/cifar10_cnn.yaml (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.epochs=5")
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m fasttrain.run") -> int:
    args = train_parser(prog).parse_intermixed_args(argv)  # overrides before or after --config
    preemption.hold_early_signals()  # a preemption signal from here on is acted on, not a kill
    try:
        cfg = load_config(args.config, args.overrides)
        from fasttrain.trainer import train  # imported after the config is known good: fail fast

        timing.clock().startup_done("imports")  # the interpreter, torch and fasttrain, the config
        state = train(cfg)
    except UserError as err:
        report(err)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        # Ctrl-C before training started, or a second one during it: no traceback, checkpoints already
        # written are complete (atomic writes) and kept
        sys.stderr.write(f"{_rank_prefix()}fasttrain: stopped by Ctrl-C; checkpoints written before it are kept "
                         f"(resume=auto continues from the newest); exit code {preemption.EXIT_INTERRUPTED}\n")
        return preemption.EXIT_INTERRUPTED
    finally:
        preemption.release_early_signals()
    if state.stopped_by == preemption.INTERRUPT:
        sys.stderr.write(f"{_rank_prefix()}fasttrain: interrupted by Ctrl-C after step {state.global_step}: "
                         f"{_saved(state)}; exit code {preemption.EXIT_INTERRUPTED}\n")
        return preemption.EXIT_INTERRUPTED
    if state.stopped_by and state.stopped_by != "stop_after_steps":
        sys.stderr.write(f"[rank {launcher_rank()}] fasttrain: preempted by {state.stopped_by} after step "
                         f"{state.global_step}: {_saved(state)}; exit code {preemption.EXIT_PREEMPTED}\n")  # one write: no interleaving
        sys.stderr.flush()
        return preemption.EXIT_PREEMPTED
    return 0


def _saved(state) -> str:
    return "checkpoint saved" if state.last_checkpoint else "no new checkpoint"


def _rank_prefix() -> str:
    rank = launcher_rank()
    return "" if rank == "0" else f"[rank {rank}] "


def exit_now(code: int) -> NoReturn:
    """End a training process with `code` once main() has returned: every output is closed and synced and
    the process group destroyed, so nothing is left to tear down but the interpreter itself. That teardown
    is skipped (os._exit) because it can still change the exit code of a run that is already complete:
    torch 2.14 on gloo now and then aborts there ("terminate called without an active exception", SIGABRT,
    after the last Python frame; seen in CI-like load on a 2-core machine, not when idle), and Python
    puts the default signal handlers back first, so torchrun's SIGTERM to a rank that stopped cleanly for a
    preemption kills it (-15 instead of 75). A job script acts on that code: requeue, or give up."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
