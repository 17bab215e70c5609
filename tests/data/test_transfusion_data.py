"""Transfusion data: placeholders in the token stream, latents beside it, aligned through packing and loading."""

from __future__ import annotations

import numpy as np
import pytest

from megafusion.core.errors import DataError
from megafusion.core.modality import Modality
from megafusion.data.builtin.shapes import shapes_documents
from megafusion.data.codecs.latent import PixelLatentCodec
from megafusion.data.codecs.pixel import resize_nearest
from megafusion.data.loader import MicrobatchSource
from megafusion.data.packing import pack_documents
from megafusion.data.tokenizers.joint import MultimodalTokenizer, train_sentencepiece
from megafusion.data.transfusion_data import PlaceholderCodec, encode_transfusion_document
from megafusion.data.types import Document, ImageSegment, TextSegment


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    docs = shapes_documents(40, seed=0, image_size=12)
    two = Document([TextSegment("two pictures."), docs[0].segments[-1], docs[1].segments[-1]], source="two")
    docs = [two, *docs]
    texts = [seg.text for d in docs for seg in d.segments if isinstance(seg, TextSegment)]
    sp = train_sentencepiece(texts, 64, str(tmp_path_factory.mktemp("sp") / "sp"))
    latent = PixelLatentCodec(12)
    tok = MultimodalTokenizer.from_files(sp, PlaceholderCodec(latent, patch_size=3))
    return docs, tok, latent


def test_document_has_placeholders_and_its_latents(setup):
    docs, tok, latent = setup
    encoded = encode_transfusion_document(tok, docs[0])
    image_tokens = encoded.modalities == Modality.IMAGE
    assert image_tokens.sum() == 2 * 16  # two 12x12 images, 3x3 patches of the 12x12 latent
    assert set(encoded.tokens[image_tokens]) == {tok.image_offset}  # one placeholder id
    assert encoded.meta["latents"].shape == (2, 3, 12, 12)
    np.testing.assert_array_equal(latent.decode(encoded.meta["latents"][1]), docs[0].segments[2].pixels)
    with pytest.raises(DataError, match="patch size that divides"):
        PlaceholderCodec(latent, patch_size=5)


def test_microbatch_latents_follow_image_ids_and_images_leave_the_lm_loss(setup):
    docs, tok, latent = setup
    encoded = [encode_transfusion_document(tok, d) for d in docs]
    rows = pack_documents(encoded, 95, tok.pad_id)
    assert len(rows.latents) == rows.num_rows
    source = MicrobatchSource(rows, seed=3)
    batch = source.microbatch(0, 4)
    ids, lat = batch["image_ids"], batch["latents"]
    counts = (ids.max(dim=1).values + 1).tolist()
    assert lat.shape[0] == sum(counts) > 0
    # The k-th image of a row is the latent at the row's offset + k; its pixels are an image
    # of the documents packed in that row.
    all_images = {
        resize_nearest(seg.pixels, 12, 12).tobytes()
        for d in docs
        for seg in d.segments
        if isinstance(seg, ImageSegment)
    }
    for image in lat:
        assert latent.decode(image.numpy()).tobytes() in all_images
    for row, n in enumerate(counts):
        for k in range(n):
            span = (ids[row] == k).nonzero().flatten()
            assert len(span) == 16 and (span.diff() == 1).all()
            assert batch["tokens"][row, span[0] - 1] == tok.boi_id
            assert batch["tokens"][row, span[-1] + 1] == tok.eoi_id
    image = int(Modality.IMAGE)
    image_related = (batch["modality_ids"] == image) | (batch["label_modality_ids"] == image)
    assert image_related.any() and (batch["loss_mask"][image_related] == 0).all()
    text_pairs = ~image_related & (batch["document_ids"] >= 0)
    assert batch["loss_mask"][text_pairs].sum() > 0


def test_latents_keep_the_order_of_the_images(setup):
    docs, tok, latent = setup
    rows = pack_documents([encode_transfusion_document(tok, docs[0])], 95, tok.pad_id)
    batch = MicrobatchSource(rows, seed=0).microbatch(0, 1)
    assert batch["image_ids"].max() == 1
    for k, seg in enumerate(docs[0].segments[1:]):
        np.testing.assert_array_equal(latent.decode(batch["latents"][k].numpy()), seg.pixels)


def test_inconsistent_latents_are_refused(setup):
    docs, tok, _ = setup
    rows = pack_documents([encode_transfusion_document(tok, d) for d in docs[:3]], 95, tok.pad_id)
    rows.latents[0] = rows.latents[0][:-1]
    with pytest.raises(DataError, match="latents; the dataset is inconsistent"):
        MicrobatchSource(rows, seed=0).microbatch(0, rows.num_rows)


def test_images_without_a_caption_before_them_get_capped_noise(setup):
    import torch

    from megafusion.objectives.diffusion import NoiseSchedule
    from megafusion.objectives.transfusion import captioned, noised_images

    docs, tok, _ = setup
    picture = docs[0].segments[1]
    image_first = Document([picture, TextSegment("a caption after the image.")], source="first")
    rows = pack_documents([encode_transfusion_document(tok, d) for d in [image_first, docs[0]]], 95, tok.pad_id)
    batch = MicrobatchSource(rows, seed=0).microbatch(0, 1)
    batch["sample_ids"] = torch.tensor([0])
    assert [captioned(batch, 0, k) for k in range(3)] == [False, True, True]
    schedule = NoiseSchedule("cosine", 1000)
    capped = []
    for seed in range(20):
        images, _ = noised_images(batch, schedule, seed, torch.device("cpu"), uncaptioned_max_t=10)
        capped.append(images.timesteps.tolist())
    assert all(t[0] <= 10 for t in capped)
    assert max(t[1] for t in capped) > 10  # captioned images are not capped


def test_caption_dropout_hides_the_caption_from_dropped_images_only(setup):
    import torch

    from megafusion.layers.attended_keys import attended_keys_from_mask
    from megafusion.layers.masks import block_mask, dense_mask
    from megafusion.objectives.transfusion import attended_keys, caption_dropout

    docs, tok, _ = setup
    rows = pack_documents([encode_transfusion_document(tok, d) for d in docs], 95, tok.pad_id)
    batch = MicrobatchSource(rows, seed=0).microbatch(0, 8)
    batch["sample_ids"] = torch.arange(8)
    assert torch.equal(caption_dropout(batch, 1, 0.0), torch.zeros_like(batch["image_ids"]))
    first_key = caption_dropout(batch, 1, 0.5)
    assert torch.equal(first_key, caption_dropout(batch, 1, 0.5))  # keyed, not random per call
    batch["first_key"] = first_key
    dropped = first_key > 0
    patches = dropped & (batch["image_ids"] >= 0)
    assert patches.any()
    # Besides the patches, one position per dropped image: its <boi>, which sees <bos> and itself.
    rows, cols = (dropped & ~patches).nonzero(as_tuple=True)
    assert (batch["tokens"][rows, cols] == tok.boi_id).all() and torch.equal(first_key[rows, cols], cols)
    assert {(r, int(first_key[r, c])) for r, c in patches.nonzero().tolist()} == set(zip(rows.tolist(), cols.tolist()))

    doc, img = batch["document_ids"], batch["image_ids"]
    mask = dense_mask(doc, img, first_key)
    plain = dense_mask(doc, img)
    b, s = doc.shape
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    for r in range(b):  # brute force: the rule of dense_mask's docstring
        for i in range(s):
            for j in range(s):
                hidden = first_key[r, i] > 0 and j < first_key[r, i] and not starts[r, j]
                assert bool(mask[r, 0, i, j]) == (bool(plain[r, 0, i, j]) or hidden)
    # Through any chain of layers: everything a dropped patch reads, directly or through what it
    # reads, is its document's first token, its <boi> or its image (the transitive closure). With
    # cross-document attention (data.attention=causal) that first token has read the earlier
    # documents of the row, so they are reached too: never its own caption, nor a later token.
    from megafusion.objectives.registry import get_objective

    assert (doc.amax(dim=1) > 0).all(), "rows of several documents: the cross-document closure is not vacuous"
    for cross in (False, True):
        mask = dense_mask(doc, img, first_key, cross_document=cross)
        allowed = (~mask[:, 0]).float()  # 0/1 products and sums of at most s terms: exact in fp32 (BLAS)
        reach = allowed.clone()
        while True:
            grown = ((reach + reach @ allowed) > 0).float()
            if torch.equal(grown, reach):
                break
            reach = grown
        for r, i in patches.nonzero().tolist():
            boi = int(first_key[r, i])
            own = starts[r] & (doc[r] == doc[r, i])
            own[boi:] |= (img[r, boi:] == img[r, i]) | (torch.arange(s - boi) == 0)
            if cross:
                own |= (torch.arange(s) < int(own.nonzero()[0])) & (doc[r] != -1)  # what its <bos> read
            assert reach[r, i].bool().equal(own), f"row {r}: dropped patch {i} reaches past its <bos> <boi> image"
        assert torch.equal(attended_keys(batch, cross), attended_keys_from_mask(mask))
        if not cross:  # the block mask of the causal mode: tests/layers/test_transfusion_masks.py
            flex = block_mask(doc, img, block_size=32, first_key=first_key)
            q, kv = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
            for r in range(b):
                assert torch.equal(flex.mask_mod(torch.tensor(r), torch.tensor(0), q, kv), ~mask[r, 0])
        # The LM objective's caption dropout (images causal) counts its mask's keys too.
        lm_keys = get_objective("lm").flops_inputs({"document_ids": doc, "first_key": first_key}, cross)["keys"]
        assert torch.equal(lm_keys, attended_keys_from_mask(dense_mask(doc, None, first_key, cross_document=cross)))
