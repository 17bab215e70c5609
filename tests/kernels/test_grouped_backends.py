"""MoT and MoMa models compute the same with every ``ops.backend`` as with the torch reference.

Whole two-layer models (every MoT part untied: Q/K/V, output projection, FFN; MoMa's 4+4
experts), forward and every parameter's gradient, on one microbatch with all modalities
present. The Triton kernels run in Triton's interpreter on a CPU (fp32).
"""

from __future__ import annotations

import pytest
import torch

from megafusion import ops
from megafusion.layers.routing import modality_routing
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


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_experts_on_torch_backend_are_megatrons_sequential_mlp_bit_for_bit(dispatcher, runtime, monkeypatch):
    """The torch backend's grouped experts, and the dispatcher-free EP = 1 path, compute exactly
    what megatron's ``SequentialMLP`` loop computes behind its dispatcher (expert choice turns a
    last-bit difference into a different choice, so the reference must not drift)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    from tests.models.test_moma import layer_inputs, moe_layer

    cfg = moma_cfg()
    cfg.moe.dispatcher = dispatcher
    _, layer = moe_layer(cfg, runtime)
    x, routing = layer_inputs(3)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))

    def run():
        layer.zero_grad()
        leaf = x.clone().requires_grad_()
        with ops.backend("torch"), modality_routing(routing):
            out, _ = layer(leaf)
        out.backward(grad)
        return [out.detach(), leaf.grad] + [p.grad for p in layer.parameters()]

    ours = run()  # one process: the experts read their tokens in place
    layer.skip_dispatch = False
    dispatched = run()  # megafusion's dispatcher + grouped experts
    monkeypatch.setattr(type(layer.experts), "forward", SequentialMLP.forward)
    megatron = run()  # megafusion's dispatcher + megatron's loop over expert MLPs
    assert all(torch.equal(a, b) for a, b in zip(ours, megatron))
    assert all(torch.equal(a, b) for a, b in zip(dispatched, megatron))
