"""bf16 (the GPU default) runs through the same path: bf16 weights, fp32 master weights in the
megatron mixed-precision optimizer, fp32 loss. Checked on CPU against the fp32 run."""

from __future__ import annotations

import torch

from tests.helpers import run_train


def test_bf16_training_tracks_fp32(tmp_path):
    fp32, _, _ = run_train(tmp_path, 1, "tests/configs/parity.yaml", ["model.params_dtype=fp32"], "fp32")
    bf16, grads, _ = run_train(tmp_path, 1, "tests/configs/parity.yaml", ["model.params_dtype=bf16"], "bf16")
    assert bf16 != fp32, "bf16 run gave bit-identical losses: it did not run in bf16"
    for step, (a, b) in enumerate(zip(bf16, fp32), start=1):
        assert abs(a - b) <= 1e-2 * abs(b), f"step {step}: bf16 loss {a} vs fp32 {b}"
    assert all(g.dtype == torch.float32 for g in grads.values()), "gradients accumulate in fp32"
