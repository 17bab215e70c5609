"""The Triton kernels compile for an H100 / H200 (sm_90) on this CPU-only machine.

The interpreter tests check what the kernels compute; only the compiler sees what a GPU run
would reject first (types that change inside a loop, unsupported ops, tile configs). Triton's
wheel carries its compiler passes and ``ptxas``, so ``python -m megafusion.kernels.compile_check``
lowers every autotune config and every variant the backend launches to cubin, here in bf16 (the
full matrix of dtypes and architectures is that command without arguments).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megafusion.ops import backends
from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(not backends.triton_installed(), reason="triton is not installed")


def test_every_kernel_variant_and_config_compiles_for_sm90(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    cmd = [sys.executable, "-m", "megafusion.kernels.compile_check", "--arch", "90", "--dtype", "bf16"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 9 and all(line.startswith("sm_90 bf16 ") for line in lines), proc.stdout
    assert any("weight gradient" in line for line in lines) and any("gate gradient" in line for line in lines)
