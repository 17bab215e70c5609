"""MoMa's config keys and checks (torch-free; :mod:`megafusion.core.options`): the ``moe`` section
and what validation asks of it. The family itself is :mod:`megafusion.models.moma`."""

from __future__ import annotations

from dataclasses import dataclass, field

from megafusion.config.checks import expert_groups_problems, expert_layout_problems, group_names_ok, is_int
from megafusion.core.choices import MOE_DISPATCHERS
from megafusion.core.options import Options


@dataclass
class MoEConfig:
    """The experts that replace the FFN of every layer of model.arch=moma (MoMa, arXiv 2407.21770)."""

    # Experts per group. Modality groups route each modality's tokens among its own experts:
    # {text: 4, image: 4} is MoMa 4t4i, {text: 1, image: 1} MoT's FFN ("1t1i"); {mixed: 8} is one
    # modality-blind group (the paper's MoE-8x baseline).
    experts: dict = field(default_factory=lambda: {"text": 4, "image": 4})
    # Expert-choice capacity per group, in (0, 1]: each expert of group g takes the top
    # ceil(capacity_g x n_g) of the microbatch's n_g tokens of its group; null = 1 / (experts of
    # the group), so a token meets one expert on average (zero, one or several).
    capacity: dict | None = None
    # Gumbel-sigmoid noise on the router logits when selecting tokens in training (MoMa's
    # upcycling recipe): logits + scale x (G' - G''); 0 = off.
    router_noise: float = 0.0
    dispatcher: str = "alltoall"  # megatron-core's token dispatcher: alltoall | allgather
    # An auxiliary router per layer (sigmoid(SiLU(x W1) W2), one output per expert) trained with
    # BCE against the router's choices on detached inputs (main-model gradients unchanged):
    # needed for causal routing (generation, eval's causal column). Train it jointly, or alone
    # from a trained checkpoint with train.trainable=aux_routers.
    aux_router: bool = False


# How to write a dict setting, for a value of another type (``moe.capacity=1.5``).
DICT_FORMS = {
    "moe.experts": "moe.experts={text: 4, image: 4} (experts per modality group) or moe.experts={mixed: 8}",
    "moe.capacity": (
        "moe.capacity={text: 0.25, image: 0.25} (the fraction of its group's tokens each expert takes, "
        "one per group of moe.experts), or null for 1/experts of each group"
    ),
}


def total_experts(cfg) -> int:
    """The experts of a layer, which ``parallel.ep`` splits."""
    return sum(v for v in cfg.moe.experts.values() if is_int(v))


def moe_problems(cfg) -> list[str]:
    """The ``moe`` section: groups, expert counts, capacities, dispatcher; and the layouts megatron's
    MoE layer accepts."""
    return _section_problems(cfg.moe) + _layout_problems(cfg)


def _section_problems(moe) -> list[str]:
    example = "e.g. moe.experts={text: 4, image: 4} (MoMa 4t4i) or moe.experts={mixed: 8}"
    problems = expert_groups_problems("moe.experts", moe.experts, example)
    if not group_names_ok(moe.experts):
        return problems
    keys = set(moe.experts)
    if moe.capacity is not None:
        if set(moe.capacity) != keys:
            problems.append(
                f"moe.capacity={moe.capacity!r} must name the groups of moe.experts ({', '.join(sorted(keys))}), "
                f"or be null (each group's capacity 1 / its expert count)"
            )
        for name, c in moe.capacity.items():
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
                problems.append(
                    f"moe.capacity.{name}={c!r} must be in (0, 1] (the fraction of the group's tokens each "
                    f"expert takes; 1 = every token): e.g. moe.capacity={{{name}: 0.25}}"
                )
    if not moe.router_noise >= 0:
        problems.append(f"moe.router_noise={moe.router_noise} must be >= 0 (0 = no noise)")
    if not isinstance(moe.aux_router, bool):
        problems.append(f"moe.aux_router={moe.aux_router!r} must be true or false")
    if moe.dispatcher not in MOE_DISPATCHERS:
        problems.append(f"moe.dispatcher={moe.dispatcher!r}: choose one of {', '.join(MOE_DISPATCHERS)}")
    return problems


def _layout_problems(cfg) -> list[str]:
    return expert_layout_problems(cfg, "moe.experts", cfg.moe.experts, total_experts(cfg))


def has_aux_routers(cfg) -> bool:
    """Whether the layers have auxiliary routers (what ``train.trainable=aux_routers`` trains)."""
    return bool(cfg.moe.aux_router)


OPTIONS = Options(
    sections={"moe": MoEConfig},
    problems=moe_problems,
    dict_forms=DICT_FORMS,
    experts=total_experts,
    aux_routers=has_aux_routers,
)
