"""MoMa's expert groups: which experts a token may meet, how many tokens each expert takes, and
where each expert sits in megatron-core's global expert numbering.

A group is either one modality (``moe.experts={text: 4, image: 4}``: a modality's tokens compete
only for its own experts) or ``mixed`` (``{mixed: 8}``: every token competes for every expert, the
modality-blind expert-choice MoE). Expert-choice routing gives expert ``j`` of group ``g``
exactly ``k_g = ceil(c_g * n_g)`` tokens, where ``n_g`` is the microbatch's number of tokens of
the group (a host int, from the batch's ``modality_counts``) and ``c_g`` the group's capacity
(default ``1 / E_g``, computed exactly as ``ceil(n_g / E_g)``). So every dispatch size is known on
the host before any device work.

Global expert numbers interleave the groups (text 0, image 0, text 1, image 1, ...; a larger group
continues alone once the smaller ones run out), because megatron-core gives expert-parallel rank
``r`` the contiguous experts ``[r E / ep, (r + 1) E / ep)``: interleaving puts experts of every
modality on every rank, so a microbatch's FFN work is spread over the ranks whatever its
text/image split. The numbering does not depend on the layout, so checkpoints reshard across EP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from megafusion.core.modality import MODALITY_NAMES

MIXED = "mixed"


@dataclass(frozen=True)
class ExpertGroups:
    names: tuple[str, ...]  # modality names in modality-id order, or ("mixed",)
    sizes: tuple[int, ...]  # experts per group
    capacities: tuple[float | None, ...]  # None: 1 / size

    @classmethod
    def from_config(cls, moe) -> ExpertGroups:
        """From the ``moe`` config section (validated: keys are modalities or ``mixed``)."""
        names = (MIXED,) if MIXED in moe.experts else tuple(n for n in MODALITY_NAMES if n in moe.experts)
        capacity = moe.capacity or {}
        return cls(names, tuple(int(moe.experts[n]) for n in names), tuple(capacity.get(n) for n in names))

    @property
    def modality_blind(self) -> bool:
        return self.names == (MIXED,)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @cached_property
    def global_ids(self) -> tuple[tuple[int, ...], ...]:
        """``global_ids[g][j]``: megatron's global number of expert ``j`` of group ``g`` (interleaved)."""
        ids = [[] for _ in self.sizes]
        number = 0
        for j in range(max(self.sizes)):
            for g, size in enumerate(self.sizes):
                if j < size:
                    ids[g].append(number)
                    number += 1
        return tuple(tuple(x) for x in ids)

    def expert_name(self, global_id: int) -> str:
        """``text.2`` for the third text expert (``mixed.5`` in the modality-blind MoE)."""
        for g, ids in enumerate(self.global_ids):
            if global_id in ids:
                return f"{self.names[g]}.{ids.index(global_id)}"
        raise ValueError(f"expert {global_id} does not exist: this MoE has {self.total} experts")

    def tokens_per_expert(self, g: int, n_tokens: int) -> int:
        """``k_g``: the tokens each expert of group ``g`` takes from the group's ``n_tokens``."""
        c = self.capacities[g]
        if c is None:
            return -(-n_tokens // self.sizes[g])  # ceil(n / E) in integers: 1/E is not exact in floats
        # The epsilon keeps ceil(0.25 * 8) at 2 where the product rounds up to 2.0000000000000004.
        return min(n_tokens, math.ceil(c * n_tokens - 1e-9))

    def mean_experts_per_token(self, g: int, n_tokens: int) -> float:
        """Expert FFNs a token of group ``g`` meets on average (FLOPs accounting)."""
        return self.sizes[g] * self.tokens_per_expert(g, n_tokens) / n_tokens if n_tokens else 0.0
