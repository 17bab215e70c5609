"""Attention masks built from per-token metadata (never from token values).

A microbatch carries ``document_ids`` ``[b, s]``: tokens of one packed document share an
id; padding has ``PAD_DOCUMENT_ID`` (-1). Transfusion (Zhou et al., arXiv 2408.11039) adds
optional ``image_ids`` ``[b, s]`` int64: ``NO_IMAGE`` (-1) for tokens that are not image
patches, else an id shared by all patches of one image (unique within the row). The mask is
causal over the sequence plus bidirectional inside each image, in one of two modes
(``data.attention``, the ``cross_document`` argument):

- **isolated** (the default): a token attends only its own document::

      allowed(i, j) = same_document(i, j) and (j <= i or same_image(i, j))

  Padding is a document of its own (a pad attends the pads before it).
- **causal** (``cross_document=True``; In-Context Pretraining, arXiv 2310.10638): a token
  attends every earlier token of its row, across document boundaries; images stay
  bidirectional only inside their own span, and padding is never a key::

      allowed(i, j) = not pad(i) and not pad(j) and (j <= i or same_image(i, j))
                      or pad(i) and j == i

  A pad query attends itself only (SDPA gives NaN for a query without keys; its loss is
  masked anyway), so no pad ever reaches a real token.

``same_image(i, j) = same_document(i, j) and image_ids[i] == image_ids[j] != -1`` in both
modes: an image id that (wrongly) repeats in another document never joins two images. Begin/
end-of-image markers are text tokens (see ``megafusion.data.types``), so they stay causal: the
begin marker does not see the patches after it. :func:`image_spans_from_modality` derives
``image_ids`` from the per-token modalities.

Caption dropout (``first_key`` ``[b, s]``): query ``i`` also loses every key before
``first_key[i]`` except its own document's first token (in both modes: a dropped image sees
its document's ``<bos>`` and itself, never another document's start). In causal mode that
``<bos>`` has itself read the earlier documents of the row, so from the second layer on a
dropped image is conditioned on them (never on its own caption): the unconditional view of
an image in a multi-document context, which generation reproduces.

Neither mode changes the loss: the first token of a document is never a label of the previous
one (the batch's ``loss_mask``).

Positions. By default (``data.positions=row``) every token's RoPE position is its row index
``0 .. s-1``: megatron-core's rotary embedding is built from the sequence length. In isolated
mode that is the same as restarting at each document, because RoPE only encodes the relative
offset ``i - j`` in the scores and inside a document the row offset equals the offset within
the document. ``data.positions=document`` gives each token its position within its document
(the batch's ``position_ids``, :mod:`megafusion.models.token_positions`): in isolated mode the
logits are then those of each document alone; in causal mode it changes the offsets a token
sees to earlier documents (a key of document k-1 can appear "later" than the query). Image
patches are not given special positions: the patches of one image keep consecutive positions
in raster order (the bidirectional span lets every patch attend every other patch whatever
the order; a 2-D RoPE over patch rows/columns would be a separate change).

Two forms of the same mask:
- ``dense_mask``: boolean ``[b, 1, sq, sk]`` in megatron-core's convention (``True`` =
  blocked), for SDPA / Transformer Engine;
- ``block_mask``: a FlexAttention ``BlockMask`` (sparse, skips fully masked tiles).

Both can build any subset of the full mask's rows and columns (``query_index`` /
``key_index``, the global row positions of the queries and keys), from the full row's
metadata and without the ``s x s`` mask: a context-parallel rank builds its own queries' rows
this way, a KV-cached decoder its new positions' rows (``first_query``). Both evaluate one
rule, :func:`allowed`.
"""

from __future__ import annotations

import torch

from megafusion.core.modality import NO_IMAGE, PAD_DOCUMENT_ID, Modality


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


def _check_index(name: str, index, s: int, device) -> torch.Tensor:
    """``index`` (global row positions, 1-D integer) on ``device``; the whole row when None."""
    if index is None:
        return torch.arange(s, device=device)
    index = torch.as_tensor(index)
    if index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool:
        raise ValueError(
            f"{name} must be a 1-D integer tensor of row positions, got {index.dtype} {tuple(index.shape)}"
        )
    return index.to(device=device, dtype=torch.int64)


def _document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` bool: the first token of each document (a change of id from the left)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def allowed(q, k, doc_q, doc_k, img_q=None, img_k=None, first_key_q=None, start_k=None, cross_document=False):
    """The mask's rule on broadcastable tensors (``True`` = query may attend key): global row
    positions ``q`` / ``k``, their document ids, optionally their image ids, the query's
    ``first_key`` and whether the key starts its document (caption dropout). Both mask forms
    evaluate it: :func:`dense_mask` on whole index grids, :func:`block_mask` per pair."""
    same_doc = doc_q == doc_k
    seen = k <= q
    if img_q is not None:
        seen = seen | (same_doc & (img_q == img_k) & (img_q != NO_IMAGE))
    if first_key_q is not None:
        seen = seen & ((k >= first_key_q) | (start_k & same_doc))
    if not cross_document:
        return same_doc & seen
    pad_q, pad_k = doc_q == PAD_DOCUMENT_ID, doc_k == PAD_DOCUMENT_ID
    return (seen & ~pad_q & ~pad_k) | (pad_q & (k == q))


def dense_mask(
    document_ids: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    first_key: torch.Tensor | None = None,
    first_query: int = 0,
    *,
    cross_document: bool = False,
    query_index: torch.Tensor | None = None,
    key_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mask of the module docstring, ``True`` = blocked: ``[b, 1, sq, sk]``.

    ``image_ids=None`` gives the text-only mask. ``first_key`` ``[b, s]`` (optional) hides from
    query ``i`` every key before position ``first_key[i]`` except its document's first token:
    caption dropout for classifier-free guidance gives a dropped image's patches and its
    ``<boi>`` ``first_key`` = that ``<boi>``, so the patches see ``<bos> <boi>`` and their own
    image, and the ``<boi>`` sees no caption either: the unconditional prompt of generation at
    every layer (see :func:`megafusion.objectives.transfusion.caption_dropout`).
    ``cross_document``: the causal mode (attend earlier documents of the row) instead of isolated.

    ``query_index`` ``[sq]`` / ``key_index`` ``[sk]`` (int64, default the whole row): the global
    row positions of the mask's rows and columns, in any order, so that the result equals
    ``dense_mask(...)[:, :, query_index][:, :, :, key_index]`` without building ``s x s``.
    ``first_query`` > 0 is ``query_index = first_query .. s-1`` (``[b, 1, s - first_query, s]``):
    decoding with a KV cache needs the new positions' rows only, O(s) per token instead of O(s^2).
    """
    image_ids = _check_image_ids(document_ids, image_ids)
    s, device = document_ids.shape[1], document_ids.device
    if not 0 <= first_query < s:
        raise ValueError(f"first_query={first_query} must be in [0, {s}) (the sequence length)")
    if first_query and query_index is not None:
        raise ValueError("dense_mask: pass first_query or query_index, not both")
    queries = (
        torch.arange(first_query, s, device=device)
        if first_query
        else _check_index("query_index", query_index, s, device)
    )
    keys = _check_index("key_index", key_index, s, device)
    qs, ks = queries[:, None], keys[None, :]
    rule = {"cross_document": cross_document}
    if image_ids is not None:
        rule |= {"img_q": image_ids[:, queries, None], "img_k": image_ids[:, None, keys]}
    if first_key is not None:
        first_key = first_key.to(device)
        rule |= {"first_key_q": first_key[:, queries, None], "start_k": _document_starts(document_ids)[:, None, keys]}
    ok = allowed(qs, ks, document_ids[:, queries, None], document_ids[:, None, keys], **rule)
    return ~ok[:, None]


def block_mask(
    document_ids: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    block_size: int = 128,
    first_key: torch.Tensor | None = None,
    *,
    cross_document: bool = False,
    query_index: torch.Tensor | None = None,
    key_index: torch.Tensor | None = None,
):
    """The same mask as :func:`dense_mask` (same arguments), as a FlexAttention ``BlockMask``.

    ``s`` (or the index lengths) need not be a multiple of ``block_size`` (FlexAttention pads
    the last block). With ``query_index`` / ``key_index`` the block mask's query ``i`` / key
    ``j`` is row position ``query_index[i]`` / ``key_index[j]``.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    image_ids = _check_image_ids(document_ids, image_ids)
    b, s = document_ids.shape
    device = document_ids.device
    whole = query_index is None and key_index is None
    queries = _check_index("query_index", query_index, s, device)
    keys = _check_index("key_index", key_index, s, device)
    starts = None if first_key is None else _document_starts(document_ids)
    first_key = None if first_key is None else first_key.to(device)

    def mask_mod(bi, h, qi, ki):
        q, k = (qi, ki) if whole else (queries[qi], keys[ki])
        rule = {"cross_document": cross_document}
        if image_ids is not None:
            rule |= {"img_q": image_ids[bi, q], "img_k": image_ids[bi, k]}
        if first_key is not None:
            rule |= {"first_key_q": first_key[bi, q], "start_k": starts[bi, k]}
        return allowed(q, k, document_ids[bi, q], document_ids[bi, k], **rule)

    return create_block_mask(
        mask_mod,
        B=b,
        H=None,
        Q_LEN=queries.numel(),
        KV_LEN=keys.numel(),
        device=device,
        BLOCK_SIZE=block_size,
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


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` int64: each token's position within its document (0 at every change of id from
    the left, as packing numbers them); padding gets 0, as packing gives it."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    first = torch.where(_document_starts(document_ids), index, torch.zeros_like(index)).cummax(dim=1).values
    return (index - first).masked_fill(document_ids == PAD_DOCUMENT_ID, 0)


def attention_mask_for(
    batch: dict, backend: str, packs_documents: bool, device: torch.device, cross_document: bool = False
):
    """None (plain causal, the fast path), a dense boolean mask, or a FlexAttention BlockMask.

    Transfusion batches (``image_ids``) always get a mask: patches of one image see each other;
    so do batches with caption dropout (``first_key``). ``cross_document`` (``data.attention=causal``):
    the causal mode. None only where the model's layers are built plain causal (a row holds one
    document: ``models/dense.py`` builds them for an arbitrary mask otherwise, and None would then
    mean no mask at all), so cross-document rows get a dense mask too (it also hides padding).
    """
    image_ids, first_key = batch.get("image_ids"), batch.get("first_key")
    if not packs_documents and backend != "flex" and image_ids is None and first_key is None:
        return None
    doc_ids = batch["document_ids"].to(device)
    image_ids = None if image_ids is None else image_ids.to(device)
    first_key = None if first_key is None else first_key.to(device)  # caption dropout (Transfusion)
    if backend == "flex":
        return block_mask(doc_ids, image_ids, first_key=first_key, cross_document=cross_document)
    return dense_mask(doc_ids, image_ids, first_key, cross_document=cross_document)
