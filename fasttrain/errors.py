"""The one exception type for bad user input.

Anything a user can fix (a config typo, a missing data folder, a broken checkpoint) raises
`UserError` with a one-line message that names what is wrong and how to fix it. The entry
points turn it into `fasttrain: error: ...` on stderr and exit code 2, without a traceback.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class ConfigError(UserError):
    """A config key, type or value that is not accepted."""


class TrainingDiverged(UserError):
    """The loss became nan or inf: the run stops (exit 2) and keeps its last good checkpoint."""


def launcher_rank() -> str:
    """This process's rank as the launcher set it (torchrun's RANK, else SLURM's), "0" without one:
    readable before (and after) the process group exists."""
    import os

    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


def report(err: UserError) -> None:
    """Print a user error as one line on stderr; under a multi-process launch, config errors
    (the same on every rank) are printed by rank 0 only, other errors with their rank."""
    import sys

    rank = launcher_rank()
    if rank != "0" and isinstance(err, ConfigError):
        return
    prefix = "" if rank == "0" else f"[rank {rank}] "
    print(f"{prefix}fasttrain: error: {err}", file=sys.stderr)
