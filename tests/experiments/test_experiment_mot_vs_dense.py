"""The MoT-vs-dense experiment (examples/experiments/mot_vs_dense): its analysis on synthetic
metrics files with known answers, in the lm (Chameleon) and the Transfusion setting, and one
tiny end-to-end run of run.py in each."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from examples.experiments.harness import fmt_pct
from examples.experiments.mot_vs_dense import analyze, run
from tests.helpers import ROOT, run_module

pytestmark = pytest.mark.slow  # experiments and benchmarks end to end

HERE = ROOT / "examples" / "experiments" / "mot_vs_dense"
RUN = "examples.experiments.mot_vs_dense.run"

STEPS, EVAL_EVERY, STEP_FLOPS = 100, 20, 1e9


def write_run(run_dir, val_loss, step_time: float, steps: int = STEPS, image_key: str = "image"):
    """A metrics.jsonl as megafusion writes it: one training line per step and an evaluation line
    every EVAL_EVERY steps; ``val_loss(modality, step)`` gives every loss (training ones too).
    ``image_key``: the image loss is logged as loss/<image_key> (lm: image; Transfusion: diffusion)."""
    run_dir.mkdir(parents=True)
    keys = {"text": "text", "image": image_key}
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            record = {
                "step": step,
                "step_time_s": step_time,
                "flops": STEP_FLOPS,
                "flops_total": step * STEP_FLOPS,
                "loss": val_loss("overall", step),
            }
            record.update({f"loss/{keys[m]}": val_loss(m, step) for m in ("text", "image")})
            f.write(json.dumps(record) + "\n")
            if step % EVAL_EVERY == 0:
                val = {"step": step, "val/loss": val_loss("overall", step)}
                val.update({f"val/loss/{keys[m]}": val_loss(m, step) for m in ("text", "image")})
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


# Transfusion: the image loss is the diffusion MSE (small numbers), overall = text + 5 x diffusion.
def tf_dense_loss(modality, step):
    diffusion = 0.5 - 0.004 * step  # 0.1 at the end
    text = 5.0 - 0.02 * step  # 3.0 at the end
    return {"text": text, "image": diffusion, "overall": text + 5 * diffusion}[modality]


def tf_mot_loss(modality, step):
    # diffusion: dense's final 0.1 at step 50 (between the evaluations at 40 and 60), 50% of the
    # FLOPs, then flat at 0.02 from step 60; text: never (3.5 at the end); overall: 3.5 + 5 * 0.02 =
    # 3.6 at the end, never down to dense's final 3.5.
    diffusion = max(0.5 - 0.008 * step, 0.02)
    text = 5.0 - 0.015 * step
    return {"text": text, "image": diffusion, "overall": text + 5 * diffusion}[modality]


@pytest.fixture
def tf_runs(tmp_path):
    out = tmp_path / "tf_runs"
    write_run(out / "dense", tf_dense_loss, step_time=0.1, image_key="diffusion")
    write_run(out / "mot", tf_mot_loss, step_time=0.2, image_key="diffusion")  # wall fraction 2 x FLOPs'
    return out


def write_run_info(out_dir, config: str):
    """A run_info.json as run.py writes it, naming ``config`` (a file of the experiment folder)."""
    cmd = lambda arch: [
        "python",
        "-m",
        "megafusion.train",
        "--config",  # noqa: E731
        f"examples/experiments/mot_vs_dense/{config}",
        f"model.arch={arch}",
        f"logging.out_dir={out_dir / arch}",
    ]
    info = {
        "command": "python -m examples.experiments.mot_vs_dense.run",
        "commit": "abc1234",
        "machine": "test",
        "date_utc": "2026-01-01T00:00:00Z",
        "train_commands": {a: cmd(a) for a in ("dense", "mot")},
        "run_seconds": {"dense": 1.0, "mot": 1.0},
    }
    (out_dir / "run_info.json").write_text(json.dumps(info))


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
    early = analyze.compare(
        {"flops": [1.0, 2.0], "wall_s": [1.0, 2.0], "step": [1, 2], **dict.fromkeys(analyze.MODALITIES, [3.0, 2.0])},
        {"flops": [1.0, 2.0], "wall_s": [2.0, 4.0], "step": [1, 2], **dict.fromkeys(analyze.MODALITIES, [1.5, 1.0])},
    )
    assert early["text"]["at_first_point"] and early["text"]["flops_fraction"] == 0.5  # an upper bound
    assert fmt_pct(0.5, upper_bound=True) == "<= 50.0%"


def test_missing_and_appended_metrics_are_explained(tmp_path, runs):
    with pytest.raises(
        analyze.AnalysisError,
        match=r"nowhere/dense/metrics.jsonl does not exist.*-m examples.experiments.mot_vs_dense.run",
    ):
        analyze.analyze_runs(tmp_path / "nowhere")
    path = runs / "mot" / "metrics.jsonl"
    path.write_text(path.read_text() * 2)  # a second run appended to the same file
    with pytest.raises(analyze.AnalysisError, match="not increasing"):
        analyze.analyze_runs(runs)


def test_transfusion_fractions_on_known_curves(tf_runs, tmp_path):
    """No run_info.json: the setting comes from the metrics (val/loss/diffusion), and the image row
    is computed on the diffusion curve."""
    result = analyze.write_results(tf_runs, tmp_path / "results")
    assert result["setting"] == "transfusion" and result["image_loss"] == "val/loss/diffusion"
    val = result["validation"]
    assert val["image"]["dense_final"] == pytest.approx(0.1)
    assert val["image"]["reached"] and val["image"]["mot_step"] == pytest.approx(50)
    assert val["image"]["flops_fraction"] == pytest.approx(0.5) and val["image"]["wall_fraction"] == pytest.approx(1.0)
    assert val["image"]["mot_final"] == pytest.approx(0.02)
    assert not val["text"]["reached"] and val["text"]["mot_final"] == pytest.approx(3.5)
    assert not val["overall"]["reached"] and val["overall"]["dense_final"] == pytest.approx(3.5)
    assert val["overall"]["mot_final"] == pytest.approx(3.6)
    assert result["train_loss_ema"]["image"]["reached"]  # the smoothed diffusion loss crosses too

    base = tmp_path / "results" / "mot_vs_dense_transfusion"
    assert json.loads(base.with_suffix(".json").read_text())["validation"]["image"]["flops_fraction"] == pytest.approx(
        0.5
    )
    assert base.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "results" / "mot_vs_dense.json").exists()  # the lm report is left alone
    table = base.with_suffix(".md").read_text()
    assert table.startswith("# MoT vs dense (Transfusion setting") and "Chameleon setting," not in table
    assert "| image (diffusion) | 0.1000 | 0.0200 | 50.0% | 100.0% |" in table
    assert "| text | 3.0000 | 3.5000 | not reached | not reached |" in table
    assert "`val/loss/diffusion`" in table and "one third of the FLOPs" in table


def test_lm_report_is_unchanged_by_the_settings(runs, tmp_path):
    """The lm (Chameleon) report keeps its file names and wording."""
    result = analyze.write_results(runs, tmp_path / "results")
    assert result["setting"] == "lm" and result["image_loss"] == "val/loss/image"
    table = (tmp_path / "results" / "mot_vs_dense.md").read_text()
    assert table.startswith("# MoT vs dense (Chameleon setting, built-in shapes + digits, vq image codes)\n")
    assert "diffusion" not in table and "55.8% of the FLOPs for the 7B Chameleon setting" in table
    assert not (tmp_path / "results" / "mot_vs_dense_transfusion.json").exists()


def test_missing_image_loss_of_the_setting_is_explained(runs, tf_runs):
    # --setting asks for an image loss the runs do not log: the error names the file, the key and the fix.
    with pytest.raises(
        analyze.AnalysisError,
        match=r"dense/metrics.jsonl: no evaluation record has "
        r"val/loss/diffusion.*--setting lm",
    ):
        analyze.analyze_runs(runs, "transfusion")
    with pytest.raises(analyze.AnalysisError, match=r"val/loss/image.*--setting transfusion"):
        analyze.analyze_runs(tf_runs, "lm")
    # run_info.json's config decides over the metrics: an lm config but Transfusion metrics is an error.
    write_run_info(tf_runs, "config.yaml")
    with pytest.raises(analyze.AnalysisError, match=r"no evaluation record has val/loss/image"):
        analyze.analyze_runs(tf_runs)
    # ... and --setting must agree with it.
    write_run_info(tf_runs, "config_transfusion.yaml")
    assert analyze.analyze_runs(tf_runs)["setting"] == "transfusion"
    with pytest.raises(analyze.AnalysisError, match=r"--setting lm, but .* objective.name=transfusion.*run_info.json"):
        analyze.analyze_runs(tf_runs, "lm")


def test_setting_unknown_from_metrics_is_explained(tmp_path):
    """Neither image loss logged (and no run_info.json): the analysis asks for --setting."""
    for arch in ("dense", "mot"):
        write_run(tmp_path / "runs" / arch, dense_loss, step_time=0.1, image_key="speech")
    with pytest.raises(analyze.AnalysisError, match=r"cannot tell the setting.*neither.*--setting lm\|transfusion"):
        analyze.analyze_runs(tmp_path / "runs")


def test_run_py_setting_and_config_must_agree():
    """--setting picks the setting's config; a --config of the other setting is refused (before any training)."""
    assert run.choose_setting("transfusion", None, []) == ("transfusion", HERE / "config_transfusion.yaml")
    assert run.choose_setting(None, str(HERE / "config_transfusion.yaml"), [])[0] == "transfusion"
    assert run.choose_setting(None, str(HERE / "config.yaml"), ["objective.name=transfusion"])[0] == "transfusion"
    assert run.choose_setting(None, None, []) == (None, None)  # --analyze-only: the runs decide
    with pytest.raises(ValueError, match=r"--setting lm, but .*config_transfusion.yaml.* objective.name=transfusion"):
        run.choose_setting("lm", str(HERE / "config_transfusion.yaml"), [])
    refused = subprocess.run(
        [sys.executable, "-m", RUN, "--setting", "lm", "--config", str(HERE / "config_transfusion.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "objective.name=transfusion" in refused.stderr


def test_run_py_end_to_end_tiny(tmp_path):
    """run.py trains a tiny dense and a tiny MoT model for 3 steps each and writes the report."""
    out, results = tmp_path / "runs", tmp_path / "results"
    tiny = [
        "model.num_layers=1",
        "model.hidden_size=32",
        "model.num_attention_heads=2",
        "model.num_query_groups=1",
        "model.ffn_hidden_size=64",
        "model.seq_length=128",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.warmup_steps=1",
        "data.builtin=shapes",
        "data.num_samples=200",
        "data.text_vocab_size=64",
        "data.vq_codebook_size=24",
        f"data.cache_dir={tmp_path / 'cache'}",
        "eval.interval=1",
        "eval.batches=1",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", RUN, "--steps", "3", "--out-dir", str(out), "--results", str(results), *tiny],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
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
    again = run_module(RUN, "--analyze-only", "--out-dir", str(out), "--results", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "again" / "mot_vs_dense.json").is_file()
    refused = subprocess.run(
        [sys.executable, "-m", RUN, "model.arch=mot"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "model.arch" in refused.stderr


def test_run_py_end_to_end_tiny_transfusion(tmp_path):
    """run.py --config config_transfusion.yaml trains a tiny dense and MoT Transfusion model for 4 steps
    each and writes the Transfusion report, its image row on the diffusion loss."""
    out, results = tmp_path / "runs", tmp_path / "results"
    tiny = [
        "model.num_layers=1",
        "model.hidden_size=32",
        "model.num_attention_heads=2",
        "model.num_query_groups=1",
        "model.ffn_hidden_size=64",
        "model.seq_length=128",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.warmup_steps=1",
        "data.num_samples=200",
        "data.text_vocab_size=64",
        f"data.cache_dir={tmp_path / 'cache'}",
        "eval.interval=2",
        "eval.batches=1",
    ]
    proc = run_module(
        RUN,
        "--config",
        str(HERE / "config_transfusion.yaml"),
        "--steps",
        "4",
        "--out-dir",
        str(out),
        "--results",
        str(results),
        *tiny,
        timeout=300,
        one_thread=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((results / "mot_vs_dense_transfusion.json").read_text())
    assert result["setting"] == "transfusion" and result["image_loss"] == "val/loss/diffusion"
    assert result["objective"]["name"] == "transfusion" and result["objective"]["prediction"] == "sample"
    assert result["runs"]["dense"]["steps"] == result["runs"]["mot"]["steps"] == 4
    assert result["runs"]["mot"]["flops_total"] == pytest.approx(result["runs"]["dense"]["flops_total"])
    val = result["validation"]
    assert all(math.isfinite(val["image"][k]) for k in ("dense_final", "mot_final"))  # diffusion losses logged
    # overall = text + 5 x diffusion (+ a tiny z-loss): the image row really is the diffusion loss.
    final = {m: result["curves"]["validation"]["dense"][m][-1] for m in analyze.MODALITIES}
    assert final["overall"] == pytest.approx(final["text"] + 5 * final["image"], rel=1e-2)
    assert "config_transfusion.yaml" in " ".join(result["train_commands"]["mot"])
    params = result["parameters"]
    assert params["mot"]["total"] > params["dense"]["total"] and params["mot"]["active"] == params["dense"]["active"]
    table = (results / "mot_vs_dense_transfusion.md").read_text()
    assert "Transfusion setting" in table and "| image (diffusion) |" in table
    assert (results / "mot_vs_dense_transfusion.png").is_file() and not (results / "mot_vs_dense.json").exists()
