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
   ``rotary_pos_emb`` ``[s, 1, 1, d]``, or per row ``[s, b, 1, d]`` under ``data.positions=document``,
   gathered per token to ``[k_max, b, 1, d]``) and the
   microbatch's **mask restricted to the picked rows and columns** (megatron's convention,
   True = blocked; None = causal). Unpicked tokens are neither queries nor keys here. A routed
   family's layer (MoT, MoMa) gets a :class:`~megafusion.layers.routing.ModalityRouting` of the
   picked tokens: with ``split=per_modality`` its counts are host ints; with ``split=global``
   each modality's count among the picked tokens is a device value, read once per MoD layer
   (one device-to-host synchronisation; the price of the paper's selection).
4. **Output.** ``x + w * (f(x) - x)`` at picked tokens, computed as ``f(x) + (w - 1) * (f(x) - x)``
   (the same value, and exactly the block's output when ``w == 1``); unpicked tokens' rows are
   ``x``, bit for bit. The residual is never scaled.

5. **Auxiliary router** (``mod_aux_router``, with ``mod.aux_router``: :mod:`megafusion.layers.aux_router`,
   one output): in training, BCE of its score against the picks on the whole microbatch's
   detached inputs, attached to the output. Under causal routing (``ModalityRouting.causal``)
   it decides instead: the layer runs the routable tokens whose score is above 0.5
   (:func:`causal_select`: counts read from the device once; slots and each modality's rows
   padded with fillers to :data:`CAUSAL_ROW_BUCKET`; router logits in float64), so a token's
   result depends on no later token and no other row. With a KV cache (megatron's
   ``StaticInferenceContext``) the layer keeps its own (:class:`ModLayerCache`): only the tokens
   routed into it, with their absolute positions.

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
from megafusion.layers.aux_router import AuxRouter, attach
from megafusion.layers.routing import ModalityRouting, active_routing, modality_routing

SPLITS = ("global", "per_modality")
# Causal routing: the picked microbatch's slots, and each modality's picked rows (fillers
# included), are padded to a multiple of this, so that no GEMM's row count, and so no kernel
# choice, depends on how many tokens (later ones included) the auxiliary router picked (as for
# MoMa's experts: :data:`megafusion.layers.expert_choice_layer.CAUSAL_ROW_BUCKET`).
CAUSAL_ROW_BUCKET = 16


@dataclass(frozen=True)
class ModSettings:
    capacity: float  # c in (0, 1]
    split: str = "global"  # global | per_modality
    routed: bool = False  # the wrapped layer reads the modality routing (MoT, MoMa)
    aux_router: bool = False  # an auxiliary router predicts the picks (causal routing, decoding)


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


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def causal_select(picks: torch.Tensor, modality: torch.Tensor, routed: bool, multiple: int = 1) -> Selection:
    """Causal routing: the tokens ``picks`` ``[b, s]`` marks (auxiliary score > 0.5, routable only),
    in position order. Each row's count is data-dependent: read once from the device (its
    per-modality counts, ``groups``). ``k_max`` is rounded up to :data:`CAUSAL_ROW_BUCKET` (and
    ``multiple``); for a routed family, far enough that every modality's count can be padded
    to the bucket with fillers (:func:`subset_routing`)."""
    b, s = picks.shape
    per = torch.stack([(picks & (modality == m)).sum(dim=1) for m in range(NUM_MODALITIES)], dim=1)
    groups = tuple(tuple(int(v) for v in row) for row in per.tolist())  # the one device-to-host sync
    picked = tuple(sum(g) for g in groups)
    step = math.lcm(CAUSAL_ROW_BUCKET, multiple)
    k_max = _round_up(max(picked, default=0), step)
    if routed and k_max:
        need = sum(_round_up(sum(g[m] for g in groups), CAUSAL_ROW_BUCKET) for m in range(NUM_MODALITIES))
        k_max = max(k_max, _round_up(-(-need // b), step))
    # Picked tokens first, each row's in position order (a stable sort of "not picked").
    ranked = torch.sort((~picks).to(torch.int8), dim=1, stable=True).indices
    if k_max > s:
        ranked = F.pad(ranked, (0, k_max - s))
    slot = torch.arange(k_max, device=picks.device)[None, :]
    real = torch.tensor(picked, device=picks.device)[:, None]
    positions = ranked[:, :k_max].masked_fill(slot >= real, 0).t().contiguous()
    return Selection(positions, picked, groups)


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


def subset_routing(
    routing: ModalityRouting | None, flat: torch.Tensor, sel: Selection, fillers, split: str, bucket: int = 1
):
    """The :class:`ModalityRouting` of the picked tokens ``[k_max, b]`` (``flat``: their indices in
    the microbatch's megatron order); fillers are padding, never routed: text, or with ``bucket``
    > 1 (causal routing) first as many of each other modality as round its count up to a
    multiple of ``bucket``, so that every modality's GEMMs run a bucketed row count."""
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
    if bucket > 1 and n_fillers:
        spare = torch.tensor(_filler_slots(sel), device=device)  # slot-major, like flat
        kinds = []
        for m in range(NUM_MODALITIES):
            if m != int(Modality.TEXT):
                kinds += [m] * ((-counts[m]) % bucket)
        if len(kinds) > n_fillers:
            raise ValueError(f"{n_fillers} filler slots cannot pad the modalities' counts {routable} to {bucket}")
        kinds += [int(Modality.TEXT)] * (n_fillers - len(kinds))
        modality = modality.index_put((spare,), torch.tensor(kinds, device=device))
        for m in range(NUM_MODALITIES):
            counts[m] += kinds.count(m)
    else:
        counts[int(Modality.TEXT)] += n_fillers
    order = torch.sort(modality * 2 + filler.to(torch.int64), stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    causal = routing.causal if routing is not None else False
    return ModalityRouting(modality, order, inverse, tuple(counts), k, b, routable, None, causal)


def _filler_slots(sel: Selection) -> list[int]:
    """Host indices (slot-major, ``slot * b + row``) of the filler slots."""
    b = len(sel.picked)
    return [i * b + r for i in range(sel.slots) for r in range(b) if i >= sel.picked[r]]


class MoDLayerMixin:
    """The Mixture-of-Depths forward around a transformer layer class (see the module docstring)."""

    MOD: ModSettings  # set by mod_layer_class

    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        super().__init__(config, submodules, layer_number, **kwargs)
        self.mod_router = torch.nn.Linear(config.hidden_size, 1, bias=False, dtype=torch.float32)
        # It reads the whole microbatch on every tensor-parallel rank (gathered under sequence
        # parallelism), as the router does: every rank computes the same gradient, none is reduced.
        self.mod_aux_router = AuxRouter(config.hidden_size, 1) if self.MOD.aux_router else None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """The family's layer's, with the router as a tensor of its own per MoD layer
        (``decoder.layers.<global layer>.mod_router.weight``): only some layers have one, so it
        cannot join megatron's layer-stacked ``[L, ...]`` tensors (replicated over TP and DP)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        own = [("mod_router.weight", self.mod_router.weight)]
        if self.mod_aux_router is not None:
            own += [(f"mod_aux_router.{n}", p) for n, p in self.mod_aux_router.named_parameters()]
        for name, param in own:
            state[f"{prefix}{name}"] = make_sharded_tensor_for_checkpoint(param, f"{prefix}{self.layer_number}.{name}")
        return state

    def _tp_group(self):
        return ps.get_tensor_model_parallel_group()

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[s, b]`` router logits in fp32 (or the input's dtype when wider: float64 tests)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(dtype), self.mod_router.weight.to(dtype)).squeeze(-1)

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, inference_context=None, **kwargs):
        if kwargs.get("packed_seq_params") is not None:
            raise ValueError("Mixture-of-Depths layers take masks, not packed_seq_params")
        if inference_context is not None:
            return self._decode(hidden_states, attention_mask, rotary_pos_emb, inference_context, kwargs)
        settings = self.MOD
        tp = ps.get_tensor_model_parallel_world_size()
        sp = self.config.sequence_parallel and tp > 1
        group = self._tp_group()
        # The whole microbatch on every rank; its gradient is split back, not summed (every rank
        # computes the same selection and output).
        x = gather_from_sequence_parallel_region(hidden_states, False, group) if sp else hidden_states
        s, b, h = x.shape
        routing = active_routing()
        causal = routing is not None and routing.causal
        logits = self._logits(x, causal)  # [s, b]
        if causal:
            sel = causal_select(
                self._causal_picks(x, routing).t(), self._modality(routing, s, b), settings.routed, tp if sp else 1
            )
        else:
            sel = self._select(logits.detach(), routing, s, b, tp if sp else 1)
        flat = sel.positions * b + torch.arange(b, device=x.device)[None, :]  # [k, b] megatron order
        fillers = sel.filler_mask(x.device)
        real = self._real_slots(sel, x.device) if fillers is not None else None
        aux = None if causal or self.mod_aux_router is None else self._aux_loss(x, flat, real, routing)
        if sel.slots == 0:  # nothing picked: the block is skipped for every token
            return (hidden_states if aux is None else attach(hidden_states, aux)), kwargs.get("context")
        rows = x.reshape(s * b, h)
        packed = rows[flat.reshape(-1)].view(sel.slots, b, h)
        if fillers is not None:
            packed = packed.masked_fill(fillers[..., None], 0)
        mask = subset_mask(attention_mask, sel.positions, fillers)
        rotary = None if rotary_pos_emb is None else self._gather_rotary(rotary_pos_emb, sel.positions)
        inner = scatter_to_sequence_parallel_region(packed, group) if sp else packed
        sub = None
        if settings.routed:
            split, bucket = ("per_modality", CAUSAL_ROW_BUCKET) if causal else (settings.split, 1)
            sub = subset_routing(routing, flat, sel, fillers, split, bucket)
        with modality_routing(sub) if sub is not None else contextlib.nullcontext():
            y, context = super().forward(
                hidden_states=inner, attention_mask=mask, rotary_pos_emb=rotary, inference_context=None, **kwargs
            )
        if sp:
            y = gather_from_sequence_parallel_region(y, False, group)
        weight = self._weights(logits, causal).reshape(-1)[flat.reshape(-1)].view(sel.slots, b, 1)
        new = y + (weight - 1).to(y.dtype) * (y - packed)  # = packed + w (y - packed); y where w == 1
        new, index = new.reshape(-1, h), flat.reshape(-1)
        if real is not None:
            new, index = new[real], index[real]
        out = rows.index_copy(0, index, new).view(s, b, h)
        if aux is not None:
            out = attach(out, aux)
        if sp:
            out = scatter_to_sequence_parallel_region(out, group)
        return make_viewless_tensor(inp=out, requires_grad=out.requires_grad, keep_graph=True), context

    def _logits(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """The router logits; under causal routing computed in float64 and rounded to fp32: the
        ``[s*b, h] x [h, 1]`` product is a matrix-vector product whose fp32 result for a token can
        depend on its row index (other batch rows before it), which float64 makes invisible after
        rounding (batch invariance)."""
        if not causal or x.dtype == torch.float64:
            return self.router_logits(x)
        return self.router_logits(x.double()).to(torch.promote_types(x.dtype, torch.float32))

    @staticmethod
    def _weights(logits: torch.Tensor, causal: bool) -> torch.Tensor:
        """``sigmoid(r)``; under causal routing in float64, rounded back: on CPU an fp32 sigmoid takes a
        vectorised path for most elements and a scalar one for a tensor's last few, which round
        differently, so a token's weight would depend on how many tokens (other rows) follow it."""
        if not causal or logits.dtype == torch.float64:
            return torch.sigmoid(logits)
        return torch.sigmoid(logits.double()).to(logits.dtype)

    def _aux_loss(self, x: torch.Tensor, flat: torch.Tensor, real, routing) -> torch.Tensor:
        """The auxiliary router's BCE on every routable token of ``x`` ``[s, b, h]`` (the whole
        microbatch) against this layer's picks (statistics recorded once per microbatch)."""
        s, b, _ = x.shape
        index = flat.reshape(-1) if real is None else flat.reshape(-1)[real]
        targets = torch.zeros(s * b, 1, dtype=torch.bool, device=x.device)
        targets[index] = True
        valid = None if routing is None else routing.routable_mask()
        return self.mod_aux_router.loss(x, targets, valid, key=routing)

    def _causal_picks(self, x: torch.Tensor, routing) -> torch.Tensor:
        """``[s, b]`` bool: the tokens of ``x`` ``[s, b, h]`` whose auxiliary score is above 0.5,
        padding never (causal routing: each token decided from its own state)."""
        if self.mod_aux_router is None:
            raise ValueError(
                f"causal routing reached Mixture-of-Depths layer {self.layer_number} without an auxiliary "
                "router: train with mod.aux_router=true (or train.trainable=aux_routers from this checkpoint)"
            )
        s, b, _ = x.shape
        return self.mod_aux_router.picks(x).squeeze(-1) & routing.routable_mask().view(s, b)

    @staticmethod
    def _modality(routing, s: int, b: int) -> torch.Tensor:
        return routing.token_modality.view(s, b).t()

    def _decode(self, x, attention_mask, rotary_pos_emb, context, kwargs):
        """One step of KV-cached inference (megatron's ``StaticInferenceContext``) under causal
        routing: the run positions ``[s, b, h]`` start at ``context.sequence_len_offset``.

        The layer keeps its own cache (:class:`ModLayerCache`, on ``context``): the keys and values
        of only the tokens routed into it, in the order they came, with their absolute positions
        (for their RoPE angles and the mask's columns). A run first forgets the tokens it holds at
        positions ``>=`` the run's start (a recomputed span, e.g. an image's denoising steps);
        each row's picked run tokens then run the block against that row's held ones, one row at a
        time (each row's own offset in the layer's cache); a token that skips the layer touches
        nothing in it."""
        routing = active_routing()
        if routing is None or not routing.causal:
            raise ValueError(
                "a Mixture-of-Depths layer decodes with a KV cache only under causal routing (its "
                "auxiliary router decides each token): build the routing with causal=True"
            )
        if not context.is_static_batching():
            raise ValueError("Mixture-of-Depths layers decode with megatron's StaticInferenceContext only")
        if ps.get_tensor_model_parallel_world_size() > 1:
            raise ValueError("Mixture-of-Depths layers decode in one tensor-parallel rank: set parallel.tp=1")
        s, b, h = x.shape
        start, first_row = context.sequence_len_offset, context.batch_size_offset
        cache = ModLayerCache.of(context, self.layer_number)
        picks = self._causal_picks(x, routing)
        weight = self._weights(self._logits(x, True), True)  # [s, b]
        runs = picks.t().tolist()  # which run tokens each row routes here: one device-to-host copy
        modality = routing.token_modality.view(s, b).t().tolist() if self.MOD.routed else None
        kwargs = {k: v for k, v in kwargs.items() if k != "sequence_len_offset"}
        rows, index, updates = x.reshape(s * b, h), [], []
        for r in range(b):
            held = cache.forget_from(first_row + r, start)
            new = [i for i, p in enumerate(runs[r]) if p]
            if not new:
                continue
            run = torch.tensor(new, device=x.device)
            absolute = torch.tensor(held + [start + i for i in new], device=x.device)
            packed = x[run, r : r + 1]  # [k, 1, h]
            if attention_mask is None:
                blocked = absolute[None, :] > absolute[len(held) :, None]
            else:
                rows_mask = attention_mask[r if attention_mask.shape[0] == b else 0, 0]  # [s, keys]
                blocked = rows_mask[run][:, absolute]
            rotary = None if rotary_pos_emb is None else self._gather_rotary(rotary_pos_emb, absolute[:, None], r)
            sub = None
            if self.MOD.routed:
                counts = [0] * NUM_MODALITIES
                for i in new:
                    counts[modality[r][i]] += 1
                sel = Selection(run[:, None], (len(new),), (tuple(counts),))
                sub = subset_routing(routing, run[:, None] * b + r, sel, None, "per_modality")
            cache.context.sequence_len_offset, cache.context.batch_size_offset = len(held), first_row + r
            with modality_routing(sub) if sub is not None else contextlib.nullcontext():
                y, _ = super().forward(
                    hidden_states=packed,
                    attention_mask=blocked[None, None],
                    rotary_pos_emb=rotary,
                    inference_context=cache.context,
                    **kwargs,
                )
            w = weight[run, r].view(-1, 1, 1)
            updates.append((y + (w - 1).to(y.dtype) * (y - packed)).reshape(-1, h))
            index.append(run * b + r)
            cache.positions[first_row + r] = held + [start + i for i in new]
        out = rows if not index else rows.index_copy(0, torch.cat(index), torch.cat(updates))
        return out.view(s, b, h), kwargs.get("context")

    @staticmethod
    def _real_slots(sel: Selection, device) -> torch.Tensor:
        """Indices (slot-major, ``slot * b + row``) of the real slots, from host counts (no sync)."""
        b = len(sel.picked)
        return torch.tensor([i * b + r for i in range(sel.slots) for r in range(b) if i < sel.picked[r]], device=device)

    @staticmethod
    def _gather_rotary(rotary_pos_emb, positions: torch.Tensor, row: int | None = None):
        """Each picked token's own RoPE angles: ``[s, 1, 1, d]`` -> ``[k, b, 1, d]`` (never truncated).
        A table per batch row ``[s, b, 1, d]`` (:mod:`megafusion.models.token_positions`) is read at
        each slot's own row (or at batch row ``row``, for positions ``[k, 1]`` of that row)."""
        if isinstance(rotary_pos_emb, tuple):
            return tuple(MoDLayerMixin._gather_rotary(r, positions, row) for r in rotary_pos_emb)
        if rotary_pos_emb.shape[1] == 1:
            return rotary_pos_emb[:, 0][positions]
        if row is not None:
            return rotary_pos_emb[:, row][positions]
        return rotary_pos_emb[positions, torch.arange(positions.shape[1], device=positions.device)[None, :]]

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


@dataclass
class ModLayerCache:
    """A MoD layer's KV cache in decoding: a megatron ``StaticInferenceContext`` of its own (the
    wrapped layer's attention keeps its keys and values there, slot ``j`` of row ``r`` holding the
    ``j``-th token routed into the layer) and, per cache row, the absolute positions of those
    tokens. Kept on the model's inference context, one per MoD layer."""

    context: object
    positions: dict[int, list[int]]

    @classmethod
    def of(cls, context, layer_number: int) -> ModLayerCache:
        from megatron.core.inference.contexts import StaticInferenceContext

        caches = context.__dict__.setdefault("mod_layer_caches", {})
        if layer_number not in caches:
            own = StaticInferenceContext(context.max_batch_size, context.max_sequence_length)
            caches[layer_number] = cls(own, {})
        return caches[layer_number]

    def forget_from(self, row: int, start: int) -> list[int]:
        """Row ``row``'s held positions before ``start`` (the rest forgotten: recomputed now)."""
        held = [p for p in self.positions.get(row, []) if p < start]
        self.positions[row] = held
        return held


def cache_lengths(context) -> dict[int, dict[int, int]]:
    """Per MoD layer (its layer number), per cache row: how many tokens its KV cache holds."""
    caches = context.__dict__.get("mod_layer_caches", {})
    return {layer: {row: len(p) for row, p in c.positions.items()} for layer, c in caches.items()}


@functools.cache
def mod_layer_class(base: type, settings: ModSettings) -> type:
    """``base`` (the family's layer class) with a Mixture-of-Depths router and forward."""
    return type(f"MoD{base.__name__}", (MoDLayerMixin, base), {"MOD": settings, "__module__": __name__})
