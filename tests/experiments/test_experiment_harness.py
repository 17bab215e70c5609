"""The experiments' shared harness (examples/experiments/harness.py): paths as results record them,
the command a run records, and a report without matplotlib (the `plots` extra) naming what to install."""

from __future__ import annotations

import json
import sys

import pytest

from examples.experiments import harness
from tests.helpers import ROOT


def test_paths_inside_the_repository_are_shown_relative_to_it():
    assert harness.shown(ROOT / "runs" / "moma") == "runs/moma"
    assert harness.shown("/elsewhere/runs") == "/elsewhere/runs"
    assert harness.shown_arg(f"logging.out_dir={ROOT / 'runs' / 'x'}") == "logging.out_dir=runs/x"
    assert harness.shown_arg("model.arch=mot") == "model.arch=mot"
    assert harness.recorded_command("python -m examples.experiments.moma.run", ["--quick", "a b"]) == (
        "python -m examples.experiments.moma.run --quick 'a b'"
    )


def test_a_report_without_matplotlib_writes_its_tables_and_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the extra has
    base = tmp_path / "results" / "report"
    result = {"loss": 1.5, "metrics": str(ROOT / "runs" / "x" / "metrics.jsonl")}
    with pytest.raises(harness.AnalysisError, match=r"\.json and \.md, not \.png: .*pip install -e \.\[plots\]"):
        harness.write_report(result, base, lambda r: f"# {r['loss']}\n", lambda r, path: harness.pyplot())
    assert json.loads(base.with_suffix(".json").read_text()) == {"loss": 1.5, "metrics": "runs/x/metrics.jsonl"}
    assert base.with_suffix(".md").read_text() == "# 1.5\n" and not base.with_suffix(".png").exists()


def test_finish_reports_an_analysis_error_in_one_line_with_exit_code_2(capsys):
    def fails():
        raise harness.AnalysisError("runs/x/metrics.jsonl does not exist: run it")

    assert harness.finish("[x]", fails, str, lambda r: ROOT / "r") == 2
    assert capsys.readouterr().err == "[x] runs/x/metrics.jsonl does not exist: run it\n"
