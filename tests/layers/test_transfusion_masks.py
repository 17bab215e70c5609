"""The Transfusion mixed mask (causal + bidirectional per image, never across documents).

Every form is checked against a brute-force reading of the rule on token pairs:
``allowed(i, j) = same document and (j <= i or image_ids[i] == image_ids[j] != -1)``
- ``dense_mask`` directly;
- ``block_mask`` by evaluating its ``mask_mod`` on every pair, and by running eager
  FlexAttention with it against SDPA with the dense mask (this also exercises the
  full / partial block split, which ``to_dense()`` alone would not);
- ``attended_keys`` against the key count of the dense mask.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megafusion.accounting import flops
from megafusion.core.modality import Modality
from megafusion.layers import attended_keys as attended
from megafusion.layers.masks import NO_IMAGE, block_mask, dense_mask, image_spans_from_modality

T, I = int(Modality.TEXT), int(Modality.IMAGE)  # noqa: E741  (text / image, as in the diagrams)


def _randint(lo: int, hi: int, gen: torch.Generator) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def random_layout(b: int, s: int, gen: torch.Generator, text_only_rows: tuple[int, ...] = ()):
    """Interleaved text / image rows: ``(document_ids, image_ids, modality_ids)``, each ``[b, s]``.

    Rows pack several documents; each document is a random sequence of text and image runs, so
    images land at row start / end, right after or before a document boundary and back to back
    (distinct explicit ids). Image ids count up along the row. Some rows end in padding (the
    loader's document id -1).
    """
    doc = torch.empty(b, s, dtype=torch.int64)
    img = torch.full((b, s), NO_IMAGE, dtype=torch.int64)
    mod = torch.full((b, s), T, dtype=torch.int64)
    for r in range(b):
        pos, doc_id, image_id = 0, 0, 0
        end = s - (_randint(1, 4, gen) if _randint(0, 2, gen) == 0 else 0)  # sometimes padding
        while pos < end:
            doc_end = min(end, pos + _randint(1, max(1, s // 3), gen))
            doc[r, pos:doc_end] = doc_id
            while pos < doc_end:
                n = min(doc_end - pos, _randint(1, 7, gen))
                if r not in text_only_rows and _randint(0, 1, gen):
                    img[r, pos : pos + n], mod[r, pos : pos + n] = image_id, I
                    image_id += 1
                pos += n
            doc_id += 1
        doc[r, end:] = -1
    return doc, img, mod


def brute_force_blocked(doc: torch.Tensor, img: torch.Tensor | None) -> torch.Tensor:
    """The rule, pair by pair, on Python ints."""
    b, s = doc.shape
    d = doc.tolist()
    m = img.tolist() if img is not None else [[NO_IMAGE] * s for _ in range(b)]
    out = torch.ones(b, 1, s, s, dtype=torch.bool)
    for r in range(b):
        rows = []
        for i in range(s):
            rows.append([not (d[r][i] == d[r][j] and (j <= i or m[r][i] == m[r][j] != NO_IMAGE)) for j in range(s)])
        out[r, 0] = torch.tensor(rows)
    return out


def brute_force_spans(mod: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """Image ids by walking the row: a new image where an image token does not continue a run."""
    out = torch.full(mod.shape, NO_IMAGE, dtype=torch.int64)
    for r in range(mod.shape[0]):
        count, prev_image, prev_doc = -1, False, None
        for i in range(mod.shape[1]):
            is_image, d = int(mod[r, i]) == I, int(doc[r, i])
            if is_image:
                if not (prev_image and d == prev_doc):
                    count += 1
                out[r, i] = count
            prev_image, prev_doc = is_image, d
    return out


def materialise(bm, b: int, s: int) -> torch.Tensor:
    """``True`` = blocked ``[b, 1, s, s]`` from a BlockMask's ``mask_mod`` on every pair."""
    q = torch.arange(s)[:, None]
    kv = torch.arange(s)[None, :]
    h = torch.tensor(0)
    allowed = torch.stack([bm.mask_mod(torch.tensor(r), h, q, kv).expand(s, s) for r in range(b)])
    return ~allowed[:, None]


LAYOUT_SEEDS = range(6)


@pytest.mark.parametrize("seed", LAYOUT_SEEDS)
def test_dense_mask_matches_brute_force_on_random_layouts(seed):
    gen = torch.Generator().manual_seed(seed)
    doc, img, _ = random_layout(5, 40, gen, text_only_rows=(2,))
    assert (img != NO_IMAGE).any(), "the layout must contain images"
    assert torch.equal(dense_mask(doc, img), brute_force_blocked(doc, img))
    # No image ids: exactly the text-only mask, the same as all -1.
    assert torch.equal(dense_mask(doc), brute_force_blocked(doc, None))
    assert torch.equal(dense_mask(doc, torch.full_like(img, NO_IMAGE)), dense_mask(doc))
    # first_query (KV-cached decoding): the trailing rows alone, equal to the brute force's, also
    # with a first_key (caption dropout) hiding some random prefix from some queries.
    first_key = torch.randint(0, 40, (5, 40), generator=gen) * torch.randint(0, 2, (5, 40), generator=gen)
    for start in (0, 1, 17, 39):
        assert torch.equal(dense_mask(doc, img, first_query=start), brute_force_blocked(doc, img)[:, :, start:])
        assert torch.equal(dense_mask(doc, first_query=start), brute_force_blocked(doc, None)[:, :, start:])
        assert torch.equal(
            dense_mask(doc, img, first_key, first_query=start), dense_mask(doc, img, first_key)[:, :, start:]
        )


def test_dense_mask_edge_layouts():
    """Images at row start / end and against document boundaries, adjacent images, padding, reused ids."""
    doc = torch.tensor(
        [
            [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
            [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, -1, -1],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [3, 3, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5],
            [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
        ]
    )
    img = torch.tensor(
        [
            [0, 0, -1, 1, 2, 2, -1, 3, 4, 4, 5, 5],  # start of row, end of doc, start of doc, end of row
            [-1, 0, 0, 1, 1, 2, 2, 2, -1, -1, -1, -1],  # two images back to back, the first after a boundary
            [-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1],  # text only
            [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2],  # every token a patch: whole documents bidirectional
            [-1, 7, 7, 7, -1, -1, 7, 7, 7, -1, -1, -1],  # an id (wrongly) reused in the next document
        ]
    )
    want = brute_force_blocked(doc, img)
    assert torch.equal(dense_mask(doc, img), want)
    assert torch.equal(materialise(block_mask(doc, img, block_size=128), *doc.shape), want)
    assert not (~want)[4, 0, 1:4, 6:9].any(), "a reused image id never crosses a document boundary"
    allowed = ~dense_mask(doc, img)[:, 0]
    assert allowed[3, 2:7, 2:7].all() and not allowed[3, 2:7, 7:].any() and not allowed[3, 7:, 2:7].any()


def test_patch_sees_later_patch_of_its_image_only():
    # doc 0: text, image 0 (3 patches), text, image 1 (2 patches); doc 1: image 2 (2 patches)
    doc = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1]])
    img = torch.tensor([[-1, 0, 0, 0, -1, 1, 1, 2, 2]])
    mod = torch.tensor([[T, I, I, I, T, I, I, I, I]])
    assert torch.equal(image_spans_from_modality(mod, doc), img)
    for allowed in (~dense_mask(doc, img)[0, 0], ~materialise(block_mask(doc, img, block_size=128), 1, 9)[0, 0]):
        q = 1  # the first patch of image 0
        assert allowed[q, 2] and allowed[q, 3], "a patch attends the later patches of its own image"
        assert not allowed[q, 5] and not allowed[q, 6], "but not a later patch of another image"
        assert not allowed[q, 4], "nor later text"
        assert not allowed[q, 7:].any(), "nor anything in another document"
        assert allowed[q, :2].all(), "and causally everything before it in its document"
        assert allowed[6, :7].all(), "a later image sees the earlier image causally"
        assert not allowed[0, 1:].any(), "text before an image stays causal"
        assert not allowed[7, :7].any() and allowed[7, 8], "a document-initial image: own image only"


@pytest.mark.parametrize("s,block", [(256, 128), (200, 128), (96, 32)])
def test_block_mask_equals_dense_mask_and_flex_matches_sdpa(s, block):
    gen = torch.Generator().manual_seed(s)
    b, h, d = 3, 2, 16
    doc, img, _ = random_layout(b, s, gen, text_only_rows=(1,))
    blocked = dense_mask(doc, img)
    bm = block_mask(doc, img, block_size=block)
    assert torch.equal(materialise(bm, b, s), blocked)
    if s % block == 0:  # block level: a block is stored iff some pair in it is allowed
        nb = s // block
        blocks = (~blocked).reshape(b, 1, nb, block, nb, block).any(dim=(3, 5))
        assert torch.equal(bm.to_dense().bool(), blocks)

    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = (torch.randn(b, h, s, d, generator=gen) for _ in range(3))
    got = flex_attention(q, k, v, block_mask=bm)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=~blocked)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    # The image spans really change the output (the test would be vacuous otherwise).
    causal = F.scaled_dot_product_attention(q, k, v, attn_mask=~dense_mask(doc))
    assert not torch.allclose(causal, want, atol=1e-3)


def test_mask_errors_name_the_argument():
    doc = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="image_ids has shape"):
        dense_mask(doc, torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="image_ids must be an integer"):
        dense_mask(doc, torch.zeros(2, 8))
    with pytest.raises(TypeError, match="image_ids"):
        block_mask(doc, 64)  # the old positional block_size
    with pytest.raises(ValueError, match=r"first_query=8 must be in \[0, 8\)"):
        dense_mask(doc, first_query=8)


@pytest.mark.parametrize("seed", LAYOUT_SEEDS)
def test_attended_keys_match_mask_count(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    doc, img, mod = random_layout(4, 64, gen, text_only_rows=(3,))
    want = attended.attended_keys_from_mask(dense_mask(doc, img))
    assert torch.equal(attended.attended_keys(doc, img), want)
    assert torch.equal(attended.attended_keys(doc), attended.attended_keys_from_mask(dense_mask(doc)))
    assert (attended.attended_keys(doc, img) >= attended.attended_keys(doc)).all()

    cfg = flops_cfg()
    stats = flops.batch_flops(cfg, doc, mod, image_ids=img)
    assert stats["attention"] == flops.attention_flops_per_key(cfg) * int(want.sum())
    assert flops.batch_flops(cfg, doc, mod, keys=want) == stats


def test_attended_keys_odd_ids():
    """Ids that reappear (a document or an image id in two documents) and large ids: still the mask's count."""
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 7, 7]])
    img = torch.tensor([[5, 5, -1, 5, 5, -1, 5, 2**40, 2**40, 2**40]])
    want = attended.attended_keys_from_mask(dense_mask(doc, img))
    assert torch.equal(want, attended.attended_keys_from_mask(brute_force_blocked(doc, img)))
    assert torch.equal(attended.attended_keys(doc, img), want)
    assert torch.equal(attended.attended_keys(doc[0], img[0]), want)  # a single row as 1-D
    # One image of n patches in a document of its own: every patch attends all n.
    one_image = torch.zeros(1, 5, dtype=torch.long)
    assert attended.attended_keys(one_image, one_image).tolist() == [[5] * 5]
    with pytest.raises(ValueError, match="not both"):
        flops.batch_flops(flops_cfg(), doc, keys=want, image_ids=img)


def flops_cfg():
    from megafusion.config import Config

    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.vocab_size, m.seq_length = 2, 64, 4, 256, 64
    return cfg


def test_image_spans_from_modality_hand_made():
    cases = [
        # (modality_ids, document_ids, expected image_ids)
        ([T, T, T, T], [0, 0, 0, 0], [-1, -1, -1, -1]),  # text only
        ([I, I, T, I, I], [0, 0, 0, 0, 0], [0, 0, -1, 1, 1]),  # image at row start / end
        ([T, I, I, I, I, T], [0, 0, 0, 1, 1, 1], [-1, 0, 0, 1, 1, -1]),  # a run split by a document boundary
        ([I, I, I, I], [0, 0, 0, 0], [0, 0, 0, 0]),  # back to back = one image
        ([T, I, T, I, T, I], [0, 0, 1, 1, 2, 2], [-1, 0, -1, 1, -1, 2]),  # one image per document
        ([I, T, T, I], [-1, -1, 3, 3], [0, -1, -1, 1]),  # padding ids are just ids
    ]
    for mod, doc, want in cases:
        got = image_spans_from_modality(torch.tensor([mod]), torch.tensor([doc]))
        assert got.dtype == torch.int64 and got.tolist() == [want], (mod, doc)
    with pytest.raises(ValueError, match="modality_ids"):
        image_spans_from_modality(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def test_image_spans_from_modality_random_rows():
    gen = torch.Generator().manual_seed(7)
    doc, _, mod = random_layout(6, 64, gen)
    spans = image_spans_from_modality(mod, doc)
    assert torch.equal(spans, brute_force_spans(mod, doc))
    # Derived ids feed the mask like explicit ones (adjacent explicit images merge into one span here).
    assert torch.equal(dense_mask(doc, spans), brute_force_blocked(doc, spans))


# --- cross-document attention (data.attention=causal) and index subsets ---------------------------


def brute_force_cross(doc: torch.Tensor, img: torch.Tensor | None, first_key: torch.Tensor | None = None):
    """``data.attention=causal``, pair by pair on Python ints (True = blocked): a real query sees every
    real key up to itself and the rest of its own image, a dropped one (``first_key``) only its own
    document's first token and keys from ``first_key`` on; a pad query sees itself only."""
    b, s = doc.shape
    d = doc.tolist()
    m = img.tolist() if img is not None else [[NO_IMAGE] * s for _ in range(b)]
    f = first_key.tolist() if first_key is not None else [[0] * s for _ in range(b)]
    out = torch.ones(b, 1, s, s, dtype=torch.bool)
    for r in range(b):
        starts = {j for j in range(s) if j == 0 or d[r][j] != d[r][j - 1]}
        for i in range(s):
            for j in range(s):
                if d[r][i] == -1:
                    ok = i == j
                else:
                    image = m[r][i] != NO_IMAGE and m[r][i] == m[r][j] and d[r][i] == d[r][j]
                    shown = j >= f[r][i] or (j in starts and d[r][j] == d[r][i])
                    ok = d[r][j] != -1 and (j <= i or image) and shown
                out[r, 0, i, j] = not ok
    return out


def random_first_key(doc: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Caption dropout's shape: some queries hide every key before a random earlier position."""
    b, s = doc.shape
    pos = torch.arange(s).expand(b, s)
    hide = torch.randint(0, 3, (b, s), generator=gen) == 0
    return torch.where(hide, (pos * torch.rand(b, s, generator=gen)).long(), torch.zeros_like(pos))


def materialise_at(bm, b: int, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``materialise`` for a block mask over ``len(queries) x len(keys)`` (its own indices)."""
    q, kv, h = torch.arange(len(queries))[:, None], torch.arange(len(keys))[None, :], torch.tensor(0)
    allowed = torch.stack([bm.mask_mod(torch.tensor(r), h, q, kv).expand(len(queries), len(keys)) for r in range(b)])
    return ~allowed[:, None]


@pytest.mark.parametrize("seed", range(3))
def test_cross_document_mask_matches_brute_force_and_its_properties(seed):
    gen = torch.Generator().manual_seed(200 + seed)
    doc, img, _ = random_layout(4, 36, gen, text_only_rows=(1,))
    doc[2, 30:], img[2, 30:] = -1, NO_IMAGE  # padding ends this row, whatever random_layout drew
    first_key = random_first_key(doc, gen)
    assert (doc == -1).any() and (img != NO_IMAGE).any()
    for image_ids in (img, None):
        want = brute_force_cross(doc, image_ids)
        assert torch.equal(dense_mask(doc, image_ids, cross_document=True), want)
        assert torch.equal(materialise(block_mask(doc, image_ids, block_size=16, cross_document=True), 4, 36), want)
        for start in (1, 20, 35):
            assert torch.equal(dense_mask(doc, image_ids, first_query=start, cross_document=True), want[:, :, start:])
    dropped = brute_force_cross(doc, img, first_key)
    assert torch.equal(dense_mask(doc, img, first_key, cross_document=True), dropped)
    assert torch.equal(materialise(block_mask(doc, img, 16, first_key, cross_document=True), 4, 36), dropped)

    allowed, isolated = ~dense_mask(doc, img, cross_document=True)[:, 0], ~dense_mask(doc, img)[:, 0]
    i, j = torch.arange(36)[:, None], torch.arange(36)[None, :]
    pad_q, pad_k = (doc == -1)[:, :, None], (doc == -1)[:, None, :]
    same_image = (img[:, :, None] == img[:, None, :]) & (img != NO_IMAGE)[:, :, None]
    same_image &= doc[:, :, None] == doc[:, None, :]
    assert not (allowed & (j > i) & ~same_image).any(), "a token attends a later token outside its own image"
    assert torch.equal(allowed & (j > i), same_image & (j > i)), "images are bidirectional inside their span"
    assert not (allowed & pad_k & ~(i == j)).any(), "padding is a key only of itself"
    assert torch.equal(allowed & pad_q, pad_q & (i == j)), "a pad query sees itself only"
    real = ~pad_q & ~pad_k
    assert torch.equal(allowed & real & (j <= i), real & (j <= i)), "every earlier real token, across documents"
    assert torch.equal(isolated & allowed & ~pad_q, isolated & ~pad_q), "causal mode only adds keys to a real query"
    assert (allowed & ~isolated).any(), "and it adds some: other documents"
    # Keys per query, without the s x s mask.
    assert torch.equal(
        attended.attended_keys(doc, img, cross_document=True), attended.attended_keys_from_mask(~allowed[:, None])
    )
    assert torch.equal(
        attended.attended_keys(doc, cross_document=True),
        attended.attended_keys_from_mask(dense_mask(doc, cross_document=True)),
    )


@pytest.mark.parametrize("cross", [False, True])
def test_index_subsets_equal_the_sliced_full_mask(cross):
    """Any rows and columns (a context-parallel rank's share, permuted) from the full row's metadata."""
    gen = torch.Generator().manual_seed(31)
    b, s = 3, 40
    doc, img, _ = random_layout(b, s, gen)
    first_key = random_first_key(doc, gen)
    for queries, keys in [
        (torch.randperm(s, generator=gen)[:13], torch.arange(s)),
        (torch.cat([torch.arange(0, 10), torch.arange(30, 40)]), torch.randperm(s, generator=gen)),  # head-tail
        (torch.tensor([39, 0, 17]), torch.tensor([5, 39, 0, 17, 22])),
    ]:
        for image_ids, fk in [(None, None), (img, None), (img, first_key)]:
            full = dense_mask(doc, image_ids, fk, cross_document=cross)
            want = full[:, :, queries][:, :, :, keys]
            got = dense_mask(doc, image_ids, fk, cross_document=cross, query_index=queries, key_index=keys)
            assert torch.equal(got, want)
            bm = block_mask(doc, image_ids, 8, fk, cross_document=cross, query_index=queries, key_index=keys)
            assert torch.equal(materialise_at(bm, b, queries, keys), want)
    with pytest.raises(ValueError, match="first_query or query_index"):
        dense_mask(doc, first_query=3, query_index=torch.arange(4))
    with pytest.raises(ValueError, match="query_index must be a 1-D integer"):
        dense_mask(doc, query_index=torch.ones(2, 2, dtype=torch.long))


@pytest.mark.parametrize("cross", [False, True])
def test_masked_core_attention_dense_and_block_agree_with_float64(cross):
    """MaskedCoreAttention (what the model runs) with the dense mask (SDPA) and the block mask (eager
    FlexAttention) gives the attention of a float64 reference over the brute-force mask."""
    from types import SimpleNamespace

    from megatron.core.transformer.enums import AttnMaskType

    from megafusion.layers.core_attention import MaskedCoreAttention

    gen = torch.Generator().manual_seed(5)
    b, s, heads, groups, d = 2, 48, 4, 2, 8
    doc, img, _ = random_layout(b, s, gen)
    doc[1, 40:], img[1, 40:] = -1, NO_IMAGE
    blocked = brute_force_cross(doc, img) if cross else brute_force_blocked(doc, img)
    q = torch.randn(s, b, heads, d, generator=gen)
    k, v = (torch.randn(s, b, groups, d, generator=gen) for _ in range(2))
    config = SimpleNamespace(context_parallel_size=1, attention_dropout=0.0, kv_channels=d)
    attention = MaskedCoreAttention(config, 1, AttnMaskType.causal)
    dense = attention(q, k, v, dense_mask(doc, img, cross_document=cross))
    block = attention(q, k, v, block_mask(doc, img, block_size=16, cross_document=cross))
    # float64 reference: softmax over the allowed keys only.
    qd, kd, vd = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(heads // groups, 1), vd.repeat_interleave(heads // groups, 1)
    scores = (qd @ kd.transpose(-1, -2)) * d**-0.5
    ref = torch.softmax(scores.masked_fill(blocked, float("-inf")), -1) @ vd
    ref = ref.permute(2, 0, 1, 3).reshape(s, b, -1)
    for got in (dense, block):
        assert (got.double() - ref).abs().max() < 1e-6
    other = brute_force_blocked(doc, img) if cross else brute_force_cross(doc, img)
    assert (
        torch.softmax(scores.masked_fill(other, float("-inf")), -1) @ vd - ref.view(s, b, heads, d).permute(1, 2, 0, 3)
    ).abs().max() > 1e-2
