"""Blended datasets: several indexed datasets drawn at fixed token shares, deterministic and resumable.

``data.blend: [{path: P, weight: w}, ...]`` asks for dataset ``k`` to supply ``w_k / sum(w)`` of
the *tokens* trained on (e.g. a text corpus and an image-text set at a chosen token ratio). Rows
are packed, so datasets fill their rows differently; each dataset's share of *samples* is its
token weight divided by its mean document tokens per row (from the sample index), renormalised.

Sample ``i`` of the run maps to sample ``j`` of dataset ``k`` by a fixed schedule of ``PERIOD``
samples: dataset ``k`` gets ``n_k`` of them (largest-remainder rounding of its sample share, so
the shares hold to 1/``PERIOD`` over every period), spread over the period by megatron-core's
``BlendedDataset`` rule (its compiled ``build_blending_indices``: the next sample goes to the
dataset furthest below its target). Then
``k, r = schedule[i % PERIOD]`` and ``j = (i // PERIOD) * n_k + r``: a pure function of ``i``, so
the loader's state stays the consumed-sample count and a resumed run continues the exact stream.
Dataset ``k`` serves its ``j``-th sample from its own ``MicrobatchSource`` (its rows, shuffled per
epoch with its own seed).

Microbatches carry ``dataset_tokens`` (``[datasets]``: document tokens of each dataset among the
microbatch's input tokens) so the trainer can log the realised shares.
"""

from __future__ import annotations

import numpy as np
import torch

from megafusion.core.errors import DataError
from megafusion.core.modality import PAD_DOCUMENT_ID
from megafusion.data.loader import MicrobatchSource, to_microbatch
from megafusion.data.packing import PackedRows

PERIOD = 10_000  # samples per schedule period: the sample shares hold to 1e-4 over each period


def sample_counts(shares: np.ndarray, period: int = PERIOD) -> np.ndarray:
    """Largest-remainder rounding of ``shares`` (summing to 1) to integers summing to ``period``."""
    exact = np.asarray(shares, dtype=np.float64) * period
    counts = np.floor(exact).astype(np.int64)
    # Stable order: equal remainders go to the earlier dataset.
    extra = np.argsort(-(exact - counts), kind="stable")[: period - int(counts.sum())]
    counts[extra] += 1
    return counts


def schedule(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(dataset, rank within the period)`` of each sample of one period: megatron-core's
    ``build_blending_indices`` (its ``BlendedDataset`` rule) over one period."""
    from megatron.core.datasets.helpers_cpp import build_blending_indices

    period = int(counts.sum())
    which = np.zeros(period, dtype=np.int16)
    rank = np.zeros(period, dtype=np.int64)
    build_blending_indices(which, rank, counts / period, len(counts), period, False)
    # Over a whole period the rule gives each dataset exactly its count (the error stays below 1).
    assert np.array_equal(np.bincount(which, minlength=len(counts)), counts), "blending schedule is off its counts"
    return which.astype(np.int64), rank


def _concat(parts: list[PackedRows], order: np.ndarray) -> PackedRows:
    """Rows of ``parts`` stacked, then taken in ``order``."""
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])[order]  # noqa: E731
    latents = None
    if parts[0].latents is not None:
        every = [lat for p in parts for lat in p.latents]
        latents = [every[i] for i in order]
    return PackedRows(cat("tokens"), cat("modalities"), cat("document_ids"), cat("positions"), latents)


class BlendedSource:
    """Samples drawn from several ``MicrobatchSource`` s at fixed token shares (module doc)."""

    def __init__(
        self,
        sources: list[MicrobatchSource],
        weights: list[float],
        names: list[str],
        name: str,
        key: str = "data.blend",
        share_group: str = "blend",
    ):
        """``key``: the config key that set the weights (in messages); ``share_group``: the trainer
        logs the realised shares as ``data/<share_group>/<name>/share``."""
        if len(sources) != len(weights) or not sources:
            raise ValueError("BlendedSource: one weight per source, at least one source")
        self.sources, self.names, self.name, self.share_group = sources, names, name, share_group
        weights = np.asarray(weights, dtype=np.float64)
        self.token_shares = weights / weights.sum()
        fill = np.array([sum(s.tokens_per_modality().values()) / s.num_rows for s in sources])
        samples = self.token_shares / fill
        self.sample_shares = samples / samples.sum()
        self.counts = sample_counts(self.sample_shares)
        starved = [n for n, c in zip(names, self.counts) if c == 0]
        if starved:
            raise DataError(
                f"{key}: {', '.join(starved)} would get no sample in {PERIOD} (weight below "
                f"{1 / PERIOD:g} of the blend's): raise its weight or drop it from {key}"
            )
        self._which, self._rank = schedule(self.counts)

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, that dataset's sample number) of each of ``samples``."""
        period, offset = np.divmod(np.asarray(samples, dtype=np.int64), PERIOD)
        which = self._which[offset]
        return which, period * self.counts[which] + self._rank[offset]

    def microbatch(self, first_sample: int, size: int) -> dict[str, torch.Tensor]:
        samples = np.arange(first_sample, first_sample + size)
        which, own = self.locate(samples)
        parts, positions, row_ids = [], [], np.empty(size, dtype=np.int64)
        for k, source in enumerate(self.sources):
            mine = np.flatnonzero(which == k)
            if mine.size:
                idx = source.rows_of(own[mine])
                parts.append(source.rows.take(idx))
                positions.append(mine)
                row_ids[mine] = idx
        order = np.argsort(np.concatenate(positions), kind="stable")
        rows = _concat(parts, order)
        batch = to_microbatch(rows, samples, self.name, row_ids)
        real = (rows.document_ids[:, :-1] != PAD_DOCUMENT_ID).sum(axis=1)
        batch["dataset_tokens"] = torch.from_numpy(
            np.bincount(which, weights=real, minlength=len(self.sources)).astype(np.int64)
        )
        return batch

    def describe(self) -> str:
        lines = [
            f"{self.name}: {len(self.sources)} datasets, token shares "
            + ", ".join(f"{n} {w:.3f}" for n, w in zip(self.names, self.token_shares))
            + " (samples "
            + ", ".join(f"{n} {c / PERIOD:.4f}" for n, c in zip(self.names, self.counts))
            + ")"
        ]
        lines += [f"  {s.describe()}" for s in self.sources]
        return "\n".join(lines)


__all__ = ["BlendedSource", "sample_counts", "schedule", "PERIOD"]
