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
