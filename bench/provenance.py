"""Where a recorded figure came from: the commit and the machine, for every result in bench/results.

Read-only git queries (``--no-optional-locks``: another git process may hold the index lock).
A checkout is "-dirty" when tracked files other than ``bench/results`` differ from HEAD (a
benchmark that rewrites earlier results does not mark its own commit dirty).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit() -> str:
    """Short HEAD, with "-dirty" when tracked files (bench/results aside) differ from it."""
    sha = git("rev-parse", "--short", "HEAD")
    if sha is None:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    return f"{sha}-dirty" if dirty else sha


def cpu_name() -> str:
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if names:
            return names[0].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine() -> str:
    """The GPU(s) where torch sees one, else the CPU model, cores and torch threads."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"{cpu_name()}, {cpu_cores()} cores, torch {torch.get_num_threads()} threads"


def utc_now() -> str:
    """The current UTC time as results record it: ``2026-11-23T19:56:44Z``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def recorded_or_now(info: dict) -> dict:
    """``commit``, ``machine``, ``date_utc``, ``command`` of a run as its launcher recorded them in
    ``info`` (an experiment's run_info.json); each one missing is this process's instead (an
    analysis of runs whose provenance was not recorded: all we know)."""
    import sys

    return {
        "commit": info.get("commit") or git_commit(),
        "machine": info.get("machine") or machine(),
        "date_utc": info.get("date_utc") or utc_now(),
        "command": info.get("command") or f"(analysis only) {' '.join(sys.argv)}",
    }


def repo_relative(value):
    """``value`` (nested dicts / lists) with every path string inside this repository written
    relative to it: results record ``runs/...``, not the machine's checkout directory."""
    if isinstance(value, dict):
        return {k: repo_relative(v) for k, v in value.items()}
    if isinstance(value, list):
        return [repo_relative(v) for v in value]
    prefix = f"{ROOT}{os.sep}"
    return value[len(prefix) :] if isinstance(value, str) and value.startswith(prefix) else value


def _outside_repository(path: str) -> bool:
    return not (ROOT / path).resolve().is_relative_to(ROOT)


def recorded_command(module: str, argv: list[str]) -> str:
    """``python -m <module> ARGS`` as a result records it: paths inside this repository relative to
    it (``key=PATH`` overrides too), and an ``--out`` outside the repository left out: that is a
    scratch file, and a result copied from it into ``bench/results`` must not name a path of the
    machine it ran on."""
    args, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--out" and i + 1 < len(argv) and _outside_repository(argv[i + 1]):
            skip = True
            continue
        if arg.startswith("--out=") and _outside_repository(arg.removeprefix("--out=")):
            continue
        key, eq, value = arg.rpartition("=") if "=" in arg else ("", "", arg)
        args.append(f"{key}{eq}{repo_relative(value)}")
    return shlex.join(["python", "-m", module, *args])


def write_table(results_dir, table_name: str, render_table) -> Path:
    """Write ``render_table(results_dir)`` (the markdown of every result there) to ``table_name`` in it."""
    path = Path(results_dir) / table_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_table(results_dir))
    return path
