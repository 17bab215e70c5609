"""The Branch-Train-MiX experiment (examples/experiments/btx): its analysis on synthetic metrics files
with known answers, run.py's plan, and run.py --quick end to end into temporary folders."""

from __future__ import annotations

import json

import pytest

from examples.experiments.btx import analyze, run
from examples.experiments.harness import AnalysisError
from tests.helpers import run_module

pytestmark = pytest.mark.slow  # experiments end to end

RUN = "examples.experiments.btx.run"
DOMAINS = ["shapes", "digits", "arithmetic"]


def write_run(run_dir, steps: int, step_flops: float, losses: dict, eval_every: int = 2):
    """A metrics.jsonl as megafusion train writes it; every evaluation reports ``losses`` per domain."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            record = {"step": step, "step_time_s": 0.5, "flops": step_flops, "flops_total": step * step_flops}
            f.write(json.dumps(record) + "\n")
            if step % eval_every == 0 or step == steps:
                val = {"step": step, "val/loss": 1.0}
                val.update({analyze.DOMAIN_KEY.format(d): v for d, v in losses.items()})
                f.write(json.dumps(val) + "\n")


@pytest.fixture
def runs(tmp_path):
    """Known runs: branches better on their own domain, the fine-tuned merge best on the mean."""
    out = tmp_path / "runs"
    write_run(out / "seed", 10, 1e9, {"shapes": 2.0, "digits": 2.0, "arithmetic": 2.0})
    for d in DOMAINS:
        write_run(out / f"branch_{d}", 10, 1e9, {x: 1.0 if x == d else 2.5 for x in DOMAINS})
    (out / "merged").mkdir()
    merged = {"validation": {"loss": 3.0}, "domains": {x: {"loss": 3.0, "tokens": 10} for x in DOMAINS}}
    (out / "merged" / analyze.EVAL_FILE).write_text(json.dumps(merged))
    write_run(out / "btx", 10, 1.5e9, {x: 1.1 for x in DOMAINS})
    write_run(out / "dense", 55, 1e9, {x: 1.5 for x in DOMAINS})
    info = {
        "domains": DOMAINS,
        "seed_expert": True,
        "steps": {"seed": 10},
        "commit": "abc",
        "machine": "m",
        "date_utc": "2026-12-07T00:00:00Z",
        "command": "python -m examples.experiments.btx.run",
        "run_seconds": {"seed": 5.0},
    }
    (out / "run_info.json").write_text(json.dumps(info))
    return out


def test_report_on_known_runs(runs, tmp_path):
    result = analyze.write_results(runs, tmp_path / "results")
    rows, d = result["rows"], result["directions"]
    assert rows["branch_digits"]["loss"] == {"shapes": 2.5, "digits": 1.0, "arithmetic": 2.5}
    assert rows["btx"]["mean"] == pytest.approx(1.1)
    # FLOPs behind each model: the seed's, then the branches', then the fine-tuning's.
    assert rows["branch_shapes"]["training_flops"] == pytest.approx(20e9)
    assert rows["merged"]["training_flops"] == pytest.approx(40e9)
    assert rows["btx"]["training_flops"] == pytest.approx(55e9)
    assert d["flops_dense_over_btx"] == pytest.approx(1.0)
    assert all(d["branch_beats_seed_on_own_domain"].values())
    assert d["btx_minus_best_branch"] == pytest.approx({x: 0.1 for x in DOMAINS})
    assert d["btx_beats_dense_on_mean"] and d["merge_worse_before_finetuning"]
    assert d["dense_reaches_btx_at_flops_fraction"] is None  # dense's curve stays at 1.5 > 1.1
    # The fine-tuning's curve starts after the seed's and the branches' FLOPs.
    assert result["curves"]["btx"]["flops"][0] == pytest.approx(40e9 + 2 * 1.5e9)
    table = (tmp_path / "results" / "btx.md").read_text()
    assert "| BTX (merged + fine-tuned) | 1.1000 | 1.1000 | 1.1000 | 1.1000 | 10 |" in table
    assert "- commit: `abc`" in table


def test_first_reach_interpolates_between_evaluations():
    curve = {"flops": [10.0, 20.0, 30.0], "mean": [2.0, 1.0, 0.5]}
    assert analyze.first_reach(curve, 1.5) == pytest.approx(15.0)
    assert analyze.first_reach(curve, 3.0) == 10.0 and analyze.first_reach(curve, 0.1) is None


def test_missing_domain_loss_is_explained(runs, tmp_path):
    write_run_dir = runs / "dense"
    lines = (write_run_dir / "metrics.jsonl").read_text().splitlines()
    (write_run_dir / "metrics.jsonl").write_text("\n".join(x.replace("val/domain/digits/loss", "x") for x in lines))
    with pytest.raises(AnalysisError, match="val/domain/digits/loss"):
        analyze.analyze_runs(runs)


def test_run_py_plan():
    assert run.dense_steps(55e9, 1e9) == 55 and run.dense_steps(1.0, 1e9) == 1
    assert run.printed_json('log line\n{\n "a": {\n  "b": 1\n }\n}\n') == {"a": {"b": 1}}
    refused = run_module(RUN, "--quick", "data.domains=shapes", timeout=60)
    assert refused.returncode == 2 and "data.domains" in refused.stderr


def test_run_py_quick_end_to_end(tmp_path):
    """run.py --quick: seed, three branches, merge, the merge evaluated, fine-tuned, dense; the report."""
    out, results = tmp_path / "runs", tmp_path / "results"
    proc = run_module(RUN, "--quick", "--out-dir", str(out), "--results", str(results), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((results / "btx.json").read_text())
    assert result["domains"] == DOMAINS and result["run_info"]["quick"]
    info = json.loads((out / "run_info.json").read_text())
    assert info["commands"]["merge"][3:5] == ["convert", "btx-merge"]
    # The compute-matched dense run took the FLOPs of the seed, the branches and the fine-tuning.
    flops = lambda name: sum(run.run_flops(out / name))  # noqa: E731
    spent = flops("seed") + sum(flops(f"branch_{d}") for d in DOMAINS) + flops("btx")
    assert abs(flops("dense") - spent) <= flops("seed") / len(run.run_flops(out / "seed"))
    assert (results / "btx.md").read_text().startswith("# Branch-Train-MiX")
    assert set(result["rows"]["merged"]["loss"]) == set(DOMAINS)
