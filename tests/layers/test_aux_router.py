"""The auxiliary router (:mod:`megafusion.layers.aux_router`) against float64 hand references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megafusion.core.modality import PAD_DOCUMENT_ID
from megafusion.layers.aux_router import STAT_FIELDS, AuxRouter, attach, summarize, take_stats
from megafusion.layers.routing import ModalityRouting


def _router(d=8, outputs=3, seed=0):
    torch.manual_seed(seed)
    r = AuxRouter(d, outputs)
    for p in r.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return r


def _reference_bce(r: AuxRouter, x, targets, valid):
    """Float64 by hand: sigmoid(SiLU(x W1) W2), BCE by its definition."""
    w1, w2 = r.fc1.weight.double(), r.fc2.weight.double()
    h = x.double() @ w1.T
    p = torch.sigmoid((h * torch.sigmoid(h)) @ w2.T)
    t = targets.double()
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    return bce[valid].mean(dim=1).sum(), bce[valid].sum(), p


def test_bce_matches_float64_reference_and_statistics():
    r = _router()
    x = torch.randn(10, 8)
    targets = torch.rand(10, 3) < 0.4
    valid = torch.ones(10, dtype=torch.bool)
    valid[[2, 7]] = False
    loss = r.loss(x, targets, valid)
    ref_loss, ref_all, p = _reference_bce(r, x, targets, valid)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    stats = take_stats([r], torch.device("cpu"))
    picked = (p > 0.5)[valid]
    t = targets[valid]
    counts = [(picked & t).sum(), (picked & ~t).sum(), (~picked & t).sum(), (~picked & ~t).sum(), 24]
    expect = [float(ref_all.detach()), *counts]
    torch.testing.assert_close(stats[0], torch.tensor(expect[0], dtype=torch.float64), rtol=1e-6, atol=0)
    assert stats[1:].tolist() == [float(v) for v in expect[1:]]
    assert r.stats is None and take_stats([r], torch.device("cpu")).abs().sum() == 0  # taken and reset
    s = summarize(stats)
    assert abs(s["aux/accuracy"] - float((picked == t).double().mean())) < 1e-12
    assert set(s) <= {f"aux/{k}" for k in ("loss", "accuracy", "precision", "recall")} and len(STAT_FIELDS) == 6
    # control: the padding rows do change the loss if counted
    assert not torch.allclose(r.loss(x, targets).double(), ref_loss)


def test_inputs_detached_and_attach_passes_gradient_through():
    r = _router()
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(6, 8)
    out = x * 2
    targets = torch.rand(6, 3) < 0.5
    y = attach(out, r.loss(out, targets))
    (y * w).sum().backward()
    assert torch.equal(x.grad, 2 * w)  # the main gradient is exactly the one without the aux loss
    through = [p.grad.clone() for p in r.parameters()]
    r.zero_grad()
    r.loss(out.detach(), targets).backward()  # the aux weights get d(loss)/dW at scale 1
    assert all(torch.equal(a, p.grad) for a, p in zip(through, r.parameters()))
    assert through[0].abs().sum() > 0


def test_picks_are_score_above_half():
    r = _router()
    x = torch.randn(20, 8)
    p = torch.sigmoid(F.linear(F.silu(F.linear(x, r.fc1.weight)), r.fc2.weight))
    assert torch.equal(r.picks(x), p > 0.5)


def test_recorded_once_per_routing_key():
    r = _router()
    ids = torch.zeros(1, 4, dtype=torch.long)
    routing = ModalityRouting.from_modality_ids(ids, None, torch.device("cpu"), 2)
    x, t = torch.randn(4, 8), torch.rand(4, 3) < 0.5
    r.loss(x, t, key=routing)
    r.loss(x, t, key=routing)  # a recomputed forward of the same microbatch
    assert take_stats([r], torch.device("cpu"))[-1] == 12


def test_routable_mask_and_causal_flag():
    ids = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])
    docs = torch.tensor([[0, 0, 0, PAD_DOCUMENT_ID], [0, 0, PAD_DOCUMENT_ID, PAD_DOCUMENT_ID]])
    routing = ModalityRouting.from_modality_ids(ids, None, torch.device("cpu"), 2, docs == PAD_DOCUMENT_ID, causal=True)
    assert routing.causal
    expect = (docs != PAD_DOCUMENT_ID).t().reshape(-1)
    assert torch.equal(routing.routable_mask(), expect)


def test_a_backward_outside_megatrons_schedule_leaves_its_loss_scale_settable(monkeypatch):
    """A model without experts (dense + MoD) runs no schedule code that sets megatron's aux-loss scale;
    its backward must not leave a scale that a later MoE model's schedule (``set_loss_scale`` of a
    ``[1]`` tensor) cannot copy into, in the same process."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megafusion.layers.aux_router import attach

    monkeypatch.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale", None)
    x = torch.ones(3, requires_grad=True)
    w = torch.ones((), requires_grad=True)
    attach(x * 2, (w * 5).sum()).sum().backward()
    assert w.grad == 5.0 and torch.equal(x.grad, torch.full((3,), 2.0))
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))  # what megatron's schedule does for an MoE model
    # Control: megatron's own default (created in its backward) is a [] tensor the schedule cannot copy into.
    monkeypatch.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale", None)
    y = torch.ones((), requires_grad=True)
    MoEAuxLossAutoScaler.apply(x * 2, y * 5).sum().backward()
    with pytest.raises(RuntimeError, match="broadcast shape"):
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
