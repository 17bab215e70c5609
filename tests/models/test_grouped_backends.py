"""MoT and MoMa models compute the same with every ``ops.backend`` as with the torch reference.

Whole two-layer models (every MoT part untied: Q/K/V, output projection, FFN; MoMa's 4+4
experts), forward and every parameter's gradient, on one microbatch with all modalities
present. The Triton kernels run in Triton's interpreter on a CPU (fp32).
"""

from __future__ import annotations

import pytest
import torch

from megafusion import ops
from megafusion.ops import backends
from tests.models.test_moma import moma_cfg
from tests.models.test_mot import batch_with_modalities, build, forward, lm_loss, small_cfg

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not backends.triton_installed(), reason="no triton")),
    "torch_grouped_mm",
]


def loss_and_grads(cfg, runtime, backend):
    cfg.ops.backend = backend
    with ops.backend("auto"):  # restored afterwards: the build sets the process's backend
        model = build(cfg, runtime)  # same seed: same weights for every backend
        assert ops.current_backend() == backend
        batch = batch_with_modalities(cfg, seed=4)
        loss = lm_loss(forward(model, batch), batch)
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["mot", "moma"])
def test_model_with_backend_equals_torch_backend(arch, backend, runtime):
    make = (lambda: small_cfg("mot")) if arch == "mot" else moma_cfg
    want_loss, want = loss_and_grads(make(), runtime, "torch")
    loss, got = loss_and_grads(make(), runtime, backend)
    grouped = [n for n in want if ".image." in n or "local_experts" in n]
    assert grouped and set(got) == set(want)
    assert torch.allclose(loss, want_loss, rtol=1e-6, atol=0)
    for name, g in want.items():
        err = (got[name] - g).abs().max() / g.abs().max().clamp_min(1e-30)
        assert err < 1e-5, f"{arch} {backend}: {name} gradient differs by {err:.2e}"
