"""Mixture-of-Depths (arXiv 2404.02258): a transformer layer that only some tokens run.

A MoD layer is the family's own layer class (megatron's ``TransformerLayer``, megafusion's
``PostNormTransformerLayer``, with the family's attention, norms, FFN or experts) with a router
in front (:func:`mod_layer_class` makes the subclass, so the wrapped layer's parameter names
stay the family's; the router adds ``mod_router.weight`` ``[1, h]``, fp32). Per microbatch:

1. **Router.** ``r = x W_r`` (fp32) for every token, ``w = sigmoid(r)``.
2. **Selection** (whole microbatch, identical on every tensor-parallel rank: under sequence
   parallelism the layer gathers the sequence first). Row ``b`` picks exactly
   ``k_b = floor(c * n_b)`` of its ``n_b`` routable (non-padding) tokens, those of highest ``r``,
   ties to the earlier position (a stable sort); padding is never picked. ``split=global``
   ranks all of a row's tokens together (the paper: before any modality split);
   ``split=per_modality`` picks ``floor(c * n_{b,m})`` among the row's tokens of each modality
   ``m``. ``floor`` is taken of ``c * n`` rounded to 9 decimals (0.29 * 100 picks 29). Every
   ``k_b`` is a host int, so nothing here waits for the device.
3. **The block on the picked tokens.** The picked tokens of each row, in position order, form
   a shorter microbatch ``[k_max, b, h]`` (``k_max`` the largest ``k_b``, rounded up to a multiple
   of the tensor-parallel size under sequence parallelism; the slots a row does not fill are
   *fillers*: zeros that see only themselves, are never routed to an expert and are thrown
   away). The parent layer runs on it with each token's **original RoPE position** (megatron's
   ``rotary_pos_emb`` ``[s, 1, 1, d]`` gathered per token to ``[k_max, b, 1, d]``) and the
   microbatch's **mask restricted to the picked rows and columns** (megatron's convention,
   True = blocked; None = causal). Unpicked tokens are neither queries nor keys here. A routed
   family's layer (MoT, MoMa) gets a :class:`~megafusion.layers.routing.ModalityRouting` of the
   picked tokens: with ``split=per_modality`` its counts are host ints; with ``split=global``
   each modality's count among the picked tokens is a device value, read once per MoD layer
   (one device-to-host synchronisation; the price of the paper's selection).
4. **Output.** ``x + w * (f(x) - x)`` at picked tokens, computed as ``f(x) + (w - 1) * (f(x) - x)``
   (the same value, and exactly the block's output when ``w == 1``); unpicked tokens' rows are
   ``x``, bit for bit. The residual is never scaled.

Selection and output are made on the whole microbatch on every tensor-parallel rank (the
router's weight gets the same gradient on each, so it is not reduced); the parent layer runs
sequence-parallel on the picked tokens as usual. Activation recomputation runs the same
selection again (the scores are the same).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_viewless_tensor

from megafusion.core.modality import NUM_MODALITIES, Modality
from megafusion.layers.routing import ModalityRouting, active_routing, modality_routing

SPLITS = ("global", "per_modality")


@dataclass(frozen=True)
class ModSettings:
    capacity: float  # c in (0, 1]
    split: str = "global"  # global | per_modality
    routed: bool = False  # the wrapped layer reads the modality routing (MoT, MoMa)


def picked_count(capacity: float, tokens: int) -> int:
    """``floor(c * n)``, of ``c * n`` rounded to 9 decimals (float products like 0.29 * 100)."""
    return math.floor(round(capacity * tokens, 9))


def row_capacities(settings: ModSettings, row_routable) -> list[list[int]]:
    """Per row, per selection group (one for ``global``, one per modality otherwise): tokens picked."""
    if settings.split == "global":
        return [[picked_count(settings.capacity, sum(row))] for row in row_routable]
    return [[picked_count(settings.capacity, n) for n in row] for row in row_routable]


@dataclass(frozen=True)
class Selection:
    """Which tokens a MoD layer runs, as slots ``[k_max, b]`` (slot ``i`` of row ``b``)."""

    positions: torch.Tensor  # [k_max, b] int64 device: each slot's position (fillers: 0)
    picked: tuple[int, ...]  # k_b per row (host): slots < k_b are real, the rest fillers
    groups: tuple[tuple[int, ...], ...]  # per row, tokens picked per selection group (host)

    @property
    def slots(self) -> int:
        return self.positions.shape[0]

    def filler_mask(self, device) -> torch.Tensor | None:
        """``[k_max, b]`` bool, True at fillers; None when every slot is real."""
        if all(k == self.slots for k in self.picked):
            return None
        slot = torch.arange(self.slots)[:, None]
        return (slot >= torch.tensor(self.picked)[None, :]).to(device)


def select(scores: torch.Tensor, members: list[torch.Tensor], ks: list[list[int]], multiple: int = 1) -> Selection:
    """Top ``ks[b][g]`` of ``scores`` ``[b, s]`` among ``members[g]`` ``[b, s]`` per row and group, ties
    to the earlier position; slots in position order, ``k_max`` rounded up to ``multiple``."""
    b = scores.shape[0]
    per_row: list[list[torch.Tensor]] = [[] for _ in range(b)]
    for g, member in enumerate(members):
        ranked = torch.sort(scores.masked_fill(~member, float("-inf")), dim=1, descending=True, stable=True).indices
        for row in range(b):
            per_row[row].append(ranked[row, : ks[row][g]])
    rows = [torch.cat(parts).sort().values if parts else scores.new_zeros(0, dtype=torch.int64) for parts in per_row]
    picked = tuple(sum(k) for k in ks)
    k_max = -(-max(picked, default=0) // multiple) * multiple
    positions = torch.stack([F.pad(p, (0, k_max - p.numel())) for p in rows], dim=1)
    return Selection(positions, picked, tuple(tuple(k) for k in ks))


def subset_mask(attention_mask, positions: torch.Tensor, fillers: torch.Tensor | None) -> torch.Tensor:
    """``[b, 1, k, k]`` bool, True = blocked: the microbatch's mask (None: causal) at the picked rows
    and columns; a filler sees only itself and no one sees it."""
    pos = positions.t()  # [b, k]
    if attention_mask is None:
        blocked = pos[:, None, :] > pos[:, :, None]
    else:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
            raise ValueError(
                "a Mixture-of-Depths layer needs a dense boolean attention mask or None (causal): use "
                "model.attention_backend=sdpa (FlexAttention block masks are not restricted to picked tokens)"
            )
        b = pos.shape[0]
        rows = torch.arange(b, device=pos.device) if attention_mask.shape[0] == b else torch.zeros_like(pos[:, 0])
        blocked = attention_mask[rows[:, None, None], 0, pos[:, :, None], pos[:, None, :]]
    if fillers is not None:
        f = fillers.t()  # [b, k]
        eye = torch.eye(pos.shape[1], dtype=torch.bool, device=pos.device)[None]
        blocked = (blocked | f[:, None, :] | f[:, :, None]) & ~(eye & f[:, :, None])
    return blocked[:, None]


def subset_routing(routing: ModalityRouting | None, flat: torch.Tensor, sel: Selection, fillers, split: str):
    """The :class:`ModalityRouting` of the picked tokens ``[k_max, b]`` (``flat``: their indices in
    the microbatch's megatron order); fillers are text padding, never routed."""
    k, b = sel.positions.shape
    device = flat.device
    if routing is None:
        modality = torch.zeros(k * b, dtype=torch.int64, device=device)
    else:
        modality = routing.token_modality[flat.reshape(-1)]
    filler = torch.zeros(k * b, dtype=torch.bool, device=device) if fillers is None else fillers.reshape(-1)
    if fillers is not None:
        modality = modality.masked_fill(filler, int(Modality.TEXT))
    n_fillers = k * b - sum(sel.picked)
    if split == "per_modality" or routing is None:  # host ints: per row, the modality groups' picks
        counts = [0] * NUM_MODALITIES
        for groups in sel.groups:
            for m, n in enumerate(groups if len(groups) == NUM_MODALITIES else (groups[0],)):
                counts[m] += n
    else:  # the paper's global selection: each modality's share of the picks is a device value
        counts = torch.bincount(modality.masked_fill(filler, NUM_MODALITIES), minlength=NUM_MODALITIES + 1)
        counts = counts[:NUM_MODALITIES].tolist()  # the one device-to-host sync of this layer
    routable = tuple(counts)
    counts[int(Modality.TEXT)] += n_fillers
    order = torch.sort(modality * 2 + filler.to(torch.int64), stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    causal = routing.causal if routing is not None else False
    return ModalityRouting(modality, order, inverse, tuple(counts), k, b, routable, None, causal)


class MoDLayerMixin:
    """The Mixture-of-Depths forward around a transformer layer class (see the module docstring)."""

    MOD: ModSettings  # set by mod_layer_class

    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        super().__init__(config, submodules, layer_number, **kwargs)
        self.mod_router = torch.nn.Linear(config.hidden_size, 1, bias=False, dtype=torch.float32)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """The family's layer's, with the router as a tensor of its own per MoD layer
        (``decoder.layers.<global layer>.mod_router.weight``): only some layers have one, so it
        cannot join megatron's layer-stacked ``[L, ...]`` tensors (replicated over TP and DP)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}mod_router.weight"
        state[key] = make_sharded_tensor_for_checkpoint(
            self.mod_router.weight, f"{prefix}{self.layer_number}.mod_router.weight"
        )
        return state

    def _tp_group(self):
        return ps.get_tensor_model_parallel_group()

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[s, b]`` router logits in fp32 (or the input's dtype when wider: float64 tests)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(dtype), self.mod_router.weight.to(dtype)).squeeze(-1)

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, inference_context=None, **kwargs):
        if inference_context is not None:
            raise NotImplementedError("Mixture-of-Depths layers do not decode with a KV cache yet")
        if kwargs.get("packed_seq_params") is not None:
            raise ValueError("Mixture-of-Depths layers take masks, not packed_seq_params")
        settings = self.MOD
        tp = ps.get_tensor_model_parallel_world_size()
        sp = self.config.sequence_parallel and tp > 1
        group = self._tp_group()
        # The whole microbatch on every rank; its gradient is split back, not summed (every rank
        # computes the same selection and output).
        x = gather_from_sequence_parallel_region(hidden_states, False, group) if sp else hidden_states
        s, b, h = x.shape
        routing = active_routing()
        logits = self.router_logits(x)  # [s, b]
        sel = self._select(logits.detach(), routing, s, b, tp if sp else 1)
        if sel.slots == 0:  # nothing picked: the block is skipped for every token
            return hidden_states, kwargs.get("context")
        flat = sel.positions * b + torch.arange(b, device=x.device)[None, :]  # [k, b] megatron order
        fillers = sel.filler_mask(x.device)
        rows = x.reshape(s * b, h)
        packed = rows[flat.reshape(-1)].view(sel.slots, b, h)
        if fillers is not None:
            packed = packed.masked_fill(fillers[..., None], 0)
        mask = subset_mask(attention_mask, sel.positions, fillers)
        rotary = None if rotary_pos_emb is None else self._gather_rotary(rotary_pos_emb, sel.positions)
        inner = scatter_to_sequence_parallel_region(packed, group) if sp else packed
        sub = subset_routing(routing, flat, sel, fillers, settings.split) if settings.routed else None
        with modality_routing(sub) if sub is not None else contextlib.nullcontext():
            y, context = super().forward(
                hidden_states=inner, attention_mask=mask, rotary_pos_emb=rotary, inference_context=None, **kwargs
            )
        if sp:
            y = gather_from_sequence_parallel_region(y, False, group)
        weight = torch.sigmoid(logits).reshape(-1)[flat.reshape(-1)].view(sel.slots, b, 1)
        new = y + (weight - 1).to(y.dtype) * (y - packed)  # = packed + w (y - packed); y where w == 1
        new, index = new.reshape(-1, h), flat.reshape(-1)
        if fillers is not None:
            real = self._real_slots(sel, x.device)
            new, index = new[real], index[real]
        out = rows.index_copy(0, index, new).view(s, b, h)
        if sp:
            out = scatter_to_sequence_parallel_region(out, group)
        return make_viewless_tensor(inp=out, requires_grad=out.requires_grad, keep_graph=True), context

    @staticmethod
    def _real_slots(sel: Selection, device) -> torch.Tensor:
        """Indices (slot-major, ``slot * b + row``) of the real slots, from host counts (no sync)."""
        b = len(sel.picked)
        return torch.tensor([i * b + r for i in range(sel.slots) for r in range(b) if i < sel.picked[r]], device=device)

    @staticmethod
    def _gather_rotary(rotary_pos_emb, positions: torch.Tensor):
        """Each picked token's own RoPE angles: ``[s, 1, 1, d]`` -> ``[k, b, 1, d]`` (never truncated)."""
        if isinstance(rotary_pos_emb, tuple):
            return tuple(MoDLayerMixin._gather_rotary(r, positions) for r in rotary_pos_emb)
        return rotary_pos_emb[:, 0][positions]

    def _select(self, scores: torch.Tensor, routing, s: int, b: int, multiple: int) -> Selection:
        settings = self.MOD
        if routing is None:  # a bare call (tests): every token text, none padding
            row_routable = [(s, *([0] * (NUM_MODALITIES - 1)))] * b
            routable = torch.ones(b, s, dtype=torch.bool, device=scores.device)
            modality = torch.zeros(b, s, dtype=torch.int64, device=scores.device)
        else:
            if routing.row_routable is None or routing.seq_length != s or routing.micro_batch_size != b:
                raise ValueError(
                    f"a Mixture-of-Depths layer needs the microbatch's routing of [{s}, {b}] tokens with "
                    f"per-row counts (ModalityRouting.from_modality_ids); got {routing.seq_length} x "
                    f"{routing.micro_batch_size}"
                )
            row_routable = routing.row_routable
            routable = routing.routable_mask().view(s, b).t()
            modality = routing.token_modality.view(s, b).t()
        ks = row_capacities(settings, row_routable)
        if settings.split == "global":
            members = [routable]
        else:
            members = [routable & (modality == m) for m in range(NUM_MODALITIES)]
        return select(scores.t(), members, ks, multiple)


@functools.cache
def mod_layer_class(base: type, settings: ModSettings) -> type:
    """``base`` (the family's layer class) with a Mixture-of-Depths router and forward."""
    return type(f"MoD{base.__name__}", (MoDLayerMixin, base), {"MOD": settings, "__module__": __name__})
