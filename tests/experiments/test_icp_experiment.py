"""The ICP experiment (examples/experiments/icp): its analysis on synthetic runs with known answers,
run.py's refusals, and run.py --quick end to end, whose evaluation (the later-document loss, the
probe) equals a brute-force reference (tests/experiments/icp_reference.py: each document through
plain causal attention alone, or after its row, no packed microbatch, no mask)."""

from __future__ import annotations

import json

import pytest

from examples.experiments.icp import analyze
from tests.helpers import run_module

pytestmark = pytest.mark.slow  # experiments end to end

RUN = "examples.experiments.icp.run"


def write_run(run_dir, order, attention, later, partner_acc, steps=10):
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "loss": 2.0}) + "\n")
            if step % 5 == 0:
                f.write(json.dumps({"step": step, "val/loss": 2.0 - step / 100}) + "\n")
    probe = {
        "partner_before": {"accuracy": partner_acc, "documents": 50, "fact_loss": 1.0},
        "all": {"accuracy": partner_acc / 2, "documents": 100, "fact_loss": 1.5},
        "no_partner_before": {"accuracy": 0.1, "documents": 50, "fact_loss": 2.3},
    }
    ev = {
        "order": order,
        "attention": attention,
        "step": steps,
        "chance": 0.1,
        "loss": {"all": later - 0.05, "first": 2.0, "later": later},
        "tokens": {"all": 1000, "first": 200, "later": 800},
        "probe": probe,
    }
    (run_dir / analyze.EVAL_FILE).write_text(json.dumps(ev))


@pytest.fixture
def runs(tmp_path):
    """The paper's direction: ICP + causal best, random + causal worst, order little under isolation."""
    out = tmp_path / "runs"
    write_run(out / "random_isolated", "random", "isolated", 1.50, 0.1)
    write_run(out / "icp_isolated", "icp", "isolated", 1.49, 0.1)
    write_run(out / "random_causal", "random", "causal", 1.55, 0.1)
    write_run(out / "icp_causal", "icp", "causal", 1.20, 0.9)
    info = {
        "commit": "abc",
        "machine": "m",
        "date_utc": "2026-12-07T00:00:00Z",
        "command": "python -m examples.experiments.icp.run",
        "steps": 10,
        "run_seconds": {"icp_causal": 5.0},
    }
    (out / "run_info.json").write_text(json.dumps(info))
    return out


def test_report_on_known_runs(runs, tmp_path):
    result = analyze.write_results(runs, tmp_path / "results")
    d = result["directions"]
    assert d["icp_causal_lowest_later_loss"] and d["random_causal_highest_later_loss"]
    assert d["order_under_isolated"] == pytest.approx(-0.01) and d["order_under_causal"] == pytest.approx(-0.35)
    assert d["causal_over_isolated_icp"] == pytest.approx(-0.29)
    assert d["causal_over_isolated_random"] == pytest.approx(0.05)
    assert d["probe_icp_causal_over_chance"] == pytest.approx(0.8)
    assert result["curves"]["icp_causal"] == {"step": [5, 10], "val_loss": [1.95, 1.9]}
    table = (tmp_path / "results" / "icp.md").read_text()
    assert "| ICP order, causal attention | 1.1500 | 2.0000 | 1.2000 | 90.0% (50) | 45.0% (100) | 1.0000 | 5 |" in table
    assert "- commit: `abc`" in table and (tmp_path / "results" / "icp.png").is_file()


def test_a_run_of_another_cell_is_refused(runs):
    ev = json.loads((runs / "icp_causal" / analyze.EVAL_FILE).read_text())
    (runs / "icp_causal" / analyze.EVAL_FILE).write_text(json.dumps({**ev, "attention": "isolated"}))
    with pytest.raises(analyze.AnalysisError, match="not the run icp_causal's icp / causal"):
        analyze.analyze_runs(runs)


def test_run_py_refuses_what_it_sets_per_run():
    refused = run_module(RUN, "--quick", "data.attention=causal", timeout=60)
    assert refused.returncode == 2 and "may not set data.order, data.attention" in refused.stderr


def test_run_py_quick_end_to_end_and_the_evaluation_against_a_reference(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    proc = run_module(RUN, "--quick", "--out-dir", str(out), "--results", str(results), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((results / "icp.json").read_text())
    assert set(result["rows"]) == set(analyze.RUNS) and result["run_info"]["quick"]
    assert (results / "icp.md").read_text().startswith("# In-Context Pretraining")
    # ICP order puts a probe document after its group partner in the held-out rows; random order does not.
    data = result["data"]
    assert data["icp"]["val"]["partner_before"]["share"] > 0.2 > data["random"]["val"]["partner_before"]["share"]
    for name in ("icp_isolated", "icp_causal"):
        ref = run_module("tests.experiments.icp_reference", str(out / name / "checkpoints"), timeout=300)
        assert ref.returncode == 0, ref.stderr[-3000:]
        want = json.loads(ref.stdout.strip().splitlines()[-1])
        got = json.loads((out / name / analyze.EVAL_FILE).read_text())
        assert got["tokens"] == want["tokens"]
        for key, loss in want["loss"].items():
            assert got["loss"][key] == pytest.approx(loss, rel=1e-6), (name, key)
        for key, p in want["probe"].items():
            assert got["probe"][key]["documents"] == p["documents"]
            assert round(got["probe"][key]["accuracy"] * p["documents"]) == p["hits"]
