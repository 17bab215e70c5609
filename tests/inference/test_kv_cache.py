"""The KV cache of ``megafusion generate`` equals recomputing the whole sequence (dense, MoT, MoMa and MoMa + MoD
with causal routing by its auxiliary routers).

Each check runs in a fresh process (the generator initialises megatron-core's parallel state)
on a Transfusion checkpoint trained for two steps: every denoising prediction of an image
(conditional and caption-hidden, alternating and repeated so the overwritten slots of ``<boi>``
and the patches are exercised: the two views differ in ``<boi>``'s keys from layer 2 on), the
logits after the finished image and its ``<eoi>``, and each following text step, from the
cache, against the same positions computed from scratch without a cache.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, run_train

CONFIG = "tests/configs/transfusion_small.yaml"


def check_cache_matches_recomputation(ckpt: str) -> None:
    from megafusion.inference.generate import Generator, _Sequence

    g = Generator.from_checkpoint(ckpt)
    tok = g.tokenizer
    gen = torch.Generator().manual_seed(0)
    shape = (1, *g.latent.latent_shape)
    x0, xt, t = torch.randn(shape, generator=gen).clamp(-1, 1), torch.randn(shape, generator=gen), torch.tensor([700.0])
    prompt = [tok.bos_id, *tok.encode_text("a red circle at the top left."), tok.boi_id]
    first = len(prompt)
    seq = _Sequence(prompt + [tok.image_offset] * g.patches, [(first, first + g.patches)])

    def close(got, want, what):
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, f"{what}: cached differs from recomputed by {err:.2e} (relative to the max)"

    conditional = g._forward(seq, 0, None, current=(xt, t))[1]
    hidden = g._forward(seq, 0, None, current=(xt, t), hide=0)[1]
    # Otherwise the caption-hidden comparison below would not test the cached mask.
    assert (conditional - hidden).abs().max() > 1e-4
    # The unconditional view does not read the caption at any layer: another caption of the same
    # length (its pieces reversed) gives the same prediction, bit for bit.
    other = [prompt[0], *prompt[-2:0:-1], prompt[-1]]
    other = _Sequence(other + [tok.image_offset] * g.patches, [(first, first + g.patches)])
    assert torch.equal(g._forward(other, 0, None, current=(xt, t), hide=0)[1], hidden)
    assert (g._forward(other, 0, None, current=(xt, t))[1] - conditional).abs().max() > 1e-4
    cache = g.new_cache()
    boi = first - 1
    g._forward(seq.prefix(boi), 0, cache)
    for step in range(2):
        close(g._forward(seq, boi, cache, current=(xt, t))[1], conditional, f"denoising step {step}")
        close(g._forward(seq, boi, cache, current=(xt, t), hide=0)[1], hidden, f"unconditional step {step}")
    seq.latents.append(x0)
    seq.tokens.append(tok.eoi_id)
    close(g._forward(seq, boi, cache)[0], g._forward(seq, 0, None)[0], "logits after the image")
    for position, token in enumerate(tok.encode_text("a blue square."), start=len(seq.tokens)):
        seq.tokens.append(token)
        close(g._forward(seq, position, cache)[0], g._forward(seq, 0, None)[0], f"text position {position}")


@pytest.mark.parametrize("arch", ["dense", "mot", "moma", "moma+mod"])
def test_kv_cache_equals_recomputing_the_sequence(tmp_path, arch):
    # MoMa generates with causal routing: its auxiliary routers (trained jointly here) choose.
    # MoMa + MoD: MoD's too; each MoD layer keeps only the tokens routed into it in its cache, and
    # forgets the image's slots at every denoising step (they are run again).
    moma = ["moe.aux_router=true", "moe.experts={text: 2, image: 2}"] if arch.startswith("moma") else []
    if arch.endswith("+mod"):
        arch, moma = "moma", [*moma, "mod.capacity=0.5", "mod.aux_router=true"]
    run_train(
        tmp_path,
        1,
        CONFIG,
        [
            "train.steps=2",
            f"model.arch={arch}",
            *moma,
            "checkpoint.save=true",
            f"checkpoint.dir={tmp_path / 'ckpt'}",
            "logging.dump_grads=null",
        ],
        "train",
    )
    code = f"from {__name__} import check_cache_matches_recomputation as c; c({str(tmp_path / 'ckpt')!r})"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
