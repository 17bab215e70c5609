"""The MoT-vs-dense experiment (examples/experiments/mot_vs_dense): its analysis on synthetic
metrics files with known answers, and one tiny end-to-end run of run.py."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

HERE = ROOT / "examples" / "experiments" / "mot_vs_dense"
_spec = importlib.util.spec_from_file_location("mot_vs_dense_analyze", HERE / "analyze.py")
analyze = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(analyze)

STEPS, EVAL_EVERY, STEP_FLOPS = 100, 20, 1e9


def write_run(run_dir, val_loss, step_time: float, steps: int = STEPS):
    """A metrics.jsonl as megafusion writes it: one training line per step and an evaluation line
    every EVAL_EVERY steps; ``val_loss(modality, step)`` gives every loss (training ones too)."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            record = {"step": step, "step_time_s": step_time, "flops": STEP_FLOPS, "flops_total": step * STEP_FLOPS,
                      "loss": val_loss("overall", step)}
            record.update({f"loss/{m}": val_loss(m, step) for m in ("text", "image")})
            f.write(json.dumps(record) + "\n")
            if step % EVAL_EVERY == 0:
                val = {"step": step, "val/loss": val_loss("overall", step)}
                val.update({f"val/loss/{m}": val_loss(m, step) for m in ("text", "image")})
                f.write(json.dumps(val) + "\n")


def dense_loss(modality, step):
    return 5.0 - 0.02 * step  # 3.0 at the end


def mot_loss(modality, step):
    # text: dense's final 3.0 at step 50 (between the evaluations at 40 and 60), i.e. 50% of the FLOPs;
    # overall: at step 80 (an evaluation point); image: never (4.0 at the end).
    slope = {"text": 0.04, "overall": 0.025, "image": 0.01}[modality]
    return 5.0 - slope * step


@pytest.fixture
def runs(tmp_path):
    write_run(tmp_path / "runs" / "dense", dense_loss, step_time=0.1)
    write_run(tmp_path / "runs" / "mot", mot_loss, step_time=0.15)  # slower steps: wall fraction 1.5 x FLOPs'
    return tmp_path / "runs"


def test_fractions_on_known_curves(runs, tmp_path):
    result = analyze.write_results(runs, tmp_path / "results")
    val = result["validation"]
    assert val["text"]["dense_final"] == pytest.approx(3.0)
    assert val["text"]["reached"] and val["text"]["mot_step"] == pytest.approx(50)
    assert val["text"]["flops_fraction"] == pytest.approx(0.5)
    assert val["text"]["wall_fraction"] == pytest.approx(0.75)
    assert val["overall"]["flops_fraction"] == pytest.approx(0.8) and not val["overall"]["at_first_point"]
    assert not val["image"]["reached"] and val["image"]["flops_fraction"] is None
    assert val["image"]["mot_final"] == pytest.approx(4.0)
    # The smoothed training loss lags equally in both runs: reached for text near 50%, never for image.
    ema = result["train_loss_ema"]
    assert ema["text"]["reached"] and 0.45 < ema["text"]["flops_fraction"] < 0.6
    assert not ema["image"]["reached"]
    assert result["runs"]["dense"]["wall_clock_s"] == pytest.approx(10.0)

    base = tmp_path / "results" / "mot_vs_dense"
    saved = json.loads(base.with_suffix(".json").read_text())
    assert saved["validation"]["text"]["flops_fraction"] == pytest.approx(0.5)
    assert saved["commit"] and saved["machine"] and saved["date_utc"].endswith("Z")
    table = base.with_suffix(".md").read_text()
    assert "| text | 3.0000 | 1.0000 | 50.0% | 75.0% |" in table
    assert "| image | 3.0000 | 4.0000 | not reached | not reached |" in table
    assert base.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ema_and_crossing_helpers():
    assert analyze.ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull to 0
    smoothed = analyze.ema([1.0, math.nan, 3.0])  # a step without tokens of a modality is skipped
    assert smoothed[1] == smoothed[0] == pytest.approx(1.0) and 1.0 < smoothed[2] < 3.0
    assert analyze.first_crossing([1, 2, 3], [5.0, 4.0, 2.0], 3.0) == (2.5, 1.5)
    assert analyze.first_crossing([1, 2, 3], [2.0, 1.0, 0.5], 3.0) == (1, 0.0)  # already below: first point
    assert analyze.first_crossing([1, 2], [5.0, 4.0], 3.0) is None
    early = analyze.compare({"flops": [1.0, 2.0], "wall_s": [1.0, 2.0], "step": [1, 2], **dict.fromkeys(
        analyze.MODALITIES, [3.0, 2.0])}, {"flops": [1.0, 2.0], "wall_s": [2.0, 4.0], "step": [1, 2], **dict.fromkeys(
        analyze.MODALITIES, [1.5, 1.0])})
    assert early["text"]["at_first_point"] and early["text"]["flops_fraction"] == 0.5  # an upper bound
    assert analyze._pct(0.5, upper_bound=True) == "<= 50.0%"


def test_missing_and_appended_metrics_are_explained(tmp_path, runs):
    with pytest.raises(analyze.AnalysisError, match=r"nowhere/dense/metrics.jsonl does not exist.*run.py"):
        analyze.analyze_runs(tmp_path / "nowhere")
    path = runs / "mot" / "metrics.jsonl"
    path.write_text(path.read_text() * 2)  # a second run appended to the same file
    with pytest.raises(analyze.AnalysisError, match="not increasing"):
        analyze.analyze_runs(runs)


def test_run_py_end_to_end_tiny(tmp_path):
    """run.py trains a tiny dense and a tiny MoT model for 3 steps each and writes the report."""
    out, results = tmp_path / "runs", tmp_path / "results"
    tiny = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=1",
            "model.ffn_hidden_size=64", "model.seq_length=128", "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.warmup_steps=1", "data.builtin=shapes", "data.num_samples=200",
            "data.text_vocab_size=64", "data.vq_codebook_size=24", f"data.cache_dir={tmp_path / 'cache'}",
            "eval.interval=1", "eval.batches=1"]
    proc = subprocess.run([sys.executable, str(HERE / "run.py"), "--steps", "3", "--out-dir", str(out),
                           "--results", str(results), *tiny], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((results / "mot_vs_dense.json").read_text())
    assert result["runs"]["dense"]["steps"] == result["runs"]["mot"]["steps"] == 3
    # Same data and FLOPs per token: both runs count the same training FLOPs.
    assert result["runs"]["mot"]["flops_total"] == pytest.approx(result["runs"]["dense"]["flops_total"])
    params = result["parameters"]
    assert params["mot"]["total"] > params["dense"]["total"] == params["dense"]["active"] == params["mot"]["active"]
    assert set(result["train_commands"]) == {"dense", "mot"} and "model.arch=mot" in result["train_commands"]["mot"]
    assert (results / "mot_vs_dense.md").is_file() and (results / "mot_vs_dense.png").is_file()
    # Analysis alone reuses the runs; a reserved override is refused.
    again = subprocess.run([sys.executable, str(HERE / "run.py"), "--analyze-only", "--out-dir", str(out),
                            "--results", str(tmp_path / "again")], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "again" / "mot_vs_dense.json").is_file()
    refused = subprocess.run([sys.executable, str(HERE / "run.py"), "model.arch=mot"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "model.arch" in refused.stderr
