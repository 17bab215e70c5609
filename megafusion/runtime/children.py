"""No process outlives a run: child processes die with it, and are reaped on every exit path.

megatron-core's checkpoint writer forks one process per file bucket during a save; if the
trainer dies mid-save (SIGKILL after a grace period, a node failure), such a child would go on
writing a checkpoint nobody will complete. :func:`die_with_parent` makes every child forked from
now on receive SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``; elsewhere a no-op), and
:func:`reap_children` terminates whatever children remain when a command ends (the W&B service,
a writer of an interrupted save). The multiprocessing ``Manager`` megatron-core would start for
its write results (a server process plus a resource tracker, left running forever by a killed
run) is not started at all: see ``checkpoint.mcore_patches.no_writer_manager``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_installed = False
_before: set[int] = set()  # children that existed before the run (an in-process caller's own)


def _set_pdeathsig() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux, or no prctl: reap_children still runs at exit
        pass


def die_with_parent() -> None:
    """Every process forked from now on is killed when this one dies (idempotent)."""
    global _installed, _before
    import psutil

    _before = {c.pid for c in psutil.Process().children(recursive=True)}
    if _installed or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(after_in_child=_set_pdeathsig)
    _installed = True


def reap_children(timeout: float = 3.0) -> list[int]:
    """Terminate (then kill) every descendant process started since :func:`die_with_parent` that
    is still alive; returns their pids."""
    import psutil

    try:
        children = [c for c in psutil.Process().children(recursive=True) if c.pid not in _before]
    except psutil.Error:
        return []
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    return [c.pid for c in children]
