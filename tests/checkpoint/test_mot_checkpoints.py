"""MoT checkpoints: readable per-modality keys, resume into another layout, dense-to-mot warm start."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from megatron.core import dist_checkpointing

from megafusion.models.init import tied_name
from tests.helpers import ROOT, run_train

CONFIG = "tests/configs/mixed_small.yaml"
MOT = ["model.arch=mot"]
STOP = {"MEGAFUSION_FAULT": "after_save:3"}


@pytest.mark.torchrun
def test_mot_resumes_into_tp2_with_sequence_parallel(tmp_path):
    full, _, _ = run_train(tmp_path, 1, CONFIG, [*MOT, "logging.dump_grads=null"], "full")
    ckpt = tmp_path / "ckpt"
    run_train(
        tmp_path, 1, CONFIG, [*MOT, "checkpoint.save=true", f"checkpoint.dir={ckpt}"], "stopped", env=STOP, expect_rc=17
    )
    keys = set(dist_checkpointing.load_tensors_metadata(str(ckpt / "step_0000003")))
    for key in (
        "decoder.layers.mlp.image.linear_fc1.weight",
        "decoder.layers.self_attention.linear_qkv.text.weight",
        "decoder.layers.input_layernorm.image.weight",
        "decoder.final_layernorm.text.weight",
    ):
        assert any(k.startswith(key) for k in keys), f"{key} not among the checkpoint's keys"
    losses, _, out = run_train(
        tmp_path,
        2,
        CONFIG,
        [*MOT, "parallel.tp=2", "parallel.sp=true", "checkpoint.save=true", f"checkpoint.dir={ckpt}"],
        "tp2_sp",
    )
    assert "resumed from" in out and "step_0000003" in out
    assert len(losses) == 3
    for a, b in zip(losses, full[3:]):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, full[3:])


def assert_mot_gradients_sum_to_dense(m_grads: dict, d_grads: dict) -> None:
    """Each dense gradient equals the sum of its MoT copies' (a converted model's first step)."""
    summed = {}
    for name, grad in m_grads.items():
        summed[tied_name(name)] = summed.get(tied_name(name), 0) + grad
    assert sorted(summed) == sorted(d_grads)
    for name, want in d_grads.items():
        assert ((summed[name] - want).norm() / want.norm()).item() < 1e-5, name


def convert(src, out, *extra):
    cmd = [
        sys.executable,
        "-m",
        "megafusion",
        "convert",
        "dense-to-mot",
        "--input",
        str(src),
        "--output",
        str(out),
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    dense_ckpt = tmp / "dense_ckpt"
    run_train(
        tmp,
        1,
        CONFIG,
        ["train.steps=3", "checkpoint.save=true", f"checkpoint.dir={dense_ckpt}", "logging.dump_grads=null"],
        "dense",
    )
    proc = convert(dense_ckpt, tmp / "mot_init")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint.init_from=" in proc.stdout
    return tmp, dense_ckpt, tmp / "mot_init"


@pytest.mark.parametrize(
    "layout",
    [pytest.param((1, []), id="single"), pytest.param((2, ["parallel.tp=2"]), id="tp2", marks=pytest.mark.torchrun)],
)
def test_converted_mot_starts_exactly_where_the_dense_model_is(converted, layout):
    """Same first-step loss as the dense weights; MoT gradients summed over modalities = dense gradients."""
    tmp, dense_ckpt, mot_init = converted
    nproc, overrides = layout
    one_step = ["train.steps=1", "checkpoint.save=false"]
    d_loss, d_grads, _ = run_train(tmp, 1, CONFIG, [*one_step, f"checkpoint.init_from={dense_ckpt}"], "dense_init")
    m_loss, m_grads, out = run_train(
        tmp, nproc, CONFIG, [*MOT, *one_step, *overrides, f"checkpoint.init_from={mot_init}"], f"mot_init{nproc}"
    )
    assert "initialised from" in out
    assert abs(m_loss[0] - d_loss[0]) <= 1e-5 * abs(d_loss[0]), (m_loss, d_loss)
    assert_mot_gradients_sum_to_dense(m_grads, d_grads)


def test_weights_only_checkpoint_cannot_be_resumed_and_bad_input_is_named(converted, tmp_path):
    tmp, dense_ckpt, mot_init = converted
    copy = tmp_path / "as_run_dir"
    shutil.copytree(mot_init, copy / "step_0000000")
    (copy / "latest").write_text("step_0000000\n")
    _, _, out = run_train(tmp_path, 1, CONFIG, [*MOT, "train.steps=1", f"checkpoint.dir={copy}"], "resume", expect_rc=2)
    assert "checkpoint.init_from" in out
    proc = convert(mot_init, tmp_path / "again")
    assert proc.returncode == 2 and "dense checkpoints only" in proc.stderr
    proc = convert(tmp_path / "nowhere", tmp_path / "x")
    assert proc.returncode == 2 and f"--ckpt {tmp_path / 'nowhere'}: no such file or directory" in proc.stderr
    _, _, out = run_train(
        tmp_path,
        1,
        CONFIG,
        [*MOT, "model.untie=ffn", "train.steps=1", f"checkpoint.init_from={mot_init}"],
        "wrong_untie",
        expect_rc=2,
    )
    assert "model.untie" in out


@pytest.mark.slow
def test_converted_transfusion_mot_starts_exactly_where_the_dense_model_is(tmp_path):
    """The same on the Transfusion objective: the image modules (patch embedding, head, timestep
    embedding) carry over unchanged and the diffusion loss is dense's too."""
    config = "tests/configs/transfusion_small.yaml"
    dense_ckpt = tmp_path / "dense_ckpt"
    run_train(
        tmp_path,
        1,
        config,
        ["train.steps=2", "checkpoint.save=true", f"checkpoint.dir={dense_ckpt}", "logging.dump_grads=null"],
        "dense",
    )
    proc = convert(dense_ckpt, tmp_path / "mot_init")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_step = ["train.steps=1", "checkpoint.save=false"]
    d_loss, d_grads, _ = run_train(tmp_path, 1, config, [*one_step, f"checkpoint.init_from={dense_ckpt}"], "d")
    m_loss, m_grads, _ = run_train(
        tmp_path, 1, config, [*MOT, *one_step, f"checkpoint.init_from={tmp_path / 'mot_init'}"], "m"
    )
    assert abs(m_loss[0] - d_loss[0]) <= 1e-5 * abs(d_loss[0]), (m_loss, d_loss)
    assert any("image_patch_head" in name for name in d_grads)
    assert_mot_gradients_sum_to_dense(m_grads, d_grads)
