"""Branch-Train-MiX's config keys and checks (torch-free; :mod:`megafusion.core.options`): the ``btx``
section and what validation asks of it. The family itself is :mod:`megafusion.models.btx`."""

from __future__ import annotations

from dataclasses import dataclass, field

from megafusion.config.checks import expert_groups_problems, expert_layout_problems, group_names_ok, is_int
from megafusion.core.choices import MOE_DISPATCHERS
from megafusion.core.options import Options


@dataclass
class BTXConfig:
    """The merged model of Branch-Train-MiX (model.arch=btx, arXiv 2403.07816): every layer's FFN is
    a top-k token-choice MoE (each token picks its k best experts; docs/btx.md)."""

    # Experts per group, as moe.experts: {mixed: 4} routes every token among all 4 experts (merged
    # from dense branches); {text: 2, image: 2} routes a token among its modality's experts only
    # (merged from MoT branches). Global expert numbers interleave the groups (text 0, image 0, ...).
    experts: dict = field(default_factory=lambda: {"mixed": 4})
    topk: int = 2  # experts per token, within its group (the paper: 2)
    # Load-balancing loss per microbatch and layer, added to the training loss with this weight
    # (the paper: 0.01; 0 = off, still logged): megatron-core's switch loss per group g,
    # E_g * sum_i f_i * P_i with f_i = tokens routed to expert i / (topk * n_g) (fractions that sum
    # to 1) and P_i = the group's mean softmax score of expert i, weighted by the group's share of
    # the n routable tokens (n_g / n): 1 when perfectly balanced (docs/btx.md; metrics moe/aux_loss).
    aux_loss_coeff: float = 0.01
    # megatron's moe_router_pre_softmax. false (BTX): top-k of the logits, then a softmax over the
    # k picked, so a token's gates sum to 1 (K identical experts = the FFN they were copied from).
    # true: softmax over the group's experts, then top-k of it (gates sum to less than 1).
    pre_softmax: bool = False
    dispatcher: str = "alltoall"  # megatron-core's token dispatcher: alltoall | allgather


DICT_FORMS = {
    "btx.experts": "btx.experts={mixed: 4} (one modality-blind group) or btx.experts={text: 2, image: 2}",
}


def total_experts(cfg) -> int:
    """The experts of a layer, which ``parallel.ep`` splits."""
    return sum(v for v in cfg.btx.experts.values() if is_int(v))


def btx_problems(cfg) -> list[str]:
    """The ``btx`` section, and the layouts megatron's MoE layer accepts."""
    b = cfg.btx
    example = "e.g. btx.experts={mixed: 4} (merged from dense branches) or btx.experts={text: 2, image: 2}"
    problems = expert_groups_problems("btx.experts", b.experts, example)
    if not group_names_ok(b.experts):
        return problems
    smallest = min((v for v in b.experts.values() if is_int(v)), default=1)
    if not is_int(b.topk) or not 1 <= b.topk <= smallest:
        problems.append(
            f"btx.topk={b.topk!r} must be a whole number in [1, {smallest}] (a token picks that many "
            f"experts of its group; the smallest group of btx.experts={b.experts!r} has {smallest})"
        )
    if b.topk == 1 and b.pre_softmax is False:
        problems.append(
            "btx.topk=1 needs btx.pre_softmax=true: a softmax over the one picked expert is 1, so the "
            "router would learn from the balancing loss only (megatron-core refuses it too)"
        )
    if isinstance(b.aux_loss_coeff, bool) or not isinstance(b.aux_loss_coeff, (int, float)) or b.aux_loss_coeff < 0:
        problems.append(f"btx.aux_loss_coeff={b.aux_loss_coeff!r} must be a number >= 0 (0.01 in the paper; 0 = off)")
    if not isinstance(b.pre_softmax, bool):
        problems.append(f"btx.pre_softmax={b.pre_softmax!r} must be true or false (BTX: false)")
    if b.dispatcher not in MOE_DISPATCHERS:
        problems.append(f"btx.dispatcher={b.dispatcher!r}: choose one of {', '.join(MOE_DISPATCHERS)}")
    return problems + expert_layout_problems(cfg, "btx.experts", b.experts, total_experts(cfg))


OPTIONS = Options(sections={"btx": BTXConfig}, problems=btx_problems, dict_forms=DICT_FORMS, experts=total_experts)
