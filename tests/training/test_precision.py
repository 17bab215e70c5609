"""bf16 (the GPU default) runs through the same path: bf16 weights, fp32 master weights in the
megatron mixed-precision optimizer, fp32 loss. Checked on CPU against the fp32 run."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import run_train


def test_bf16_training_tracks_fp32(tmp_path):
    fp32, _, _ = run_train(tmp_path, 1, "tests/configs/parity.yaml", ["model.params_dtype=fp32"], "fp32")
    bf16, grads, _ = run_train(tmp_path, 1, "tests/configs/parity.yaml", ["model.params_dtype=bf16"], "bf16")
    assert bf16 != fp32, "bf16 run gave bit-identical losses: it did not run in bf16"
    for step, (a, b) in enumerate(zip(bf16, fp32), start=1):
        assert abs(a - b) <= 1e-2 * abs(b), f"step {step}: bf16 loss {a} vs fp32 {b}"
    assert all(g.dtype == torch.float32 for g in grads.values()), "gradients accumulate in fp32"


@pytest.mark.slow
def test_bf16_transfusion_and_lmfusion_train_and_checkpoint(tmp_path):
    """Transfusion's image modules and LMFusion's new-token rows are in params_dtype like every other
    weight: bf16 trains (tracking fp32), saves (megatron's mixed-precision optimizer cannot
    checkpoint a model mixing fp32 and bf16 parameters), and warm-starts LMFusion, which trains
    and saves too."""
    from megafusion import checkpoint as ck
    from tests.interop.test_hf_llama import checkpoint_tensors

    config, steps = "tests/configs/transfusion_small.yaml", ["train.steps=3", "checkpoint.save=true"]
    fp32, _, _ = run_train(tmp_path, 1, config, ["model.params_dtype=fp32", "train.steps=3"], "fp32")
    bf16, grads, _ = run_train(
        tmp_path, 1, config, ["model.params_dtype=bf16", *steps, f"checkpoint.dir={tmp_path / 'dense'}"], "bf16"
    )
    assert bf16 != fp32, "bf16 run gave bit-identical losses: it did not run in bf16"
    for step, (a, b) in enumerate(zip(bf16, fp32), start=1):
        assert abs(a - b) <= 1e-2 * abs(b), f"step {step}: bf16 loss {a} vs fp32 {b}"
    assert any(name.startswith("image_patch_head") for name in grads)
    saved = checkpoint_tensors(ck.resolve_checkpoint(tmp_path / "dense"))
    assert {t.dtype for k, t in saved.items() if k.startswith(("image_", "decoder."))} == {torch.bfloat16}

    lmf, grads, _ = run_train(
        tmp_path,
        1,
        config,
        [
            "model.params_dtype=bf16",
            "model.arch=mot",
            "model.freeze_text=true",
            *steps,
            f"checkpoint.init_from={tmp_path / 'dense'}",
            f"checkpoint.dir={tmp_path / 'lmf'}",
        ],
        "lmf",
    )
    assert len(lmf) == 3 and all(math.isfinite(loss) for loss in lmf)
    saved = checkpoint_tensors(ck.resolve_checkpoint(tmp_path / "lmf"))
    assert saved["embedding_new_rows.weight"].dtype == torch.bfloat16
    assert saved["output_new_rows.weight"].abs().sum() > 0
