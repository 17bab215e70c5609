"""``launch/slurm/train.sbatch`` under preemption: the signal SLURM sends the batch shell reaches the
ranks (through srun), and a run that stopped on it is requeued, with one line and exit status 75
(saved) or 76 (forced out without saving); one that ended or crashed is not, and exits with the
ranks' status.

srun and scontrol are fakes: srun stands for the ranks (it traps USR1 and writes what a rank
writes to ``MEGAFUSION_EXIT_STATUS_FILE``), scontrol records its arguments.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT

SBATCH = ROOT / "launch/slurm/train.sbatch"
CONFIG = ROOT / "examples/configs/tiny_dense.yaml"

FAKE_SRUN = """#!/bin/bash
# the ranks: stop on USR1 like megafusion.train does (save, write the status, exit 75)
trap 'echo "$OUTCOME" > "$MEGAFUSION_EXIT_STATUS_FILE"; exit 75' USR1
touch "$READY"
for i in $(seq 300); do sleep 0.1; done
echo "done step 10" > "$MEGAFUSION_EXIT_STATUS_FILE"
"""


@pytest.fixture
def slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fake-srun").write_text(FAKE_SRUN)
    (bin_dir / "fake-scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "GPUS_PER_NODE"))}
    env.update(
        {
            "SLURM_JOB_ID": "777",
            "SLURM_NNODES": "1",
            "GPUS_PER_NODE": "1",
            "RDZV_HOST": "localhost",
            "PYTHON": sys.executable,
            "PYTHONPATH": str(ROOT),
            "MEGAFUSION_SRUN": str(bin_dir / "fake-srun"),
            "MEGAFUSION_SCONTROL": str(bin_dir / "fake-scontrol"),
            "MEGAFUSION_PREFLIGHT": "0",
            "READY": str(tmp_path / "ready"),
        }
    )
    return tmp_path, env


def _start(tmp_path, env):
    return subprocess.Popen(
        ["bash", str(SBATCH), "--config", str(CONFIG)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize(
    "outcome, rc, line",
    [
        (
            "preempted step 3 runs/x/checkpoints/step_0000003",
            75,
            "preempted at step 3, saved runs/x/checkpoints/step_0000003: requeueing job 777 to continue it "
            "(exit status 75; torchrun's messages: logs/777/torchrun/)",
        ),
        (
            "forced second signal (SIGTERM)",
            76,
            "stopped without saving (second signal (SIGTERM)); checkpoint.dir/latest names the last complete "
            "checkpoint: requeueing job 777 to continue it (exit status 76;",
        ),
    ],
    ids=["saved", "forced"],
)
def test_usr1_reaches_the_ranks_and_the_job_is_requeued(slurm, outcome, rc, line):
    tmp_path, env = slurm
    proc = _start(tmp_path, {**env, "OUTCOME": outcome})
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@120` does
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == rc, out
    assert "SIGUSR1 received: passing it on" in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "777"]
    assert line in out, out


def test_a_finished_or_crashed_run_is_not_requeued(slurm):
    tmp_path, env = slurm
    srun = tmp_path / "bin/fake-srun"
    srun.write_text('#!/bin/bash\necho "done step 10" > "$MEGAFUSION_EXIT_STATUS_FILE"\n')
    out = _start(tmp_path, env).communicate(timeout=60)[0]
    assert "finished with status 0 (done step 10)" in out
    srun.write_text("#!/bin/bash\nexit 3\n")  # a crash: the ranks' status, nothing written
    proc = _start(tmp_path, env)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 3, out
    assert "finished with status 3" in out
    assert not (tmp_path / "scontrol.log").exists()
