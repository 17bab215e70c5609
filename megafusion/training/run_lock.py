"""One run at a time in a directory: a lock file that names its holder.

A training run holds its ``logging.out_dir`` and its ``checkpoint.dir`` for as long as it runs:
rank 0 of the job (the only process that takes it, on any number of nodes) creates ``run.lock`` in
each with ``O_CREAT | O_EXCL`` (atomic on local disks, NFS v3+ and Lustre) and writes who holds it:
host, pid, the process's start time, the SLURM job id and the command. A second run is refused at
start, in one line naming the holder. The holder touches the file every ``HEARTBEAT_S`` seconds and
removes it when the run ends, however it ends short of being killed.

A lock left by a process that is gone is *stale* and is taken over, with one line saying so:

- on the same host: its pid is not running, or runs another program (a reused pid: its start time
  differs from the recorded one);
- in the same SLURM job (a requeued job, even on another node): the earlier incarnation has ended;
- on another host: its heartbeat is older than ``STALE_AFTER_S`` (the holder cannot be asked).

A take-over renames the stale file first (atomic: of two runs taking over at once, one wins the
rename and the other is refused by the lock the winner then creates).

Nothing here imports torch: ``megafusion train`` takes the locks before torch is imported, so a
refusal takes well under a second.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from megafusion.core.errors import ConfigError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # a lock of another host whose heartbeat is older than this is stale

_held: dict[Path, RunLock] = {}  # directory -> the lock this process holds there


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def describe(holder: dict) -> str:
    """``host h1, pid 123, started 2026-12-07T03:50:01+0000, SLURM job 42``."""
    parts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}"]
    if holder.get("started"):
        parts.append(f"started {_when(holder['started'])}")
    if holder.get("job"):
        parts.append(f"SLURM job {holder['job']}")
    return ", ".join(parts)


class RunLock:
    """``run.lock`` in one directory, held by this process (see the module docstring)."""

    def __init__(self, directory: Path, what: str):
        self.directory, self.what = Path(directory), what
        self.path = self.directory / LOCK_NAME
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _process_start(os.getpid()),
            "job": os.environ.get("SLURM_JOB_ID"),
            "command": " ".join(sys.argv),
            "token": self.token,
        }

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> tuple[dict | None, float | None]:
        """The holder's record (None: unreadable, e.g. half written) and the heartbeat's age in s."""
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(text), age
        except json.JSONDecodeError:
            return None, age

    def stale_reason(self, holder: dict | None, age: float) -> str | None:
        """Why the holder is gone, or None when it may still be running."""
        if holder is None:  # a record being written, or a torn one
            return f"its record is unreadable and {age:.0f} s old" if age > STALE_AFTER_S else None
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("job") == job:
            return f"it is an earlier incarnation of this SLURM job ({job}), which has ended"
        if holder.get("host") == socket.gethostname():
            started = _process_start(int(holder.get("pid", -1)))
            if started is None:
                return "its process is no longer running"
            recorded = holder.get("started")
            if recorded is not None and abs(started - recorded) > 1.0:
                return "its process is no longer running (the pid now belongs to another process)"
            return None
        if age > STALE_AFTER_S:
            return f"its heartbeat is {age:.0f} s old (> {STALE_AFTER_S:.0f} s: the run on that host is gone)"
        return None

    def acquire(self, say) -> None:
        """Take the lock, or take over a stale one (saying so), or raise ``ConfigError`` naming the holder."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a holder may release, or another run take over, between two of our looks
            if self._create():
                self._start_heartbeat()
                return
            holder, age = self._read()
            if age is None:
                continue  # released just now: try again
            why = self.stale_reason(holder, age)
            if why is None:
                beat = f", last heartbeat {age:.0f} s ago" if age is not None else ""
                raise ConfigError(
                    f"{self.what} {self.directory} is in use by another run ({describe(holder or {})}{beat}; "
                    f"{self.path}): wait for it to end, or choose another {self.what}. If that run is gone, "
                    f"delete {self.path}"
                )
            aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
            try:
                os.rename(self.path, aside)  # one of several runs taking over at once wins this
            except FileNotFoundError:
                continue
            aside.unlink(missing_ok=True)
            say(f"[megafusion] took over {self.path}: {why} ({describe(holder or {})})")
        raise ConfigError(f"could not take {self.path}: other runs keep taking it; start one run at a time")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    pass  # a full or flaky disk must not stop training; the next beat retries

        self._thread = threading.Thread(target=beat, name=f"megafusion-lock-{self.directory.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Remove the lock if it is still ours (a take-over by another run after a long stall is theirs)."""
        self._stop.set()
        holder, _ = self._read()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def hold(directories: dict[str, Path], say) -> None:
    """Take the lock of each ``{what: directory}`` not already held by this process (idempotent: the
    command takes them before torch is imported, the trainer again when called directly)."""
    for what, directory in directories.items():
        directory = Path(directory).resolve()
        if directory in _held:
            continue
        lock = RunLock(directory, what)
        lock.acquire(say)
        _held[directory] = lock


def release_all() -> None:
    """Release every lock this process holds (the end of a run, on any exit path)."""
    while _held:
        _, lock = _held.popitem()
        lock.release()
