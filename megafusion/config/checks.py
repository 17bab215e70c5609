"""Small helpers that config checks share (the core sections' in :mod:`megafusion.config.validate`
and those of families and objectives, :mod:`megafusion.core.options`): each gives a problem line
that names the key, its value and a fix."""

from __future__ import annotations


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def braces(xs) -> str:
    return "{" + ", ".join(str(x) for x in xs) + "}"


def near(value: int, step: int) -> str:
    """The multiples of `step` nearest to `value`, as 'a or b'."""
    lo = (value // step) * step
    hi = lo + step
    return f"{lo} or {hi}" if lo >= step else str(hi)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def at_least(key: str, v, low: int) -> list[str]:
    return [f"{key}={v} must be >= {low}: set {key} to {low} or more"] if v < low else []


def one_of(key: str, v, allowed) -> list[str]:
    return [] if v in allowed else [f"{key}={v!r} is not one of {', '.join(allowed)}: set {key} to one of them"]


def expert_layout_problems(cfg, key: str, experts, total: int) -> list[str]:
    """What megatron-core's MoE layer asks of the layout, for a family whose ``key`` (e.g.
    ``moe.experts``, value ``experts``) holds ``total`` experts: ``parallel.ep`` divides them, and
    tensor parallelism comes with sequence parallelism."""
    p = cfg.parallel
    problems = []
    if total and p.ep >= 1 and total % p.ep:
        problems.append(
            f"{key}={experts!r} holds {total} experts, not divisible by parallel.ep={p.ep} (every "
            f"expert-parallel rank holds the same number of experts): choose parallel.ep in "
            f"{braces(divisors(total))} or change {key}"
        )
    if p.tp > 1 and not p.sp:
        problems.append(
            f"model.arch={cfg.model.arch} with parallel.tp={p.tp} needs parallel.sp=true (megatron-core's "
            f"MoE layer refuses tensor parallelism without sequence parallelism in training)"
        )
    return problems


def expert_groups_problems(key: str, experts: dict, example: str) -> list[str]:
    """An experts-per-group setting (``moe.experts``, ``btx.experts``): every modality named with its
    count, or only ``mixed``; counts whole and >= 1. ``example`` ends each line."""
    from megafusion.core.modality import MODALITY_NAMES

    if not group_names_ok(experts):
        return [
            f"{key}={experts!r} must name every modality ({', '.join(MODALITY_NAMES)}) with its "
            f"expert count, or only 'mixed' (one modality-blind group): {example}"
        ]
    bad = {k: v for k, v in experts.items() if not is_int(v) or v < 1}
    return [f"{key}: {bad} must be whole numbers >= 1 (experts in the group): {example}"] if bad else []


def group_names_ok(experts: dict) -> bool:
    """Whether an experts-per-group setting names every modality, or only ``mixed``."""
    from megafusion.core.modality import MODALITY_NAMES

    names = set(experts)
    return names == {"mixed"} or names == set(MODALITY_NAMES)
