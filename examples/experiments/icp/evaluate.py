"""One trained run of the ICP experiment, evaluated on its held-out rows: the loss of the later
documents of a row and the probe's accuracy.

``python -m examples.experiments.icp.evaluate --ckpt OUT/<run>/checkpoints --output OUT/<run>/eval.json``
(from the repository root)

The checkpoint's model and data are rebuilt as its run had them (``model_from_checkpoint`` with
its config: the same tokenizer, held-out split, ``data.order`` and ``data.attention``), and every
held-out row (``bundle.val``: the documents held out by content, a ``facts`` group whole, packed
in the run's order) goes once through the training's own forward step
(:func:`megafusion.training.forward_step.make_forward_step`: the run's mask and positions), on
one process. Per row, from its logits:

- **held-out loss**: the mean next-token cross-entropy (float64, over every vocabulary row, as
  training computes it) of the tokens the loss counts (``loss_mask``: inside a document, no
  padding); **first documents** / **later documents**: the same over the tokens of the first
  document of each row (document id 0) and over those of every other document (id >= 1: the
  documents that have earlier documents in their row, where attention across documents can use
  them);
- **probe**: every ``facts`` document of the row (found by its tokens among the run's
  ``builtin:facts`` documents, regenerated from ``data.num_samples`` and ``train.seed``): its fact
  (the colour, :func:`megafusion.data.builtin.facts.fact_span`) counts as predicted when the
  greedy (argmax) prediction of each of its tokens, given the true tokens before it (teacher
  forcing), is that token; ``fact_loss`` is the colour's negative log-likelihood (its tokens'
  cross-entropies summed), averaged over the documents. Reported over
  all facts documents, over those with a document of their group earlier in the same row
  (``partner_before``: the only ones whose colour the context holds) and over the others.

Writes one JSON object to ``--output`` (and prints it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PROG = "python -m examples.experiments.icp.evaluate"


def facts_index(cfg, tokenizer) -> dict[tuple, tuple[str, int, int]]:
    """Each ``facts`` document of the run, by its tokens: ``(group, fact start, fact end)``, the
    fact's positions within the document's tokens (``<bos>`` at 0)."""
    from megafusion.data.builtin.facts import fact_groups, fact_span

    index = {}
    if "facts" not in [s.strip() for s in cfg.data.builtin.split(",")]:
        return index
    for text, name, _ in fact_groups(cfg.data.num_samples, cfg.train.seed):
        ids = tokenizer.encode_text(text)
        start, end = fact_span(tokenizer.encode_text, text)
        index[(tokenizer.bos_id, *ids, tokenizer.eos_id)] = (name, 1 + start, 1 + end)
    return index


def partner_share(rows, index: dict) -> dict:
    """Of the facts documents in packed ``rows``: how many, and the share whose group has a
    document earlier in the same row (the documents whose fact the context holds)."""
    from megafusion.core.modality import PAD_DOCUMENT_ID

    hits = total = 0
    for tokens, ids in zip(rows.tokens, rows.document_ids):
        seen = set()
        for d in np.unique(ids[ids != PAD_DOCUMENT_ID]).tolist():
            found = index.get(tuple(tokens[ids == d].tolist()))
            if found is not None:
                total += 1
                hits += found[0] in seen
                seen.add(found[0])
    return {"documents": total, "share": hits / total if total else None}


class Tally:
    """Sums of the report (losses as float64 sums and counts; probe hits and counts)."""

    def __init__(self):
        self.loss = {k: [0.0, 0] for k in ("all", "first", "later")}
        self.probe = {k: [0, 0, 0.0] for k in ("all", "partner_before", "no_partner_before")}  # hits, docs, nll

    def add_tokens(self, nll: np.ndarray, mask: np.ndarray, doc_ids: np.ndarray) -> None:
        for key, keep in (("all", mask), ("first", mask & (doc_ids == 0)), ("later", mask & (doc_ids >= 1))):
            self.loss[key][0] += float(nll[keep].sum())
            self.loss[key][1] += int(keep.sum())

    def add_fact(self, correct: bool, nll: float, partner_before: bool) -> None:
        for key in ("all", "partner_before" if partner_before else "no_partner_before"):
            self.probe[key][0] += int(correct)
            self.probe[key][1] += 1
            self.probe[key][2] += nll

    def result(self) -> dict:
        def mean(total, count):
            return total / count if count else None

        return {
            "loss": {k: mean(*v) for k, v in self.loss.items()},
            "tokens": {k: v[1] for k, v in self.loss.items()},
            "probe": {
                k: {"accuracy": mean(h, n), "documents": n, "fact_loss": mean(s, n)}
                for k, (h, n, s) in self.probe.items()
            },
        }


def score_rows(tally: Tally, logits, batch: dict, rows, index: dict) -> None:
    """Add a microbatch's rows to ``tally``: ``logits`` ``[b, s, vocab]`` of ``batch``, made from
    the packed ``rows`` (``[b, s + 1]``: each document whole)."""
    import torch

    from megafusion.core.modality import PAD_DOCUMENT_ID

    logits = logits.double()
    labels = batch["labels"]
    nll = (torch.logsumexp(logits, -1) - logits.gather(-1, labels[..., None])[..., 0]).numpy()
    hit = (logits.argmax(-1) == labels).numpy()
    mask, doc_ids = batch["loss_mask"].numpy() > 0, batch["document_ids"].numpy()
    tally.add_tokens(nll, mask, doc_ids)
    for r in range(rows.num_rows):
        row, ids = rows.tokens[r], rows.document_ids[r]
        seen = set()
        for d in np.unique(ids[ids != PAD_DOCUMENT_ID]).tolist():
            where = np.flatnonzero(ids == d)
            found = index.get(tuple(row[where].tolist()))
            if found is None:
                continue
            group, start, end = found
            # Fact token at row position p is the label of input position p - 1.
            predicted = np.arange(where[0] + start, where[0] + end) - 1
            tally.add_fact(bool(hit[r, predicted].all()), float(nll[r, predicted].sum()), group in seen)
            seen.add(group)


def evaluate(ckpt: str, batch_rows: int = 8) -> dict:
    """The report of checkpoint ``ckpt`` (see the module doc)."""
    import torch

    from megafusion.data.builtin.facts import COLOURS
    from megafusion.data.loader import to_microbatch
    from megafusion.inference.load import model_from_checkpoint
    from megafusion.training.forward_step import make_forward_step

    loaded = model_from_checkpoint(ckpt, data=True)
    cfg, bundle, (model,) = loaded.cfg, loaded.data, loaded.chunks
    val = bundle.val
    if val is None:
        raise SystemExit(f"{PROG}: {ckpt}: the run holds no documents out (data.val_fraction=0): nothing to evaluate")
    step = make_forward_step(cfg, loaded.runtime.device)
    index = facts_index(cfg, bundle.tokenizer)
    tally = Tally()
    with torch.no_grad():
        for first in range(0, val.num_rows, batch_rows):
            idx = np.arange(first, min(first + batch_rows, val.num_rows))
            rows = val.rows.take(idx)
            batch = to_microbatch(rows, idx, val.name, idx)
            output, _ = step(iter([batch]), model)
            logits = output[0] if isinstance(output, tuple) else output
            score_rows(tally, logits.float().cpu(), batch, rows, index)
    return {
        "checkpoint": str(loaded.path),
        "step": loaded.step,
        "order": cfg.data.order,
        "attention": cfg.data.attention,
        "positions": cfg.data.positions,
        "rows": val.num_rows,
        "chance": 1 / len(COLOURS),
        **tally.result(),
    }


def command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a run's checkpoint.dir or step directory")
    parser.add_argument("--output", required=True, help="the JSON file to write")
    parser.add_argument("--batch", type=int, default=8, help="held-out rows per forward (default 8)")
    args = parser.parse_args(argv)
    result = evaluate(args.ckpt, args.batch)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from megafusion.commands.main import run

    return run(command, argv, PROG, runtime=True)


if __name__ == "__main__":
    sys.exit(main())
