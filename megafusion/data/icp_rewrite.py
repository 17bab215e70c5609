"""A dataset written in the In-Context Pretraining order (``megafusion data prepare --order icp``).

The dataset is first written in input order under a temporary prefix beside the output (same file
system, so the rewrite needs no copy across devices; twice the disk for a while), collecting each
document's bag of text pieces on the way; :func:`megafusion.data.icp.icp_order` orders the bags
(TF-IDF, nearest neighbours, the paper's greedy traversal), and
:func:`megafusion.data.formats.indexed_reorder.write_reordered` rewrites the documents in that
order one at a time, latents with their documents. The meta records the order (``"order"``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

from megafusion.core.errors import DataError


def write_in_icp_order(
    output: str, write_input_order: Callable[..., dict], tok, meta: dict, neighbors: int, latent_codec=None
) -> dict:
    """The dataset at ``output`` in ICP order; ``write_input_order(prefix, observe)`` writes it in
    input order to ``prefix``, showing each tokenized document to ``observe``. ``tok``: the
    tokenizer that made it (its special ids are left out of the bags); ``latent_codec``: a
    Transfusion dataset's, whose latents follow their documents. Returns the rewrite's stats, plus
    ``"order"``: the :class:`~megafusion.data.icp.IcpOrder`."""
    from megafusion.data.formats.indexed_reorder import remove_dataset, write_reordered
    from megafusion.data.icp import BagOfPieces, icp_order

    # Pieces every document has say nothing about what it is about (see megafusion.data.icp).
    bag = BagOfPieces(exclude=(tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id))
    tmp = f"{output}.tmp-icp-input-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            write_input_order(tmp, bag.add)
        except DataError as err:
            # Name the output the user gave, not the temporary prefix (as the input order would).
            raise DataError(str(err).replace(tmp, output)) from None
        result = icp_order(bag.matrix(tok.vocab_size), neighbors)
        stats = write_reordered(tmp, output, result.order, {**meta, "order": result.meta()}, latent_codec)
    finally:
        remove_dataset(tmp)
    stats["order"] = result
    return stats
