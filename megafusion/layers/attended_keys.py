"""How many keys each query attends under the masks of :mod:`megafusion.layers.masks`, counted
from the per-token metadata without building the ``s x s`` mask (FLOPs accounting and tests)."""

from __future__ import annotations

import torch

from megafusion.core.modality import NO_IMAGE, PAD_DOCUMENT_ID


def _rank_in_group(*columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For flat int64 columns of equal length: each element's 1-based rank among the elements with
    the same tuple of values (in original order), and the size of that group.

    ``torch.unique(dim=0)`` numbers the groups (no arithmetic key, so ids of any size cannot
    overflow); a stable sort keeps original order inside a group, so the rank is the position
    in the sorted order minus the group's first position.
    """
    group = torch.unique(torch.stack(columns, dim=1), dim=0, return_inverse=True)[1]
    order = torch.sort(group, stable=True).indices
    sorted_group = group[order]
    idx = torch.arange(group.numel(), dtype=torch.int64, device=group.device)
    new_group = torch.ones_like(sorted_group, dtype=torch.bool)
    new_group[1:] = sorted_group[1:] != sorted_group[:-1]
    group_start = torch.cummax(torch.where(new_group, idx, torch.zeros_like(idx)), dim=0).values
    rank = torch.empty_like(idx)
    rank[order] = idx - group_start + 1
    size = torch.bincount(group)[group]
    return rank, size


def attended_keys(
    document_ids: torch.Tensor, image_ids: torch.Tensor | None = None, cross_document: bool = False
) -> torch.Tensor:
    """Keys each query attends under the mask of :mod:`megafusion.layers.masks`: ``[b, s]`` int64.

    Isolated (the default): query i attends key j iff ``document_ids[j] == document_ids[i]`` and
    (j <= i, or both are patches of one image: ``image_ids[i] == image_ids[j] != -1``). So the
    count is

        (tokens of i's document up to and including i)
        + (patches of i's image in i's document that come after i),

    i.e. its position within the document + 1 for contiguous packed documents, plus the rest of
    its image; still exact if a document or image id reappears later in the row.
    ``cross_document`` (the causal mode): the first term becomes the non-padding tokens of the
    row up to and including i (its row position + 1 when no padding comes before it); a padding
    query attends itself only (1).
    ``image_ids=None`` (or all -1) is the text-only mask. Vectorised, no ``s x s`` tensor: a
    stable sort per (row, document) and per (row, document, image) gives ranks and group sizes,
    O(b s log(b s)).
    """
    doc = torch.as_tensor(document_ids).to(torch.int64)
    if doc.dim() == 1:
        doc = doc[None]
    b, s = doc.shape
    if image_ids is not None:
        img = torch.as_tensor(image_ids).to(device=doc.device, dtype=torch.int64)
        if img.numel() != doc.numel():
            raise ValueError(
                f"image_ids has shape {tuple(img.shape)}, document_ids {tuple(doc.shape)}: both must be [b, s]"
            )
        img = img.reshape(b, s)
    if doc.numel() == 0:
        return torch.zeros(b, s, dtype=torch.int64, device=doc.device)
    row = torch.arange(b, dtype=torch.int64, device=doc.device)[:, None].expand(b, s).reshape(-1)
    if cross_document:
        counts = (doc != PAD_DOCUMENT_ID).to(torch.int64).cumsum(dim=1).reshape(-1)
    else:
        counts, _ = _rank_in_group(row, doc.reshape(-1))
    if image_ids is not None:
        flat_img = img.reshape(-1)
        rank, size = _rank_in_group(row, doc.reshape(-1), flat_img)
        is_patch = flat_img != NO_IMAGE
        counts = counts + torch.where(is_patch, size - rank, torch.zeros_like(rank))
    if cross_document:
        counts = torch.where(doc.reshape(-1) == PAD_DOCUMENT_ID, torch.ones_like(counts), counts)
    return counts.view(b, s)


def attended_keys_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Keys per query from a boolean mask ``[b, 1, s, s]`` in megatron's convention (True = blocked)."""
    return (~mask.bool()).sum(-1).squeeze(1).to(torch.int64)
