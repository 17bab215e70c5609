"""A brute-force reference for ``examples/experiments/icp/evaluate.py``, run as
``python -m tests.experiments.icp_reference CKPT`` (prints one JSON object).

The same sums as the evaluation's, by another road: no packed microbatch, no attention mask, no
loss mask. Each held-out row's documents go through ``megafusion.inference.logits.forward_logits``
(plain causal attention over the tokens it is given, positions 0, 1, ...): under
``data.attention=isolated`` every document alone (RoPE is relative, so a document's logits do not
depend on where its row puts it), under ``causal`` the row's tokens (real tokens first, padding
after them: causal attention keeps it out of their logits). A document's loss is the float64
cross-entropy of its tokens after its first, given what came before.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch


def reference(ckpt: str) -> dict:
    from examples.experiments.icp.evaluate import facts_index
    from megafusion.core.modality import PAD_DOCUMENT_ID
    from megafusion.data.sources import build_data
    from megafusion.inference.load import checkpoint_config
    from megafusion.inference.logits import forward_logits, load_model

    run_cfg = checkpoint_config(ckpt).cfg  # the run's data: its rows are model.seq_length + 1 tokens
    width = run_cfg.model.seq_length + 1
    loaded = load_model(ckpt, [], width, 1)  # a model that reads a whole packed row
    cfg, runtime, chunks = loaded.cfg, loaded.runtime, loaded.chunks
    bundle = build_data(run_cfg)
    index = facts_index(run_cfg, bundle.tokenizer)
    rows = bundle.val.rows
    sums = {"all": [0.0, 0], "first": [0.0, 0], "later": [0.0, 0]}
    probe = {"all": [0, 0], "partner_before": [0, 0], "no_partner_before": [0, 0]}

    def logits_of(tokens: np.ndarray) -> torch.Tensor:
        padded = np.full(width, int(tokens[0]), dtype=np.int64)  # any id pads: it comes last
        padded[: tokens.size] = tokens
        return forward_logits(cfg, runtime, chunks, torch.from_numpy(padded)[None])[0].double()

    for r in range(rows.num_rows):
        tokens, ids = rows.tokens[r], rows.document_ids[r]
        whole = logits_of(tokens[ids != PAD_DOCUMENT_ID]) if cfg.data.attention == "causal" else None
        seen = set()
        for d in np.unique(ids[ids != PAD_DOCUMENT_ID]).tolist():
            where = np.flatnonzero(ids == d)
            doc = tokens[where]
            # Logits predicting the document's tokens 1 .. n-1 (from its positions 0 .. n-2).
            logits = whole[where[:-1]] if whole is not None else logits_of(doc)[: doc.size - 1]
            target = torch.from_numpy(doc[1:])
            nll = torch.logsumexp(logits, -1) - logits.gather(-1, target[:, None])[:, 0]
            for key in ("all", "first" if d == 0 else "later"):
                sums[key][0] += float(nll.sum())
                sums[key][1] += int(nll.numel())
            found = index.get(tuple(doc.tolist()))
            if found is not None:
                group, start, end = found
                hit = bool((logits[start - 1 : end - 1].argmax(-1) == target[start - 1 : end - 1]).all())
                for key in ("all", "partner_before" if group in seen else "no_partner_before"):
                    probe[key][0] += hit
                    probe[key][1] += 1
                seen.add(group)
    return {
        "loss": {k: s / n for k, (s, n) in sums.items()},
        "tokens": {k: n for k, (_, n) in sums.items()},
        "probe": {k: {"hits": h, "documents": n} for k, (h, n) in probe.items()},
    }


if __name__ == "__main__":
    from megafusion.runtime import shutdown

    try:
        print(json.dumps(reference(sys.argv[1])))
    finally:
        shutdown()
