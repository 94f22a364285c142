"""The run folder (output.dir): held by one run at a time, and changed only once a run is accepted.

`RunFolder.claim` (rank 0, before anything is built) creates the folder when needed and takes an
exclusive lock on `.fasttrain.lock` in it: a second run into the same folder stops at once with
one line naming the run that holds it (its pid, host and start time). The lock is the kernel's
(flock), so a run that is killed, even with SIGKILL, releases it. Then the checks that need no
data: a folder that is a file, a fresh run (resume=none) into a folder with checkpoints, and a
resume=PATH into a folder whose checkpoints are not continued by it (another run's, or a point
before the folder's newest): without output.overwrite=true a run never replaces a run's files.

Nothing in the folder is written until `commit`, which the trainer calls once the run is
accepted: data loaded, model built, and the checkpoint it continues from put back. A run
rejected before that (a conflicting resume, a missing dataset, fp16 on a CPU) leaves an existing
folder exactly as it was, and removes a folder it created itself. `commit` starts the history
afresh for resume=none, writes config.yaml and env.json, and removes the temporary files of
interrupted checkpoint writes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import List, Optional

from fasttrain.checkpoint.folder import find_resume_checkpoint, remove_stale_temporaries
from fasttrain.dist.preemption import MARKER
from fasttrain.errors import UserError

LOCK = ".fasttrain.lock"
HISTORY_FILES = ("metrics.jsonl", "steps.jsonl", "metrics.csv", MARKER)


def _unusable(path: Path, err: OSError) -> UserError:
    return UserError(f"output.dir {path} cannot be used ({err.strerror or err}): it is not writable, or cannot be "
                     f"created there; set output.dir to a folder you can write (a shorter path if it is too long)")


class RunFolder:
    """output.dir, claimed by this run (rank 0 only)."""

    def __init__(self, path: Path, created: "bool | List[Path]"):
        self.path = path
        # the folders this run made, deepest first (output.dir, then parents such as runs/ that did not exist): a
        # rejected run removes them again, each only while empty
        self.made: List[Path] = list(created) if isinstance(created, list) else ([path] if created else [])
        self.created = bool(self.made)
        self.warnings: List[str] = []  # said in the run's log once it exists
        self._fd: Optional[int] = None
        self._made_lock_file = False

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @classmethod
    def claim(cls, path: Path, resume: str, overwrite: bool) -> "RunFolder":
        try:
            if path.exists() and not path.is_dir():
                raise UserError(f"output.dir {path} is a file, not a folder: set output.dir to a folder path")
            created = [folder for folder in (path, *path.parents) if not folder.exists()]
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a name too long for the file system, a folder we may not enter or write, ...
            raise _unusable(path, err) from None
        folder = cls(path, created)
        try:
            folder._lock()
            ckpts = folder.checkpoints
            if resume == "none" and ckpts.is_dir() and any(ckpts.glob("*.pt")) and not overwrite:
                raise UserError(f"output.dir {path} already holds checkpoints of an earlier run: continue it with "
                                f"resume=auto, choose another output.dir, or set output.overwrite=true to start over")
            if resume not in ("none", "auto") and ckpts.is_dir() and any(ckpts.glob("*.pt")) and not overwrite:
                folder._refuse_a_resume_that_replaces(resume)
        except BaseException:
            folder.abandon()
            raise
        return folder

    def _refuse_a_resume_that_replaces(self, resume: str) -> None:
        """resume=PATH into a folder holding checkpoints continues that folder only from its newest
        checkpoint (what resume=auto picks): anything else would replace a run's last.pt, best.pt and
        metrics with another's."""
        if _inside(Path(resume), self.checkpoints):  # another folder's file is never this one's newest: no load
            try:
                newest = find_resume_checkpoint(self.checkpoints, warn=lambda _: None)
            except UserError:
                newest = None  # only broken files: still a run's folder, not this resume's to replace
            if newest is not None and _same_file(newest[0], Path(resume)):
                return
        raise UserError(f"output.dir {self.path} already holds checkpoints of a run, and resume={resume} does not "
                        f"continue from its newest one: it would replace that run's files; choose an empty "
                        f"output.dir, continue that run with resume=auto, or set output.overwrite=true to replace it")

    def _lock(self) -> None:
        lock = self.path / LOCK
        for _ in range(5):  # the lock file can be replaced between open and flock (a run ending): retry
            try:
                existed = lock.exists()
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise _unusable(self.path, err) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(f"output.dir {self.path} is in use by another fasttrain run ({holder}): wait for it "
                                f"to end, or choose another output.dir") from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise _unusable(self.path, err) from None
                self.warnings.append(f"warning: output.dir {self.path} cannot be locked on this file system "
                                     f"({err.strerror}): a second run started into it would not be stopped")
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd, self._made_lock_file = fd, not existed
            holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder.encode() + b"\n", 0)
            except OSError:
                pass  # a full disk: the lock holds all the same, only the holder's name is missing
            return
        raise UserError(f"output.dir {self.path}: could not take its lock {lock} (it kept changing): try again")

    def commit(self, resume: str, overwrite: bool, config_yaml: str, env_json: str) -> None:
        """The run is accepted: from here on it writes into the folder."""
        ckpts = self.checkpoints
        try:
            ckpts.mkdir(exist_ok=True)
            replaced = overwrite and resume not in ("none", "auto") and not _inside(Path(resume), ckpts)
            if resume == "none" or replaced:
                for name in HISTORY_FILES:
                    (self.path / name).unlink(missing_ok=True)  # overwrite=true: start the history afresh
                if overwrite:
                    for old in ckpts.glob("*.pt"):
                        old.unlink()  # starting over: a later resume=auto must never pick the earlier run's
            remove_stale_temporaries(ckpts)
            (self.path / "config.yaml").write_text(config_yaml)
            (self.path / "env.json").write_text(env_json)
        except OSError as err:
            raise _unusable(self.path, err) from None

    def record_env(self, key: str, value: object) -> None:
        """Add `key` to env.json (replaced atomically: a kill leaves the old file or the new one). A folder
        that cannot be written any more raises UserError: the caller decides what that costs."""
        env_file = self.path / "env.json"
        try:
            env = json.loads(env_file.read_text()) if env_file.is_file() else {}
            env[key] = value
            tmp = env_file.with_name(f".env.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(env, indent=2) + "\n")
            os.replace(tmp, env_file)
        except (OSError, ValueError) as err:
            raise UserError(f"{env_file} could not be updated ({getattr(err, 'strerror', None) or err})") from None

    def release(self) -> None:
        """End of the run: the lock file goes (while still held, so no other run can hold it meanwhile)."""
        if self._fd is None:
            return
        try:
            (self.path / LOCK).unlink(missing_ok=True)
        except OSError:
            pass  # a read-only or vanished folder: the lock itself ends with the descriptor
        os.close(self._fd)
        self._fd = None

    def abandon(self) -> None:
        """A rejected run: leave the folder as it found it (removed, when it made it and it is still empty)."""
        made_lock_file = self._made_lock_file
        if self._fd is not None:
            if not made_lock_file:
                os.close(self._fd)  # a lock file left by an earlier, killed run: not ours to remove
                self._fd = None
            else:
                self.release()
        for folder in self.made:
            try:
                folder.rmdir()  # only when empty: never takes anything else with it
            except OSError:
                break  # not empty (or gone): its parents are not empty either


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().parent == folder.resolve()
    except OSError:
        return False


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
