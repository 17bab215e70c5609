"""The sources of ``data.domains`` (docs/data.md "Domains"; the names and checks:
:mod:`megafusion.config.domains`).

A run's domains are the sets of ``data.builtin`` or the datasets of ``data.blend``. Whatever
``data.domains`` selects, the tokenizer and image codec are made from every domain (so every
Branch-Train-MiX branch has the same vocabulary) and each document's train / held-out side is
decided over all of them by content hash (so every branch holds out the same documents). What
the selection changes is only what trains:

- a plain list trains the selected domains at their natural shares: built-in sets have their
  training documents packed together, in the order they have without ``data.domains`` (all of
  ``data.builtin`` selected gives the rows of a run without it, sample for sample);
  ``data.blend`` entries keep their blend weights;
- a mapping ``{name: weight}`` trains them at those token weights: a ``BlendedSource`` over one
  ``MicrobatchSource`` per domain, each packed alone.

Each domain's held-out documents are packed alone (``val_domains``): validation reports every
domain's loss, the trained ones and the others.
"""

from __future__ import annotations

import numpy as np
import torch

from megafusion.config.domains import builtin_names, selected_domains
from megafusion.core.modality import PAD_DOCUMENT_ID
from megafusion.data.blend import BlendedSource
from megafusion.data.loader import MicrobatchSource
from megafusion.data.packing import PackedRows, next_fit_rows, pack_documents
from megafusion.data.types import TokenizedDocument


class DomainUnion(MicrobatchSource):
    """Documents of several domains packed together; each microbatch also carries
    ``dataset_tokens`` (its input tokens per domain, as a ``BlendedSource``'s) for the logs."""

    share_group = "domain"  # the trainer logs data/domain/<name>/share

    def __init__(self, rows: PackedRows, seed: int, name: str, names: list[str], row_tokens: np.ndarray):
        super().__init__(rows, seed, name)
        self.names = names
        self._row_tokens = row_tokens  # [rows, domains]: each row's input tokens per domain

    def microbatch(self, first_sample: int, size: int) -> dict[str, torch.Tensor]:
        batch = super().microbatch(first_sample, size)
        rows = self.row_indices(first_sample, size)  # the epoch orders are cached: no second draw
        batch["dataset_tokens"] = torch.from_numpy(self._row_tokens[rows].sum(axis=0))
        return batch


def union_of(
    docs: list[TokenizedDocument], domain: list[int], names: list[str], seq_length: int, pad_id: int, seed: int
):
    """``docs`` (of domain index ``domain[i]`` in ``names``) packed together as a ``DomainUnion``."""
    rows = pack_documents(docs, seq_length, pad_id)
    # Which document each token is: the row's first document (the packing's own next-fit) + its
    # document id within the row. Only input tokens (a row's first seq_length) are counted.
    lengths = np.array([len(d.tokens) for d in docs], dtype=np.int64)
    starts = next_fit_rows(lengths, seq_length + 1, lambda i: docs[i].source)
    ids = rows.document_ids[:, :-1]
    real = ids != PAD_DOCUMENT_ID
    which = np.asarray(domain, dtype=np.int64)[(starts[:-1, None] + np.where(real, ids, 0))]
    flat = np.arange(rows.num_rows)[:, None] * len(names) + which
    row_tokens = np.bincount(flat[real], minlength=rows.num_rows * len(names)).reshape(rows.num_rows, len(names))
    return DomainUnion(rows, seed, f"domains {','.join(names)} train", names, row_tokens.astype(np.int64))


def builtin_domain_sources(cfg, tokenized: list[TokenizedDocument], labels: list[str], held: np.ndarray, pad_id: int):
    """``(train or None, val_domains)`` of the built-in ``tokenized`` documents (set ``labels[i]``,
    held out where ``held[i]``): the training source of ``data.domains`` (None when it is null) and
    each set's held-out documents packed alone (``{set: MicrobatchSource}``, sets without any left out)."""
    d, seq, seed = cfg.data, cfg.model.seq_length, cfg.train.seed
    names = builtin_names(d.builtin)
    val_domains = {}
    for k, name in enumerate(names):
        docs = [t for t, label, h in zip(tokenized, labels, held) if h and label == name]
        if docs:
            # Set k's rows with seeds of its own (set 0: the seeds of a run without domains).
            val_domains[name] = MicrobatchSource(
                pack_documents(docs, seq, pad_id), seed + 2 * k + 1, f"builtin:{name} val"
            )
    chosen = selected_domains(d.domains)
    if not chosen:
        return None, val_domains
    order = list(chosen)
    if all(w is None for w in chosen.values()):  # the plain list: packed together, in the data's order
        mine = [(t, order.index(label)) for t, label, h in zip(tokenized, labels, held) if not h and label in chosen]
        docs, domain = [t for t, _ in mine], [i for _, i in mine]
        return union_of(docs, domain, order, seq, pad_id, seed), val_domains
    sources = []
    for name in order:
        docs = [t for t, label, h in zip(tokenized, labels, held) if not h and label == name]
        rows = pack_documents(docs, seq, pad_id)
        sources.append(MicrobatchSource(rows, seed + 2 * names.index(name), f"builtin:{name} train"))
    weights = [float(chosen[n]) for n in order]
    return domain_blend(sources, weights, order), val_domains


def domain_blend(sources: list, weights: list[float], names: list[str]) -> BlendedSource:
    """The selected domains' training sources at token ``weights``."""
    return BlendedSource(sources, weights, names, "domains train", key="data.domains", share_group="domain")


def indexed_domain_train(cfg, trains: list, weights: list[float], names: list[str]):
    """The training source of ``data.domains`` over the datasets of ``data.blend`` (``trains``, at
    blend ``weights``, named ``names``), or None when it is null: the selected ones at the weights
    ``data.domains`` gives, else at their blend weights."""
    chosen = selected_domains(cfg.data.domains)
    if not chosen:
        return None
    at = [names.index(n) for n in chosen]
    given = [chosen[n] if chosen[n] is not None else weights[k] for n, k in zip(chosen, at)]
    return domain_blend([trains[k] for k in at], [float(w) for w in given], list(chosen))


__all__ = ["DomainUnion", "builtin_domain_sources", "domain_blend", "indexed_domain_train", "union_of"]
