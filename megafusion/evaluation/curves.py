"""Loss-vs-compute curves shared by the experiments' analyses (``examples/experiments``).

``read_metrics`` splits a run's ``metrics.jsonl`` into training and evaluation records and
refuses files the curves would misread (cut off mid-line, two runs appended to one file).
``first_crossing`` finds where a curve first gets down to a target loss (e.g. another run's
final loss), linearly interpolated between evaluations; ``value_at`` reads another axis of the
same curve (steps, wall clock) at that fractional position.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path, rerun: str, error: type[Exception] = ValueError) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a ``metrics.jsonl`` that ``megafusion train`` wrote,
    each with strictly increasing steps. An evaluation record has a ``val/...`` key; a training record
    has a ``step`` and none. ``error`` (raised with the file and what to do, ``rerun`` being the command
    that makes the file again) is the caller's exception class."""
    if not path.is_file():
        raise error(
            f"{path} does not exist: produce the runs with `{rerun}` (or analyse another directory with --out-dir)"
        )
    train, evals = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}:{n} is not JSON ({err}): the run was cut off mid-write? Rerun it") from None
            if "event" in record:  # a resume marker, loss spike or skipped step: not a measurement
                continue
            if any(key.startswith("val/") for key in record):
                evals.append(record)
            elif "step" in record:
                train.append(record)
    for kind, records in (("training", train), ("evaluation", evals)):
        steps = [r["step"] for r in records]
        if any(b <= a for a, b in zip(steps, steps[1:])):
            # MetricsLogger appends: a second run into the same directory repeats steps.
            raise error(
                f"{path}: the {kind} steps are not increasing (two runs appended to one file?): delete "
                f"{path.parent} and rerun `{rerun}`"
            )
    return train, evals


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
