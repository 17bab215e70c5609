"""``python -m bench.moma_layer --quick``: runs end to end, records provenance, equal active FLOPs, a table row.

The benchmark runs in a subprocess (it sets up and tears down its own process group, which
must not touch the session ``runtime`` fixture), writing only into ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.moma_layer import FLOPS_TOLERANCE, TABLE_NAME, parse_groups, render_table
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # experiments and benchmarks end to end


def test_quick_run_writes_result_and_table(tmp_path):
    out = tmp_path / "moma_layer_cpu.json"
    cmd = [sys.executable, "-m", "bench.moma_layer", "--quick", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"

    r = json.loads(out.read_text())
    for key in (
        "device",
        "versions",
        "commit",
        "date",
        "command",
        "load_average_1min",
        "shape",
        "dtype",
        "params",
        "layer_ms",
        "ratio",
        "mot_ratio",
        "moma_over_mot",
        "mlp_ms",
        "mlp_ratio",
        "router_ms",
        "flops",
        "tflops",
        "gpu_target",
    ):
        assert key in r, key
    assert r["benchmark"] == "moma_layer" and r["quick"] is True
    assert r["device"]["name"] and r["versions"]["megatron_core"]
    assert r["command"].startswith("python -m bench.moma_layer --quick --out ")
    assert r["date"].endswith("Z") and r["commit"]
    assert r["dtype"] == ("bf16" if r["device"]["type"] == "cuda" else "fp32")

    sh = r["shape"]
    assert sh["experts"] == {"text": 4, "image": 4} and sh["expert_ffn"] == sh["ffn"]
    assert sh["moma_untie"] == "attention,norms"
    # Default capacity: each expert takes ceil(n_m / 4) tokens of its modality.
    assert sh["tokens_per_expert"] == {m: -(-n // 4) for m, n in sh["tokens"].items()}
    assert sum(sh["tokens"].values()) == sh["seq"] * sh["batch"]

    f = r["flops"]
    assert f["dense"] == f["mot"] > 0 and f["matches_analytic"], f
    # MoMa = dense + router (2 h E per token, forward + backward) + ceil rounding (none here).
    tokens = sh["seq"] * sh["batch"]
    assert f["router"] == 3 * 2 * sh["hidden"] * 8 * tokens and f["rounding"] == 0
    assert f["moma"] == f["expected_moma"] == f["dense"] + f["router"] and f["matches_expected"]
    # The recorded ratio is the router's share on top of dense (the test's own count above).
    assert abs(f["ratio"] - (1 + f["router"] / f["dense"])) < 1e-6 and f["ratio"] <= 1 + FLOPS_TOLERANCE
    assert f["mlp"]["moma"] - f["mlp"]["dense"] == f["router"]

    for group in ("layer_ms", "mlp_ms"):
        for name in ("dense", "mot", "moma"):
            stat = r[group][name]
            assert 0 < stat["p10"] <= stat["median"] <= stat["p90"], (group, name, stat)
    assert r["router_ms"]["median"] > 0
    assert r["params"]["moma"] > r["params"]["mot"] > r["params"]["dense"]
    assert r["gpu_target"]["max_ratio"] == 1.05
    # Mixture-of-Depths: the dense layer on each row's floor(c x s) picked tokens, plus the router.
    mod = r["mod"]
    assert mod["capacity"] == 0.125 and mod["picked_per_row"] == sh["seq"] // 8
    assert mod["flops"] == mod["expected_flops"] and mod["matches_expected"], mod
    assert mod["flops_ratio"] < 0.125 + 0.05 and mod["layer_ms"]["median"] > 0
    assert (mod["gpu_target"]["met"] is None) == (r["device"]["type"] != "cuda")
    assert (r["gpu_target"]["met"] is None) == (r["device"]["type"] != "cuda")

    table = (tmp_path / TABLE_NAME).read_text()
    assert table == render_table(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "(quick)" in line]
    assert len(rows) == 1 and r["commit"] in rows[0] and f"`{r['command']}`" in rows[0] and "| 4t4i |" in rows[0]
    assert f"| 0.125 | {mod['ratio']:.3f} (" in rows[0]


def test_parse_groups():
    assert parse_groups("text=4, image=2", int, "--experts", "") == {"text": 4, "image": 2}
    assert parse_groups("mixed=8", int, "--experts", "") == {"mixed": 8}
    assert parse_groups("text=0.25,image=0.5", float, "--capacity", "") == {"text": 0.25, "image": 0.5}
    for bad in ("text4", "text=x", "=4"):
        with pytest.raises(Exception, match="name=value"):
            parse_groups(bad, int, "--experts", "")
