"""Per-token modality routing for modality-partitioned layers (Mixture-of-Transformers).

megatron-core hands a transformer layer's linears, norms and MLP nothing but hidden states,
so the routing of one microbatch travels beside the model call instead of through it::

    routing = ModalityRouting.from_modality_ids(batch["modality_ids"], batch["modality_counts"], device)
    with modality_routing(routing):
        logits = model(tokens, position_ids, attention_mask)

Every modality-partitioned module reads :func:`current_routing` during its forward; the
backward needs nothing (autograd kept the index tensors), except where activation recomputation
(``train.recompute``) runs a layer's forward again inside the backward pass, outside this context:
:mod:`megafusion.layers.recompute` re-enters the routing the forward saw (:func:`active_routing`).
Each pipeline stage and virtual chunk builds the routing from its own copy of the microbatch, so no stage asks another.

What the routing holds, in megatron-core's token order (hidden states are ``[s, b, h]``;
flattening the first two dims gives token ``i = pos * b + row``):

- ``token_modality`` ``[s * b]``: the modality of each token, on the device;
- ``order`` / ``inverse_order``: a stable sort of the tokens by modality and its inverse; within
  a modality the batch's padding (``document_ids == -1``, text tokens) comes after every real
  token, so expert-choice routing can leave it out;
- ``counts``: tokens per modality as Python ints, from the batch's host-side
  ``modality_counts``, so routing never synchronises with the device; ``routable_counts``: the
  same without padding (the first ``routable_counts[m]`` of modality ``m``'s tokens in ``order``);
- ``causal``: whether routed layers must route each token from its own state only (causal
  inference: generation, eval's causal column; auxiliary routers decide); expert choice otherwise;
- ``sample_ids``: the global sample number of each row (host ints, the batch's ``sample_ids``),
  which keys anything drawn at random per row (MoMa's router noise), so a sample gets the same
  draw in every parallel layout, at any microbatch position and after a resume.

Under sequence parallelism each tensor-parallel rank holds a contiguous slice of the
sequence between the linears; :meth:`ModalityRouting.modality_of` returns the modality of
exactly the tokens a tensor holds.

Under context parallelism (``parallel.cp`` > 1, :mod:`megafusion.runtime.context_parallel`) the
routing describes this rank's shard of the microbatch (per-token routing, MoT, needs nothing
more) and carries ``shard`` and ``whole``, the routing of the whole microbatch in row order:
what routing that ranks tokens against each other (MoMa's expert choice, Mixture-of-Depths'
top-c, BTX's load-balancing statistics) reads after gathering the rows
(:mod:`megafusion.layers.context_rows`), so it decides exactly as one process does.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state as ps

from megafusion.core.modality import NUM_MODALITIES, PAD_DOCUMENT_ID

_ACTIVE: list[ModalityRouting] = []


@dataclass(frozen=True)
class ModalityRouting:
    token_modality: torch.Tensor  # [s * b] int64, megatron order (pos-major)
    order: torch.Tensor  # [s * b] int64: tokens sorted by modality (stable)
    inverse_order: torch.Tensor  # [s * b] int64: argsort(order)
    counts: tuple[int, ...]  # tokens per modality, host ints
    seq_length: int
    micro_batch_size: int
    routable_counts: tuple[int, ...] | None = None  # counts without padding; None: no padding
    sample_ids: tuple[int, ...] | None = None  # each row's global sample number (host ints); None: unknown
    # Causal routing: every routed layer routes each token from its own state only (auxiliary
    # routers' predictions, :mod:`megafusion.layers.aux_router`), never against other tokens.
    causal: bool = False
    # Routable (non-padding) tokens of each row per modality, ``[b][num_modalities]`` host ints
    # (Mixture-of-Depths' per-row capacities, :mod:`megafusion.layers.mod_layer`); None: unknown.
    row_routable: tuple[tuple[int, ...], ...] | None = None
    # Host-side facts derived from the microbatch once and shared by its layers (MoMa's
    # expert-parallel dispatch counts, :mod:`megafusion.layers.expert_choice_layer`).
    cache: dict = field(default_factory=dict, compare=False, repr=False)
    # Context parallelism: this rank's shard of the rows (a ContextShard) and the whole
    # microbatch's routing (row order, ``whole.shard`` None); both None without it.
    shard: object = None
    whole: ModalityRouting | None = None

    def routable(self, modality: int) -> int:
        return self.counts[modality] if self.routable_counts is None else self.routable_counts[modality]

    @classmethod
    def from_modality_ids(
        cls,
        modality_ids: torch.Tensor,
        modality_counts: torch.Tensor | None,
        device: torch.device,
        num_modalities: int,
        padding: torch.Tensor | None = None,
        sample_ids=None,
        causal: bool = False,
    ) -> ModalityRouting:
        """Routing of one ``[b, s]`` microbatch whose metadata lives on the host.

        ``modality_counts`` (``[num_modalities]``, counted when the batch was made) is checked
        against the ids here, on the host, so a broken data pipeline fails loudly instead of
        mis-routing tokens. ``padding`` (``[b, s]`` bool, optional) marks the batch's padding;
        ``sample_ids`` (``[b]``, host tensor or ints, optional) each row's global sample number;
        ``causal``: route each token from its own state only (:attr:`causal`).
        """
        if modality_ids.device.type != "cpu":
            raise ValueError(
                "ModalityRouting.from_modality_ids wants the batch's host (CPU) modality_ids; "
                "build the routing before moving the batch to the device"
            )
        b, s = modality_ids.shape
        if sample_ids is not None:
            sample_ids = tuple(int(i) for i in sample_ids)
            if len(sample_ids) != b:
                raise ValueError(f"{len(sample_ids)} sample_ids for a microbatch of {b} rows")
        flat = modality_ids.t().reshape(-1).to(torch.int64)  # [s, b] order, like the hidden states
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_modalities):
            raise ValueError(
                f"modality_ids must lie in [0, {num_modalities}); got [{int(flat.min())}, {int(flat.max())}]"
            )
        counted = torch.bincount(flat, minlength=num_modalities)
        if modality_counts is not None and not torch.equal(counted, modality_counts.to(torch.int64)):
            raise ValueError(
                f"batch modality_counts {modality_counts.tolist()} disagree with its "
                f"modality_ids ({counted.tolist()}): the data loader is inconsistent"
            )
        key, routable = flat, None
        if padding is not None:
            pad = padding.t().reshape(-1).to(torch.int64)
            key = flat * 2 + pad  # padding after the real tokens of its modality
            routable = tuple(int(c) for c in counted - torch.bincount(flat[pad.bool()], minlength=num_modalities))
        order = torch.sort(key, stable=True).indices
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731 - three identical moves
        counts = tuple(int(c) for c in counted)
        real = modality_ids if padding is None else torch.where(padding, num_modalities, modality_ids)
        rows = tuple(
            tuple(int(c) for c in torch.bincount(row.to(torch.int64), minlength=num_modalities + 1)[:num_modalities])
            for row in real
        )
        return cls(move(flat), move(order), move(inverse), counts, s, b, routable, sample_ids, causal, rows)

    def routable_mask(self) -> torch.Tensor:
        """``[s * b]`` bool on the device, megatron order: True for the tokens that are not padding
        (made once per microbatch, kept in :attr:`cache`)."""
        if "routable_mask" not in self.cache:
            mask = torch.ones_like(self.token_modality, dtype=torch.bool)
            start = 0
            for m, count in enumerate(self.counts):
                mask[self.order[start + self.routable(m) : start + count]] = False
                start += count
            self.cache["routable_mask"] = mask
        return self.cache["routable_mask"]

    def modality_of(self, x: torch.Tensor) -> torch.Tensor:
        """Modality of each token of ``x`` (``[s or s/tp, b, ...]``), shaped ``[x.shape[0], b]``."""
        ids = self.token_modality.view(self.seq_length, self.micro_batch_size)
        rows = x.shape[0]
        if rows == self.seq_length:
            return ids
        tp = ps.get_tensor_model_parallel_world_size()
        if rows * tp == self.seq_length:  # a sequence-parallel slice: this rank's part
            start = ps.get_tensor_model_parallel_rank() * rows
            return ids[start : start + rows]
        raise ValueError(
            f"a tensor of {rows} positions matches neither the microbatch's sequence "
            f"({self.seq_length}) nor its sequence-parallel slice"
        )


@contextlib.contextmanager
def modality_routing(routing: ModalityRouting):
    """Make ``routing`` the one modality-partitioned modules read inside the block."""
    _ACTIVE.append(routing)
    try:
        yield routing
    finally:
        _ACTIVE.pop()


def active_routing() -> ModalityRouting | None:
    """The routing modules would read now, or None outside any ``modality_routing`` block."""
    return _ACTIVE[-1] if _ACTIVE else None


def current_routing() -> ModalityRouting:
    if not _ACTIVE:
        raise RuntimeError(
            "a modality-partitioned (MoT) module ran without routing: call the model inside "
            "`with megafusion.layers.routing.modality_routing(ModalityRouting.from_modality_ids(...))` "
            "(megafusion's forward step does this for every microbatch)"
        )
    return _ACTIVE[-1]


def routing_of(batch: dict, device: torch.device, causal: bool = False) -> ModalityRouting:
    """The modality routing of a microbatch (``[b, s]`` host tensors)."""
    documents = batch.get("document_ids")
    padding = None if documents is None else documents == PAD_DOCUMENT_ID
    return ModalityRouting.from_modality_ids(
        batch["modality_ids"],
        batch.get("modality_counts"),
        device,
        NUM_MODALITIES,
        padding,
        batch.get("sample_ids"),
        causal,
    )


def routing_for(batch: dict, device: torch.device, causal: bool = False, shard=None, whole: dict | None = None):
    """The modality routing of a microbatch, as a context for the model call (MoT families);
    ``causal``: every routed layer routes each token from its own state only (inference).
    Context parallelism: ``batch`` is this rank's ``shard`` of the microbatch ``whole``."""
    routing = routing_of(batch, device, causal)
    if shard is not None:
        routing = dataclasses.replace(routing, shard=shard, whole=routing_of(whole, device, causal))
    return modality_routing(routing)
