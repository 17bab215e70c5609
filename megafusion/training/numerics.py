"""Non-finite losses and gradient norms, and loss spikes, found on every step from the numbers the
step already reduces (the summed loss report, the gradient norm clipping computes).

A non-finite step never updates the weights: the optimizer step is taken only after the loss
and the gradient norm are known finite (:func:`guarded_optimizer_step` is megatron-core's
``step`` with that check between the norm and the update). ``train.on_nan=stop`` then ends the
run with :class:`~megafusion.core.errors.NumericsError` before anything is saved; ``skip`` drops
the step's update, logs an event and goes on (more than ``train.nan_skip_limit`` in a row stop
it). Which microbatch and which modality went bad is worked out only then (one gather of a few
numbers), so a healthy step pays nothing extra.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist

SPIKE_WINDOW = 20  # steps in the running mean a spike is measured against


def nonfinite_fields(report: dict, fields) -> list[str]:
    """The loss fields of a reduced report that are NaN or infinite (``tokens`` counts excluded)."""
    return [f for f in fields if not f.startswith("tokens") and not math.isfinite(report[f])]


def locate(store, fields, first_sample: int, micro_batch_size: int) -> dict | None:
    """The first microbatch (over all ranks) whose loss report is not finite: its index in the step,
    its first sample and its bad fields. A collective: every rank calls it."""
    local = None
    for i, item in enumerate(store or ()):
        values = item["report"].tolist()
        bad = [f for f, v in zip(fields, values) if not f.startswith("tokens") and not math.isfinite(v)]
        if bad:
            local = {"sample": first_sample + i * micro_batch_size, "fields": bad}
            break
    found = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, local)
    found = [f for f in found if f]
    return min(found, key=lambda f: f["sample"]) if found else None


def guarded_optimizer_step(optimizer) -> tuple[bool, float]:
    """megatron-core's optimizer step, skipping the update when the gradient norm is not finite.
    Returns (updated, grad norm)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    found_inf = optimizer.prepare_grads()  # fp16 loss scaling's own check (and grads -> main grads)
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(grad_norm):
        return False, grad_norm
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(sub, "is_stub_optimizer", False) or sub.config.clip_grad <= 0:
            continue
        params = sub.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(
                params,
                max_norm=sub.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    return bool(optimizer.step_with_ready_grads()), grad_norm


def weights_finite(model, device) -> bool:
    """Whether every parameter of every rank is finite (checked before a checkpoint is written)."""
    bad = torch.zeros(1, device=device)
    for chunk in model:
        for p in chunk.parameters():
            if not torch.isfinite(p.detach()).all():
                bad += 1
                break
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    return bad.item() == 0


class SpikeWatch:
    """Loss spikes: a finite loss above ``factor`` x the mean of the last SPIKE_WINDOW finite losses.

    ``recent`` is saved in every checkpoint and restored on resume, so a resumed run (e.g. with
    another ``train.lr``) is watched from its first step."""

    def __init__(self, factor: float):
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)

    def check(self, step: int, loss: float) -> dict | None:
        """The spike event of ``step`` (None: none)."""
        event = None
        if self.factor and len(self.recent) >= min(5, SPIKE_WINDOW):
            mean = sum(self.recent) / len(self.recent)
            if mean > 0 and loss > self.factor * mean:
                event = {
                    "step": step,
                    "event": "loss_spike",
                    "loss": loss,
                    "running_mean": mean,
                    "ratio": loss / mean,
                    "message": f"loss spike at step {step}: {loss:.4f} = {loss / mean:.1f}x the mean "
                    f"{mean:.4f} of the last {len(self.recent)} steps (train.spike_factor={self.factor:g})",
                }
        self.recent.append(loss)
        return event
