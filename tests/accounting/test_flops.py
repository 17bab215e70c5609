"""Parameter counts, analytic FLOPs (vs torch's FlopCounterMode and a brute-force mask count), MFU.

What FlopCounterMode counts for the model's attention (``F.scaled_dot_product_attention``):
- on CPU, SDPA runs ``aten._scaled_dot_product_flash_attention_for_cpu`` (masked or causal
  alike), which has no flop formula: attention counts 0;
- with ``SDPBackend.MATH`` it is decomposed into ``bmm`` over the full ``s x s`` scores (masks
  and causality are element-wise fills, ignored), backward 2 x forward;
- the CUDA fused kernels (flash / efficient / cuDNN) are counted from shapes alone, full
  ``s x s`` regardless of ``is_causal`` or the mask, backward 2.5 x forward (recomputed scores).
  No GPU here, so that path is exercised by mapping the CPU kernel to torch's own formulas.
Everything else the model does that FlopCounterMode counts is ``aten.mm`` of the linear layers;
the embedding lookup and its backward (a scatter-add) count 0, as do norms, RoPE and softmax.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from megafusion.accounting import flops
from megafusion.accounting import mfu as M
from megafusion.accounting import params as acc_params
from megafusion.accounting import recompute as R
from megafusion.accounting.report import flops_report
from megafusion.commands.flops import main
from megafusion.config import Config
from megafusion.core.modality import MODALITY_NAMES, Modality
from megafusion.data.builtin.synthetic import synthetic_microbatch
from megafusion.layers import attended_keys as attended
from megafusion.layers.masks import dense_mask
from megafusion.models.transformer_config import build_transformer_config
from megafusion.objectives.build import build_model_chunks
from tests.helpers import ROOT

TINY = str(ROOT / "examples/configs/tiny_dense.yaml")

aten = torch.ops.aten
CPU_SDPA = aten._scaled_dot_product_flash_attention_for_cpu
CPU_SDPA_BWD = aten._scaled_dot_product_flash_attention_for_cpu_backward


def small_cfg(docs: int = 1, groups: int | None = None, qk_norm: bool = True) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = 2, 64, 4, groups
    m.ffn_hidden_size, m.vocab_size, m.seq_length, m.qk_norm = 128, 256, 32, qk_norm
    cfg.data.docs_per_sequence = docs
    return cfg


def build(cfg, runtime):
    return build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime)[0]


@pytest.mark.parametrize("groups,qk_norm,ffn", [(None, True, 128), (2, True, None), (1, False, 96)])
def test_parameter_counts_match_built_model(runtime, groups, qk_norm, ffn):
    cfg = small_cfg(groups=groups, qk_norm=qk_norm)
    cfg.model.ffn_hidden_size = ffn
    model = build(cfg, runtime)
    counts = acc_params.parameter_counts(cfg)
    named = dict(model.named_parameters())
    assert counts["total"] == sum(p.numel() for p in named.values())
    assert counts["embedding"] == named["embedding.word_embeddings.weight"].numel()
    assert counts["output_layer"] == named["output_layer.weight"].numel()
    assert counts["norm"] == sum(p.numel() for n, p in named.items() if "norm" in n)
    assert counts["non_embedding"] == counts["total"] - counts["embedding"] - counts["output_layer"]
    assert counts["matmul"] == sum(p.numel() for n, p in named.items() if "norm" not in n and "embedding" not in n)
    assert counts["active"] == counts["total"]


def _cpu_sdpa_as_fused(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_bwd_as_fused(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def measure(model, batch, mask, kernel: str) -> FlopCounterMode:
    """FlopCounterMode around forward + backward; ``kernel`` picks how SDPA is seen (see module doc)."""
    custom = {}
    ctx = contextlib.nullcontext()
    if kernel == "math":
        ctx = sdpa_kernel(SDPBackend.MATH)
    elif kernel == "fused":  # count the CPU kernel with torch's formulas for the CUDA kernels
        custom = {CPU_SDPA: _cpu_sdpa_as_fused, CPU_SDPA_BWD: _cpu_sdpa_bwd_as_fused}
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    model.zero_grad(set_to_none=True)
    with ctx, counter:
        logits = model(batch["tokens"], batch["position_ids"], mask, labels=None)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)).backward()
    assert model.embedding.word_embeddings.weight.grad is not None  # the whole backward ran
    return counter


@pytest.mark.parametrize("docs,groups", [(1, None), (3, 2)], ids=["causal-None-mask", "dense-mask-gqa"])
@pytest.mark.parametrize("kernel", ["math", "fused", "cpu"])
def test_analytic_flops_match_flop_counter(runtime, docs, groups, kernel):
    cfg = small_cfg(docs=docs, groups=groups)
    model = build(cfg, runtime)
    assert next(model.parameters()).dtype == torch.float32
    b, s, v = 2, cfg.model.seq_length, cfg.model.vocab_size
    batch = synthetic_microbatch(0, b, 7, s, v, docs)
    mask = None if docs == 1 else dense_mask(batch["document_ids"])
    if docs > 1:
        assert batch["document_ids"].max() > 0, "the dense-mask case must really mask documents"
    if kernel == "cpu" and CPU_SDPA in flop_counter.flop_registry:
        kernel = "fused"  # a newer torch counts the CPU kernel; it would use the fused formula
    counter = measure(model, batch, mask, kernel)
    measured = counter.get_total_flops()
    predicted = flops.flop_counter_flops(cfg, b, s, kernel)
    assert abs(measured - predicted) <= 0.02 * predicted, (kernel, measured, predicted, counter.get_flop_counts())

    # The pieces: the linear layers are aten.mm and are exactly the dense model FLOPs.
    by_op = {str(k): val for k, val in counter.get_flop_counts()["Global"].items()}
    assert by_op["aten.mm"] == b * s * flops.dense_flops_per_token(cfg)
    attention = measured - by_op["aten.mm"]
    full = b * s * s * flops.attention_flops_per_key(cfg)  # model FLOPs, every query x all keys
    assert attention == {"math": full, "fused": full * 7 // 6, "cpu": 0}[kernel]
    if kernel == "math":  # the mask-blind model FLOPs are what the math backend counts
        assert measured == flops.dense_attention_flops_equivalent(cfg, b, s)
        assert measured == flops.batch_flops(cfg, batch["document_ids"], attention="full")["total"]
        assert measured == b * s * flops.flops_per_token(cfg, attended_keys=s)
    # FlopCounterMode ignores masks: the real-mask count is strictly smaller whenever s > 1.
    real = flops.batch_flops(cfg, batch["document_ids"])
    assert real["attention"] < full


@pytest.mark.parametrize("mode", ["selective", "full"])
@pytest.mark.parametrize("kernel", ["math", "fused", "cpu"])
def test_recomputed_forward_matches_flop_counter(runtime, mode, kernel):
    """``train.recompute``: FlopCounterMode around a real forward + backward (recomputation on, the
    backward outside any routing) counts the model's FLOPs plus the recomputed forward; model FLOPs
    stay as they were, hardware FLOPs add :func:`recompute_flops`."""
    cfg = small_cfg(docs=3, groups=2)
    cfg.train.recompute = mode
    model = build(cfg, runtime)
    b, s, v = 2, cfg.model.seq_length, cfg.model.vocab_size
    batch = synthetic_microbatch(0, b, 7, s, v, 3)
    doc = batch["document_ids"]
    if kernel == "cpu" and CPU_SDPA in flop_counter.flop_registry:
        kernel = "fused"
    measured = measure(model, batch, dense_mask(doc), kernel).get_total_flops()
    extra = R.flop_counter_recompute_flops(cfg, doc, None, kernel)
    assert measured == flops.flop_counter_flops(cfg, b, s, kernel) + extra
    layers = b * s * 2 * cfg.model.num_layers * acc_params._matmul_parts(cfg)["attention"]
    layers += b * s * 2 * cfg.model.num_layers * acc_params._matmul_parts(cfg)["mlp"]
    attention = 0 if kernel == "cpu" else b * s * s * flops.attention_flops_per_key(cfg, forward_only=True)
    assert extra == attention + (layers if mode == "full" else 0)
    # With the real mask (what the trainer reports): the same parts, each query's own keys.
    real = R.recompute_flops(cfg, doc)
    real_attention = flops.batch_flops(cfg, doc, forward_only=True)["attention"]
    assert real["attention"] == real_attention
    assert real["total"] == real_attention + (layers if mode == "full" else 0)
    assert sum(real["per_modality"].values()) == real["total"]
    assert R.recompute_flops(cfg, doc, mode="none")["total"] == 0


def brute_force_attended(doc_ids: torch.Tensor) -> torch.Tensor:
    b, s = doc_ids.shape
    out = torch.zeros(b, s, dtype=torch.int64)
    for r in range(b):
        for i in range(s):
            for j in range(s):
                out[r, i] += int(j <= i and doc_ids[r, j] == doc_ids[r, i])
    return out


def test_batch_flops_attention_matches_brute_force_mask_count():
    cfg = small_cfg(groups=2)
    doc = torch.tensor(
        [
            [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3],
            [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5],
            [0, 1, 1, 0, 0, 2, 2, 1, 1, 1, 9, 9],  # ids that reappear: still "same id and j <= i"
        ]
    )
    mod = torch.tensor(
        [
            [0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1],
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ]
    )
    want_keys = brute_force_attended(doc)
    assert torch.equal(attended.attended_keys(doc), want_keys)
    assert torch.equal(attended.attended_keys(doc), attended.attended_keys_from_mask(dense_mask(doc)))

    stats = flops.batch_flops(cfg, doc, mod, loss_mask=torch.ones(doc.shape))
    per_key, dense = flops.attention_flops_per_key(cfg), flops.dense_flops_per_token(cfg)
    assert stats["attention"] == per_key * int(want_keys.sum())
    assert stats["dense"] == dense * doc.numel()
    assert stats["total"] == stats["dense"] + stats["attention"]
    # The split is by the query token's modality and sums to the total.
    assert set(stats["per_modality"]) == set(MODALITY_NAMES)
    assert sum(stats["per_modality"].values()) == stats["total"]
    assert sum(stats["tokens_per_modality"].values()) == doc.numel()
    for m in Modality:
        sel = mod == int(m)
        name = MODALITY_NAMES[int(m)]
        assert stats["tokens_per_modality"][name] == int(sel.sum())
        assert stats["per_modality"][name] == dense * int(sel.sum()) + per_key * int(want_keys[sel].sum())
        assert stats["loss_tokens_per_modality"][name] == float(sel.sum())
    # Forward only is a third; all text when modality_ids are absent.
    assert flops.batch_flops(cfg, doc, mod, forward_only=True)["total"] * 3 == stats["total"]
    text_only = flops.batch_flops(cfg, doc)
    assert text_only["per_modality"]["text"] == stats["total"] and text_only["per_modality"]["image"] == 0
    # Per-token formula: one causal document of s tokens attends (s + 1) / 2 keys on average.
    one_doc = flops.batch_flops(cfg, doc[1:2])
    assert one_doc["total"] == pytest.approx(12 * flops.flops_per_token(cfg, flops.causal_mean_attended_keys(12)))


def test_cross_document_attention_counts_every_earlier_real_token_of_the_row():
    """``data.attention=causal``: a query attends its row position + 1 keys (padding: itself only), as
    the mask counts; the planner's mean is then the whole row's, whatever the documents per row."""
    from megafusion.planning.step_time import mean_attended_keys

    cfg = small_cfg(groups=2)
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3], [0, 0, 1, 1, 1, 1, 2, 2, -1, -1, -1, -1]])
    isolated = flops.batch_flops(cfg, doc)
    cfg.data.attention = "causal"
    keys = attended.attended_keys_from_mask(dense_mask(doc, cross_document=True))
    assert keys.tolist() == [list(range(1, 13)), [*range(1, 9), 1, 1, 1, 1]]
    assert torch.equal(attended.attended_keys(doc, cross_document=True), keys)
    stats = flops.batch_flops(cfg, doc)
    assert stats["attention"] == flops.attention_flops_per_key(cfg) * int(keys.sum()) > isolated["attention"]
    assert stats["dense"] == isolated["dense"]
    s = cfg.model.seq_length
    cfg.data.docs_per_sequence = 4
    assert mean_attended_keys(cfg) == (s + 1) / 2
    cfg.data.attention = "isolated"
    assert mean_attended_keys(cfg) == (s / 4 + 1) / 2


def test_longer_document_costs_more_attention_than_two_halves():
    cfg = small_cfg()
    one = flops.batch_flops(cfg, torch.zeros(1, 64, dtype=torch.long))
    halves = flops.batch_flops(cfg, torch.tensor([[0] * 32 + [1] * 32]))
    assert one["dense"] == halves["dense"]
    assert one["attention"] > halves["attention"]
    # Exactly: s(s+1)/2 pairs against 2 * (s/2)(s/2+1)/2.
    per_key = flops.attention_flops_per_key(cfg)
    assert one["attention"] == per_key * 64 * 65 // 2 and halves["attention"] == per_key * 2 * 32 * 33 // 2


def test_flops_per_token_formula():
    cfg = small_cfg(groups=2)
    m = cfg.model
    h, d, heads, g, f, v, L = 64, 16, 4, 2, 128, 256, 2
    fwd_dense = L * 2 * (h * (heads + 2 * g) * d + heads * d * h + h * 2 * f + f * h) + 2 * h * v
    assert flops.dense_flops_per_token(cfg, forward_only=True) == fwd_dense
    assert flops.attention_flops_per_key(cfg, forward_only=True) == L * 2 * 2 * heads * d
    keys = 10.5
    assert flops.flops_per_token(cfg, keys) == 3 * (fwd_dense + keys * L * 4 * heads * d)
    assert flops.flops_per_token(cfg, keys, forward_only=True) == fwd_dense + keys * L * 4 * heads * d
    assert flops.dense_flops_per_token(cfg) == 6 * acc_params.parameter_counts(cfg)["matmul"]
    m.arch = "moe"
    with pytest.raises(ValueError, match="model.arch"):
        acc_params.parameter_counts(cfg)


def test_peak_and_mfu():
    assert M.peak_tflops("cpu", 123.0) == 123.0
    assert M.peak_tflops("NVIDIA H100 80GB HBM3", 500.0) == 500.0  # override wins over the table
    assert M.peak_tflops(torch.device("cpu"), None) is None
    assert M.peak_tflops("Some Future Accelerator", None) is None
    msg = M.describe_peak(torch.device("cpu"), None)
    assert "not reported" in msg and "logging.peak_tflops" in msg and "'cpu'" in msg
    assert "logging.peak_tflops" in M.describe_peak("Some Future Accelerator", None)
    assert "123" in M.describe_peak("cpu", 123.0)
    for name in ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"):
        assert M.peak_tflops(name, None) == 312.0, name
    assert M.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert M.peak_tflops("NVIDIA H200", None) == 989.0
    assert M.peak_tflops("NVIDIA H100 PCIe", None) == 756.0  # not the SXM figure
    assert "989" in M.describe_peak("NVIDIA H100 80GB HBM3", None)
    assert M.mfu(494.5e12, 989.0) == pytest.approx(0.5)
    assert M.mfu(1e12, None) is None


def test_flops_cli_prints_params_and_per_token_flops(capsys):
    assert main(["--config", TINY]) == 0
    out = capsys.readouterr().out
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = 4, 64, 4, 2
    m.ffn_hidden_size, m.vocab_size, m.seq_length = 192, 256, 64
    n = acc_params.parameter_counts(cfg)
    for key in ("total", "embedding", "non_embedding", "active"):
        assert f"{n[key]:,}" in out, key
    assert "0 FLOPs" in out and "6N" in out and "text" in out and "image" in out
    assert "causal attention" in out and "per modality" in out

    assert main(["--config", TINY, "model.hidden_size=65"]) == 2
    assert "hidden_size" in capsys.readouterr().err


def test_flops_cli_reports_hardware_flops_under_recompute(capsys):
    assert main(["--config", TINY]) == 0
    assert "train.recompute=none: hardware FLOPs = model FLOPs" in capsys.readouterr().out
    for mode, what in (("selective", "core attention's forward"), ("full", "the transformer layers' forward")):
        assert main(["--config", TINY, f"train.recompute={mode}"]) == 0
        out = capsys.readouterr().out
        assert f"train.recompute={mode}: hardware FLOPs" in out and what in out


def test_flops_report_takes_any_microbatch():
    cfg = small_cfg()
    batch = {
        "document_ids": torch.tensor([[0] * 20 + [1] * 12]),
        "modality_ids": torch.tensor([[0] * 4 + [1] * 16 + [0] * 12]),
    }
    text = flops_report(cfg, batch)
    assert "image" in text and "6*N*tokens" in text
    stats = flops.batch_flops(cfg, batch["document_ids"], batch["modality_ids"])
    assert stats["tokens_per_modality"] == {"text": 16, "image": 16}
