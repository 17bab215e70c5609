"""Auxiliary routers: small causal predictors of a non-causal router's choices (MoMa, Mixture-of-Depths).

Expert choice (MoMa) and Mixture-of-Depths rank each token against the whole microbatch, so
a token's route depends on later tokens. An auxiliary router predicts, from the token's own
hidden state only, whether the main router picks it (MoMa, arXiv 2407.21770, §2.3):
``p = sigmoid(SiLU(x W1) W2)``, ``W1`` ``d x d/2``, ``W2`` ``d/2 x outputs`` (one output per expert,
or one for a MoD layer), fp32, without biases. At causal inference a score above 0.5 picks.

Training (:meth:`AuxRouter.loss`): binary cross-entropy of the scores against the main
router's selections, on **detached** inputs, so the main model's gradients are exactly those
without it (stop-gradient: it may train jointly with the model or alone after it). The loss is
the sum over the routable (non-padding) tokens of the mean over outputs: megafusion trains with
megatron's per-token loss (``calculate_per_token_loss``: every gradient divided by the step's
loss tokens), which turns that sum into a per-token mean. It reaches the backward pass through
megatron's ``MoEAuxLossAutoScaler`` attached to the layer's output (:func:`attach`), as
megatron's own load-balancing loss does, so it works inside any pipeline stage and with
activation recomputation (the graph is built by whichever forward keeps it). The schedule sets
that scaler's scale to the main loss's gradient scale for configs with experts; elsewhere it is
1, which megafusion's fp32/bf16 training (no loss scaling) needs.

Tensor and sequence parallelism. The weights are replicated over the tensor-parallel ranks. A
caller feeds either this rank's sequence-parallel slice of the tokens (``sequence_parallel=True``:
each token is counted on exactly one tensor-parallel rank, and the weights carry megatron's
``sequence_parallel`` attribute, so its DDP sums their gradients over those ranks, as for the
norms) or the whole microbatch on every rank (``False``: every rank computes the same gradient and
nothing is reduced; the statistics are kept on tensor-parallel rank 0 only).

Training alone or jointly (:func:`prepare_training`, ``train.trainable``): alone, every other
weight is frozen; jointly, the routers' gradients are left out of the gradient norm, so that
clipping (by the norm of the main model's gradients only) leaves the main model's update exactly
what it is without them; ``grad_norm`` is then the main model's.

Statistics (:meth:`AuxRouter.record`): per router, a float64 device vector ``STAT_FIELDS`` (BCE
summed over every decision, i.e. token and output; true/false positives, false/true negatives,
decisions) accumulated without synchronisation until :func:`take_stats` hands the sum over
routers to a trainer or an evaluation and resets them. Activation recomputation runs a layer's
forward twice; a router records a microbatch once (keyed on its routing,
:mod:`megafusion.layers.routing`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

STAT_FIELDS = ("bce", "tp", "fp", "fn", "tn", "count")
THRESHOLD = 0.5  # a score above it picks (causal routing)


class AuxRouter(torch.nn.Module):
    """``sigmoid(SiLU(x W1) W2)`` on detached fp32 inputs; ``fc1.weight`` ``[d/2, d]``, ``fc2.weight``
    ``[outputs, d/2]``."""

    def __init__(self, hidden_size: int, outputs: int, *, sequence_parallel: bool = False, device=None):
        super().__init__()
        if hidden_size < 2 or outputs < 1:
            raise ValueError(f"AuxRouter needs hidden_size >= 2 and outputs >= 1, not {hidden_size}, {outputs}")
        inner = hidden_size // 2
        self.fc1 = torch.nn.Linear(hidden_size, inner, bias=False, device=device, dtype=torch.float32)
        self.fc2 = torch.nn.Linear(inner, outputs, bias=False, device=device, dtype=torch.float32)
        self.sequence_parallel = sequence_parallel
        for param in self.parameters():
            # megatron's DDP sums the gradients of such weights over the tensor-parallel ranks.
            param.sequence_parallel = sequence_parallel
        self.outputs = outputs
        self.stats: torch.Tensor | None = None  # [len(STAT_FIELDS)] float64, since take_stats

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., outputs]`` pre-sigmoid scores of the detached hidden states ``x`` ``[..., d]``."""
        return self.fc2(F.silu(self.fc1(x.detach().float())))

    def picks(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., outputs]`` bool: the causal choice, score > 0.5 (logit > 0, the same test).

        The second product runs in float64: with few outputs (one for Mixture-of-Depths) it is a
        matrix-vector product, whose fp32 result for a token can depend on the token's row index
        in the matrix (seen on CPU with one thread), so a token's choice would depend on how many
        rows come before it (other batch rows); float64 makes a sign flip from that practically
        impossible."""
        inner = F.silu(self.fc1(x.detach().float()))
        return F.linear(inner.double(), self.fc2.weight.double()) > 0

    def loss(self, x: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None, key=None):
        """The BCE sum over the valid tokens of ``x`` (``[T, d]`` or ``[s, b, d]``) against ``targets``
        (``[T, outputs]`` bool, the main router's selections, same token order), as an fp32 device
        scalar with a graph to the weights; records the statistics (once per ``key``)."""
        logits = self.logits(x).reshape(-1, self.outputs)
        targets = targets.reshape(-1, self.outputs)
        if valid is not None:
            valid = valid.reshape(-1)
            logits, targets = logits[valid], targets[valid]
        bce = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")
        self.record(bce.detach().sum(), logits.detach() > 0, targets, key)
        return bce.mean(dim=1).sum() if logits.shape[0] else logits.sum()

    def record(self, bce_sum: torch.Tensor, picked: torch.Tensor, targets: torch.Tensor, key=None) -> None:
        """Add one microbatch's statistics (``bce_sum`` over every decision, ``picked`` and ``targets``
        ``[T, outputs]`` bool; no synchronisation); ``key``: the microbatch's routing,
        so a recomputed forward does not count it again."""
        if key is not None:
            seen = key.cache.setdefault("aux_router_recorded", set())
            if id(self) in seen:
                return
            seen.add(id(self))
        if not self.sequence_parallel and ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_rank():
            return  # every tensor-parallel rank saw the same tokens: rank 0 counts them
        targets = targets.bool()
        values = torch.stack(
            [
                bce_sum.double(),
                (picked & targets).sum().double(),
                (picked & ~targets).sum().double(),
                (~picked & targets).sum().double(),
                (~picked & ~targets).sum().double(),
                torch.tensor(float(targets.numel()), dtype=torch.float64, device=targets.device),
            ]
        )
        self.stats = values if self.stats is None else self.stats + values


def attach(output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``output`` unchanged, with ``loss`` joining the backward pass through it (megatron's
    ``MoEAuxLossAutoScaler``: the gradient of ``output`` passes through untouched)."""
    if not torch.is_grad_enabled() or not loss.requires_grad:
        return output
    if MoEAuxLossAutoScaler.main_loss_backward_scale is None:
        # megatron's schedules set this scale (a [1] tensor, copied into afterwards) only for models with
        # num_moe_experts; its backward would otherwise create a [] one, into which a later MoE model's
        # schedule in the same process cannot copy. 1 is what the schedules set with per-token loss.
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=loss.device))
    return MoEAuxLossAutoScaler.apply(output, loss)


def aux_routers_of(modules) -> list[AuxRouter]:
    """Every auxiliary router inside ``modules`` (model chunks, DDP-wrapped or not)."""
    return [m for module in modules for m in module.modules() if isinstance(m, AuxRouter)]


def prepare_training(chunks, trainable: str) -> None:
    """Before DDP wraps ``chunks``: ``trainable="aux_routers"`` freezes every weight but the
    auxiliary routers' (megatron's DDP and optimizer then give the rest no gradient buffer or
    state); ``"all"`` (joint training) leaves the routers out of the gradient norm (megatron's
    ``shared`` attribute, which its norm skips), so clipping scales the main model's update by
    exactly what it would be without them (the routers' gradients are scaled by the same factor)."""
    routers = aux_routers_of(chunks)
    own = {id(p) for r in routers for p in r.parameters()}
    if trainable == "aux_routers":
        for chunk in chunks:
            for param in chunk.parameters():
                if id(param) not in own:
                    param.requires_grad_(False)
        return
    for router in routers:
        for param in router.parameters():
            param.shared = True


def take_stats(routers, device: torch.device) -> torch.Tensor:
    """The statistics summed over ``routers`` since the last call (``STAT_FIELDS``, float64 on
    ``device``; zeros if none recorded), and start again. No synchronisation; the caller sums it
    over the ranks (every token counted once per layer: see the module's docstring)."""
    total = torch.zeros(len(STAT_FIELDS), dtype=torch.float64, device=device)
    for r in routers:
        if r.stats is not None:
            total = total + r.stats.to(device)
        r.stats = None
    return total


def summarize(stats, prefix: str = "aux") -> dict[str, float]:
    """Mean BCE per decision (a token and one output), precision, recall and accuracy from summed
    statistics (a tensor or list in ``STAT_FIELDS`` order); {} when nothing was counted."""
    bce, tp, fp, fn, tn, count = (float(v) for v in stats)
    if count <= 0:
        return {}
    out = {f"{prefix}/loss": bce / count, f"{prefix}/accuracy": (tp + tn) / count}
    if tp + fp:
        out[f"{prefix}/precision"] = tp / (tp + fp)
    if tp + fn:
        out[f"{prefix}/recall"] = tp / (tp + fn)
    return out


def sequence_rows(flat: torch.Tensor, rows: int, seq_length: int, micro_batch_size: int) -> torch.Tensor:
    """The entries of a per-token tensor (first dim ``s * b``, megatron order) for the ``rows``
    positions a (possibly sequence-parallel) hidden-state tensor holds on this rank."""
    if rows == seq_length:
        return flat
    tp = ps.get_tensor_model_parallel_world_size()
    if rows * tp != seq_length:
        raise ValueError(f"{rows} positions match neither the sequence ({seq_length}) nor its sequence-parallel slice")
    start = ps.get_tensor_model_parallel_rank() * rows * micro_batch_size
    return flat[start : start + rows * micro_batch_size]
