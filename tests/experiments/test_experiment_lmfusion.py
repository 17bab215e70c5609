"""The LMFusion experiment (examples/experiments/lmfusion): its analysis on synthetic metrics
with known answers, the FLOPs-budget rule, and one tiny end-to-end run of run.py --quick."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from examples.experiments.lmfusion import analyze
from tests.helpers import ROOT, run_module

pytestmark = pytest.mark.slow  # experiments and benchmarks end to end

RUN = "examples.experiments.lmfusion.run"


def write_run(run_dir, steps: int, step_flops: float, losses, eval_every: int = 20, step_time: float = 0.1):
    """A metrics.jsonl as megafusion train writes it: a training line per step, an evaluation line
    every ``eval_every`` steps and at the last; ``losses(step)`` -> {metric: value}."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": 1.0,
                        "step_time_s": step_time,
                        "flops": step_flops,
                        "flops_total": step * step_flops,
                    }
                )
                + "\n"
            )
            if step % eval_every == 0 or step == steps:
                f.write(json.dumps({"step": step, **losses(step)}) + "\n")


def lmfusion_losses(step):
    # image: 0.5 - 0.004 step -> 0.1 at step 100; reaches MoT's final 0.3 at step 50 (between evaluations)
    return {"val/loss": 2.0, "val/loss/text": 1.0, "val/loss/diffusion": 0.5 - 0.004 * step}


def mot_losses(step):
    # image: 0.5 - 0.0025 step -> 0.3 at step 80, never down to LMFusion's 0.1
    return {"val/loss": 3.0, "val/loss/text": 1.5 - 0.005 * step, "val/loss/diffusion": 0.5 - 0.0025 * step}


@pytest.fixture
def runs(tmp_path):
    out = tmp_path / "runs"
    # Same total: LMFusion 100 steps x 1e9, MoT 80 steps x 1.25e9 = 1e11 FLOPs.
    write_run(out / "lmfusion", 100, 1e9, lmfusion_losses)
    write_run(out / "mot_scratch", 80, 1.25e9, mot_losses, step_time=0.2)
    write_run(out / "text_lm", 10, 5e8, lambda s: {"val/loss": 0.8, "val/loss/text": 0.8}, eval_every=5)
    ev = lambda loss: {"loss": loss, "perplexity": math.exp(loss), "tokens": 100}  # noqa: E731
    info = {
        "command": "python -m examples.experiments.lmfusion.run",
        "commit": "abc1234",
        "machine": "test",
        "date_utc": "2026-01-01T00:00:00Z",
        "launcher": "subprocess",
        "quick": False,
        "settings": {
            "heldout_captions": 10,
            "caption_choices": 648,
            "text_captions": 100,
            "text_seed": 1,
            "text_documents": 20,
            "captions_per_document": 5,
            "n_text": 50,
            "heldout_seed": 2,
        },
        "budget": {"rule": "the same FLOPs"},
        "steps": [
            {"name": n, "command": f"megafusion {n}", "seconds": s}
            for n, s in (("text_lm", 5.0), ("lmfusion", 12.0), ("mot_scratch", 20.0))
        ],
        "text_eval": {"text_lm": ev(0.7), "import": ev(0.7), "lmfusion": ev(0.7), "mot_scratch": ev(0.9)},
    }
    (out / "run_info.json").write_text(json.dumps(info))
    return out


def test_analysis_on_known_curves(runs, tmp_path):
    result = analyze.write_results(runs, tmp_path / "results")
    r = result["runs"]
    assert r["lmfusion"]["steps"] == 100 and r["mot_scratch"]["steps"] == 80
    assert r["lmfusion"]["flops_total"] == pytest.approx(1e11) == r["mot_scratch"]["flops_total"]
    assert result["flops_ratio_mot_to_lmfusion"] == pytest.approx(1.0)
    assert result["per_step_flops_ratio_mot_to_lmfusion"] == pytest.approx(1.25)
    assert r["lmfusion"]["final_image"] == pytest.approx(0.1) and r["mot_scratch"]["final_image"] == pytest.approx(0.3)
    assert r["mot_scratch"]["final_text"] == pytest.approx(1.1) and r["lmfusion"]["process_wall_s"] == 12.0
    assert r["mot_scratch"]["step_wall_s"] == pytest.approx(16.0)
    lmf = result["image"]["lmfusion_reaches_mot_final"]
    assert lmf["reached"] and not lmf["at_first_point"]
    assert lmf["step"] == pytest.approx(50) and lmf["flops"] == pytest.approx(5e10)  # interpolated between 40 and 60
    assert lmf["fraction_of_other_flops"] == pytest.approx(0.5)
    assert not result["image"]["mot_reaches_lmfusion_final"]["reached"]
    te = result["text_eval"]
    assert te["round_trip_abs_diff"] == 0 and te["lmfusion_minus_pretrained"] == 0
    assert te["mot_scratch_minus_pretrained"] == pytest.approx(0.2)
    assert te["entropy_floor"] == pytest.approx(10 * math.log(648) / 100)
    assert result["text_lm"]["final_text"] == pytest.approx(0.8) and result["text_lm"]["steps"] == 10
    assert r["lmfusion"]["parameters"] is None  # no checkpoints to count from

    base = tmp_path / "results" / "lmfusion"
    saved = json.loads(base.with_suffix(".json").read_text())
    assert saved["image"]["lmfusion_reaches_mot_final"]["fraction_of_other_flops"] == pytest.approx(0.5)
    assert saved["commit"] == "abc1234" and saved["curves"]["lmfusion"]["step"][-1] == 100
    table = base.with_suffix(".md").read_text()
    assert "| LMFusion | 100 | 1e+11 | 0.1000 | 1.0000 |" in table
    assert "| MoT from scratch | 80 | 1e+11 | 0.3000 | 1.1000 |" in table
    assert "LMFusion reaches MoT from scratch's final image loss 0.3000 at 5e+10 FLOPs (step 50), 50.0%" in table
    assert "MoT from scratch never reaches LMFusion's final image loss 0.1000" in table
    # + the text pretraining's 10 x 5e8 FLOPs: (5e10 + 5e9) / 1e11
    assert "50.0% of MoT from scratch's training FLOPs; 55.0% counting the text pretraining's 5e+09 FLOPs too" in table
    assert result["image"]["lmfusion_reaches_mot_best"]["target"] == pytest.approx(0.3)  # monotone: best = final
    assert "| LMFusion | 0.700000 |" in table and "- text_lm (5 s): `megafusion text_lm`" in table
    assert base.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_and_appended_metrics_are_explained(runs, tmp_path):
    with pytest.raises(
        analyze.AnalysisError,
        match=r"nowhere/lmfusion/metrics.jsonl does not exist.*-m examples.experiments.lmfusion.run",
    ):
        analyze.analyze_runs(tmp_path / "nowhere")
    path = runs / "mot_scratch" / "metrics.jsonl"
    path.write_text(path.read_text() * 2)
    with pytest.raises(analyze.AnalysisError, match="not increasing"):
        analyze.analyze_runs(runs)


def test_crossing_helpers():
    assert analyze.first_crossing([1, 2, 3], [5.0, 4.0, 2.0], 3.0) == (2.5, 1.5)
    assert analyze.first_crossing([1, 2, 3], [2.0, 1.0, 0.5], 3.0) == (1, 0.0)
    assert analyze.first_crossing([1, 2], [5.0, float("nan")], 3.0) is None
    row = analyze.reach(
        {"flops": [1.0, 2.0], "step": [10, 20], "image": [0.2, 0.1]},
        {"flops": [1.0, 4.0], "step": [5, 10], "image": [0.5, 0.3]},
    )
    assert row["reached"] and row["at_first_point"] and row["fraction_of_other_flops"] == 0.25


def test_budget_rule_and_model_section(tmp_path):
    from examples.experiments.lmfusion import run  # sets OMP_NUM_THREADS if unset, as a run would

    # MoT costs 1.2x per step: 8 steps (96) fit in LMFusion's 100, 9 (108) do not.
    budget = run.mot_steps_for_budget([10.0] * 10, [12.0, 12.0])
    assert budget["mot_steps"] == 8 and budget["mot_predicted_flops_total"] == pytest.approx(96.0)
    assert budget["mot_to_lmfusion_flops_per_step"] == pytest.approx(1.2)
    # Per-step FLOPs vary with the batch: the prediction follows LMFusion's own steps.
    assert run.mot_steps_for_budget([10.0, 20.0, 30.0], [11.0])["mot_steps"] == 2
    (tmp_path / "m.yaml").write_text(
        "model:\n  arch: dense\n  num_layers: 2\n  rope_scaling: null\n  qk_norm: false\n  vocab_size: 189\n"
    )
    assert run.model_section_overrides(tmp_path / "m.yaml") == [
        "model.num_layers=2",
        "model.rope_scaling=null",
        "model.qk_norm=false",
    ]
    assert run.last_json('noise\n{"loss": 1.5}\n[megafusion] done\n') == {"loss": 1.5}


@pytest.mark.torchrun
def test_run_py_quick_end_to_end(tmp_path):
    """Every step at tiny size: text data, tokenizer, data prepare, text LM, HF round trip, LMFusion,
    the MoT pilot and the MoT from scratch at the same FLOPs, four eval --text, the report."""
    out, results = tmp_path / "runs", tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", RUN, "--quick", "--out-dir", str(out), "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((results / "lmfusion.json").read_text())
    assert result["quick"] and result["launcher"] == "inprocess"
    assert result["versions"]["megatron_core"] and "recorded" not in result["versions"]  # recorded by run.py
    names = [s["name"] for s in result["steps"]]
    assert names == [
        "text_data",
        "tokenizer",
        "data_prepare",
        "text_lm",
        "export_hf",
        "import_hf",
        "eval_text_lm",
        "eval_import",
        "lmfusion",
        "pilot_mot",
        "mot_scratch",
        "eval_lmfusion",
        "eval_mot_scratch",
    ]
    commands = {s["name"]: s["command"] for s in result["steps"]}
    assert "--vocab-multiple 1" in commands["import_hf"]
    assert f"--vocab-size {result['settings']['n_text']}" in commands["export_hf"]
    assert "model.freeze_text=true" in commands["lmfusion"] and "checkpoint.init_from=" in commands["lmfusion"]
    assert "freeze_text" not in commands["mot_scratch"] and "init_from" not in commands["mot_scratch"]
    # The same text tokenizer everywhere.
    sp = result["settings"]["tokenizer"]
    for name in ("data_prepare", "text_lm", "lmfusion", "mot_scratch", "eval_lmfusion"):
        assert sp in commands[name], name
    # HF round trip and frozen text: the same held-out text loss, exactly.
    te = result["text_eval"]
    assert set(te["results"]) == {"text_lm", "import", "lmfusion", "mot_scratch"}
    assert te["round_trip_abs_diff"] == 0 and te["lmfusion_minus_pretrained"] == 0
    assert te["results"]["mot_scratch"]["loss"] != te["results"]["text_lm"]["loss"]
    # Same FLOPs budget: the MoT never spends more than LMFusion, and costs more per step.
    r = result["runs"]
    assert r["mot_scratch"]["flops_total"] <= r["lmfusion"]["flops_total"]
    assert result["per_step_flops_ratio_mot_to_lmfusion"] > 1
    assert r["mot_scratch"]["steps"] == result["budget"]["mot_steps"]
    assert all(math.isfinite(r[n]["final_image"]) for n in ("lmfusion", "mot_scratch"))
    lmf, mot = r["lmfusion"]["parameters"], r["mot_scratch"]["parameters"]
    assert lmf["trainable"] < lmf["total"] and mot["trainable"] == mot["total"]
    assert lmf["frozen_vocab_rows"] == result["settings"]["n_text"] and lmf["vocab_size"] == mot["vocab_size"]
    log = (out / "logs" / "lmfusion.log").read_text()
    assert "initialised from" in log and "vocabulary grown from" in log and "dense -> MoT" in log
    assert (results / "lmfusion.md").read_text().startswith("# LMFusion vs MoT from scratch")
    assert (results / "lmfusion.png").is_file()
    again = run_module(RUN, "--analyze-only", "--out-dir", str(out), "--results", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "again" / "lmfusion.json").read_text())["date_utc"] == result["date_utc"]


def test_results_record_paths_relative_to_the_repository():
    from bench.provenance import repo_relative

    inside, outside = str(ROOT / "runs" / "lmfusion" / "metrics.jsonl"), "/elsewhere/runs/metrics.jsonl"
    got = repo_relative({"runs": [{"metrics": inside}, {"metrics": outside}], "steps": 3, "name": str(ROOT) + "x"})
    assert got == {
        "runs": [{"metrics": "runs/lmfusion/metrics.jsonl"}, {"metrics": outside}],
        "steps": 3,
        "name": str(ROOT) + "x",
    }
