"""Stopping a run on a signal without losing it: finish the step, save, exit 75 (requeue me).

SLURM warns a job before its time limit with the signal ``--signal=B:USR1@120`` names
(``launch/slurm/train.sbatch`` passes it on to every rank) and preempts one with SIGTERM,
followed by SIGKILL after a grace time. :class:`StopSignals` replaces the handlers of
``train.stop_signals``: the first signal only sets a flag; after each step the ranks agree (one
all-reduce of one number) and, if any rank was signalled, every rank saves a checkpoint and the
run raises :class:`Preempted`, whose exit status :data:`EXIT_PREEMPTED` tells a launcher to run
the same command again (it resumes from that checkpoint). A second signal more than
:data:`DUPLICATE_WINDOW_S` seconds after the first, or ``train.stop_deadline_s`` seconds without
reaching the end, forces the exit at once (:data:`EXIT_FORCED`) after killing the process's
children: ``latest`` still names the last complete checkpoint. A signal within
:data:`DUPLICATE_WINDOW_S` of the first is taken as a copy of it, because one signal reaches a
rank more than once within milliseconds (under SLURM, slurmstepd and torchrun both pass it on)
and a signal carries nothing that tells a copy from a person's second ``kill``; rank 0 says so once.

With ``MEGAFUSION_EXIT_STATUS_FILE`` set (both launchers set it), the outcome is also written
there (``preempted step N <checkpoint>``, ``forced <why>``, ``done step N``), because torchrun
reports a worker's status 75 as a plain failure; ``launch/torchrun_report.py`` and
``launch/slurm/train.sbatch`` turn it into their one-line report and exit status.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly, checkpoint saved; run the same command again
EXIT_FORCED = 76  # a second signal or the deadline: exited without saving
STATUS_FILE_VARIABLE = "MEGAFUSION_EXIT_STATUS_FILE"
# Signals within this many seconds of the first are copies of it (launchers forwarding one signal).
DUPLICATE_WINDOW_S = 5.0


class Preempted(SystemExit):
    """A clean stop on a signal (status 75); ``message`` says where the checkpoint is."""

    def __init__(self, message: str):
        super().__init__(EXIT_PREEMPTED)
        self.message = message


def write_status(text: str) -> None:
    path = os.environ.get(STATUS_FILE_VARIABLE)
    if not path:
        return
    try:
        with open(path, "w") as f:
            f.write(text + "\n")
    except OSError:
        pass  # the exit status still says it


class StopSignals:
    """The handlers of the stop signals, for the life of one training loop (a context manager)."""

    def __init__(self, names: str, deadline_s: float, rank: int = 0):
        self.signals = [getattr(signal, n.strip()) for n in names.split(",") if n.strip()]
        self.deadline_s = deadline_s
        self.rank = rank
        self.received: str | None = None
        # The newest complete checkpoint (the trainer sets it after each save): a forced exit names it.
        self.last_checkpoint: str | None = None
        self._first_at = 0.0
        self._copy_said = False
        self._previous: dict = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    def _say(self, text: str) -> None:
        os.write(2, f"[megafusion] rank {self.rank}: {text}\n".encode())  # print() is not reentrant

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = name, now
            self._say(
                f"{name} received: finishing this step, then saving a checkpoint and exiting (a second signal "
                f"more than {DUPLICATE_WINDOW_S:g} s after this one, or train.stop_deadline_s={self.deadline_s:g} "
                f"s, forces the exit without saving)"
            )
            why = f"train.stop_deadline_s={self.deadline_s:g} passed"
            self._timer = threading.Timer(self.deadline_s, self.force, args=(why,))
            self._timer.daemon = True
            self._timer.start()
        elif now - self._first_at > DUPLICATE_WINDOW_S:
            self.force(f"second signal ({name})")
        elif self.rank == 0 and not self._copy_said:
            self._copy_said = True
            self._say(
                f"{name} {now - self._first_at:.1f} s after the first signal: taken as a copy of it (launchers "
                f"pass one signal on several times); a signal more than {DUPLICATE_WINDOW_S:g} s after the first "
                f"forces the exit"
            )

    def force(self, why: str) -> None:
        from megafusion.runtime.children import reap_children

        kept = (
            f"the last complete checkpoint, {self.last_checkpoint}, is kept"
            if self.last_checkpoint
            else "no checkpoint was saved by this run (checkpoint.dir/latest, if any, is kept)"
        )
        self._say(f"{why}: exiting now without saving; {kept}")
        write_status(f"forced {why}")
        reap_children(timeout=1.0)
        from megafusion.training import run_lock

        run_lock.release_all()  # the rerun finds the directories free (not a stale lock to take over)
        os._exit(EXIT_FORCED)

    def agreed(self, device: torch.device) -> str | None:
        """Whether any rank was signalled (a collective: every rank calls it after every step)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            return self.received or "a signal on another rank"
        return None

    def injected(self, step: int) -> None:
        """Test hook: ``MEGAFUSION_FAULT=sigterm:<step>[:<rank>]`` signals this process (rank 0 by
        default) at the start of that step, as a scheduler would."""
        fault = os.environ.get("MEGAFUSION_FAULT", "").split(":")
        if fault[0] == "sigterm" and int(fault[1]) == step and int(fault[2] if len(fault) > 2 else 0) == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)
