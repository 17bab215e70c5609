"""Mixture-of-Transformers in one process: reference, copy equivalence, isolation, keys, FLOPs.

- The MoT model equals a float64 reference that computes every modality's weights for every
  token and selects (``tests/models/test_dense_reference.py``), on randomly interleaved modalities.
- With every modality's copy equal to a dense model's weights, MoT gives the dense logits,
  and its per-modality gradients sum to the dense gradients.
- Isolation: image weights cannot touch a text-only sequence; text weights reach image
  tokens only through attention.
- No wasted compute: FlopCounterMode counts the same FLOPs for MoT as for dense.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megafusion import ops
from megafusion.accounting.flops import flop_counter_flops
from megafusion.accounting.params import parameter_counts
from megafusion.config import Config
from megafusion.core.modality import MODALITY_NAMES, Modality
from megafusion.data.builtin.synthetic import synthetic_microbatch
from megafusion.layers.masks import dense_mask
from megafusion.layers.routing import ModalityRouting, modality_routing
from megafusion.models.init import tied_name
from megafusion.models.param_layout import global_param_names
from megafusion.models.transformer_config import build_transformer_config
from megafusion.objectives.build import build_model_chunks
from tests.models.test_dense_reference import reference_logits

NUM_MODALITIES = len(MODALITY_NAMES)


def small_cfg(arch: str = "mot", untie: str = "all", docs: int = 2) -> Config:
    cfg = Config()
    m = cfg.model
    m.arch, m.untie, m.num_layers, m.hidden_size, m.num_attention_heads = arch, untie, 2, 32, 4
    m.num_query_groups, m.ffn_hidden_size, m.vocab_size, m.seq_length, m.init_std = 2, 48, 64, 16, 0.2
    cfg.data.docs_per_sequence = docs
    return cfg


def build(cfg, runtime):
    return build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime)[0]


def batch_with_modalities(cfg, seed: int = 11, modality_ids=None):
    batch = synthetic_microbatch(0, 2, seed, cfg.model.seq_length, cfg.model.vocab_size, cfg.data.docs_per_sequence)
    if modality_ids is None:
        gen = torch.Generator().manual_seed(seed)
        modality_ids = torch.randint(NUM_MODALITIES, batch["tokens"].shape, generator=gen)
    batch["modality_ids"] = modality_ids
    return batch


def forward(model, batch, mask=None):
    routing = ModalityRouting.from_modality_ids(batch["modality_ids"], None, torch.device("cpu"), NUM_MODALITIES)
    mask = dense_mask(batch["document_ids"]) if mask is None else mask
    with modality_routing(routing):
        return model(batch["tokens"], batch["position_ids"], mask, labels=None)


def lm_loss(logits, batch):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


@pytest.mark.parametrize("norm_placement", ["pre", "post"])
def test_mot_matches_float64_reference(runtime, norm_placement):
    cfg = small_cfg()
    cfg.model.norm_placement = norm_placement
    model = build(cfg, runtime)
    batch = batch_with_modalities(cfg)
    assert 0 < int(batch["modality_ids"].sum()) < batch["modality_ids"].numel()
    logits = forward(model, batch)
    lm_loss(logits, batch).backward()

    params = global_param_names(model)
    ref_w = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    ref = reference_logits(ref_w, batch["tokens"], batch["document_ids"], cfg.model, batch["modality_ids"])
    assert ((logits.double() - ref).norm() / ref.norm()).item() < 1e-5
    lm_loss(ref, batch).backward()
    for name, p in params.items():
        want = ref_w[name].grad
        assert want.norm() > 0, f"{name}: no reference gradient"
        assert ((p.grad.double() - want).norm() / want.norm()).item() < 1e-4, name


def copy_dense_into_mot(dense, mot) -> None:
    dense_w = global_param_names(dense)
    with torch.no_grad():
        for name, p in global_param_names(mot).items():
            p.copy_(dense_w[tied_name(name)])


@pytest.mark.parametrize("untie", ["all", "ffn", "attention,norms"])
def test_mot_with_copied_dense_weights_equals_dense(runtime, untie):
    dense, mot = build(small_cfg("dense"), runtime), build(small_cfg("mot", untie), runtime)
    copy_dense_into_mot(dense, mot)
    batch = batch_with_modalities(small_cfg())
    want = forward(dense, batch)
    got = forward(mot, batch)
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()

    lm_loss(want, batch).backward()
    lm_loss(got, batch).backward()
    summed: dict[str, torch.Tensor] = {}
    for name, p in global_param_names(mot).items():
        summed[tied_name(name)] = summed.get(tied_name(name), 0) + p.grad
    for name, p in global_param_names(dense).items():
        rel = ((summed[name] - p.grad).norm() / p.grad.norm()).item()
        assert rel < 1e-5, f"{name}: MoT gradients summed over modalities differ by {rel:.2e}"


def perturb(model, modality: str) -> int:
    """Add noise to every parameter of ``modality``'s copies; returns how many were changed."""
    changed = 0
    with torch.no_grad():
        for name, p in global_param_names(model).items():
            if f".{modality}." in f".{name}":
                p.add_(torch.randn_like(p))
                changed += 1
    return changed


def test_image_weights_do_not_touch_text_only_sequences(runtime):
    cfg = small_cfg()
    model = build(cfg, runtime)
    batch = batch_with_modalities(cfg, modality_ids=torch.zeros(2, cfg.model.seq_length, dtype=torch.int64))
    before = forward(model, batch)
    assert perturb(model, "image") > 0
    assert torch.equal(forward(model, batch), before)


def test_text_weights_reach_image_tokens_only_through_attention(runtime):
    cfg = small_cfg(docs=1)
    model = build(cfg, runtime)
    s = cfg.model.seq_length
    modality = torch.zeros(2, s, dtype=torch.int64)
    modality[:, s // 2 :] = int(Modality.IMAGE)  # a caption, then its image
    batch = batch_with_modalities(cfg, modality_ids=modality)
    image = modality.bool()
    causal = dense_mask(batch["document_ids"])
    # The same causal mask, except that image queries may not look at text keys.
    no_text_keys = causal | (image[:, None, :, None] & ~image[:, None, None, :])

    before, before_cut = forward(model, batch, causal), forward(model, batch, no_text_keys)
    assert perturb(model, "text") > 0
    after, after_cut = forward(model, batch, causal), forward(model, batch, no_text_keys)
    assert not torch.allclose(after[image], before[image]), "image tokens attend the caption: they must change"
    assert torch.equal(after_cut[image], before_cut[image]), "with attention to text cut, nothing else may leak"
    assert not torch.allclose(after[~image], before[~image])


@pytest.mark.parametrize("untie", ["all", "ffn", "attention", "norms", ""])
def test_keys_and_parameter_counts(runtime, untie):
    cfg = small_cfg("mot", untie)
    params = global_param_names(build(cfg, runtime))
    assert sum(p.numel() for p in params.values()) == parameter_counts(cfg)["total"]
    dense_counts = parameter_counts(small_cfg("dense"))
    assert parameter_counts(cfg)["active"] == dense_counts["total"]
    assert parameter_counts(cfg)["matmul"] == dense_counts["matmul"]  # same FLOPs per token
    parts = cfg.model.untied_parts()
    expect = {
        "decoder.layers.1.mlp.image.linear_fc1.weight": "ffn" in parts,
        "decoder.layers.1.self_attention.linear_qkv.image.weight": "attention" in parts,
        "decoder.layers.1.self_attention.linear_proj.text.weight": "attention" in parts,
        "decoder.layers.0.input_layernorm.image.weight": "norms" in parts,
        "decoder.layers.0.self_attention.q_layernorm.text.weight": "norms" in parts,
        "decoder.final_layernorm.image.weight": "norms" in parts,
    }
    for key, untied in expect.items():
        assert (key in params) == untied, key
        assert (tied_name(key) in params) == (not untied), tied_name(key)


def test_mot_costs_the_dense_flops(runtime):
    """Each token is multiplied by one modality's weights only: FlopCounterMode sees dense FLOPs."""
    cfg = small_cfg()
    model = build(cfg, runtime)
    batch = batch_with_modalities(cfg)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        lm_loss(forward(model, batch), batch).backward()
    b, s = batch["tokens"].shape
    assert counter.get_total_flops() == flop_counter_flops(cfg, b, s, kernel="math")


def test_model_outside_routing_context_says_what_to_do(runtime):
    cfg = small_cfg()
    model = build(cfg, runtime)
    batch = batch_with_modalities(cfg)
    with pytest.raises(RuntimeError, match="modality_routing"):
        model(batch["tokens"], batch["position_ids"], dense_mask(batch["document_ids"]), labels=None)


def test_routing_rejects_counts_that_disagree_with_ids():
    ids = torch.tensor([[0, 1, 1, 0]])
    routing = ModalityRouting.from_modality_ids(ids, torch.tensor([2, 2]), torch.device("cpu"), 2)
    assert routing.counts == (2, 2)
    assert torch.equal(routing.token_modality[routing.order], torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="modality_counts"):
        ModalityRouting.from_modality_ids(ids, torch.tensor([3, 1]), torch.device("cpu"), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ModalityRouting.from_modality_ids(torch.tensor([[0, 2]]), None, torch.device("cpu"), 2)


def test_grouped_linear_matches_float64_reference():
    gen = torch.Generator().manual_seed(0)
    counts = [5, 0, 3]
    x = torch.randn(sum(counts), 6, generator=gen)
    weights = [torch.randn(4, 6, generator=gen, requires_grad=True) for _ in counts]
    y = ops.grouped_linear(x, weights, counts)
    starts = [0, 5, 5]
    for g, (start, n) in enumerate(zip(starts, counts)):
        want = x[start : start + n].double() @ weights[g].detach().double().T
        assert torch.allclose(y[start : start + n].double(), want, atol=1e-6)
    y.sum().backward()
    assert torch.equal(weights[1].grad, torch.zeros_like(weights[1]))  # empty group: zero, not None
    with pytest.raises(ValueError, match="sum to"):
        ops.grouped_linear(x, weights, [1, 1, 1])


def test_grouped_linear_in_modality_order_returns_token_order():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, (2, 7), generator=gen)
    routing = ModalityRouting.from_modality_ids(ids, None, torch.device("cpu"), 3)
    x = torch.randn(14, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    eye = [torch.eye(5, dtype=torch.float64) * (g + 1) for g in range(3)]
    y = ops.grouped_linear(x, eye, routing.counts, gather=routing.order, scatter=routing.order)
    assert torch.equal(y, x * (routing.token_modality + 1).unsqueeze(-1))  # token order, own modality's weight
    weights = [torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(
        lambda t, *w: ops.grouped_linear(t, w, routing.counts, gather=routing.order, scatter=routing.order),
        (x, *weights),
    )
