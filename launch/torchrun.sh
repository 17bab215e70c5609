#!/usr/bin/env bash
# Launch megafusion on one node with torchrun.
#   NPROC=4 launch/torchrun.sh --config examples/configs/tiny_dense.yaml parallel.tp=2 parallel.pp=2
# NPROC defaults to the number of GPUs (or 2 processes on a CPU-only machine).
#
# The ranks print on the console as under plain torchrun; torchrun's own messages (and the
# traceback it prints whenever a rank exits non-zero, a clean stop on a signal included) go to
# logs/torchrun-<date>-<pid>.log (TORCHRUN_LOG=FILE to choose). The exit status says how the
# run ended, and every outcome but 0 and 2 ends with one line naming that log
# (launch/torchrun_report.py):
#   0   finished
#   2   a user's error: the ranks' one line
#   75  stopped on a signal with a checkpoint saved: "preempted at step N, saved <checkpoint>;
#       run the same command again to continue"
#   76  forced out without saving (a second signal more than 5 s after the first, or
#       train.stop_deadline_s): run the same command again to continue from the last
#       complete checkpoint
#   any other: a crash, the failed rank's status (128 + N when signal N killed it), its
#       traceback above
# SIGTERM / SIGUSR1 sent to this process reach every rank once (torchrun passes them on); the
# ranks get MEGAFUSION_SHUTDOWN_TIMEOUT (default 115) s to finish the step and save.
#
# Environment knobs: NPROC, PYTHON (default: <repo>/.venv/bin/python, else the interpreter of
# torchrun, else python3), TORCHRUN_LOG, MEGAFUSION_SHUTDOWN_TIMEOUT,
# MEGAFUSION_EXIT_STATUS_FILE (where the ranks write the outcome; default next to the log,
# removed once it is in the log).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then  # the repository's venv, else the interpreter torchrun runs on, else python3
  PYTHON=python3
  if [[ -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON=$ROOT/.venv/bin/python
  elif command -v torchrun >/dev/null 2>&1; then
    shebang=$(head -n1 "$(command -v torchrun)")
    [[ "$shebang" == "#!"*python* && -x "${shebang#\#!}" ]] && PYTHON=${shebang#\#!}
  fi
fi
if [[ -z "${NPROC:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | wc -l)
  else
    NPROC=2
  fi
fi
LOG=${TORCHRUN_LOG:-logs/torchrun-$(date +%Y%m%d-%H%M%S)-$$.log}
exec "$PYTHON" "$HERE/torchrun_report.py" --log "$LOG" --report --prog launch/torchrun.sh -- \
  --standalone --nproc-per-node "$NPROC" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --shutdown-timeout "${MEGAFUSION_SHUTDOWN_TIMEOUT:-115}" \
  -m megafusion.train "$@"
