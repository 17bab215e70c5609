"""The in-process pieces of fault handling: the free-space check before a save, loss-spike events,
and the resume review's decisions (the end-to-end cases are in tests/training/test_faults.py)."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from megafusion.checkpoint import io
from megafusion.config import load_config
from megafusion.core.errors import CheckpointError, UsageError
from megafusion.training import resume_changes, run_dir
from megafusion.training.numerics import SpikeWatch
from tests.helpers import ROOT

Usage = namedtuple("Usage", "total used free")


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(CheckpointError) as err:
        io._check_free_space(tmp_path / "ckpt", needed=2**30, margin=0.1)
    assert str(tmp_path / "ckpt") in str(err.value) and "1.00 GiB" in str(err.value) and "1.0 MiB" in str(err.value)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * 2**30, 0, 10 * 2**30))
    io._check_free_space(tmp_path / "ckpt", needed=2**30, margin=0.1)  # room: no error


def test_loss_spikes_are_events_and_ordinary_noise_is_not():
    watch = SpikeWatch(3.0)
    events = [watch.check(step, loss) for step, loss in enumerate([2.0, 2.1, 1.9, 2.0, 2.05, 2.2, 7.0, 2.0], 1)]
    assert [e["step"] for e in events if e] == [7]
    assert events[6]["ratio"] > 3 and "loss spike at step 7" in events[6]["message"]
    assert all(SpikeWatch(0).check(s, 1e9 if s == 9 else 1.0) is None for s in range(1, 12))


def test_resume_review_applies_the_schedule_and_refuses_the_stream():
    saved = load_config(str(ROOT / "tests/configs/parity.yaml"), []).to_dict()
    cfg = load_config(str(ROOT / "tests/configs/parity.yaml"), ["train.steps=50", "train.lr=1e-3", "parallel.tp=2"])
    lines = resume_changes.review("ckpt", saved, cfg)
    assert any(line.startswith("train.steps: 5 -> 50") for line in lines)
    assert any("parallel.tp: 1 -> 2 (resharded on load)" in line for line in lines)
    assert any("cosine decay to 0.0003 at step 50" in line for line in lines)
    for change in (
        "model.seq_length=16",
        "train.seed=1",
        "data.docs_per_sequence=3",
        "data.domains=shapes",
        "data.order=icp",
        "data.icp_neighbors=4",
    ):
        with pytest.raises(CheckpointError, match=change.split("=")[0].replace(".", r"\.")):
            resume_changes.review("ckpt", saved, load_config(str(ROOT / "tests/configs/parity.yaml"), [change]))
    recompute = resume_changes.review(
        "ckpt", saved, load_config(str(ROOT / "tests/configs/parity.yaml"), ["train.recompute=full"])
    )
    assert recompute == ["train.recompute: 'none' -> 'full' (applied from the next step)"]
    # What tokens attend and where RoPE puts them: applied, said with the consequence; a checkpoint
    # from before these keys existed was trained with their defaults.
    attention = load_config(
        str(ROOT / "tests/configs/parity.yaml"), ["data.attention=causal", "data.positions=document"]
    )
    for before in (
        saved,
        {**saved, "data": {k: v for k, v in saved["data"].items() if k not in ("attention", "positions")}},
    ):
        said = resume_changes.review("ckpt", before, attention)
        assert [line.split(" (")[0] for line in said] == [
            "data.attention: 'isolated' -> 'causal'",
            "data.positions: 'row' -> 'document'",
        ]
        assert "what each token attends" in said[0] and "checkpoint.init_from" in said[1]
    unreported = ["logging.log_interval=5", "train.on_nan=skip", "data.cache_dir=elsewhere"]
    quiet = load_config(str(ROOT / "tests/configs/parity.yaml"), unreported)
    assert resume_changes.review("ckpt", saved, quiet) == []


def test_every_output_path_is_checked_writable_before_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    base = ["data.source=builtin", f"logging.out_dir={tmp_path}/out", f"data.cache_dir={tmp_path}/cache"]
    ok = load_config(str(ROOT / "examples/configs/tiny_mixed.yaml"), base)
    run_dir.check_output_paths(ok, tmp_path / "ckpt")
    for key in ("logging.out_dir", "data.cache_dir", "logging.dump_losses"):
        cfg = load_config(str(ROOT / "examples/configs/tiny_mixed.yaml"), [*base, f"{key}={blocker}/sub"])
        with pytest.raises(UsageError, match=rf"{key.replace('.', '[.]')} .*a_file"):
            run_dir.check_output_paths(cfg, tmp_path / "ckpt")
    with pytest.raises(UsageError, match="logging.out_dir/checkpoints .*a_file"):
        run_dir.check_output_paths(ok, blocker / "ckpt")


def test_many_epochs_of_a_small_training_set_are_announced():
    from types import SimpleNamespace

    from megafusion.training.trainer import _epochs_note

    cfg = load_config(str(ROOT / "tests/configs/parity.yaml"), ["train.steps=100", "train.global_batch_size=8"])

    def trainer(rows):
        return SimpleNamespace(cfg=cfg, data=SimpleNamespace(train=SimpleNamespace(num_rows=rows)))

    note = _epochs_note(trainer(40))  # 100 x 8 samples over 40 rows: 20 epochs
    assert "holds 40 rows" in note and "20 epochs" in note and "data.num_samples" in note
    assert _epochs_note(trainer(400)) is None  # 2 epochs: ordinary
    assert _epochs_note(SimpleNamespace(cfg=cfg, data=SimpleNamespace(train=object()))) is None  # endless data
