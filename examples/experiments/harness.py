"""What the experiments in this folder share: launching their steps, and writing their reports.

Each experiment is a folder with ``run.py`` (trains the runs, then reports) and ``analyze.py``
(the report from runs already there), run as modules from the repository root, like the
benchmarks (``python -m bench.<name>``)::

    python -m examples.experiments.mot_vs_dense.run
    python -m examples.experiments.moma.analyze --out-dir runs/moma

- launching: :func:`run_logged` runs a process in the repository root with its output shown, kept
  in a log and returned; :func:`run_inprocess` runs ``megafusion <args>`` in this process the same
  way (the quick runs: no ~10 s of imports per step); :class:`Tee` is the stream behind both;
  :func:`run_megafusion` runs one step either way (:func:`command_line` is its process, a failure
  :class:`StepFailed`), :func:`load_config` reads the shared config, :func:`clean` deletes what an
  earlier run left;
- paths as results record them: :func:`shown` / :func:`shown_arg` (relative to the repository
  root), :func:`recorded_command` (the command a run records);
- reports: :class:`AnalysisError` (one line, then exit code 2: :func:`finish`), :func:`read_run_info`,
  :func:`provenance_lines` (the header every report starts with), :func:`fmt_loss`, :func:`pyplot`
  (matplotlib without a display, or one line naming the extra to install) and :func:`write_report`
  (``<name>.json``, ``.md`` and ``.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from io import StringIO
from pathlib import Path

from bench.provenance import ROOT, repo_relative


class AnalysisError(RuntimeError):
    """The report cannot be made: the runs are missing or unusable, or what it needs is not installed;
    the message says which file or package and what to do."""


# --------------------------------------------------------------------------- launching
class Tee:
    """A text stream that writes to several streams (the console, a step's log, a buffer)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()

    def isatty(self):
        return False


def run_logged(cmd: list[str], log, env: dict | None = None) -> tuple[int, str]:
    """Run ``cmd`` in the repository root to its end, its output (stdout and stderr) shown and written
    to ``log``; return its exit code and output. Interrupted (Ctrl-C), it stops the process too."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            lines.append(line)
    except BaseException:  # e.g. Ctrl-C: do not leave the step running on its own
        proc.terminate()
        proc.wait()
        raise
    return proc.wait(), "".join(lines)


def run_inprocess(args: list[str], log) -> tuple[int, str]:
    """``megafusion <args>`` in this process, in the repository root, as :func:`run_logged` runs a
    process: output shown, logged and returned; an exception becomes exit code 1, as in a process."""
    from megafusion.commands.main import main as cli_main

    captured = StringIO()
    tee = Tee(sys.__stdout__, log, captured)
    cwd = os.getcwd()
    os.chdir(ROOT)  # as run_logged: relative paths are from the repository root
    try:
        with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(tee):
            try:
                rc = cli_main(args)
            except SystemExit as exit_:  # as a process would end
                rc = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:  # noqa: BLE001 -- reported like a failed process
                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(cwd)
    return int(rc or 0), captured.getvalue()


class StepFailed(RuntimeError):
    """A step of an experiment (a training run, a conversion) failed; the message names its log."""


def command_line(args: list[str]) -> list[str]:
    """The process that runs ``megafusion <args>``: training as ``python -m megafusion.train``."""
    if args[0] == "train":
        return [shown(sys.executable), "-m", "megafusion.train", *args[1:]]
    return [shown(sys.executable), "-m", "megafusion", *args]


def run_megafusion(args: list[str], log_path: Path, launcher: str, tag: str) -> float:
    """Run ``megafusion <args>`` to completion (``launcher``: one process, or ``inprocess``), echoing
    and logging its output; return its wall time. StepFailed (naming the log) when it fails."""
    print(f"{tag} {shlex.join(command_line(args))}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        rc, _ = run_logged(command_line(args), log) if launcher == "subprocess" else run_inprocess(args, log)
    elapsed = time.perf_counter() - start
    if rc != 0:
        raise StepFailed(f"`megafusion {args[0]}` failed (exit code {rc}); its output is in {shown(log_path)}")
    return elapsed


def load_config(config: Path, overrides: list[str]):
    """The experiment's shared config with ``overrides``; ValueError (the config's message) when bad."""
    from megafusion.config import ConfigError, load_config

    try:
        return load_config(str(config), overrides)
    except ConfigError as err:
        raise ValueError(str(err)) from None


def clean(path: Path) -> None:
    """Delete what an earlier run left at ``path`` (MetricsLogger appends to metrics.jsonl, and a run
    refuses a checkpoint folder of another run)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --------------------------------------------------------------------------- paths as shown
def shown(path) -> str:
    """A path relative to the repository root where it lies inside it (shorter commands and reports).

    abspath, not resolve: resolving symlinks would turn the venv's python into the base one."""
    path = Path(os.path.abspath(path))
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def shown_arg(arg: str) -> str:
    """A command-line argument with its path (alone, or the value of key=PATH) shortened by :func:`shown`."""
    key, sep, value = arg.partition("=")
    if sep and os.path.isabs(value):
        return f"{key}={shown(value)}"
    return shown(arg) if os.path.isabs(arg) else arg


def recorded_command(run_command: str, argv: list[str]) -> str:
    """The command a run records: ``run_command`` (``python -m examples.experiments.<name>.run``) and ``argv``."""
    return shlex.join([*shlex.split(run_command), *argv])


# --------------------------------------------------------------------------- reports
def read_run_info(out_dir: Path, fix: str) -> dict:
    """``<out_dir>/run_info.json`` as a run.py wrote it, or {} where there is none; ``fix`` says what to
    do when it is not JSON."""
    path = Path(out_dir) / "run_info.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AnalysisError(f"{path} is not JSON ({err}): {fix}") from None


def provenance_lines(result: dict) -> list[str]:
    """The lines every report starts with: commit, machine, date and command of the runs."""
    return [
        f"- commit: `{result['commit']}`",
        f"- machine: {result['machine']}",
        f"- date (UTC): {result['date_utc']}",
        f"- command: `{result['command']}`",
    ]


def fmt_loss(x) -> str:
    """A loss as the tables show it (4 decimals; "n/a" where there is none)."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def fmt_pct(x, upper_bound: bool = False) -> str:
    """A fraction as a percentage ("not reached" for None; "<= " when it is an upper bound)."""
    return "not reached" if x is None else f"{'<= ' if upper_bound else ''}{100 * x:.1f}%"


def pyplot():
    """``matplotlib.pyplot`` drawing without a display; AnalysisError naming the extra when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise AnalysisError("the plots need matplotlib, which is not installed: pip install -e .[plots]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(result: dict, base: Path, markdown: Callable[[dict], str], plot: Callable[[dict, Path], None]) -> None:
    """``<base>.json`` (every number, paths relative to the repository), ``<base>.md`` (``markdown``)
    and ``<base>.png`` (``plot``), in that order: without matplotlib the first two are still written."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{base}.json").write_text(json.dumps(repo_relative(result), indent=1) + "\n")
    Path(f"{base}.md").write_text(markdown(result))
    try:
        plot(result, Path(f"{base}.png"))
    except AnalysisError as err:
        raise AnalysisError(f"wrote {shown(base)}.json and .md, not .png: {err}") from None


def finish(tag: str, write: Callable[[], dict], markdown: Callable[[dict], str], base: Callable[[dict], Path]) -> int:
    """Make the report (``write()``), print it and where it went (``base(result)``.json, .md, .png):
    exit code 0; or the AnalysisError's one line after ``tag``: 2."""
    try:
        result = write()
    except AnalysisError as err:
        print(f"{tag} {err}", file=sys.stderr)
        return 2
    print(markdown(result))
    print(f"{tag} wrote {shown(base(result))}.json, .md, .png")
    return 0


def add_run_arguments(parser: argparse.ArgumentParser, name: str, config: Path) -> None:
    """The options every experiment's ``run.py`` takes after its own: where runs and results go, the
    shared config, the launcher, analysis only, and ``section.key=value`` overrides for every run."""
    parser.add_argument(
        "--out-dir", default=None, help=f"one folder per run (default: runs/{name}, with --quick runs/{name}_quick)"
    )
    parser.add_argument(
        "--results",
        default=None,
        help=f"where {name}.{{json,md,png}} go (default: bench/results, with --quick runs/{name}_quick/results)",
    )
    parser.add_argument("--config", default=str(config), help="the shared config (default: this folder's config.yaml)")
    parser.add_argument(
        "--launcher",
        choices=("subprocess", "inprocess"),
        default=None,
        help="one process per step (default) or all in this one (default with --quick)",
    )
    parser.add_argument("--analyze-only", action="store_true", help="skip training; analyse the runs in --out-dir")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to every run")


def parse_run_arguments(parser: argparse.ArgumentParser, argv: list[str], name: str, reserved) -> tuple:
    """``(args, out_dir, results)``: the parsed options (``args.launcher`` defaulted), overrides that set
    none of ``reserved`` (the script sets those per run) and an existing ``--config``, else a usage error."""
    args = parser.parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o or o.split("=", 1)[0] in reserved]
    if bad:
        parser.error(
            f"{', '.join(bad)}: overrides must be section.key=value and may not set "
            f"{', '.join(reserved)} (this script sets them per run; use --out-dir)"
        )
    out_dir = Path(args.out_dir or (f"runs/{name}_quick" if args.quick else f"runs/{name}")).resolve()
    results = Path(args.results or (out_dir / "results" if args.quick else "bench/results")).resolve()
    if not args.analyze_only and not Path(args.config).resolve().is_file():
        parser.error(f"--config {args.config}: no such file")
    args.launcher = args.launcher or ("inprocess" if args.quick else "subprocess")
    return args, out_dir, results
