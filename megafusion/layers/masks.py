"""Attention masks built from per-token metadata (never from token values).

A microbatch carries ``document_ids`` ``[b, s]``: tokens of one packed document share an
id. Query i may attend key j iff j <= i and both belong to the same document.

Transfusion (Zhou et al., arXiv 2408.11039) adds optional ``image_ids`` ``[b, s]`` int64:
``NO_IMAGE`` (-1) for tokens that are not image patches, else an id shared by all patches
of one image (unique within the row, so images of different documents never share an id).
The mixed mask is causal over the sequence plus bidirectional inside each image::

    allowed(i, j) = same_document(i, j) and (j <= i or image_ids[i] == image_ids[j] != -1)

Documents are never crossed, even by an image id that (wrongly) repeats across documents.
Begin/end-of-image markers are text tokens (see ``megafusion.data.types``), so they stay
causal: the begin marker does not see the patches after it. :func:`image_spans_from_modality`
derives ``image_ids`` from the per-token modalities.

Positions. The model uses megatron-core's rotary embedding, which is built from the sequence
length: every token's RoPE position is its row index ``0 .. s-1`` (the batch's
``position_ids`` are only read by learned absolute embeddings). Image patches are not given
special positions: the patches of one image keep consecutive positions in raster order. This
is fine because (1) RoPE only encodes the relative offset ``i - j`` in the scores, and inside
a document the row offset equals the offset within the document, so packing does not shift
anything; (2) the bidirectional span lets every patch attend every other patch of its image
whatever the order, so raster order costs no visibility, it only fixes which relative offset
each patch pair sees (a 2-D RoPE over patch rows/columns would be a separate change).

Two forms of the same mask:
- ``dense_mask``: boolean ``[b, 1, s, s]`` in megatron-core's convention (``True`` =
  blocked), for SDPA / Transformer Engine;
- ``block_mask``: a FlexAttention ``BlockMask`` (sparse, skips fully masked tiles).
"""

from __future__ import annotations

import torch

from megafusion.core.modality import NO_IMAGE, Modality


def _check_image_ids(document_ids: torch.Tensor, image_ids) -> torch.Tensor | None:
    if image_ids is None:
        return None
    if not isinstance(image_ids, torch.Tensor):
        # Guards the old positional call ``block_mask(doc, 64)`` (block_size moved after image_ids).
        raise TypeError(f"image_ids must be a [b, s] int64 tensor or None, got {type(image_ids).__name__}")
    if image_ids.shape != document_ids.shape:
        raise ValueError(
            f"image_ids has shape {tuple(image_ids.shape)}, document_ids {tuple(document_ids.shape)}: "
            "both must be [b, s]"
        )
    if image_ids.is_floating_point() or image_ids.dtype == torch.bool:
        raise ValueError(f"image_ids must be an integer tensor (-1 = not an image patch), got {image_ids.dtype}")
    return image_ids.to(document_ids.device)


def _document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` bool: the first token of each document (a change of id from the left)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def dense_mask(
    document_ids: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    first_key: torch.Tensor | None = None,
    first_query: int = 0,
) -> torch.Tensor:
    """Causal + same-document (+ bidirectional per image) mask, ``True`` = blocked: ``[b, 1, s, s]``.

    ``image_ids=None`` gives the text-only mask (causal + same document). ``first_key`` ``[b, s]``
    (optional) hides from query ``i`` every key before position ``first_key[i]`` except its
    document's first token: caption dropout for classifier-free guidance gives a dropped image's
    patches and its ``<boi>`` ``first_key`` = that ``<boi>``, so the patches see ``<bos> <boi>`` and
    their own image, and the ``<boi>`` sees no caption either: the unconditional prompt of
    generation at every layer (see :func:`megafusion.objectives.transfusion.caption_dropout`).
    ``first_query`` > 0 builds only the rows of queries
    ``first_query .. s-1`` (``[b, 1, s - first_query, s]``, equal to those rows of the whole mask):
    decoding with a KV cache needs the new positions' rows only, O(s) per token instead of O(s^2).
    """
    image_ids = _check_image_ids(document_ids, image_ids)
    s = document_ids.shape[1]
    if not 0 <= first_query < s:
        raise ValueError(f"first_query={first_query} must be in [0, {s}) (the sequence length)")
    rows = slice(first_query, None)
    queries = torch.arange(first_query, s, device=document_ids.device)
    keys = torch.arange(s, device=document_ids.device)
    causal = keys[None, :] <= queries[:, None]
    same_doc = document_ids[:, rows, None] == document_ids[:, None, :]
    if image_ids is None:
        allowed = same_doc & causal
    else:
        q_image = image_ids[:, rows]
        same_image = (q_image[:, :, None] == image_ids[:, None, :]) & (q_image != NO_IMAGE)[:, :, None]
        allowed = same_doc & (causal | same_image)
    if first_key is not None:
        visible = (keys[None, None, :] >= first_key[:, rows, None]) | _document_starts(document_ids)[:, None, :]
        allowed = allowed & visible
    return ~allowed[:, None]


def block_mask(
    document_ids: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    block_size: int = 128,
    first_key: torch.Tensor | None = None,
):
    """The same mask as :func:`dense_mask`, as a FlexAttention ``BlockMask``.

    ``s`` need not be a multiple of ``block_size`` (FlexAttention pads the last block).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    image_ids = _check_image_ids(document_ids, image_ids)

    if image_ids is None:

        def base(b, q, kv):
            return (kv <= q) & (document_ids[b, q] == document_ids[b, kv])
    else:

        def base(b, q, kv):
            q_img = image_ids[b, q]
            same_image = (q_img == image_ids[b, kv]) & (q_img != NO_IMAGE)
            return (document_ids[b, q] == document_ids[b, kv]) & ((kv <= q) | same_image)

    if first_key is None:

        def mask_mod(b, h, q, kv):
            return base(b, q, kv)
    else:
        starts = _document_starts(document_ids)

        def mask_mod(b, h, q, kv):
            return base(b, q, kv) & ((kv >= first_key[b, q]) | starts[b, kv])

    b, s = document_ids.shape
    return create_block_mask(
        mask_mod, B=b, H=None, Q_LEN=s, KV_LEN=s, device=document_ids.device, BLOCK_SIZE=block_size
    )


def image_spans_from_modality(modality_ids: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """``image_ids`` ``[b, s]`` int64 from per-token modalities: one image per run of image tokens.

    Each maximal run of ``Modality.IMAGE`` tokens inside one document is one image; a run that
    crosses a document boundary is split there. Images are numbered 0, 1, 2, ... along each
    row (unique within the row); every other token gets ``NO_IMAGE`` (-1). Two images placed
    back to back with nothing between them are indistinguishable here and become one image:
    the tokenizer separates images with begin/end-of-image text tokens, and a pipeline that
    does not should pass explicit ``image_ids`` instead of calling this.
    """
    if modality_ids.shape != document_ids.shape or modality_ids.dim() != 2:
        raise ValueError(
            f"modality_ids {tuple(modality_ids.shape)} and document_ids {tuple(document_ids.shape)} must both be [b, s]"
        )
    is_image = modality_ids == int(Modality.IMAGE)
    # A run starts at an image token whose left neighbour is not an image token of the same document.
    continues = torch.zeros_like(is_image)
    continues[:, 1:] = is_image[:, :-1] & (document_ids[:, 1:] == document_ids[:, :-1])
    starts = is_image & ~continues
    number = starts.to(torch.int64).cumsum(dim=1) - 1
    return torch.where(is_image, number, torch.full_like(number, NO_IMAGE))


def attention_mask_for(batch: dict, backend: str, packs_documents: bool, device: torch.device):
    """None (plain causal, the fast path), a dense boolean mask, or a FlexAttention BlockMask.

    Transfusion batches (``image_ids``) always get a mask: patches of one image see each other;
    so do batches with caption dropout (``first_key``).
    """
    image_ids, first_key = batch.get("image_ids"), batch.get("first_key")
    if not packs_documents and backend != "flex" and image_ids is None and first_key is None:
        return None
    doc_ids = batch["document_ids"].to(device)
    image_ids = None if image_ids is None else image_ids.to(device)
    first_key = None if first_key is None else first_key.to(device)  # caption dropout (Transfusion)
    if backend == "flex":
        return block_mask(doc_ids, image_ids, first_key=first_key)
    return dense_mask(doc_ids, image_ids, first_key)


def context_mask(batch: dict, backend: str, device: torch.device, query_index: torch.Tensor, key_index: torch.Tensor):
    """One context-parallel rank's mask: the rows of its queries (row positions ``query_index``)
    against every key in gathered order (``key_index``), cut from the whole row's metadata
    (:mod:`megafusion.runtime.context_parallel`). A row of one document with no images is the
    plain causal mask, built here too: a rank's queries are not a prefix of the row."""
    doc_ids = batch["document_ids"].to(device)
    image_ids, first_key = batch.get("image_ids"), batch.get("first_key")
    image_ids = None if image_ids is None else image_ids.to(device)
    first_key = None if first_key is None else first_key.to(device)
    full = dense_mask(doc_ids, image_ids, first_key)
    return full[:, :, query_index.to(device)][:, :, :, key_index.to(device)]
