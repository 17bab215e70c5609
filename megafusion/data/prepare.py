"""Shards -> a tokenized, indexed dataset on disk: what ``megafusion data prepare`` runs (its
command line: :mod:`megafusion.commands.data`).

:func:`prepare` reads the shards (:func:`megafusion.data.formats.shards.read_shards`), tokenizes
every document with the text tokenizer plus the image codec, and writes ``PREFIX.bin``,
``PREFIX.idx`` and ``PREFIX.meta.json`` (:mod:`megafusion.data.formats.indexed`). The meta
(:func:`dataset_meta`) records the tokenizer and codec configs (the tokenizer by content hash, its
file for messages) so a training run can check that its model matches the data.

With a :class:`~megafusion.data.transfusion_data.PlaceholderCodec` the dataset is for Transfusion:
the tokens are exactly those of ``encode_transfusion_document`` (an image = ``<boi>``, one
placeholder per latent patch, ``<eoi>``) and the latents of all images go to
``PREFIX.latents.npy`` (:mod:`megafusion.data.formats.indexed_latents`), described in the meta.

Documents are counted on their way to disk against the packed row of the ``seq_length`` the data
will be trained at: packing (:mod:`megafusion.data.packing`) never cuts a document, so a run at
that length would stop on the first that does not fit; the data is written anyway (a longer
``model.seq_length`` can train on it). ``order="icp"`` writes the In-Context Pretraining order
instead of the input order (:mod:`megafusion.data.icp_rewrite`).
"""

from __future__ import annotations

import os

from megafusion.core.errors import DataError, UsageError
from megafusion.data.icp import DEFAULT_NEIGHBORS, ORDER_NAMES

CREATED_BY = "megafusion data prepare"


def dataset_meta(tok, codec, extra: dict) -> dict:
    """What a dataset's meta records of the tokenizer ``tok`` and image ``codec`` that made it (+ ``extra``)."""
    return {
        "tokenizer": tok.config(),
        # Only for messages (a run with another tokenizer is told which file made the data); the
        # check itself compares the content hash in "tokenizer".
        "tokenizer_file": os.path.abspath(tok.path),
        "codec": codec.config(),
        "vocab_size": int(tok.vocab_size),
        "pad_id": int(tok.pad_id),
        "bos_id": int(tok.bos_id),
        "eos_id": int(tok.eos_id),
        "boi_id": int(tok.boi_id),
        "eoi_id": int(tok.eoi_id),
        **extra,
    }


def prepare(
    inputs: list[str],
    tokenizer_path: str,
    output: str,
    codec,
    seq_length: int | None = None,
    order: str = "input",
    neighbors: int = DEFAULT_NEIGHBORS,
) -> dict:
    """Tokenize ``inputs`` with ``codec`` into the dataset at ``output``; returns ``write_indexed``'s stats.

    A :class:`~megafusion.data.transfusion_data.PlaceholderCodec` makes a Transfusion dataset:
    the stats then also hold ``"latents"`` (images written to ``PREFIX.latents.npy``). With
    ``seq_length``, they also hold ``"too_long"``: ``{"documents": n, "longest": tokens}`` of the
    documents longer than a packed row of ``seq_length + 1`` tokens (see :func:`_tally_long`).
    ``order="icp"`` writes the documents in the In-Context Pretraining order with ``neighbors``
    nearest neighbours (:mod:`megafusion.data.icp_rewrite`); the stats then also hold
    ``"order"``, the :class:`~megafusion.data.icp.IcpOrder`.
    """
    from megafusion.data.formats.indexed import write_indexed
    from megafusion.data.formats.indexed_latents import LatentWriter
    from megafusion.data.formats.shards import read_shards, shard_files
    from megafusion.data.icp_rewrite import write_in_icp_order
    from megafusion.data.tokenizers.joint import MultimodalTokenizer
    from megafusion.data.transfusion_data import PlaceholderCodec, encode_transfusion_document

    if order not in ORDER_NAMES:
        raise UsageError(f"--order {order!r} is not one of {', '.join(ORDER_NAMES)}")
    # Resolve (and check) every input before anything is written.
    files = shard_files(list(inputs))
    tok = MultimodalTokenizer.from_files(tokenizer_path, codec)
    meta = dataset_meta(tok, codec, {"inputs": files, "created_by": CREATED_BY})
    too_long = {"documents": 0, "longest": 0}
    transfusion = isinstance(codec, PlaceholderCodec)

    def documents():
        """The shards' documents, in order; none at all is a DataError naming the inputs (not the output)."""
        count = 0
        for doc in read_shards(files):
            count += 1
            yield doc
        if not count:
            given = " --input ".join(inputs)
            what = "" if list(inputs) == files else f" ({len(files)} shard{'s' * (len(files) > 1)}: {', '.join(files)})"
            raise DataError(
                f"--input {given}: no documents in it{what}: give shards with at least one document (a JSONL shard "
                "holds one JSON object per line)"
            )

    def write_input_order(prefix: str, observe=None) -> dict:
        """The documents, as read, to ``prefix``; ``observe(doc)`` sees each one on its way."""
        if not transfusion:
            docs = (tok.encode_document(doc) for doc in documents())
            return write_indexed(prefix, _observe(_tally_long(docs, seq_length, too_long), observe), meta)
        latents = LatentWriter(prefix, codec)

        def transfusion_docs():
            for doc in documents():
                encoded = encode_transfusion_document(tok, doc)
                # The latents live in their own file; the indexed files get tokens and modalities only.
                latents.add(encoded.meta.pop("latents"), encoded.source)
                yield encoded

        docs = _observe(_tally_long(transfusion_docs(), seq_length, too_long), observe)
        stats = write_indexed(prefix, docs, meta, sidecar=latents)
        stats["latents"] = {"count": latents.count, "shape": list(latents.shape)}
        return stats

    if order == "input":
        stats = write_input_order(output)
    else:
        stats = write_in_icp_order(output, write_input_order, tok, meta, neighbors, codec if transfusion else None)
    if seq_length is not None:
        stats["too_long"] = too_long
    return stats


def _observe(docs, observe):
    """Pass ``docs`` through, showing each to ``observe`` (None: nothing to show)."""
    for doc in docs:
        if observe is not None:
            observe(doc)
        yield doc


def _tally_long(docs, seq_length: int | None, tally: dict):
    """Pass ``docs`` through, counting in ``tally`` those that do not fit in a packed row.

    The criterion is packing's own (``megafusion.data.packing.pack_documents``): a row holds
    ``model.seq_length + 1`` tokens and a longer document is refused, never cut. The tokens
    counted are the ones written, i.e. exactly what training will pack.
    """
    for doc in docs:
        n = len(doc.tokens)
        if seq_length is not None and n > seq_length + 1:
            tally["documents"] += 1
            tally["longest"] = max(tally["longest"], n)
        yield doc
