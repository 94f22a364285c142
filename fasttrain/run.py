"""Train: `python -m fasttrain.run --config configs/cifar10_cnn.yaml [key.sub=value ...]`.

Parse, build, train, clean up; everything else lives in the components.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn, Optional, Sequence

# only light modules here (no torch, no OmegaConf): `python -m fasttrain.run` imports them before main()'s
# first line, and until then a SIGTERM has its default action
from fasttrain.dist import preemption
from fasttrain.observe import timing
from fasttrain.errors import EXIT_USER_ERROR, UserError, broken_torchvision, incomplete_launch, launcher_rank, report

KEYS_HEADER = "config keys (set in the YAML file or as key.sub=value overrides; defaults shown):\n"


class _TrainParser(argparse.ArgumentParser):
    """The run's arguments. Its epilog (every config key) is built only when help is printed: describing
    the keys imports the registries, so torch, torchvision and DALI (about 1.5 s), which a run must not
    wait for before its early signal hold, nor pay twice."""

    given: Sequence[str] = ()

    def parse_intermixed_args(self, args=None, namespace=None):  # type: ignore[override]
        self.given = list(sys.argv[1:] if args is None else args)
        return super().parse_intermixed_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        super().error(flag_hint(message, self.given) or message)

    def format_help(self) -> str:
        if self.epilog is None:
            from fasttrain.config import describe_keys

            self.epilog = KEYS_HEADER + "\n".join(describe_keys())
        return super().format_help()


def flag_hint(message: str, given: Sequence[str]) -> Optional[str]:
    """For `--epochs 5` and the like (other tools' habit): the key.sub=value override meant, or how to write one.
    `given`: the command line's arguments, where the flag's value follows it."""
    if not message.startswith("unrecognized arguments:"):
        return None
    for token in message.split(":", 1)[1].split():
        if not token.startswith("--"):
            continue
        name, _, value = token[2:].partition("=")
        if not value:
            after = list(given)[list(given).index(token) + 1:] if token in given else []
            value = after[0] if after and not after[0].startswith("-") and "=" not in after[0] else "..."
        from fasttrain.config import Config, all_keys  # only on this error: it imports the registries

        leaf = name.replace("-", "_")
        keys = [key for key, _, _ in all_keys(Config()) if key.rpartition(".")[2] == leaf]
        said = " or ".join(f"{key}={value}" for key in keys) if keys else "key.sub=value (every key: --help)"
        return f"{token} is not an option: settings are overrides written as {said}"
    return None


def run_config(config: Optional[str], resume_dir: Optional[str], overrides: Sequence[str]) -> tuple:
    """(the config file, the overrides, whether the file is a run folder's) a run starts from. `--resume RUN_DIR` is
    resume=auto output.dir=RUN_DIR; a resume of a run folder without --config takes the config.yaml that run saved
    (resuming it with the built-in defaults would be another run), and says so. The train.stop_after_steps that
    stopped the run is done with: reset to 0 (kept, it would stop the resumed run at once); an override sets another."""
    overrides = list(overrides)
    if resume_dir is not None:
        if not (Path(resume_dir) / "config.yaml").is_file():
            raise UserError(f"--resume {resume_dir}: no run folder there (it holds no config.yaml): give the folder a "
                            f"run wrote, e.g. runs/<run>")
        overrides = ["resume=auto", f"output.dir={resume_dir}", *overrides]
    settings = {key: value for key, _, value in (item.partition("=") for item in overrides)}
    run_dir = settings.get("output.dir")
    saved = Path(run_dir) / "config.yaml" if run_dir else None
    if config is None and settings.get("resume", "none") != "none" and saved is not None and saved.is_file():
        if launcher_rank() == "0":
            print(f"fasttrain: config from {saved} (the run being resumed, without a train.stop_after_steps that "
                  f"stopped it; --config chooses another)", flush=True)
        return str(saved), ["train.stop_after_steps=0", *overrides], True
    return config, overrides, False


def refuse_imports_named_by_a_run_folder(cfg, overrides: Sequence[str], saved: str) -> None:
    """A run folder's config.yaml is a file: like a checkpoint, it does not choose code to import. A model named by
    import path there is used only when the command line names it too."""
    name = cfg.model.name
    named_here = any(item.startswith("model.name=") for item in overrides)
    if ":" in name and not name.startswith("torchvision:") and not named_here:
        raise UserError(f"{saved} names its model by import (model.name={name!r}) and fasttrain imports no code that "
                        f"a file names: if you trust that module, name it yourself: ... model.name={name}")


def train_parser(prog: str = "python -m fasttrain.run") -> argparse.ArgumentParser:
    parser = _TrainParser(prog=prog, description="Train an image classifier.",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe, e.g. configs/cifar10_cnn.yaml (default: built-in defaults; "
                        "with resume and output.dir of a run: that run's config.yaml)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint "
                        "with its own config.yaml (overrides given are applied on top): resume=auto output.dir=RUN_DIR")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.epochs=5")
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m fasttrain.run", ends_process: bool = False) -> int:
    """`ends_process`: the caller ends the process with `exit_now` as soon as this returns (the command
    line). Then the handlers that absorb a preemption signal after training ended stay in place up to
    os._exit instead of being put back, which would leave a moment in which the signal kills a complete run."""
    preemption.hold_early_signals()  # the first line: a preemption signal from here on is acted on, not a kill
    try:
        args = train_parser(prog).parse_intermixed_args(argv)  # overrides before or after --config
        problem = incomplete_launch()
        if problem:  # before the config: its errors are printed by rank 0 only, and RANK=1 alone is not rank 0
            raise UserError(problem)
        from fasttrain.config import load_config

        config, overrides, from_run_folder = run_config(args.config, args.resume, args.overrides)
        cfg = load_config(config, overrides)
        if from_run_folder:
            refuse_imports_named_by_a_run_folder(cfg, args.overrides, config)
        preemption.narrow_early_hold(cfg.checkpoint.signals)  # a signal not configured: its default from now
        from fasttrain.train.lifecycle import train  # imported after the config is known good: fail fast

        timing.clock().startup_done("imports")  # the interpreter, torch and fasttrain, the config
        state = train(cfg)
        late = preemption.signal_after_end()  # came after the run's last log line (the trainer logs earlier ones)
        if late and launcher_rank() == "0":
            sys.stderr.write(f"fasttrain: {preemption.after_end_line(late)}\n")
    except UserError as err:
        report(err)
        return EXIT_USER_ERROR
    except RuntimeError as err:
        broken = broken_torchvision(err)  # wherever torchvision was first imported (a transform, a model)
        if broken is None:
            raise
        report(broken)
        return EXIT_USER_ERROR
    except preemption.PreemptedBeforeStart as stop:
        sys.stderr.write(f"{_rank_prefix()}fasttrain: {stop}; exit code {preemption.EXIT_PREEMPTED} (resume=auto "
                         f"starts it again)\n")
        return preemption.EXIT_PREEMPTED
    except KeyboardInterrupt:
        # Ctrl-C before training started, or a second one during it: no traceback, checkpoints already
        # written are complete (atomic writes) and kept
        sys.stderr.write(f"{_rank_prefix()}fasttrain: stopped by Ctrl-C; checkpoints written before it are kept "
                         f"(resume=auto continues from the newest); exit code {preemption.EXIT_INTERRUPTED}\n")
        return preemption.EXIT_INTERRUPTED
    finally:
        if not ends_process:
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
    exit_now(main(ends_process=True))
