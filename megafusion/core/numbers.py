"""Integer helpers shared by the config checks and the layout planner (torch-free)."""

from __future__ import annotations


def divisors(n: int) -> list[int]:
    """Every positive divisor of ``n``, ascending (``[]`` for ``n < 1``)."""
    return [d for d in range(1, n + 1) if n % d == 0]
