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


def incomplete_launch(environ=None) -> "str | None":
    """A launcher's environment that is only partly there (RANK=1 set by hand, WORLD_SIZE without RANK,
    LOCAL_RANK alone): None when complete or absent, else the one line that refuses it. Read as it is, such
    a process would train alone as rank 0 of 1 while it reports as another rank (and as rank 1 it would not
    even print a config error: those are printed by rank 0 only)."""
    import os

    environ = os.environ if environ is None else environ
    present = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if name in environ]
    missing = [name for name in ("RANK", "WORLD_SIZE") if name not in environ]
    if not present or not missing:
        return None
    given = ", ".join(f"{name}={environ[name]}" for name in present)
    return (f"incomplete launch environment: {given} is set but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: launch with torchrun (or srun, accelerate launch), which "
            f"sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT together, or unset "
            f"{' and '.join(present)} to train as one process")


def report(err: UserError) -> None:
    """Print a user error as one line on stderr; under a multi-process launch, config errors
    (the same on every rank) are printed by rank 0 only, other errors with their rank."""
    import sys

    rank = launcher_rank()
    record_for_launcher(f"fasttrain: error: {err}")
    if rank != "0" and isinstance(err, ConfigError):
        return
    prefix = "" if rank == "0" else f"[rank {rank}] "
    print(f"{prefix}fasttrain: error: {err}", file=sys.stderr)


def record_for_launcher(line: str) -> None:
    """Under torchrun (and accelerate, which runs it): the error file torch elastic gives each worker
    ($TORCHELASTIC_ERROR_FILE), in its documented form ({"message": {"message": ..., "extraInfo": {"py_callstack":
    ..., "timestamp": ...}}}), so that the launcher's failure summary shows this line as the root cause instead of
    "To enable traceback see ...". Elsewhere nothing; a file that cannot be written costs nothing but that."""
    import json
    import os
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as out:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                   "timestamp": str(int(time.time()))}}}, out)
    except OSError:
        pass


def folder_write_failed(folder, what: str, err: OSError) -> UserError:
    """The one line a running job stops with when its run folder cannot be written any more (removed,
    made read-only, a full disk): which folder, what was being written, and what to do about it."""
    from pathlib import Path

    reason = err.strerror or str(err)
    if not Path(folder).is_dir():
        return UserError(f"output.dir {folder} was removed while the run was going (writing {what}: {reason}): "
                         f"nothing more can be saved there; start again with an output.dir that stays, or continue "
                         f"from a copy of its checkpoints with resume=PATH")
    return UserError(f"output.dir {folder} cannot be written any more (writing {what}: {reason}): it was made "
                     f"read-only or its disk is full; the checkpoints written before are kept: make it writable or "
                     f"free space, then continue with resume=auto output.dir={folder}")


def broken_torchvision(err: BaseException) -> "UserError | None":
    """torchvision built for another torch release: its compiled operators do not register, and importing it
    raises RuntimeError("operator torchvision::nms does not exist"). Named as such (None for any other error),
    rather than as whatever fasttrain was doing when it imported torchvision (a download, a transform)."""
    text = str(err)
    if "torchvision::" not in text or "does not exist" not in text:
        return None
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    return UserError(f"torchvision {version('torchvision')} does not work with torch {version('torch')} "
                     f"({text.splitlines()[0]}): install the torchvision release built for this torch (the pair "
                     f"is listed at pytorch.org/get-started/previous-versions), e.g. pip install --force-reinstall "
                     f"torch=={version('torch')} torchvision")
