"""``grouped_linear``: one weight per row group, with the row gather and scatter fused in.

Contract (shared by every backend, :mod:`megafusion.ops.backends`):

- the problem has ``P = sum(counts)`` rows in *group order*: the first ``counts[0]`` rows
  belong to group 0, the next ``counts[1]`` to group 1, and so on; ``counts`` are Python ints
  known on the host (batch metadata), so no backend synchronises with the device to learn
  the group sizes; groups may be empty;
- row ``p`` reads ``x[gather[p]]`` (``x[p]`` without ``gather``); ``gather_permutes=True``
  (the default) says ``gather`` is a permutation of ``x``'s rows (MoT's sort by modality),
  ``False`` that it may repeat or skip rows (a token chosen by two experts, or by none):
  the input gradient then sums over repeats and is zero for skipped rows;
- ``weights[g]`` is ``[m, k]`` (``torch.nn.functional.linear``'s layout, megatron's
  ``ColumnParallelLinear.weight``), one tensor per group, all of one shape and dtype;
- ``y[p] = scale[p] * (x_row(p) @ weights[g].T)`` (no ``scale``: factor 1);
- without ``scatter`` the result is ``[P, m]`` in group order; with ``scatter`` and no
  ``out_rows``, ``scatter`` is a permutation and ``out[scatter[p]] = y[p]`` (back to token
  order); with ``out_rows``, ``out`` is ``[out_rows, m]`` and ``out[t] = Σ_{scatter[p] = t} y[p]``
  (the gate-weighted combine of expert choice and top-k; zero where no row lands).

Each row is multiplied by exactly one weight: the FLOPs are those of one dense matmul over
all rows. A group with zero rows still takes part in autograd (its weight gets an all-zero
gradient), so every parameter always has a gradient and data-parallel reductions see the
same set of gradients on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megafusion.ops import backends


def grouped_linear(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    counts: Sequence[int],
    *,
    gather: torch.Tensor | None = None,
    scatter: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    out_rows: int | None = None,
    gather_permutes: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Grouped ``y = x @ W_g.T`` with optional fused gather, gate and scatter (see the module doc).

    ``backend`` overrides the process's choice (:func:`megafusion.ops.backends.use_backend`).
    """
    counts = [int(c) for c in counts]
    _check(x, weights, counts, gather, scatter, scale, out_rows, gather_permutes)
    impl = backends.implementation(backends.resolve(backend, x.device, x.dtype, *weights[0].shape))
    return impl(x, list(weights), counts, gather, scatter, scale, out_rows, gather_permutes)


def _check(x, weights, counts, gather, scatter, scale, out_rows, gather_permutes) -> None:
    rows = sum(counts)
    if len(weights) != len(counts):
        raise ValueError(f"grouped_linear: {len(weights)} weights but {len(counts)} group counts")
    if min(counts, default=0) < 0:
        raise ValueError(f"grouped_linear: negative group count in {counts}")
    shapes = {(tuple(w.shape), w.dtype) for w in weights}
    if len(shapes) != 1:
        raise ValueError(f"grouped_linear: the groups' weights differ in shape or dtype: {sorted(map(str, shapes))}")
    source_rows = rows if gather is None else gather.numel()
    if source_rows != rows:
        raise ValueError(f"grouped_linear: gather has {gather.numel()} entries for {rows} grouped rows")
    if (gather is None or gather_permutes) and x.shape[0] != rows:
        raise ValueError(
            f"grouped_linear: group counts {counts} sum to {rows}, but the input has {x.shape[0]} rows "
            "(pass gather_permutes=False for a gather that repeats or skips rows)"
        )
    if scatter is not None and scatter.numel() != rows:
        raise ValueError(f"grouped_linear: scatter has {scatter.numel()} entries for {rows} grouped rows")
    if scale is not None and scale.numel() != rows:
        raise ValueError(f"grouped_linear: scale has {scale.numel()} entries for {rows} grouped rows")
    if out_rows is not None and scatter is None:
        raise ValueError("grouped_linear: out_rows needs a scatter index")
