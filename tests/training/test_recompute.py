"""Activation recomputation (``train.recompute``) changes no loss and no gradient, in one process.

For dense (also with ``data.attention=causal`` and ``data.positions=document``), MoT, MoMa (with
Gumbel router noise), Transfusion (MoT layers; the U-Net patchify) and LMFusion, two layers and
two optimizer steps of two microbatches each are trained with ``none``, ``selective`` and
``full``; every step's loss and every parameter's gradient must equal the run
without recomputation bit for bit (fp32; recomputation reruns the same kernels on the same inputs,
which the CPU runs deterministically; the issue asks for 1e-6). Two layers, so that a routing or
mask error in the second layer (whose input depends on the first) shows. The parity tests
(``tests/distributed``) run the parallel layouts with recomputation on.

The trainer's metrics keep the model FLOPs (``flops``) and add the recomputed forward to the
hardware FLOPs (``hardware_flops``): the forward attention (selective) or the layers' forward
(full), counted here from ``batch_flops(forward_only=True)`` of the step's microbatches.
"""

from __future__ import annotations

import pytest
import torch

from megafusion.accounting import flops as F
from megafusion.accounting import params as P
from megafusion.config import load_config, validate
from megafusion.layers import recompute
from megafusion.layers.routing import ModalityRouting, active_routing, current_routing, modality_routing
from tests.helpers import ROOT

MIXED, TRANSFUSION = "tests/configs/mixed_small.yaml", "tests/configs/transfusion_small.yaml"
SMALL = ["model.num_layers=2", "train.steps=2", "train.global_batch_size=4", "eval.interval=0"]
CASES = {
    "dense": ("tests/configs/parity.yaml", []),
    # Cross-document attention and RoPE at document positions: the recomputed layers get the table
    # the forward made inside token_positions (the backward runs outside it).
    "dense_cross_document": ("tests/configs/parity.yaml", ["data.attention=causal", "data.positions=document"]),
    "mot": (MIXED, ["model.arch=mot"]),
    "moma": (MIXED, ["model.arch=moma", "moe.experts={text: 2, image: 2}", "moe.router_noise=1.0"]),
    "transfusion_mot": (TRANSFUSION, ["model.arch=mot"]),
    # LMFusion: frozen text copies and embedding; the layers' input needs a gradient through the
    # new-token rows and the image modules, or a recomputed layer would give its weights none.
    "lmfusion": (TRANSFUSION, ["model.arch=mot", "model.freeze_text=true"]),
    "transfusion_unet": (
        TRANSFUSION,
        ["objective.patchify=unet", "data.image_size=16", "objective.latent_patch_size=4"],
    ),
}


def train_two_steps(runtime, config: str, overrides: list[str], mode: str):
    """Per-step losses and full gradients of two optimizer steps in this process."""
    from megafusion.runtime import seed_everything
    from megafusion.training.grads import full_gradients
    from megafusion.training.trainer import Trainer

    cfg = load_config(str(ROOT / config), [*overrides, *SMALL, f"train.recompute={mode}"])
    validate(cfg, 1)
    seed_everything(cfg.train.seed)
    trainer = Trainer(cfg, runtime)
    losses, grads, consumed, records = [], [], 0, []
    for step in range(cfg.train.steps):
        record = trainer.train_step(step, consumed, None)
        record["recomputed"] = recomputed_forward(trainer, consumed, mode)
        consumed = record["consumed_samples"]
        losses.append(record["loss"])
        grads.append(full_gradients(trainer.model, False))
        records.append(record)
    return losses, grads, records


def recomputed_forward(trainer, consumed: int, mode: str) -> int:
    """The forward FLOPs ``mode`` runs again in the step starting at sample ``consumed``."""
    total = 0
    for mb in trainer._microbatches(trainer.data.train, consumed):
        inputs = {"latent_shape": trainer.latent_shape, **trainer.objective.flops_inputs(mb)}
        forward = F.batch_flops(trainer.cfg, mb["document_ids"], mb["modality_ids"], forward_only=True, **inputs)
        parts = P._matmul_parts(trainer.cfg)  # the output layer (+ LMFusion's output delta): not a layer
        output = 2 * forward["tokens"] * (parts["output"] + parts["new_rows"])
        layers = forward["total"] - output - forward["image_modules"]
        total += {"none": 0, "selective": forward["attention"], "full": layers}[mode]
    return total


@pytest.mark.parametrize("case", list(CASES))
def test_recompute_gives_the_same_losses_and_gradients(case, runtime, monkeypatch):
    config, overrides = CASES[case]
    want_losses, want_grads, want_records = train_two_steps(runtime, config, overrides, "none")
    for record in want_records:
        assert record["hardware_flops"] == record["flops"] > 0
    calls = []
    megatron_checkpoint = recompute._MEGATRON_CHECKPOINT
    monkeypatch.setattr(
        recompute, "_MEGATRON_CHECKPOINT", lambda f, d, *a: calls.append(f) or megatron_checkpoint(f, d, *a)
    )
    for mode in ("selective", "full"):
        calls.clear()
        losses, grads, records = train_two_steps(runtime, config, overrides, mode)
        for record, want in zip(records, want_records):
            assert record["flops"] == want["flops"]  # model FLOPs do not change
            assert record["hardware_flops"] == record["flops"] + record["recomputed"] > record["flops"]
        # 2 steps x 2 microbatches x 2 layers, each layer's core attention or whole layer once
        assert len(calls) == 8, f"{case} {mode}: {len(calls)} checkpointed regions"
        assert losses == want_losses, f"{case} {mode}: losses {losses} vs {want_losses}"
        for step, (got_step, want_step) in enumerate(zip(grads, want_grads), start=1):
            assert sorted(got_step) == sorted(want_step)
            assert any(g.abs().sum() > 0 for g in want_step.values())
            for name, want in want_step.items():
                diff = (got_step[name] - want).abs().max().item()
                assert torch.equal(got_step[name], want), f"{case} {mode} step {step}: {name} differs by {diff:.2e}"


def test_the_recomputed_region_re_enters_the_forwards_routing_and_keeps_non_tensor_arguments(runtime):
    """megatron's checkpoint runs the region again in the backward pass, here outside any routing
    context; the wrapper re-enters the routing of the forward and passes a non-tensor argument (as a
    FlexAttention ``BlockMask`` would be), which ``save_for_backward`` refuses, through unchanged."""
    seen, opaque = [], object()

    def region(x, held):
        seen.append((current_routing(), held, torch.is_grad_enabled()))
        return x * x

    routing = ModalityRouting.from_modality_ids(torch.tensor([[0, 1, 1]]), None, torch.device("cpu"), 2)
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with modality_routing(routing):
        y = recompute.checkpoint(region, False, x, opaque)
    assert active_routing() is None and type(y.grad_fn).__name__ == "CheckpointFunctionBackward"
    y.sum().backward()
    assert seen == [(routing, opaque, False), (routing, opaque, True)]  # forward (no graph), recompute
    assert torch.equal(x.grad, 2 * x.detach())
