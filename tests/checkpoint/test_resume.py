"""Checkpoints: a stopped run resumes to the same numbers, in the same or another layout; a
save killed mid-write leaves the previous checkpoint in charge; incompatible ones are refused."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import run_train

CONFIG = "tests/configs/mixed_small.yaml"
STOP = {"MEGAFUSION_FAULT": "after_save:3"}  # dies right after the step-3 checkpoint is complete


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run, and a checkpoint directory of a run killed after step 3."""
    tmp = tmp_path_factory.mktemp("resume")
    full, _, _ = run_train(tmp, 1, CONFIG, ["logging.dump_grads=null"], "full")
    ckpt = tmp / "stopped_ckpt"
    run_train(tmp, 1, CONFIG, ["checkpoint.save=true", f"checkpoint.dir={ckpt}"], "stopped", env=STOP, expect_rc=17)
    assert (ckpt / "latest").read_text().strip() == "step_0000003"
    return tmp, full, ckpt


def _resume(tmp, ckpt, tag, nproc=1, overrides=()):
    copy = tmp / f"{tag}_ckpt"
    shutil.copytree(ckpt, copy)
    losses, _, out = run_train(tmp, nproc, CONFIG, ["checkpoint.save=true", f"checkpoint.dir={copy}", *overrides], tag)
    assert "resumed from" in out and "step_0000003" in out
    return losses, copy


def _assert_close(got, want, rel, what):
    assert len(got) == len(want), f"{what}: {len(got)} steps vs {len(want)}"
    for step, (a, b) in enumerate(zip(got, want), start=4):
        assert abs(a - b) <= rel * abs(b), f"{what}, step {step}: {a!r} vs uninterrupted {b!r}"


def test_resume_same_layout_is_exact(runs):
    tmp, full, ckpt = runs
    assert full[-1] < full[0], "the run must learn for the comparison to mean something"
    losses, copy = _resume(tmp, ckpt, "same")
    _assert_close(losses, full[3:], 1e-6, "resumed in the same layout")
    assert (copy / "latest").read_text().strip() == "step_0000006"


@pytest.mark.torchrun
@pytest.mark.parametrize(
    "layout",
    [(2, ["parallel.tp=2"]), (2, ["parallel.pp=2"]), (2, ["parallel.pp=2", "parallel.vpp=2"])],
    ids=["tp2", "pp2", "pp2_vpp2"],
)
def test_resume_into_another_layout(runs, layout):
    tmp, full, ckpt = runs
    nproc, overrides = layout
    losses, _ = _resume(
        tmp, ckpt, "_".join(o.replace("parallel.", "").replace("=", "") for o in overrides), nproc, overrides
    )
    _assert_close(losses, full[3:], 1e-5, f"resumed into {overrides}")


@pytest.mark.torchrun
def test_distributed_optimizer_resumes_into_another_dp_and_tp(runs):
    """DP=2 with the distributed optimizer, stopped at step 3, resumed as TP=2 (DP=1)."""
    tmp, full, _ = runs
    ckpt = tmp / "distopt_ckpt"
    distopt = ["parallel.distributed_optimizer=true", "checkpoint.save=true", f"checkpoint.dir={ckpt}"]
    _, _, out = run_train(tmp, 2, CONFIG, distopt, "distopt_stopped", env=STOP, expect_rc=1)  # torchrun's code
    assert out.count("dying at after_save of step 3") == 2
    losses, _, out = run_train(tmp, 2, CONFIG, [*distopt, "parallel.tp=2"], "distopt_tp2")
    assert "resumed from" in out and "step_0000003" in out
    _assert_close(losses, full[3:], 1e-5, "distributed optimizer, DP=2 -> TP=2")


def test_save_killed_mid_write_leaves_previous_checkpoint_loadable(runs):
    tmp, full, ckpt = runs
    crashed = tmp / "crashed_ckpt"
    shutil.copytree(ckpt, crashed)
    # Resume, train steps 4-6, and die after writing step 6's shards but before completing it.
    run_train(
        tmp,
        1,
        CONFIG,
        ["checkpoint.save=true", f"checkpoint.dir={crashed}"],
        "crash",
        env={"MEGAFUSION_FAULT": "after_shards:6"},
        expect_rc=17,
    )
    assert (crashed / "latest").read_text().strip() == "step_0000003"
    assert (crashed / "step_0000006").is_dir() and not (crashed / "step_0000006" / "megafusion.json").exists()
    losses, _, out = run_train(tmp, 1, CONFIG, ["checkpoint.save=true", f"checkpoint.dir={crashed}"], "after_crash")
    assert "resumed from" in out and "step_0000003" in out
    _assert_close(losses, full[3:], 1e-6, "resumed after a crashed save")
    assert (crashed / "latest").read_text().strip() == "step_0000006"
    assert sorted(p.name for p in crashed.glob("step_*")) == ["step_0000003", "step_0000006"]


def test_keep_last_prunes_old_checkpoints(tmp_path):
    ckpt = tmp_path / "ckpt"
    run_train(
        tmp_path,
        1,
        CONFIG,
        [
            "checkpoint.save=true",
            f"checkpoint.dir={ckpt}",
            "checkpoint.interval=1",
            "checkpoint.keep_last=2",
            "train.steps=4",
        ],
        "prune",
    )
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000003", "step_0000004"]
    assert (ckpt / "latest").read_text().strip() == "step_0000004"


def test_incompatible_checkpoint_is_refused_with_the_reason(runs):
    tmp, _, ckpt = runs
    copy = tmp / "incompatible_ckpt"
    shutil.copytree(ckpt, copy)
    _, _, out = run_train(
        tmp,
        1,
        CONFIG,
        ["checkpoint.save=true", f"checkpoint.dir={copy}", "model.hidden_size=64"],
        "incompatible",
        expect_rc=2,
    )
    assert str(copy / "step_0000003") in out
    assert "model.hidden_size: checkpoint 32, this run 64" in out
    assert "start a new run elsewhere" in out and "--overwrite" in out
    _, _, out = run_train(
        tmp,
        1,
        CONFIG,
        ["checkpoint.save=true", f"checkpoint.dir={copy}", "parallel.distributed_optimizer=true"],
        "other_optimizer",
        expect_rc=2,
    )
    assert "parallel.distributed_optimizer: checkpoint False, this run True" in out
