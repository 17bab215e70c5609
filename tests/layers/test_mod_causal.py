"""Mixture-of-Depths' auxiliary routers (``mod.aux_router``), causal routing and KV-cached decoding,
in one process (MoD on dense, on MoT, and MoMa + MoD with MoMa's auxiliary routers too).

- Causality: under causal routing, changing the tokens after position ``i`` leaves every logit at
  positions ``<= i`` bit-identical (batch of 1 and 2, with padding, 3 layers of which 2 are MoD);
  control: the teacher-forced top-k selection over the same rows changes an earlier logit.
- Batch invariance: a sequence's causal logits are bit-identical alone and batched with another
  (dense, MoT, MoMa with shared or untied attention; MoT without MoD too).
- Causal picks are the auxiliary router's predictions (float64 reference: score > 0.5, never
  padding); the auxiliary routers are used: zeroing them changes the causal logits (no token runs
  a MoD layer then).
- Stop-gradient: adding MoD's auxiliary loss leaves every main-model gradient bit-identical to the
  model without auxiliary routers (same weights); control: without the detach they differ.
- KV-cached greedy decoding under causal routing equals recomputing the whole sequence (1e-5,
  relative to the largest logit) and picks the same tokens; each MoD layer's cache holds exactly
  the tokens its auxiliary router routed into it (fewer than all of them: not "every token through
  every block"); a step whose token skips a layer leaves that layer's cache bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from megafusion.core.modality import PAD_DOCUMENT_ID
from megafusion.layers import aux_router as aux_module
from megafusion.layers import expert_choice_layer, mod_layer, modality_linear
from megafusion.layers.aux_router import aux_routers_of, take_stats
from megafusion.layers.masks import dense_mask
from megafusion.layers.mod_layer import MoDLayerMixin, cache_lengths
from megafusion.layers.routing import ModalityRouting, modality_routing
from megafusion.models.registry import causal_routing
from tests.causal_helpers import NUM_MODALITIES, assert_causal_and_control_leaks, aux_model, logits_of, routing_of
from tests.causal_helpers import make_batch as _make_batch
from tests.layers.test_mod import mod_cfg
from tests.models.test_mot import build

S = 24
ARCHS = ["dense", "mot", "moma"]


def make_batch(b: int, seed: int = 0, pad: int = 0) -> dict:
    return _make_batch(b, S, seed, pad)


def aux_cfg(arch: str, layers: int = 3, aux: bool = True):
    cfg = mod_cfg(arch, capacity=0.5, every=2, layers=layers)  # layers 1 and 3 are MoD layers
    cfg.model.seq_length = S
    cfg.mod.aux_router = aux
    if arch == "moma":
        cfg.moe.aux_router = aux
    return cfg


def mod_layers(model) -> list:
    return [layer for layer in model.decoder.layers if isinstance(layer, MoDLayerMixin)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rows,pad", [(1, 0), (2, 0), (2, 5)])
def test_causal_routing_is_causal_and_top_k_is_not(runtime, arch, rows, pad):
    # Control: the teacher-forced top-k ranks each token against the later ones of its row.
    assert_causal_and_control_leaks(aux_model(runtime, aux_cfg(arch)), make_batch(rows, pad=pad), (4, 9, 15), arch)


@pytest.fixture
def one_thread():
    """One CPU thread (as under pytest-xdist), where the controls below are known to show."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch,untie", [("dense", "all"), ("mot", "all"), ("moma", "none"), ("moma", "all")])
def test_a_sequence_alone_and_batched_is_bit_identical(runtime, arch, untie, one_thread, monkeypatch):
    # MoT's (and MoMa's untied) per-modality linears group each modality's rows of the whole
    # microbatch: under causal routing those groups are padded to 16 rows (modality_linear).
    cfg = aux_cfg(arch)
    cfg.model.untie = untie
    model = aux_model(runtime, cfg)
    pair = few_images_first(make_batch(2, seed=3, pad=4))
    alone = {k: v[:1] for k, v in pair.items()}
    both = logits_of(model, pair, True)
    assert torch.equal(both[:1], logits_of(model, alone, True))
    last = {k: v[1:] for k, v in pair.items()}
    assert torch.equal(both[1:, : S - 4], logits_of(model, last, True)[:, : S - 4])
    # Control: with the MoD router's fp32 matrix-vector product and sigmoid (a token's result
    # depends on its index there) and unbucketed row counts, the other row changes this one's logits.
    monkeypatch.setattr(MoDLayerMixin, "_logits", lambda self, x, causal: self.router_logits(x))
    monkeypatch.setattr(MoDLayerMixin, "_weights", staticmethod(lambda logits, causal: torch.sigmoid(logits)))
    monkeypatch.setattr(mod_layer, "CAUSAL_ROW_BUCKET", 1)
    monkeypatch.setattr(expert_choice_layer, "CAUSAL_ROW_BUCKET", 1)
    monkeypatch.setattr(modality_linear, "CAUSAL_ROW_BUCKET", 1)
    assert not torch.equal(logits_of(model, pair, True)[:1], logits_of(model, alone, True))


def few_images_first(batch: dict) -> dict:
    """Row 0 all text but 3 image tokens: alone, its image GEMMs have 3 rows (another kernel than
    for the pair's count, on CPU), unless the row groups are padded."""
    batch["modality_ids"][0] = 0
    batch["modality_ids"][0, 3:6] = 1
    return batch


def test_mot_alone_and_batched_is_bit_identical_only_with_padded_groups(runtime, one_thread, monkeypatch):
    """MoT without MoD under causal routing: a sequence's logits are bit-identical alone and batched
    (its per-modality GEMMs see bucketed row counts); control: unbucketed, the other row changes them.
    Teacher-forced routing keeps the unpadded GEMMs (training numerics unchanged)."""
    cfg = aux_cfg("mot")
    cfg.mod.capacity = None
    model = build(cfg, runtime)
    pair = few_images_first(make_batch(2, seed=3, pad=4))
    alone = {k: v[:1] for k, v in pair.items()}
    assert torch.equal(logits_of(model, pair, True)[:1], logits_of(model, alone, True))
    groups = modality_linear.modality_groups(routing_of(pair, False))
    assert groups.out_rows is None and groups.counts == routing_of(pair, False).counts
    monkeypatch.setattr(modality_linear, "CAUSAL_ROW_BUCKET", 1)
    assert not torch.equal(logits_of(model, pair, True)[:1], logits_of(model, alone, True))


def spy_picks(model, monkeypatch) -> dict:
    """layer number -> the ``[s, b]`` causal picks of its last forward (and its input)."""
    seen = {}
    original = MoDLayerMixin._causal_picks

    def spy(self, x, routing):
        picks = original(self, x, routing)
        seen[self.layer_number] = (x.detach().clone(), picks.clone())
        return picks

    monkeypatch.setattr(MoDLayerMixin, "_causal_picks", spy)
    return seen


@pytest.mark.parametrize("arch", ["dense", "moma"])
def test_causal_picks_are_the_aux_predictions_and_used(runtime, arch, monkeypatch):
    model = aux_model(runtime, aux_cfg(arch))
    batch = make_batch(2, pad=5)
    seen = spy_picks(model, monkeypatch)
    want_logits = logits_of(model, batch, True)
    real = (batch["document_ids"] != PAD_DOCUMENT_ID).t()  # [s, b]
    for layer in mod_layers(model):
        x, picks = seen[layer.layer_number]
        r = layer.mod_aux_router
        h = x.double() @ r.fc1.weight.double().T
        score = torch.sigmoid((h * torch.sigmoid(h)) @ r.fc2.weight.double().T).squeeze(-1)
        assert torch.equal(picks, (score > 0.5) & real)
        assert 0 < int(picks.sum()) < int(real.sum())  # a real mix
    # The auxiliary routers decide at inference: with MoD's zeroed (score 0.5: nobody picked) the
    # causal logits change.
    with torch.no_grad():
        for layer in mod_layers(model):
            layer.mod_aux_router.fc2.weight.zero_()
    seen.clear()
    assert not torch.equal(logits_of(model, batch, True), want_logits)
    assert all(int(p.sum()) == 0 for _, p in seen.values())


def grads(model, batch, labels):
    model.zero_grad()
    positions = torch.arange(S)[None].expand_as(batch["tokens"])
    with modality_routing(routing_of(batch, False)):
        logits = model(batch["tokens"], positions, dense_mask(batch["document_ids"]), labels=None)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["dense", "moma"])
def test_aux_loss_leaves_every_main_gradient_bit_identical(runtime, arch, monkeypatch):
    with_aux = aux_model(runtime, aux_cfg(arch), scale=1.0)
    plain = build(aux_cfg(arch, aux=False), runtime)  # the same weights: init is keyed by each weight's name
    batch = make_batch(2, seed=1, pad=3)
    labels = torch.randint(64, (2, S), generator=torch.Generator().manual_seed(2))
    main = grads(plain, batch, labels)
    take_stats(aux_routers_of([with_aux]), torch.device("cpu"))
    joint = grads(with_aux, batch, labels)
    aux_names = {n for n in joint if "aux_router." in n}
    mod_aux = {n for n in aux_names if ".mod_aux_router." in n}
    assert len(mod_aux) == 2 * 2 and all(joint[n].abs().sum() > 0 for n in aux_names)
    assert set(joint) - aux_names == set(main)
    for name, g in main.items():
        assert torch.equal(joint[name], g), name
    # Statistics: every routable token of both rows, once per MoD layer (+ MoMa's, per expert).
    stats = take_stats([layer.mod_aux_router for layer in mod_layers(with_aux)], torch.device("cpu"))
    assert stats[-1] == 2 * (2 * S - 3)
    # Control: without the detach the auxiliary loss reaches the main model.
    monkeypatch.setattr(aux_module.AuxRouter, "logits", lambda self, x: self.fc2(torch.nn.functional.silu(self.fc1(x))))
    leaky = grads(with_aux, batch, labels)
    assert any(not torch.equal(leaky[n], g) for n, g in main.items())


def test_causal_routing_follows_the_aux_routers():
    assert not causal_routing(aux_cfg("dense", aux=False)) and causal_routing(aux_cfg("dense"))
    moma = aux_cfg("moma")
    moma.moe.aux_router = False  # MoD's alone: MoMa's expert choice is still not causal
    assert not causal_routing(moma) and causal_routing(aux_cfg("moma"))


# --- KV-cached decoding ----------------------------------------------------------------------


def step(model, tokens, modality, start: int, cache):
    """Positions ``start ..`` of the one row ``tokens`` (keys: all up to the last), causal routing."""
    s = tokens.shape[1]
    mask = dense_mask(torch.zeros(1, s, dtype=torch.int64), first_query=start)
    routing = ModalityRouting.from_modality_ids(
        modality[:, start:], None, torch.device("cpu"), NUM_MODALITIES, causal=True
    )
    if cache is not None:
        cache.sequence_len_offset = start
    positions = torch.arange(start, s)[None]
    with torch.no_grad(), modality_routing(routing):
        return model(
            tokens[:, start:], positions, mask, labels=None, inference_context=cache, runtime_gather_output=True
        )[0, -1]


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cached_greedy_decoding_equals_recomputation(runtime, arch, monkeypatch):
    from megatron.core.inference.contexts import StaticInferenceContext

    model = aux_model(runtime, aux_cfg(arch))
    model.eval()
    gen = torch.Generator().manual_seed(7)
    prompt, new = 6, 12
    tokens = torch.randint(64, (1, prompt), generator=gen)
    modality = torch.randint(NUM_MODALITIES, (1, prompt + new), generator=gen)  # the decoded tokens' too
    cache = StaticInferenceContext(max_batch_size=1, max_sequence_length=S)
    cache.materialize_only_last_token_logits = False
    layers = {layer.layer_number: layer for layer in mod_layers(model)}
    skipped = 0
    cached_logits = step(model, tokens, modality[:, :prompt], 0, cache)
    for t in range(new):
        s = tokens.shape[1]
        full = step(model, tokens, modality[:, :s], 0, None)
        err = ((cached_logits - full).abs().max() / full.abs().max()).item()
        assert err < 1e-5, f"{arch} step {t}: cached differs from recomputed by {err:.2e}"
        tokens = torch.cat([tokens, full.argmax().view(1, 1)], dim=1)
        assert int(cached_logits.argmax()) == int(tokens[0, -1])
        # The new token's step: which MoD layers does it skip? Their caches must not change.
        seen = spy_picks(model, monkeypatch)
        before = {n: [t.clone() for t in c.context.key_value_memory_dict[n]] for n, c in _caches(cache).items()}
        lengths = cache_lengths(cache)
        cached_logits = step(model, tokens, modality[:, : s + 1], s, cache)
        for n in layers:
            if not bool(seen[n][1].any()):
                skipped += 1
                assert cache_lengths(cache)[n] == lengths[n]
                after = _caches(cache)[n].context.key_value_memory_dict[n]
                # Bits, not values: the buffers' unwritten slots are uninitialised (NaN != NaN).
                assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(before[n], after))
        monkeypatch.undo()
    # Each MoD layer's cache holds the tokens routed into it in the full causal forward, no others.
    seen = spy_picks(model, monkeypatch)
    step(model, tokens, modality[:, : tokens.shape[1]], 0, None)
    for n in layers:
        routed = seen[n][1][:, 0].nonzero().flatten().tolist()
        assert _caches(cache)[n].positions[0] == routed
        assert 0 < len(routed) < tokens.shape[1]  # some, not every token through every block
    assert skipped > 0


def _caches(context) -> dict:
    return context.__dict__.get("mod_layer_caches", {})


def test_decoding_needs_causal_routing(runtime):
    from megatron.core.inference.contexts import StaticInferenceContext

    model = aux_model(runtime, aux_cfg("dense", layers=1))
    model.eval()
    tokens = torch.randint(64, (1, 4))
    routing = ModalityRouting.from_modality_ids(
        torch.zeros(1, 4, dtype=torch.int64), None, torch.device("cpu"), NUM_MODALITIES
    )
    cache = StaticInferenceContext(max_batch_size=1, max_sequence_length=S)
    with torch.no_grad(), modality_routing(routing), pytest.raises(ValueError, match="causal routing"):
        model(tokens, torch.arange(4)[None], None, labels=None, inference_context=cache)
    assert mod_layer.CAUSAL_ROW_BUCKET == 16
