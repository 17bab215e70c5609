"""Branch-Train-MiX's FLOPs and parameters: the accounting against FlopCounterMode and the built model.

- FlopCounterMode (SDPA's math backend, mask-blind) around a real forward + backward, the
  load-balancing loss in it, equals ``flop_counter_flops`` and ``batch_flops(attention="full")``
  exactly: every token's attention projections, router and output layer, and ``k`` expert FFNs per
  routable token (padding none), which hooks on the routers confirm from the routing maps the model
  used. Cases: top-2 of a modality-blind group with padding, modality groups, top-3, a text-only
  microbatch; forward only too.
- The per-modality split: a token's ``k`` runs are its own modality's, exactly.
- Parameter counts: total, experts and router equal the built model's; a token's active parameters
  are everything but the other modality's copies and all but ``k`` experts.
- ``megafusion plan`` (the layout search and its memory and time model) accepts btx with ``parallel.ep``.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megafusion.accounting import flops as F
from megafusion.accounting import params as P
from megafusion.accounting.report import summary
from megafusion.config import load_config
from megafusion.core.modality import MODALITY_NAMES, PAD_DOCUMENT_ID, Modality
from megafusion.layers.masks import dense_mask
from megafusion.layers.routing import routing_for
from megafusion.models.param_layout import global_param_names
from tests.helpers import ROOT
from tests.models.test_mot import batch_with_modalities, build, lm_loss, small_cfg

PASSES = 3  # forward + input and weight gradients, for every matmul (router and experts too)


def btx_cfg(experts, topk: int = 2, untie: str = "all"):
    cfg = small_cfg("btx", untie)
    cfg.btx.experts, cfg.btx.topk = experts, topk
    return cfg


def btx_batch(cfg, modalities: str, padding: int):
    b, s = 2, cfg.model.seq_length
    ids = torch.zeros(b, s, dtype=torch.int64) if modalities == "text" else None
    batch = batch_with_modalities(cfg, seed=11, modality_ids=ids)
    if padding:
        batch["document_ids"][1, -padding:] = PAD_DOCUMENT_ID
        batch["modality_ids"][1, -padding:] = int(Modality.TEXT)
    return batch


def measure(model, batch, forward_only: bool = False):
    """FlopCounterMode around forward (+ backward), and per layer the router's input rows and the
    (token, expert) pairs its routing map chose."""
    rows, pairs = [], []

    def record(module, args, out):
        rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
        pairs.append(int(out[1].sum()))

    hooks = [layer.mlp.router.register_forward_hook(record) for layer in model.decoder.layers]
    try:
        with torch.set_grad_enabled(not forward_only), sdpa_kernel(SDPBackend.MATH):
            with FlopCounterMode(display=False) as counter:
                with routing_for(batch, torch.device("cpu")):
                    logits = model(
                        batch["tokens"], batch["position_ids"], dense_mask(batch["document_ids"]), labels=None
                    )
                if not forward_only:
                    lm_loss(logits, batch).backward()  # the balancing loss joins through the gates
    finally:
        for hook in hooks:
            hook.remove()
    return counter, rows, pairs


CASES = {
    "mixed_4_top2_padding": ({"mixed": 4}, 2, "random", 3),
    "2t3i_top2": ({"text": 2, "image": 3}, 2, "random", 0),
    "mixed_4_top3_padding": ({"mixed": 4}, 3, "random", 5),
    "2t2i_text_only_padding": ({"text": 2, "image": 2}, 2, "text", 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_btx_flops_equal_flop_counter(runtime, case):
    experts, k, modalities, padding = CASES[case]
    cfg = btx_cfg(experts, k)
    model = build(cfg, runtime)
    batch = btx_batch(cfg, modalities, padding)
    doc, mod = batch["document_ids"], batch["modality_ids"]
    b, s = doc.shape
    counter, rows, pairs = measure(model, batch)
    measured = counter.get_total_flops()
    assert measured == F.flop_counter_flops(cfg, b, s, "math", document_ids=doc, modality_ids=mod)
    stats = F.batch_flops(cfg, doc, mod, attention="full")
    assert measured == stats["total"]
    by_op = {str(op): v for op, v in counter.get_flop_counts()["Global"].items()}
    assert by_op["aten.mm"] == stats["dense"] + stats["experts"]
    assert by_op["aten.bmm"] == stats["attention"]

    # Independently of the formulas: the routers ran on every token, padding included, and the
    # experts on exactly k (token, expert) pairs per routable token.
    h, f, L = cfg.model.hidden_size, cfg.model.ffn_hidden_size, cfg.model.num_layers
    E = sum(experts.values())
    mlp = h * 2 * f + f * h
    routable = int((doc != PAD_DOCUMENT_ID).sum())
    assert rows == [b * s] * L
    assert pairs == [k * routable] * L
    assert stats["experts"] == 2 * PASSES * mlp * sum(pairs)
    router = 2 * PASSES * h * E * L
    assert stats["dense"] == b * s * (F.dense_flops_per_token(small_cfg("mot")) - 2 * PASSES * L * mlp + router)
    # A token's k runs are its own modality's, exactly.
    per_run = 2 * PASSES * L * mlp
    for name, m in zip(MODALITY_NAMES, Modality):
        n_m = int(((mod == int(m)) & (doc != PAD_DOCUMENT_ID)).sum())
        assert stats["experts_per_modality"][name] == k * n_m * per_run
    assert sum(stats["per_modality"].values()) == stats["total"]


def test_btx_forward_only_flops_equal_flop_counter(runtime):
    cfg = btx_cfg({"mixed": 4}, 2)
    model = build(cfg, runtime)
    batch = btx_batch(cfg, "random", 3)
    counter, _, _ = measure(model, batch, forward_only=True)
    stats = F.batch_flops(cfg, batch["document_ids"], batch["modality_ids"], attention="full", forward_only=True)
    assert counter.get_total_flops() == stats["total"]


def test_nominal_per_token_flops_count_k_experts():
    cfg = btx_cfg({"mixed": 4}, 2)
    s = cfg.model.seq_length
    doc, mod = torch.zeros(2, s, dtype=torch.int64), torch.tensor([[0] * s, [1] * s])
    stats = F.batch_flops(cfg, doc, mod, attention="full")
    assert stats["total"] == 2 * s * F.flops_per_token(cfg, attended_keys=s)  # no padding: exact
    one = btx_cfg({"mixed": 4}, 1)
    one.btx.pre_softmax = True
    per_expert_token = PASSES * 2 * cfg.model.num_layers * (32 * 96 + 48 * 32)
    assert F.dense_flops_per_token(cfg) - F.dense_flops_per_token(one) == per_expert_token


@pytest.mark.parametrize("experts,untie", [({"mixed": 4}, "attention,norms"), ({"text": 2, "image": 3}, "")])
def test_btx_parameter_counts_match_the_model(runtime, experts, untie):
    cfg = btx_cfg(experts, 2, untie)
    named = global_param_names(build(cfg, runtime))
    counts = P.parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in named.values())
    assert counts["router"] == sum(p.numel() for n, p in named.items() if n.endswith("mlp.router.weight"))
    assert counts["experts"] == sum(p.numel() for n, p in named.items() if ".mlp.experts." in n)
    L = cfg.model.num_layers
    expert = sum(p.numel() for n, p in named.items() if ".layers.0.mlp.experts.0." in n)
    for name in MODALITY_NAMES:
        other = [o for o in MODALITY_NAMES if o != name]
        own = sum(
            p.numel() for n, p in named.items() if ".mlp.experts." not in n and not any(f".{o}." in n for o in other)
        )
        assert counts[f"active/{name}"] == own + L * 2 * expert, name
    assert P.experts_per_token(cfg) == dict.fromkeys(MODALITY_NAMES, 2)
    assert "top-2 token choice" in summary(cfg)


def test_plan_accepts_btx_with_expert_parallelism():
    from megafusion.planning.hardware import hardware
    from megafusion.planning.plan import plan

    cfg = load_config(
        str(ROOT / "tests/configs/mixed_small.yaml"),
        ["model.arch=btx", "btx.experts={mixed: 4}", "model.vocab_size=256"],
    )
    result = plan(cfg, 4, hardware("h100"), recompute=["none"], micro_batch_sizes=[2])
    rows = {row["ep"]: row for row in result["rows"]}
    assert {1, 2, 4} <= set(rows), sorted(rows)
    assert all(row["time_s"]["step"] > 0 and row["memory_bytes"]["total"] > 0 for row in result["rows"])
    # EP splits the experts: a rank holds fewer parameters the more expert-parallel ranks there are.
    same = [r for r in result["rows"] if (r["tp"], r["pp"], r["dp"]) == (1, 1, 4) and not r["distributed_optimizer"]]
    held = {r["ep"]: r["check"]["params_on_rank"] for r in same}
    assert held[1] > held[2] > held[4], held
    # Each of a token's k routed copies travels in the all-to-all: top-2 sends twice top-1's.
    cfg.btx.topk, cfg.btx.pre_softmax = 1, True
    top1 = plan(cfg, 4, hardware("h100"), recompute=["none"], micro_batch_sizes=[2])
    a2a = {
        k: {
            (r["tp"], r["pp"], r["dp"], r["ep"], r["distributed_optimizer"]): r["time_s"]["ep_a2a"] for r in res["rows"]
        }
        for k, res in ((2, result), (1, top1))
    }
    key = (1, 1, 4, 2, False)
    assert a2a[2][key] == pytest.approx(2 * a2a[1][key]) and a2a[1][key] > 0
