"""torchrun with its own messages in a log file, the ranks' exit status, and (``--report``) one line
saying how the run ended.

    python launch/torchrun_report.py --log FILE [--report] [--prog NAME] -- <torchrun arguments>

The ranks keep the console: they inherit it, as under plain torchrun (``--tee`` copies, which
torchrun prints itself, stay on the console too). torchrun's own messages go to ``FILE``: its
warnings, "Sending process ... closing signal", and the 25-50-line ``ChildFailedError``
traceback it prints whenever a rank exits non-zero, a clean stop on a signal (status 75)
included. ``%n`` in ``FILE`` stands for ``SLURM_NODEID`` (one file per node under srun).

The exit status is the ranks' own instead of torchrun's 1: that of the first rank to fail
(a rank's own status before one killed by a signal N, which gives 128 + N). torchrun failing by
itself (a bad argument, a rendezvous error) prints its traceback on the console as well.

``--report`` (``launch/torchrun.sh``): the ranks write how the run ended to
``MEGAFUSION_EXIT_STATUS_FILE`` (set here to ``FILE`` + ``.status`` unless given;
``megafusion/training/preemption.py``), and this ends with one line ``NAME: ...``:

- ``preempted step N <checkpoint>``: "preempted at step N, saved <checkpoint>; run the same command
  again to continue", exit status 75;
- ``forced <why>``: "stopped without saving (<why>) ...", exit status 76;
- a crash: which rank failed with which status, exit status that status;
- a finished run (0) or a user's error (2, the ranks' one line above): no line.

Every line names the log file, which holds torchrun's messages in every case. No megafusion
import: the agent needs only torch.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback

EXIT_PREEMPTED, EXIT_FORCED = 75, 76  # megafusion.training.preemption
STATUS_FILE_VARIABLE = "MEGAFUSION_EXIT_STATUS_FILE"
USAGE = "usage: torchrun_report.py --log FILE [--report] [--prog NAME] -- <torchrun arguments>"


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    if "--" not in argv:
        sys.exit(USAGE)
    cut = argv.index("--")
    own, rest = argv[:cut], argv[cut + 1 :]
    opts = {"log": None, "report": False, "prog": "torchrun"}
    i = 0
    while i < len(own):
        if own[i] == "--report":
            opts["report"] = True
        elif own[i] in ("--log", "--prog") and i + 1 < len(own):
            opts[own[i][2:]] = own[i + 1]
            i += 1
        else:
            sys.exit(f"{USAGE}\nunknown argument {own[i]!r}")
        i += 1
    if not opts["log"]:
        sys.exit(USAGE)
    return opts, rest


def _status_of(exitcode: int) -> int:
    return 128 - exitcode if exitcode < 0 else exitcode  # torch reports a death by signal N as -N


def _describe(exitcode: int) -> str:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} (exit status {128 - exitcode})"
    return f"exited with status {exitcode}"


def run_torchrun(args: list[str], log) -> tuple[int, str]:
    """Run torchrun's ``main`` here with its messages in ``log``: (exit status, what failed)."""
    console = sys.stderr
    sys.stderr = log  # torch sets up its log handlers at import, on the stderr of that moment
    try:
        from torch.distributed import run as torchrun
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    finally:
        sys.stderr = console  # what torchrun creates later (its --tee copies) writes to the console
    sys.argv = ["torchrun", *args]
    try:
        torchrun.main(args)
        return 0, ""
    except ChildFailedError as err:
        traceback.print_exc(file=log)
        # the first failure by time; at the same second (torch's resolution), a rank's own status
        # before the signal torchrun sent the others when it saw that failure
        rank, failure = min(err.failures.items(), key=lambda kv: (kv[1].timestamp, kv[1].exitcode < 0))
        return _status_of(failure.exitcode), f"rank {rank} {_describe(failure.exitcode)}"
    except SignalException as err:  # torchrun was signalled: it passed the signal on and waited
        traceback.print_exc(file=log)
        return 128 + int(err.sigval), f"torchrun stopped on {signal.Signals(err.sigval).name}"
    except SystemExit:
        raise  # torchrun's usage errors: argparse has printed them on the console
    except BaseException as err:  # torchrun's own failure: the traceback is all there is to see
        traceback.print_exc(file=log)
        traceback.print_exc()
        return 1, f"torchrun failed ({type(err).__name__}: {err})"


def report(status_text: str, code: int, failed: str, log_path: str) -> tuple[str | None, int]:
    """The one line and the exit status for what the ranks wrote (``status_text``) and torchrun's outcome."""
    where = f"torchrun's messages: {log_path}"
    words = status_text.split(maxsplit=3)
    if words[:2] == ["preempted", "step"] and len(words) >= 3:
        saved = f"saved {words[3]}" if len(words) > 3 else "nothing saved (checkpoint.save=false)"
        return (
            f"preempted at step {words[2]}, {saved}; run the same command again to continue "
            f"(exit status {EXIT_PREEMPTED}; {where})",
            EXIT_PREEMPTED,
        )
    if words[:1] == ["forced"]:
        why = status_text.split(maxsplit=1)[1] if len(words) > 1 else "forced"
        return (
            f"stopped without saving ({why}); checkpoint.dir/latest names the last complete checkpoint: run the same "
            f"command again to continue from it (exit status {EXIT_FORCED}; {where})",
            EXIT_FORCED,
        )
    if code in (0, 2):  # done, or a user's error, which the ranks have said in one line
        return None, code
    failed = failed or f"the run failed (exit status {code})"
    return f"{failed}: the ranks' messages are above, torchrun's in {log_path}", code


def main(argv: list[str]) -> int:
    opts, args = parse(argv)
    log_path = opts["log"].replace("%n", os.environ.get("SLURM_NODEID", "0"))
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    status_path = os.environ.get(STATUS_FILE_VARIABLE) or f"{log_path}.status"
    if opts["report"]:
        os.environ[STATUS_FILE_VARIABLE] = status_path  # the ranks inherit it
        if os.path.exists(status_path):
            os.remove(status_path)  # an earlier run's outcome is not this one's
    with open(log_path, "a", buffering=1) as log:
        log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} torchrun {' '.join(args)}\n")
        code, failed = run_torchrun(args, log)
        if not opts["report"]:
            return code
        try:
            with open(status_path) as f:
                status_text = f.read().strip()
        except OSError:
            status_text = ""
        line, code = report(status_text, code, failed, log_path)
        log.write(f"== outcome: {status_text or 'none written'}; exit status {code}\n")
        if status_path == f"{log_path}.status" and os.path.exists(status_path):
            os.remove(status_path)  # ours, and now in the log
    if line:
        print(f"{opts['prog']}: {line}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
