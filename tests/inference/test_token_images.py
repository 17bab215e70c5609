"""Generation with discrete image tokens (the Chameleon setting, ``objective.name=lm``):
:class:`megafusion.inference.token_images.TokenImageGenerator` on tiny models built in this process
(random weights, a SentencePiece model trained on a few captions, 4x4-pixel images of 4 codes).

- the KV cache changes nothing: greedy generation (text, then an image under guidance, then text)
  gives the same tokens with and without it, and so does sampling with one seed; over a prompt of
  several documents too, in each ``data.attention`` / ``data.positions`` mode, whose full forward
  is the training forward of that row;
- outside images only text ids and ``<boi>`` are generated, even when image ids and ``<eoi>`` are
  made the most likely; every image is ``<boi>``, exactly ``tokens_per_image`` image ids, ``<eoi>``;
- the unconditional view reads no caption at any layer: its logits at the image positions are
  bit-identical under another caption of the same length (dense and MoT, 1, 2 and 4 layers), the
  conditional view's are not; it is the view LM caption dropout trains (the same mask);
- top-k / top-p keep exactly the ids they should, and draws never leave them.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from megafusion.config import Config
from megafusion.data.codecs.pixel import PixelPatchCodec
from megafusion.data.tokenizers.joint import MultimodalTokenizer, train_sentencepiece
from megafusion.data.tokenizers.text import load_text_tokenizer
from megafusion.data.types import ImageSegment
from megafusion.inference.decoding import Sequence
from megafusion.inference.sampling import restrict, sample_token
from megafusion.inference.token_images import TokenImageGenerator
from megafusion.models.transformer_config import build_transformer_config
from megafusion.objectives.build import build_model_chunks

CAPTIONS = ["a red circle at the top left.", "a blue square at the bottom right.", "a green triangle in the middle."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = train_sentencepiece(CAPTIONS * 4, 48, str(tmp_path_factory.mktemp("tok") / "sp"))
    return MultimodalTokenizer(load_text_tokenizer(path), PixelPatchCodec(image_size=4, patch_size=2, levels=2))


def generator(runtime, tokenizer, arch: str = "dense", layers: int = 2, kv_cache: bool = True, seed: int = 0):
    """``arch`` a family, or ``moma+mod``: MoMa 2t2i with MoD on layer 1, both with (untrained) auxiliary
    routers, which generation routes by."""
    cfg = Config()
    m = cfg.model
    if arch == "moma+mod":
        arch = "moma"
        cfg.moe.experts, cfg.moe.aux_router = {"text": 2, "image": 2}, True
        cfg.mod.capacity, cfg.mod.aux_router = 0.5, True
    m.arch, m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = arch, layers, 32, 4, 2
    m.ffn_hidden_size, m.vocab_size, m.seq_length, m.init_std = 64, 128, 64, 0.2
    torch.manual_seed(seed)
    model = build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime)[0].eval()
    return TokenImageGenerator(cfg, runtime, tokenizer, model, kv_cache)


def options(**kw):
    base = dict(image=True, max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0, cfg=2.0)
    return argparse.Namespace(**{**base, **kw})


def spans_of(tok, tokens: list[int]) -> list[tuple[int, int]]:
    """(boi, eoi) positions of each image, checked: nothing but image ids between them."""
    spans, i = [], 0
    while i < len(tokens):
        if tokens[i] == tok.boi_id:
            end = i + 1 + tok.codec.tokens_per_image
            assert all(tok.image_offset <= t < tok.vocab_size for t in tokens[i + 1 : end]), tokens[i:end]
            assert tokens[end] == tok.eoi_id, f"no <eoi> right after the image at {i}: {tokens[i : end + 1]}"
            spans.append((i, end))
            i = end + 1
        else:
            assert tokens[i] < tok.text_vocab_size, f"position {i}: {tokens[i]} is not a text id"
            i += 1
    return spans


@pytest.mark.parametrize("arch", ["dense", "mot", "moma+mod"])
def test_the_kv_cache_gives_the_same_tokens_as_recomputing(runtime, tokenizer, arch):
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=5)):  # greedy, and one seed's draws
        runs = []
        for cache in (True, False):
            g = generator(runtime, tokenizer, arch, layers=2, kv_cache=cache)
            seq, text_ids, images = g.sample(CAPTIONS[0], options(**kw), torch.Generator().manual_seed(3))
            runs.append((seq.tokens, text_ids, images))
        (tokens, text, images), (tokens_ref, text_ref, images_ref) = runs
        assert tokens == tokens_ref, kw
        assert text == text_ref and len(images) == len(images_ref) == 1
        assert all(np.array_equal(a, b) for a, b in zip(images, images_ref))
        # Text after the image (the cache's keys of the image and <eoi> are read).
        assert len(tokens) > len(tokenizer.encode_text(CAPTIONS[0])) + 1 + tokenizer.codec.tokens_per_image + 2


def test_cached_logits_equal_recomputed_ones_in_both_views(runtime, tokenizer):
    """Logits, not only argmaxes: every image position, conditional and caption-hidden, then text."""
    g = generator(runtime, tokenizer, "mot", layers=2)
    tok = g.tokenizer
    prompt = [tok.bos_id, *tok.encode_text(CAPTIONS[1]), tok.boi_id]
    codes = [tok.image_offset + c for c in (3, 0, 7, 5)]
    boi = len(prompt) - 1
    cond, hidden = g.new_cache(), g.new_cache()
    seq = Sequence(list(prompt), [(boi + 1, boi + 1 + len(codes))])
    g._forward(seq.prefix(boi), 0, cond)
    g._forward(seq.prefix(boi), 0, hidden)
    for j, code in enumerate([*codes, tok.eoi_id, *tok.encode_text("a")]):
        start = len(seq.tokens) - 1
        for cache, hide in ((cond, None), (hidden, 0)):
            got, want = g._forward(seq, start, cache, hide)[0], g._forward(seq, 0, None, hide)[0]
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < 1e-5, f"step {j} hide={hide}: cached differs from recomputed by {err:.2e}"
        seq.tokens.append(code)


@pytest.mark.parametrize("attention,positions", [("isolated", "row"), ("causal", "row"), ("causal", "document")])
def test_a_multi_document_prompt_follows_the_models_attention_with_and_without_the_cache(
    runtime, tokenizer, attention, positions
):
    """Earlier documents (one with an image) before the prompt's: the full forward is the training
    forward of that row (data.attention's mask, data.positions' RoPE), the cache gives its logits in
    both views (1e-5), and only cross-document attention lets the earlier documents matter."""
    import contextlib

    from megafusion.layers.masks import attention_mask_for, document_positions
    from megafusion.models.token_positions import token_positions

    g = generator(runtime, tokenizer, "dense", layers=2)
    g.cfg.data.attention, g.cfg.data.positions = attention, positions
    g.cfg.model.seq_length = 128  # the KV cache's slots: room for three documents
    tok = g.tokenizer
    old = [tok.image_offset + c for c in (1, 4, 6, 2)]
    first = [tok.bos_id, *tok.encode_text(CAPTIONS[0]), tok.boi_id, *old, tok.eoi_id, tok.eos_id]
    earlier = [*first, tok.bos_id, *tok.encode_text(CAPTIONS[2]), tok.eos_id]
    prompt = [tok.bos_id, *tok.encode_text(CAPTIONS[1]), tok.boi_id]
    codes = [tok.image_offset + c for c in (3, 0, 7, 5)]
    boi = len(earlier) + len(prompt) - 1
    spans = [(first.index(tok.boi_id) + 1, first.index(tok.eoi_id)), (boi + 1, boi + 1 + len(codes))]
    seq = Sequence([*earlier, *prompt, *codes, tok.eoi_id, *tok.encode_text("a")], spans)

    # The full forward is the training forward of the same row.
    documents = g._documents(seq)
    assert documents.max() == 2 and documents[0, len(first)] == 1
    image_ids, mask = g._view(seq, 0, None)
    logits = g._run(seq, 0, None, mask, image_ids)
    batch = {"tokens": torch.tensor([seq.tokens]), "document_ids": documents}
    batch["position_ids"] = document_positions(documents)
    train_mask = attention_mask_for(
        batch, g.cfg.model.attention_backend, True, torch.device("cpu"), attention == "causal"
    )
    by_document = positions == "document"
    with torch.no_grad(), token_positions(batch["position_ids"]) if by_document else contextlib.nullcontext():
        want = g.model(batch["tokens"], batch["position_ids"], train_mask, labels=None)
    assert torch.equal(logits, want)

    # The cache, token by token from the prompt's <boi>, in both views.
    cond, hidden = g.new_cache(), g.new_cache()
    step = Sequence(seq.tokens[: boi + 1], spans)
    g._forward(step.prefix(boi), 0, cond)
    g._forward(step.prefix(boi), 0, hidden)
    for j, token in enumerate(seq.tokens[boi + 1 :]):
        start = len(step.tokens) - 1
        for cache, hide in ((cond, None), (hidden, 1)):
            got, full = g._forward(step, start, cache, hide)[0], g._forward(step, 0, None, hide)[0]
            err = ((got - full).abs().max() / full.abs().max()).item()
            assert err < 1e-5, f"step {j} hide={hide}: cached differs from recomputed by {err:.2e}"
        step.tokens.append(token)

    # The earlier documents change the prompt's logits only with cross-document attention.
    alone = Sequence(seq.tokens[len(earlier) :], [(a - len(earlier), b - len(earlier)) for a, b in spans[1:]])
    own = logits[0, len(earlier) :]
    image_ids, mask = g._view(alone, 0, None)
    by_itself = g._run(alone, 0, None, mask, image_ids)[0]
    gap = ((own - by_itself).abs().max() / by_itself.abs().max()).item()
    assert (gap > 1e-3) if attention == "causal" else (gap < 1e-5), gap


def test_outside_images_only_text_and_boi_and_every_image_is_whole(runtime, tokenizer):
    g = generator(runtime, tokenizer, "dense", layers=2)
    tok = g.tokenizer
    forward = g._forward

    def tempting(seq, start, cache, hide=None):
        # Make image ids and <eoi> the most likely tokens everywhere: only the restriction keeps
        # them out of text.
        logits, extra = forward(seq, start, cache, hide)
        logits = logits.clone()
        logits[tok.image_offset : tok.vocab_size] += 100.0
        logits[tok.eoi_id] += 100.0
        return logits, extra

    g._forward = tempting
    args = options(temperature=1.0, max_new_tokens=40, image=True)
    seq, text_ids, images = g.sample(CAPTIONS[2], args, torch.Generator().manual_seed(0))
    assert all(t < tok.text_vocab_size for t in text_ids)
    spans = spans_of(tok, seq.tokens)
    assert len(spans) == len(images) >= 1 and [(a + 1, b) for a, b in spans] == seq.spans
    # The tokenizer's own decoder agrees: whole images, each the codec's decoding of its codes.
    decoded = [s.pixels for s in tok.decode(seq.tokens) if isinstance(s, ImageSegment)]
    assert len(decoded) == len(images) and all(np.array_equal(a, b) for a, b in zip(decoded, images))
    # Control: the tempted logits do prefer an image id outside an image.
    text_logits = tempting(seq.prefix(len(tok.encode_text(CAPTIONS[2])) + 1), 0, None)[0]
    assert int(text_logits[: tok.vocab_size].argmax()) >= tok.image_offset


@pytest.mark.parametrize("arch", ["dense", "mot"])
@pytest.mark.parametrize("layers", [1, 2, 4])
def test_the_unconditional_view_reads_no_caption_at_any_depth(runtime, tokenizer, arch, layers):
    g = generator(runtime, tokenizer, arch, layers)
    tok = g.tokenizer
    caption = tok.encode_text(CAPTIONS[0])
    other = caption[::-1] if caption[::-1] != caption else caption[1:] + caption[:1]  # same length, other text
    codes = [tok.image_offset + c for c in (1, 6, 2, 4)]

    def image_position_logits(text, hide):
        prompt = [tok.bos_id, *text, tok.boi_id]
        seq = Sequence([*prompt, *codes, tok.eoi_id], [(len(prompt), len(prompt) + len(codes))])
        image_ids, mask = g._view(seq, 0, hide)
        logits = g._run(seq, 0, None, mask, image_ids)[0]
        return logits[len(prompt) - 1 : len(prompt) + len(codes) - 1]  # <boi> and the image: predict the codes

    hidden = image_position_logits(caption, 0)
    assert torch.equal(image_position_logits(other, 0), hidden)
    conditional = image_position_logits(caption, None)
    assert (image_position_logits(other, None) - conditional).abs().max() > 1e-4  # control: the caption is read
    assert (conditional - hidden).abs().max() > 1e-4


def test_the_unconditional_view_is_what_lm_caption_dropout_trains(runtime, tokenizer):
    """prepare_step of the LM objective drops a captioned image with the mask the generator hides with."""
    from megafusion.config import apply_overrides
    from megafusion.layers.attended_keys import attended_keys_from_mask
    from megafusion.layers.masks import attention_mask_for
    from megafusion.objectives.registry import get_objective

    g = generator(runtime, tokenizer, "dense", 2)
    tok = g.tokenizer
    prompt = [tok.bos_id, *tok.encode_text(CAPTIONS[1]), tok.boi_id]
    codes = [tok.image_offset + c for c in (2, 2, 5, 1)]
    seq = Sequence([*prompt, *codes, tok.eoi_id, tok.eos_id], [(len(prompt), len(prompt) + len(codes))])
    s = len(seq.tokens)
    modality = torch.zeros(1, s, dtype=torch.int64)
    modality[0, len(prompt) : len(prompt) + len(codes)] = 1
    batch = {
        "tokens": torch.tensor([seq.tokens]),
        "document_ids": torch.zeros(1, s, dtype=torch.int64),
        "modality_ids": modality,
        "sample_ids": torch.tensor([0]),
    }
    cfg = apply_overrides(Config(), ["objective.caption_dropout=0.999999"])
    lm = get_objective(cfg.objective.name)
    assert lm.image_tokens and not lm.image_latents
    lm.prepare_step(cfg, None, 0, [batch], training=True)
    backend, cpu = Config().model.attention_backend, torch.device("cpu")
    train_mask = attention_mask_for(batch, backend, True, cpu)
    assert torch.equal(train_mask, g._view(seq, 0, 0)[1].cpu())
    # FLOPs accounting counts the keys of that mask.
    assert torch.equal(lm.flops_inputs(batch)["keys"], attended_keys_from_mask(train_mask))
    # Control: without dropout (and in evaluation) the batch keeps no mask key, as before.
    plain = {k: v for k, v in batch.items() if k != "first_key"}
    lm.prepare_step(Config(), None, 0, [plain], training=True)
    lm.prepare_step(cfg, None, 0, [plain], training=False)
    assert "first_key" not in plain
    assert not torch.equal(attention_mask_for(plain, backend, True, cpu), train_mask)


def test_top_k_and_top_p_keep_exactly_their_ids(runtime):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=gen)
    order = torch.argsort(logits, descending=True)
    for k in (1, 3, 10):
        kept = torch.isfinite(restrict(logits, top_k=k)).nonzero().flatten()
        assert set(kept.tolist()) == set(order[:k].tolist())
    for p in (0.05, 0.5, 0.9, 0.999):
        kept = torch.isfinite(restrict(logits, top_p=p)).nonzero().flatten()
        assert set(kept.tolist()) == nucleus(logits, p), p
    both = torch.isfinite(restrict(logits, top_k=10, top_p=0.5)).nonzero().flatten()
    # top-p over what top-k kept, renormalised (a smaller set than either alone here)
    top10 = torch.where(torch.isin(torch.arange(50), order[:10]), logits, float("-inf"))
    assert set(both.tolist()) == nucleus(top10, 0.5) < nucleus(logits, 0.5)
    # Draws never leave the support; without the restriction they do (the control).
    args = argparse.Namespace(temperature=1.0, top_k=0, top_p=1.0)
    for kw, support in ((dict(top_k=3), set(order[:3].tolist())), (dict(top_p=0.5), nucleus(logits, 0.5))):
        draws = {sample_token(logits, argparse.Namespace(**{**vars(args), **kw}), gen) for _ in range(300)}
        assert draws <= support and len(draws) > 1, (kw, draws, support)
        assert {sample_token(logits, args, gen) for _ in range(300)} - support
    assert sample_token(logits, argparse.Namespace(temperature=0.0, top_k=0, top_p=1.0), gen) == int(order[0])


def nucleus(logits: torch.Tensor, p: float) -> set[int]:
    """Reference top-p set, in float64: the fewest most likely ids whose probabilities reach ``p``."""
    probs = torch.softmax(logits.double(), -1)
    order = torch.argsort(probs, descending=True)
    n = int((torch.cumsum(probs[order], -1) < p).sum()) + 1
    return set(order[:n].tolist())


def test_top_k_1_samples_the_greedy_image(runtime, tokenizer):
    g = generator(runtime, tokenizer, "dense", 2)
    greedy = g.sample(CAPTIONS[0], options(temperature=0.0), torch.Generator().manual_seed(1))[0].tokens
    top1 = g.sample(CAPTIONS[0], options(temperature=5.0, top_k=1), torch.Generator().manual_seed(1))[0].tokens
    hot = g.sample(CAPTIONS[0], options(temperature=5.0), torch.Generator().manual_seed(1))[0].tokens
    assert top1 == greedy
    assert hot != greedy  # control: at that temperature the draws do differ from the argmax
