"""``bench/transfusion_shapes.py`` end to end at toy size: trains, evaluates, records provenance."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # experiments and benchmarks end to end


def test_quick_run_records_accuracy_chance_and_provenance(tmp_path):
    from bench.transfusion_shapes import recorded

    out = tmp_path / "result.json"
    earlier = recorded(ROOT / "bench/results/transfusion_shapes.json")[0]  # kept beside the new result
    out.write_text(json.dumps(earlier))
    cmd = [
        sys.executable,
        "-m",
        "bench.transfusion_shapes",
        "--quick",
        "--config",
        "tests/configs/transfusion_small.yaml",
        "--out",
        str(out),
        f"logging.out_dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results) == 2 and results[0] == earlier
    result = results[1]
    assert result["step"] == 2 and result["samples"] == 3 and result["train_seconds"] > 0
    assert set(result["accuracy"]) == set(result["chance"]) == {"colour", "shape", "position", "all"}
    assert result["chance"]["colour"] == 1 / 6 and result["chance"]["position"] == 1 / 9
    assert result["commit"] and result["machine"] and "transfusion_small.yaml" in result["train_command"]
    assert result["validation"]["val/loss/diffusion"] > 0 and len(result["caption_gap"]["matching"]) == 3
    table = out.with_suffix(".md").read_text()
    assert result["commit"] in table and earlier["commit"] in table and "(0.167)" in table  # accuracy (chance)
    assert "noise 0.9: " in table
