"""The MoMa experiment (examples/experiments/moma): its analysis on synthetic metrics files with
known answers (the upcycled run stitched onto MoT's first steps included), and run.py --quick end
to end into temporary folders."""

from __future__ import annotations

import json
import math

import pytest

from examples.experiments.moma import analyze
from tests.helpers import run_module

pytestmark = pytest.mark.slow  # experiments and benchmarks end to end

RUN = "examples.experiments.moma.run"

STEPS, EVAL_EVERY, STEP_FLOPS = 100, 20, 1e9
UPCYCLE_AT = 40


def write_run(
    run_dir,
    loss,
    step_time: float,
    steps: int = STEPS,
    step_flops: float = STEP_FLOPS,
    batch: int = 4,
    causal_cost: float | None = None,
):
    """A metrics.jsonl as megafusion train writes it: a training line per step, an evaluation line every
    EVAL_EVERY steps; ``loss(modality, step)`` gives every loss (training ones too). ``causal_cost``: the
    run has auxiliary routers, its causal-routing validation loss is this much above the teacher-forced one."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            record = {
                "step": step,
                "consumed_samples": step * batch,
                "step_time_s": step_time,
                "flops": step_flops,
                "flops_total": step * step_flops,
                "loss": loss("overall", step),
            }
            record.update({f"loss/{m}": loss(m, step) for m in ("text", "image")})
            f.write(json.dumps(record) + "\n")
            if step % EVAL_EVERY == 0:
                val = {"step": step, "val/loss": loss("overall", step)}
                val.update({f"val/loss/{m}": loss(m, step) for m in ("text", "image")})
                if causal_cost is not None:
                    val["val_causal/loss"] = loss("overall", step) + causal_cost
                    val.update({f"val_causal/loss/{m}": loss(m, step) + causal_cost for m in ("text", "image")})
                    val.update({"val/aux/accuracy": 0.99, "val/aux/precision": 0.9, "val/aux/recall": 0.8})
                f.write(json.dumps(val) + "\n")


def linear(slopes: dict):
    """Losses 5 - slope x step per modality (dense: 0.02 everywhere, 3.0 at step 100)."""
    return lambda modality, step: 5.0 - slopes[modality] * step


@pytest.fixture
def runs(tmp_path):
    out = tmp_path / "runs"
    write_run(out / "dense", linear(dict.fromkeys(("overall", "text", "image"), 0.02)), step_time=0.1)
    # MoT: text reaches dense's final 3.0 at step 50 (between the evaluations at 40 and 60), 50% of
    # the FLOPs; image at step 80 (an evaluation point); overall never (4.0 at the end).
    write_run(out / "mot", linear({"text": 0.04, "image": 0.025, "overall": 0.01}), step_time=0.15)
    write_run(out / "moma_1t1i", linear(dict.fromkeys(("overall", "text", "image"), 0.02)), step_time=0.2)
    # 4t4i: every loss reaches 3.0 at step 25 (between 20 and 40): 25% of the FLOPs, 50% of the wall
    # clock (its steps take twice dense's), and 2% more FLOPs per step (the router).
    write_run(out / "moma_4t4i", linear(dict.fromkeys(("overall", "text", "image"), 0.08)), 0.2, step_flops=1.02e9)
    write_run(out / "moe_8x", linear(dict.fromkeys(("overall", "text", "image"), 0.01)), step_time=0.3)
    write_run(out / "mod", linear(dict.fromkeys(("overall", "text", "image"), 0.02)), 0.1, causal_cost=0.25)
    write_run(out / "moma_4t4i_mod", linear(dict.fromkeys(("overall", "text", "image"), 0.02)), 0.2, causal_cost=0.5)
    write_run(out / "moma_4t4i_mod_pm", linear(dict.fromkeys(("overall", "text", "image"), 0.02)), 0.2, causal_cost=0.4)
    # Upcycled from MoT's step 40: its own steps 1..60 (global 41..100); image loss 3.0 at its
    # step 20 (global 60, an evaluation point) -> 60% of dense's FLOPs.
    own = lambda m, step: {"text": 2.0, "overall": 2.5, "image": 4.0 - 0.05 * step}[m]  # noqa: E731
    write_run(out / analyze.UPCYCLED, own, step_time=0.25, steps=STEPS - UPCYCLE_AT, step_flops=2e9)
    info = {
        "command": "python -m examples.experiments.moma.run",
        "commit": "abc1234",
        "machine": "test",
        "date_utc": "2026-01-01T00:00:00Z",
        "quick": False,
        "train_commands": {},
        "run_seconds": {},
        "upcycle": {
            "from": "mot",
            "step": UPCYCLE_AT,
            "steps": STEPS - UPCYCLE_AT,
            "router_noise": 1.0,
            "complete": True,
        },
    }
    (out / "run_info.json").write_text(json.dumps(info))
    return out


def test_fractions_and_step_times_on_known_curves(runs, tmp_path):
    result = analyze.write_results(runs, tmp_path / "results")
    val, r = result["validation"], result["runs"]
    assert set(val) == {
        "mot",
        "moma_1t1i",
        "moma_4t4i",
        "moe_8x",
        "mod",
        "moma_4t4i_mod",
        "moma_4t4i_mod_pm",
        analyze.UPCYCLED,
    }
    assert val["mot"]["text"]["reference_final"] == pytest.approx(3.0)
    assert val["mot"]["text"]["step"] == pytest.approx(50) and val["mot"]["text"]["flops_fraction"] == pytest.approx(
        0.5
    )
    assert val["mot"]["text"]["wall_fraction"] == pytest.approx(0.75)
    assert val["mot"]["text"]["step_fraction"] == pytest.approx(0.5) and val["mot"]["overall"]["step_fraction"] is None
    assert val["mot"]["image"]["flops_fraction"] == pytest.approx(0.8) and not val["mot"]["image"]["at_first_point"]
    assert not val["mot"]["overall"]["reached"] and val["mot"]["overall"]["final"] == pytest.approx(4.0)
    assert val["moma_1t1i"]["text"]["flops_fraction"] == pytest.approx(1.0)  # the same curve: only at the end
    assert val["moma_4t4i"]["image"]["flops_fraction"] == pytest.approx(0.25 * 1.02)
    assert val["moma_4t4i"]["image"]["wall_fraction"] == pytest.approx(0.5)
    assert not val["moe_8x"]["image"]["reached"]
    assert r["moma_4t4i"]["flops_vs_dense"] == pytest.approx(1.02)
    assert r["moma_4t4i"]["median_step_vs_dense"] == pytest.approx(2.0)
    assert r["moe_8x"]["median_step_vs_dense"] == pytest.approx(3.0) and r["dense"]["median_step_vs_dense"] == 1.0

    # The upcycled run: MoT's steps 1..40, then its own 60 steps shifted by 40, on top of MoT's FLOPs.
    up = r[analyze.UPCYCLED]
    assert up["steps"] == STEPS and up["label"] == "MoMa 4t4i upcycled"
    assert up["flops_total"] == pytest.approx(UPCYCLE_AT * 1e9 + (STEPS - UPCYCLE_AT) * 2e9)
    assert up["wall_clock_s"] == pytest.approx(UPCYCLE_AT * 0.15 + (STEPS - UPCYCLE_AT) * 0.25)
    curve = result["curves"]["validation"][analyze.UPCYCLED]
    assert curve["step"] == [20, 40, 60, 80, 100]  # MoT's evaluations up to 40, then its own
    assert curve["image"][:2] == pytest.approx([4.5, 4.0]) and curve["text"][2:] == pytest.approx([2.0] * 3)
    assert curve["flops"][2] == pytest.approx(40e9 + 20 * 2e9)
    assert val[analyze.UPCYCLED]["image"]["step"] == pytest.approx(60)
    assert val[analyze.UPCYCLED]["image"]["flops_fraction"] == pytest.approx(0.8)  # 80e9 of dense's 100e9
    assert val[analyze.UPCYCLED]["text"]["reached"] and not val[analyze.UPCYCLED]["text"]["at_first_point"]
    u = result["upcycle"]
    assert u["step"] == UPCYCLE_AT and u["median_step_after_s"] == pytest.approx(0.25)
    assert u["flops_at_step"] == pytest.approx(40e9) and not u["data_order_continued"]

    base = tmp_path / "results" / "moma"
    saved = json.loads(base.with_suffix(".json").read_text())
    assert saved["commit"] == "abc1234" and saved["machine"] == "test" and saved["date_utc"].endswith("Z")
    assert saved["command"] == "python -m examples.experiments.moma.run"
    assert saved["validation"]["mot"]["text"]["flops_fraction"] == pytest.approx(0.5)
    table = base.with_suffix(".md").read_text()
    assert table.startswith("# MoMa vs MoT vs dense at equal active FLOPs")
    assert "| MoT | not reached | 50.0% (75.0%) | 80.0% (120.0%) |" in table  # overall, text, image
    assert "| MoMa 4t4i | 100 | ? | ? | 1.02e+11 | 1.020x | 20.0 | 0.200 | 2.00x |" in table
    assert "| MoMa 4t4i upcycled | 2.5000 | 2.0000 | 1.0000 |" in table
    assert "MoT's checkpoint at step 40 -> MoMa 4t4i" in table and "restarted from the first batch" in table
    # Causal routing: only the runs with auxiliary routers, their last evaluation (dense's 3.0 + the cost).
    assert "causal" not in r["moma_4t4i"] and r["mod"]["causal"]["text"] == pytest.approx(3.25)
    assert r["moma_4t4i_mod"]["aux"] == {"accuracy": 0.99, "precision": 0.9, "recall": 0.8}
    assert (
        "| MoMa 4t4i + MoD | 3.0000 / 3.5000 (+0.5000) | 3.0000 / 3.5000 (+0.5000) | 3.0000 / 3.5000 (+0.5000) "
        "| 0.9900 | 0.9000 | 0.8000 |" in table
    )
    assert "| MoT | 3.0000" not in table.split("## Causal routing")[1].split("##")[0]
    assert base.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_the_upcycled_run(runs, tmp_path):
    """No complete upcycling in run_info.json: the five runs alone (the upcycled folder is ignored)."""
    info = json.loads((runs / "run_info.json").read_text())
    info["upcycle"], info["upcycle_skipped"] = None, "--no-upcycle"
    (runs / "run_info.json").write_text(json.dumps(info))
    result = analyze.write_results(runs, tmp_path / "results")
    assert set(result["runs"]) == set(analyze.RUNS) and result["upcycle"] is None
    assert "- upcycled run: not run (--no-upcycle)" in (tmp_path / "results" / "moma.md").read_text()


def test_missing_runs_and_bad_stitching_are_explained(runs, tmp_path):
    with pytest.raises(
        analyze.AnalysisError, match=r"nowhere/dense/metrics.jsonl does not exist.*-m examples.experiments.moma.run"
    ):
        analyze.analyze_runs(tmp_path / "nowhere")
    info = json.loads((runs / "run_info.json").read_text())
    info["upcycle"]["step"] = 500  # beyond MoT's steps
    (runs / "run_info.json").write_text(json.dumps(info))
    with pytest.raises(analyze.AnalysisError, match=r"mot/metrics.jsonl has no training step 500"):
        analyze.analyze_runs(runs)


def test_run_py_plan():
    from examples.experiments.moma import run  # sets OMP_NUM_THREADS if unset, as a run would

    assert run.default_upcycle_step(400, 25) == 100 and run.default_upcycle_step(6, 2) == 2
    assert run.default_upcycle_step(10, 0) == 2  # no evaluations between: a quarter
    assert run.experts_value("moma_4t4i") == "{text: 4, image: 4}"
    # MoD depth at equal active FLOPs: 4 plain layers = 3 plain + 4 at capacity 0.25 (every other from 1).
    assert run.mod_depth(4, 0.25, 2, 1) == 7 and run.mod_depth(4, 0.125, 2, 1) == 7  # 3.5 vs 4.5: the shallower
    assert run.mod_depth(1, 0.25, 2, 1) == 2 and run.mod_depth(3, 0.5, 1, 1) == 6
    assert run.command_line(["train", "--config", "c.yaml"])[1:] == [
        "-m",
        "megafusion.train",
        "--config",
        "c.yaml",
    ]
    refused = run_module(RUN, "--quick", "moe.experts={mixed: 8}", timeout=60)
    assert refused.returncode == 2 and "moe.experts" in refused.stderr
    refused = run_module(RUN, "--quick", "--no-upcycle", "--upcycle-step", "2", timeout=60)
    assert refused.returncode == 2 and "--no-upcycle" in refused.stderr


def test_run_py_quick_end_to_end(tmp_path):
    """run.py --quick: the five tiny runs (and the upcycled one where `convert upcycle` exists) and the report."""
    from examples.experiments.moma import run

    upcycle = run.upcycle_unavailable() is None
    out, results = tmp_path / "runs", tmp_path / "results"
    proc = run_module(
        RUN,
        "--quick",
        "--out-dir",
        str(out),
        "--results",
        str(results),
        *([] if upcycle else ["--no-upcycle"]),
        timeout=600,
        one_thread=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((results / "moma.json").read_text())
    names = [*analyze.RUNS, *([analyze.UPCYCLED] if upcycle else [])]
    assert list(result["runs"]) == names
    assert result["quick"] and result["commit"] and result["machine"] and result["date_utc"].endswith("Z")
    assert result["command"].startswith("python -m examples.experiments.moma.run --quick")
    steps = {n: r["steps"] for n, r in result["runs"].items()}
    assert set(steps.values()) == {6}, steps  # the upcycled run too: MoT's steps, then its own
    for name in names:
        cmd = result["train_commands"][name]
        assert cmd[1:3] == ["-m", "megafusion.train"] and f"logging.out_dir={out / name}" in cmd
        assert all(math.isfinite(result["curves"]["validation"][name][m][-1]) for m in analyze.MODALITIES)
        # The same width, depth and FFN: MoMa's FLOPs per step are dense's up to the router, the
        # rounding of the capacity and the padding nobody routes (plenty in this tiny data set).
        # MoD runs: the depth nearest to equal active FLOPs (1 layer here -> 2, one of them at c = 0.25).
        mod = name in analyze.RUNS and analyze.RUNS[name].mod
        assert 0.7 < result["runs"][name]["flops_vs_dense"] < (1.3 if mod else 1.1), name
    assert "moe.experts={mixed: 8}" in result["train_commands"]["moe_8x"]
    for name in names[1:]:
        assert set(result["validation"][name]) == set(analyze.MODALITIES)
        assert {"flops_fraction", "wall_fraction", "reached"} <= set(result["validation"][name]["image"])
    p = result["parameters"]
    assert p["dense"]["total"] == p["dense"]["active"] == p["mot"]["active"]
    # MoMa's active parameters: one expert's FFN, as dense's, the router (hidden x experts per layer) and
    # the auxiliary router (hidden x hidden/2 + hidden/2 x experts).
    aux = 32 * 16 + 16 * 8
    assert (
        p["moma_4t4i"]["active"] - p["dense"]["active"] == 32 * 8 + aux == p["moe_8x"]["active"] - p["dense"]["active"]
    )
    for name in ("moma_4t4i", "moe_8x", "mod", "moma_4t4i_mod", "moma_4t4i_mod_pm"):  # trained with auxiliary routers
        assert set(result["runs"][name]["causal"]) == set(analyze.MODALITIES), name
        assert 0 <= result["runs"][name]["aux"]["accuracy"] <= 1, name
    assert "model.num_layers=2" in result["train_commands"]["mod"]
    assert p["moma_4t4i"]["total"] > p["moma_1t1i"]["total"] > p["moma_1t1i"]["active"]
    if upcycle:
        up = result["upcycle"]
        assert up["step"] == 2 and up["steps"] == 4 and up["router_noise"] == 1.0
        assert "--keep-data-order" in result["convert_command"] and "upcycle" in result["convert_command"]
        assert any(a.startswith("checkpoint.init_from=") for a in result["train_commands"][analyze.UPCYCLED])
    else:
        assert result["upcycle"] is None and result["upcycle_skipped"] == "--no-upcycle"
    table = (results / "moma.md").read_text()
    assert table.startswith("# MoMa vs MoT vs dense") and "**--quick**" in table and "| MoE-8x |" in table
    assert (results / "moma.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The analysis alone reuses the runs and their provenance.
    again = run_module(RUN, "--analyze-only", "--out-dir", str(out), "--results", str(tmp_path / "a"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "a" / "moma.json").read_text())["date_utc"] == result["date_utc"]
