"""``megafusion plan``: the table shows its assumptions, the JSON holds every layout, layouts that
do not fit are marked (not dropped), and bad input is one line."""

from __future__ import annotations

import json

from megafusion.commands.main import main
from tests.helpers import ROOT

CONFIG = str(ROOT / "examples/configs/tiny_dense.yaml")


def test_plan_prints_a_ranked_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = [
        "plan",
        "--config",
        CONFIG,
        "--gpus",
        "4",
        "--gpu",
        "h100",
        "--efficiency",
        "0.4",
        "--nodes-bandwidth",
        "20",
    ]
    assert main([*argv, "--recompute", "none,full", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 x h100" in text and "efficiency 0.4" in text and "between nodes 20 GB/s" in text
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert rows and result["assumptions"]["nodes_gbps"] == 20 and result["assumptions"]["peak_tflops"] == 989
    assert {r["recompute"] for r in rows} == {"none", "full"}
    steps = [r["time_s"]["step"] for r in rows if r["fits"]]
    assert steps == sorted(steps)  # fastest first
    for r in rows:  # every breakdown adds up to its total, as the table says
        m, t = r["memory_bytes"], r["time_s"]
        assert abs(m["params"] + m["grads"] + m["optimizer"] + m["activations"] - m["total"]) < 1
        assert abs(sum(v for k, v in t.items() if k != "step") - t["step"]) < 1e-9


def test_layouts_that_do_not_fit_are_marked_not_dropped(tmp_path, capsys):
    out = tmp_path / "plan.json"
    # 4 GB of reserve on a 4.001 GB GPU: nothing fits, every layout is still listed.
    argv = ["plan", "--config", CONFIG, "--gpus", "2", "--gpu-memory", "4.001", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and not any(r["fits"] for r in rows)
    assert " NO " in capsys.readouterr().out


def test_bad_input_is_one_line(capsys):
    assert main(["plan", "--config", CONFIG, "--gpus", "4", "--gpu", "v100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown GPU" in err[0]
    assert main(["plan", "--config", CONFIG]) == 2
    assert "--gpus" in capsys.readouterr().err
    # Each names the flag as typed, and all are told before the config is read (it does not exist here).
    missing = str(ROOT / "none.yaml")
    for flags, message in [
        (["--gpu-memory", "-1"], "--gpu-memory -1: must be > 0 (the h100 table's value: 80)"),
        (["--efficiency", "0"], "--efficiency 0: must be in (0, 1] (the achieved fraction of peak)"),
        (["--recompute", "none,ful"], "--recompute none,ful: ful is not one of none, selective, full"),
        (["--latent-shape", "4,8"], "--latent-shape 4,8: expected C,H,W (three positive integers)"),
    ]:
        assert main(["plan", "--config", missing, "--gpus", "4", *flags]) == 2
        assert capsys.readouterr().err == f"megafusion plan: {message}\n"


def test_a_config_without_vocab_size_takes_it_from_its_data(tmp_path, capsys):
    """The README's main config sets no model.vocab_size: the plan takes the data's, as training does."""
    argv = ["plan", "--config", str(ROOT / "tests/configs/mixed_small.yaml"), f"data.cache_dir={tmp_path}"]
    assert main([*argv, "data.num_samples=60", "--gpus", "1", "--micro-batch-sizes", "2", "--recompute", "none"]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    assert first.startswith("model.vocab_size=256: taken from the data as a run takes it (data.source=builtin: ")
    assert first.endswith(" ids of its tokenizer, padded to a multiple of 128)") and ", vocab 256, " in rest
