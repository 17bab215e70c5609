"""``python -m bench.kernels --quick``: every backend checked against the loop, timed, and tabled.

On a CPU the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, tiny shapes):
the figures mean nothing, the run proves the benchmark works end to end for a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megafusion.ops import backends
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # experiments and benchmarks end to end


def test_quick_run_writes_result_and_table(tmp_path):
    out = tmp_path / "kernels_cpu.json"
    cmd = [sys.executable, "-m", "bench.kernels", "--quick", "--iters", "2", "--warmup", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # TRITON_INTERPRET from conftest
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    record = json.loads(out.read_text())
    assert {"machine", "commit", "date_utc", "command", "dtype", "torch"} <= set(record["info"])
    kinds = {r["kind"] for r in record["results"]}
    assert kinds == {"mot", "ec8"}
    for r in record["results"]:
        assert sum(r["counts"]) == r["n"]
        names = {case.split("/")[0] for case in r["tflops"]}
        assert {"dense", "loop"} <= names
        if backends.triton_installed():
            assert "triton" in names and r["max_rel_error_vs_loop"]["triton"] < 1e-4
    table = (tmp_path / "kernels.md").read_text()
    assert "| MoT 90/10 | 96 | 48 -> 32 | fwd+bwd |" in table
