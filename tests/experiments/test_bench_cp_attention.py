"""``python -m bench.cp_attention --quick``: CP=1 and CP=2 spawned end to end, provenance recorded, the
bytes each rank moved equal to the planner's formula, the CP attention equal to one process, a table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.cp_attention import TABLE_NAME, render_table, row_metadata
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # experiments and benchmarks end to end


def test_quick_run_measures_cp1_and_cp2(tmp_path):
    out = tmp_path / "cp_attention.json"
    cmd = [sys.executable, "-m", "bench.cp_attention", "--quick", "--cp", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"

    r = json.loads(out.read_text())
    assert r["quick"] is True and r["commit"] and r["date"].endswith("Z") and r["versions"]["megatron_core"]
    assert r["command"] == "python -m bench.cp_attention --quick --cp 2"  # the scratch --out is not recorded
    rows = {(row["mask"], row["cp"]): row for row in r["rows"]}
    assert set(rows) == {(m, c) for m in ("documents", "images") for c in (1, 2)}
    for (_mask, cp), row in rows.items():
        assert 0 < row["step_ms"]["p10"] <= row["step_ms"]["median"] <= row["step_ms"]["p90"]
        # Bytes counted at megatron-core's collectives = the planner's 2 s b G d a x (c - 1) / c each.
        assert row["bytes_per_rank"] == row["predicted_bytes_per_rank"]
        if cp == 1:
            assert row["bytes_per_rank"] == {"all_gather": 0, "reduce_scatter": 0} and row["max_error"] is None
        else:
            assert row["bytes_per_rank"]["all_gather"] == 2 * 128 * 1 * 2 * 8 * 4 / 2
            assert row["max_error"] < 1e-5 and row["scaling_efficiency"] > 0
            assert row["mask_kind"] == "Tensor [1, 1, 64, 128] torch.bool"  # this rank's query rows, every key
    assert rows[("images", 2)]["pair_imbalance"] == 1.0  # two mirror-image documents: head-tail balances them

    table = (tmp_path / TABLE_NAME).read_text()
    assert table == render_table(tmp_path) and "(quick)" in table and r["commit"] in table


def test_row_metadata_masks():
    docs = row_metadata("documents", 1, 64, 0)["document_ids"][0]
    assert docs.unique().tolist() == [0, 1, 2, 3] and (docs.diff() >= 0).all()
    images = row_metadata("images", 1, 64, 0)
    assert (images["image_ids"] >= 0).sum() == 32  # half the tokens are patches, in 4 images
    assert images["image_ids"].unique().tolist() == [-1, 0, 1, 2, 3]
    causal = row_metadata("causal", 2, 64, 0)
    assert list(causal) == ["document_ids"] and not causal["document_ids"].any()  # one document per row
