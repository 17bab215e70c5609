"""The main job end to end: built-in mixed-modal data, per-modality losses that fall, the
metrics a user reads, and the same run from raw shards through `megafusion data prepare`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from megafusion.data.builtin.shapes import shapes_documents
from megafusion.data.formats.shards import write_jsonl_shard
from tests.helpers import ROOT, run_train, train_command

REQUIRED = (
    "step",
    "loss",
    "loss/text",
    "loss/image",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tflops_per_gpu",
    "mfu",
    "mem_gb",
)


@pytest.mark.slow
def test_main_job_learns_both_modalities_and_reports_metrics(tmp_path):
    _, _, out = run_train(
        tmp_path,
        1,
        "examples/configs/tiny_mixed.yaml",
        [
            "train.steps=40",
            "logging.log_interval=1",
            "logging.wandb=true",
            "eval.interval=20",
            "checkpoint.save=true",
            "logging.peak_tflops=100",
        ],
        "main",
    )
    run_dir = tmp_path / "main"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 41))
    for r in train:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        assert abs(r["mfu"] - r["tflops_per_gpu"] / 100) < 1e-12
    for modality in ("text", "image"):
        first, last = train[0][f"loss/{modality}"], sum(r[f"loss/{modality}"] for r in train[-5:]) / 5
        assert last < 0.8 * first, f"{modality} loss did not fall: {first:.3f} -> {last:.3f}"
    assert [r["step"] for r in evals] == [20, 40] and all("val/loss/image" in r for r in evals)
    assert str(run_dir / "metrics.jsonl") in out and str(run_dir / "checkpoints") in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000040"
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run directory missing"


def test_a_run_with_wandb_exits_without_a_traceback(tmp_path):
    """The command reaps its children at exit; W&B's service must be stopped before that, or
    wandb's atexit teardown prints "Connection lost" after every run."""
    args = ["--config", str(ROOT / "tests/configs/mixed_small.yaml"), "train.steps=1", "logging.wandb=true"]
    args += [f"logging.out_dir={tmp_path / 'wb'}", "checkpoint.save=false"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(train_command(1, args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*"))


def test_without_peak_mfu_is_null_and_the_reason_is_printed(tmp_path):
    _, _, out = run_train(tmp_path, 1, "tests/configs/mixed_small.yaml", ["train.steps=2"], "nopeak")
    record = json.loads((tmp_path / "nopeak" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["mfu"] is None and "logging.peak_tflops" in out


def test_raw_shards_to_indexed_dataset_to_training(tmp_path):
    shard = tmp_path / "raw" / "shapes.jsonl"
    write_jsonl_shard(shapes_documents(300, 5, 12), str(shard))

    def cli(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "megafusion", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    cli("tokenizer", "train", "--input", str(shard.parent), "--vocab-size", "128", "--output", str(tmp_path / "spm"))
    model = tmp_path / "spm.model"
    assert model.exists()
    cli(
        "data",
        "prepare",
        "--input",
        str(shard),
        "--tokenizer",
        str(model),
        "--output",
        str(tmp_path / "ds"),
        "--image-size",
        "12",
        "--patch-size",
        "2",
        "--pixel-levels",
        "4",
    )
    losses, _, out = run_train(
        tmp_path,
        1,
        "tests/configs/mixed_small.yaml",
        ["data.source=indexed", f"data.path={tmp_path / 'ds'}", f"data.tokenizer={model}", "train.steps=3"],
        "indexed",
    )
    assert len(losses) == 3 and f"indexed:{tmp_path / 'ds'}" in out

    # A blend (here the dataset at 0.7 and a copy at 0.3), streamed, resumed mid-stream: steps 3-4 of
    # the resumed run are those of the straight run, and the realised shares are logged.
    for ext in ("bin", "idx", "meta.json"):
        shutil.copy(tmp_path / f"ds.{ext}", tmp_path / f"copy.{ext}")
    blend = [
        f"data.blend=[{{path: {tmp_path / 'ds'}, weight: 0.7}}, {{path: {tmp_path / 'copy'}, weight: 0.3}}]",
        "data.source=indexed",
        f"data.tokenizer={model}",
        "train.steps=4",
        "checkpoint.save=true",
        "checkpoint.interval=2",
        f"checkpoint.dir={tmp_path / 'blend_ckpt'}",
    ]
    # Built ahead of the run (as before a multi-node job), then found by it.
    ready = cli("data", "index", "--config", "tests/configs/mixed_small.yaml", *blend[:3])
    assert "sample index ready" in ready and (tmp_path / "copy.index").is_dir()
    straight, _, out = run_train(tmp_path, 1, "tests/configs/mixed_small.yaml", blend, "blend")
    assert "blend train: 2 datasets, token shares ds 0.700, copy 0.300" in out
    records = [json.loads(line) for line in (tmp_path / "blend" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "data/blend/ds/share" in r]
    assert len(steps) == 4 and all(abs(sum(r[f"data/share/{m}"] for m in ("text", "image")) - 1) < 1e-9 for r in steps)
    resumed, _, _ = run_train(
        tmp_path, 1, "tests/configs/mixed_small.yaml", [*blend, "checkpoint.load_step=2"], "blend_resumed"
    )
    assert resumed == straight[2:]

    # The same dataset with another tokenizer is refused, naming the dataset.
    cli("tokenizer", "train", "--input", str(shard.parent), "--vocab-size", "100", "--output", str(tmp_path / "other"))
    _, _, err = run_train(
        tmp_path,
        1,
        "tests/configs/mixed_small.yaml",
        ["data.source=indexed", f"data.path={tmp_path / 'ds'}", f"data.tokenizer={tmp_path / 'other.model'}"],
        "wrong_tok",
        expect_rc=2,
    )
    assert "ds.meta.json" in err and "different tokenizer" in err


def test_missing_logging_backend_is_named_with_the_fix(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:  # then the backend just works
        run_train(tmp_path, 1, "tests/configs/mixed_small.yaml", ["train.steps=1", "logging.tensorboard=true"], "tb")
        assert list((tmp_path / "tb" / "tensorboard").iterdir())
        return
    _, _, out = run_train(
        tmp_path, 1, "tests/configs/mixed_small.yaml", ["train.steps=1", "logging.tensorboard=true"], "tb", expect_rc=2
    )
    assert "pip install tensorboard" in out and "logging.tensorboard=false" in out
