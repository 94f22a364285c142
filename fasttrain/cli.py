"""The `fasttrain` console script: `fasttrain train ...`, `fasttrain eval CHECKPOINT ...`,
`fasttrain bench --preset ...`, `fasttrain plot RUN_DIR`, `fasttrain convert-checkpoint FILE`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn, Optional, Sequence

from fasttrain import run
from fasttrain.errors import EXIT_USER_ERROR, UserError, report


def dist_env_rank() -> int:
    from fasttrain.dist import read_env

    return read_env().rank


def _eval(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="fasttrain eval", description="Evaluate a checkpoint on the test split.")
    parser.add_argument("checkpoint", help="a .pt file written by fasttrain, e.g. runs/<run>/checkpoints/best.pt")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="applied on top of the checkpoint's config, e.g. data.root=/data train.device=cpu")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_intermixed_args(argv)  # --json and overrides in any order
    try:
        from fasttrain.train.evaluate import evaluate_checkpoint

        evaluation = evaluate_checkpoint(args.checkpoint, args.overrides)
    except UserError as err:
        report(err)
        return EXIT_USER_ERROR
    if dist_env_rank() != 0:
        return 0  # under torchrun every rank evaluated its share; rank 0 reports the total
    stats, ckpt, weights, tta = evaluation.stats, evaluation.checkpoint, evaluation.weights, evaluation.tta
    result = {"checkpoint": args.checkpoint, "epoch": ckpt["epoch"], "val_acc": stats.accuracy,
              "val_loss": stats.loss, "correct": stats.correct, "total": stats.total,
              "recorded_val_acc": ckpt.get("val_acc"), "weights": weights, "tta": tta}
    if args.json:
        print(json.dumps(result))
    else:
        if "val_acc" in ckpt:
            recorded = f"recorded at training time {100 * ckpt['val_acc']:.2f}%"
        elif ckpt.get("step_in_epoch"):
            recorded = f"a mid-epoch checkpoint (step {ckpt.get('global_step')}): no accuracy was recorded with it"
        else:
            recorded = "its epoch was not validated at training time (train.eval_every)"
        how = ("EMA weights" if weights == "ema" else "trained weights") + ("" if tta == "none" else f", tta {tta}")
        # a mid-epoch checkpoint's "epoch" counts the epochs it completed: name the one it was in
        at = (f"epoch {ckpt['epoch'] + 1}, step {ckpt.get('global_step')}" if ckpt.get("step_in_epoch")
              else f"epoch {ckpt['epoch']}")
        print(f"{args.checkpoint} ({at}, {how}): test accuracy {100 * stats.accuracy:.2f}% "
              f"({stats.correct:,}/{stats.total:,}), loss {stats.loss:.4f}; {recorded}")
    return 0


def _plot(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="fasttrain plot", description="Write curves.png and throughput.png "
                                     "into a run folder from its metrics.")
    parser.add_argument("run_dir", help="a run folder written by fasttrain, e.g. runs/<run>")
    args = parser.parse_args(argv)
    try:
        from fasttrain.observe.plots import plot_run

        for path in plot_run(args.run_dir):
            print(f"wrote {path}")
    except UserError as err:
        report(err)
        return EXIT_USER_ERROR
    return 0


def _convert(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fasttrain convert-checkpoint",
        description="Make a checkpoint that only full pickle can read (an older fasttrain's) data only, with a "
                    "content hash. This unpickles the file, which can run code: convert only files you trust.")
    parser.add_argument("checkpoint", help="the .pt file to convert (kept as FILE.orig unless --out is given)")
    parser.add_argument("--out", help="write the converted checkpoint here instead of in the file's place")
    args = parser.parse_args(argv)
    try:
        from fasttrain.checkpoint.convert import convert_checkpoint

        written = convert_checkpoint(args.checkpoint, args.out)
    except UserError as err:
        report(err)
        return EXIT_USER_ERROR
    kept = "" if args.out else f" (the original is kept as {args.checkpoint}.orig)"
    print(f"wrote {written}: data only, with a content hash{kept}")
    return 0


def _bench_roots() -> list:
    """Where a source checkout's benchmarks/ may be: beside the fasttrain package (a clone, installed
    editable or run from its folder), then the current folder (a clone beside a wheel install)."""
    from pathlib import Path

    return [Path(__file__).resolve().parents[1], Path.cwd()]


def _bench(argv: Sequence[str]) -> int:
    # a console script does not put the current folder on sys.path (python -m does): the suite is
    # found by its files, and its folder put first so that no other `benchmarks` module is taken
    roots = _bench_roots()
    root = next((r for r in roots if (r / "benchmarks" / "__main__.py").is_file()), None)
    if root is None:
        report(UserError(f"fasttrain bench runs the suite in benchmarks/ of a source checkout and found none (looked "
                         f"in {' and '.join(str(r) for r in roots)}): run it from a clone of the project, the folder "
                         f"holding benchmarks/"))
        return EXIT_USER_ERROR
    if sys.path[:1] != [str(root)]:
        sys.path.insert(0, str(root))
    try:
        from benchmarks.__main__ import main as bench_main
    except ImportError as err:  # the suite is there but something it imports is not installed
        report(UserError(f"fasttrain bench: the suite in {root / 'benchmarks'} cannot be imported ({err}): install "
                         f"the project with pip install -e . in {root}"))
        return EXIT_USER_ERROR
    return bench_main(list(argv), prog="fasttrain bench")


COMMANDS = {"train": "train a model (same as python -m fasttrain.run)", "eval": "evaluate a checkpoint",
            "bench": "the benchmark suite against the tutorial's loop (same as python -m benchmarks)",
            "plot": "plot a run folder's loss, accuracy, learning rate and throughput",
            "convert-checkpoint": "make an older checkpoint data only (for a file you trust)"}


def main(argv: Optional[Sequence[str]] = None, ends_process: bool = False) -> int:
    """`ends_process`: as run.main's (the console script ends train and eval with run.exit_now)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = (f"usage: fasttrain {{{','.join(COMMANDS)}}} ...\n\n"
                 + "\n".join(f"  {k:<18} {v}" for k, v in COMMANDS.items()))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"fasttrain: error: unknown command '{argv[0]}'\n{usage}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(usage)
        return 0 if argv else EXIT_USER_ERROR
    if argv[0] in ("train", "eval") and os.getcwd() not in sys.path and "" not in sys.path:
        # as `python -m fasttrain.run` does: model.name=package.module:callable finds a package in the current folder
        sys.path.insert(0, os.getcwd())
    if argv[0] == "train":
        return run.main(argv[1:], prog="fasttrain train", ends_process=ends_process)
    if argv[0] == "plot":
        return _plot(argv[1:])
    if argv[0] == "bench":
        return _bench(argv[1:])
    if argv[0] == "convert-checkpoint":
        return _convert(argv[1:])
    return _eval(argv[1:])


def entry() -> NoReturn:
    """The `fasttrain` console script: commands that join a process group (train, eval) end as
    `python -m fasttrain.run` does (run.exit_now: torch's teardown after gloo can abort a finished
    process, seen under torchrun for eval too)."""
    ends = sys.argv[1:2] in (["train"], ["eval"])
    code = main(ends_process=ends)
    if ends:
        run.exit_now(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
