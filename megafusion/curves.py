"""Loss-vs-compute curve arithmetic shared by the experiments' analyses (``examples/experiments``).

``first_crossing`` finds where a curve first gets down to a target loss (e.g. another run's
final loss), linearly interpolated between evaluations; ``value_at`` reads another axis of the
same curve (steps, wall clock) at that fractional position.
"""

from __future__ import annotations


def first_crossing(xs: list[float], ys: list[float], target: float) -> tuple[float, float] | None:
    """(x, position) where ``ys`` first gets <= ``target``, linearly interpolated between points.

    ``position`` is the fractional index ``i - 1 + t`` (so other axes can be read at the same place
    with :func:`value_at`). At the very first point it is that point (nothing earlier to
    interpolate from: an upper bound). None if it never does; NaN never counts.
    """
    for i, y in enumerate(ys):
        if not y <= target:
            continue
        if i == 0:
            return xs[0], 0.0
        y0 = ys[i - 1]
        t = (y0 - target) / (y0 - y) if y0 != y else 1.0
        return xs[i - 1] + t * (xs[i] - xs[i - 1]), float(i - 1 + t)
    return None


def value_at(values: list[float], position: float) -> float:
    """``values`` linearly interpolated at a fractional index."""
    i = min(int(position), len(values) - 1)
    frac = position - i
    return values[i] if frac == 0 else values[i] + frac * (values[i + 1] - values[i])
