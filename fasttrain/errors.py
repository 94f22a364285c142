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


def report(err: UserError) -> None:
    """Print a user error as one line on stderr; under a multi-process launch, config errors
    (the same on every rank) are printed by rank 0 only, other errors with their rank."""
    import os
    import sys

    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if rank != "0" and isinstance(err, ConfigError):
        return
    prefix = "" if rank == "0" else f"[rank {rank}] "
    print(f"{prefix}fasttrain: error: {err}", file=sys.stderr)
