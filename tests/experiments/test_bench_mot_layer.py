"""``python -m bench.mot_layer --quick``: runs end to end, records provenance, equal FLOPs, a table row.

The benchmark runs in a subprocess (it sets up and tears down its own process group, which
must not touch the session ``runtime`` fixture), writing only into ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.mot_layer import TABLE_NAME, modality_layout, render_table
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # experiments and benchmarks end to end


def test_quick_run_writes_result_and_table(tmp_path):
    out = tmp_path / "mot_layer_cpu.json"
    cmd = [sys.executable, "-m", "bench.mot_layer", "--quick", "--out", str(out)]
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
        "shape",
        "dtype",
        "layer_ms",
        "ratio",
        "mlp_ms",
        "routing_ms",
        "flops",
        "tflops",
    ):
        assert key in r, key
    assert r["quick"] is True and r["device"]["name"] and r["versions"]["megatron_core"]
    assert r["command"].startswith("python -m bench.mot_layer --quick --out ")
    assert r["date"].endswith("Z") and r["commit"]
    assert r["dtype"] == ("bf16" if r["device"]["type"] == "cuda" else "fp32")
    assert r["flops"]["dense"] == r["flops"]["mot"] > 0
    assert r["flops"]["matches_analytic"], r["flops"]
    for group in ("layer_ms", "mlp_ms"):
        for name in ("dense", "mot"):
            stat = r[group][name]
            assert 0 < stat["p10"] <= stat["median"] <= stat["p90"], (group, name, stat)
    assert r["routing_ms"]["layer"]["median"] > 0
    assert r["ratio"] > 0 and r["params"]["mot"] > r["params"]["dense"]
    assert sum(r["shape"]["tokens"].values()) == r["shape"]["seq"] * r["shape"]["batch"]

    table = (tmp_path / TABLE_NAME).read_text()
    assert table == render_table(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "(quick)" in line]
    assert len(rows) == 1 and r["commit"] in rows[0] and f"`{r['command']}`" in rows[0]


def test_layout_interleaves_exact_image_fraction():
    ids = modality_layout(batch=3, seq=40, image_fraction=0.25, images_per_row=2, seed=1)
    assert ids.sum(dim=1).tolist() == [10, 10, 10]
    for row in ids.tolist():
        starts = sum(1 for a, b in zip([0] + row, row) if (a, b) == (0, 1))
        assert starts in (1, 2)  # two images, which merge only when no text lies between them
    assert modality_layout(2, 8, 0.0, 2, 0).sum() == 0 and modality_layout(2, 8, 1.0, 2, 0).all()
