"""The planner under context parallelism (``parallel.cp``): memory, communication and the search,
each against a sum done by hand or against the same model without CP. The predicted memory is
checked against real CP=2 runs in ``test_plan_memory_measured.py``."""

from __future__ import annotations

from dataclasses import replace

import pytest

from megafusion.config import load_config
from megafusion.core.errors import UsageError
from megafusion.planning import memory as mem
from megafusion.planning.hardware import hardware
from megafusion.planning.plan import GB, plan
from megafusion.planning.search import layouts
from megafusion.planning.step_time import ring, step_time
from tests.helpers import ROOT

MIXED = str(ROOT / "tests/configs/mixed_small.yaml")
TINY = str(ROOT / "examples/configs/tiny_dense.yaml")


def _cfg(*overrides):
    # 4 layers, hidden 32, 4 heads (d 8), 2 kv groups, ffn 64, seq 128, micro-batch 2; packed rows: dense mask
    return load_config(MIXED, ["model.vocab_size=256", *overrides])


def test_a_cp_rank_saves_half_the_tokens_the_gathered_kv_and_half_the_mask():
    cfg = _cfg("model.attention_backend=sdpa")
    one = mem.layer_activation_bytes(cfg, mem.Rank(tp=1, pp=1, vpp=1, dp=1), "fp32")
    two = mem.layer_activation_bytes(cfg, mem.Rank(tp=1, pp=1, vpp=1, dp=1, cp=2), "fp32")
    s, b, groups, d, a = 128, 2, 2, 8, 4
    # The kernel saves the whole row's K and V (2 b s G d elements) instead of its own RoPE'd keys.
    assert two["kv_gathered"] == 2 * b * s * groups * d * a == 32768
    assert two["attention"] == one["attention"] / 2 - (s * b / 2) * a * groups * d
    assert two["mlp"] == one["mlp"] / 2
    assert two["mask"] == one["mask"] / 2 == a * b * (s // 2) * s  # [b, 1, s/2, s]
    assert two["rope"] == 4 * 4 * (s * b / 2) * d  # this rank's positions, per sequence
    # Under TP=2 the rank gathers its one kv head only.
    tp2 = mem.layer_activation_bytes(cfg, mem.Rank(tp=2, pp=1, vpp=1, dp=1, cp=2), "fp32")
    assert tp2["kv_gathered"] == two["kv_gathered"] / 2


def test_selective_recompute_under_cp_keeps_the_local_keys_not_the_gathered_ones():
    cfg = _cfg("model.attention_backend=sdpa")
    rank = mem.Rank(tp=1, pp=1, vpp=1, dp=1, cp=2)
    none = mem.chunk_activation_bytes(cfg, rank, 0, "fp32")
    sel = mem.chunk_activation_bytes(cfg, rank, 0, "fp32", recompute="selective")
    layer = mem.layer_activation_bytes(cfg, rank, "fp32")
    tokens, a, layers = 128 * 2 / 2, 4, 4
    lse, local_keys = tokens * 4 * 4, tokens * a * 2 * 8
    dropped = layers * (layer["mask"] + lse + layer["kv_gathered"] - local_keys)
    assert none["layers"] - sel["layers"] == dropped
    assert sel["ends"] - none["ends"] == 2 * 64 * 128  # the boolean mask the checkpoints keep: b (s/2) s


def test_cp_shards_gradients_and_optimizer_state_over_data_x_context_ranks():
    cfg = _cfg("parallel.distributed_optimizer=true")
    for r in range(2):
        # megatron's DDP and distributed optimizer use the data-parallel group with context parallel:
        # CP=2 (DP 1) shards as DP=2 does, the CP rank taking the DP rank's place.
        assert mem.state_bytes(cfg, mem.Rank(tp=1, pp=1, vpp=1, dp=1, cp=2, cp_rank=r), "bf16") == mem.state_bytes(
            cfg, mem.Rank(tp=1, pp=1, vpp=1, dp=2, dp_rank=r), "bf16"
        )
    # DP 2 x CP 2: rank (dp 1, cp 0) is the third of four shards.
    four = mem.Rank(tp=1, pp=1, vpp=1, dp=2, cp=2, dp_rank=1, cp_rank=0)
    assert four.dp_cp == 4 and four.dp_cp_rank == 2
    assert mem.state_bytes(cfg, four, "bf16") == mem.state_bytes(cfg, mem.Rank(1, 1, 1, dp=4, dp_rank=2), "bf16")


def test_cp_communication_by_hand():
    cfg = _cfg()
    hw = hardware("h100")
    base = mem.Rank(tp=1, pp=1, vpp=1, dp=2)
    cp2 = replace(base, dp=1, cp=2)
    state = mem.state_bytes(cfg, base, "bf16")
    one = step_time(cfg, base, hw, "bf16", 4, "none", 0.5, state)
    two = step_time(cfg, cp2, hw, "bf16", 8, "none", 0.5, mem.state_bytes(cfg, cp2, "bf16"))
    # Per layer and microbatch: all-gather K/V forward + reduce-scatter of their gradients backward,
    # each (c - 1) / c of 2 s b G d a bytes over NVLink; 4 layers; M = 8 microbatches of half rows.
    kv = 2 * 128 * 2 * 2 * 8 * 2
    assert two["cp_comm"] == pytest.approx(8 * 4 * 2 * ring(2) * kv / (hw.nvlink_gbps * 1e9))
    assert one["cp_comm"] == 0
    assert two["compute"] == pytest.approx(one["compute"])  # the same tokens per GPU per step
    assert two["dp_comm"] == pytest.approx(one["dp_comm"])  # gradients reduced over dp x cp = 2 in both
    sel = step_time(cfg, cp2, hw, "bf16", 8, "selective", 0.5, mem.state_bytes(cfg, cp2, "bf16"))
    assert sel["cp_comm"] == pytest.approx(two["cp_comm"] * 3 / 2)  # the gather again in the recompute


def test_the_search_offers_cp_for_long_rows_and_when_nothing_fits_without():
    cfg = load_config(TINY, [])
    found = layouts(cfg, 4, recompute=["none"], cp_sizes=[1, 2, 4])
    assert {lay.cp for lay in found} == {1, 2, 4}
    assert all(lay.tp * lay.cp * lay.pp * lay.dp == 4 for lay in found)
    assert "cp2" in next(lay for lay in found if lay.cp == 2).label()
    # Rows of 40: a multiple of 2 x cp = 8, not of 2 x cp x tp = 16 that CP 4 with TP 2 + SP needs.
    cp4 = layouts(load_config(TINY, ["model.seq_length=40"]), 8, recompute=["none"], cp_sizes=[4])
    assert any(lay.tp == 2 and not lay.sp for lay in cp4) and not any(lay.sp for lay in cp4)

    hw = hardware("h100", gpus_per_node=4)
    short = plan(cfg, 4, hw, recompute=["none"])
    assert short["assumptions"]["cp_sizes"] == [1] and {r["cp"] for r in short["rows"]} == {1}
    long = plan(load_config(TINY, ["model.seq_length=8192"]), 4, hw, recompute=["none"])
    assert long["assumptions"]["cp_sizes"] == [1, 2, 4] and {r["cp"] for r in long["rows"]} == {1, 2, 4}

    # A GPU just too small for any layout without CP: the automatic search adds CP and a CP row fits.
    long_cfg = load_config(TINY, ["model.seq_length=4096"])
    without = min(r["memory_bytes"]["total"] for r in plan(long_cfg, 4, hw, cp_sizes=[1])["rows"])
    with_cp = min(r["memory_bytes"]["total"] for r in plan(long_cfg, 4, hw, cp_sizes=[2, 4])["rows"])
    assert with_cp < without
    small = hardware("h100", gpus_per_node=4, hbm_gb=(with_cp + without) / 2 / GB + 4)
    result = plan(long_cfg, 4, small)
    assert result["assumptions"]["cp_sizes_why"] == "automatic: no layout without context parallelism fits"
    assert result["rows"][0]["fits"] and result["rows"][0]["cp"] > 1


def test_a_bad_cp_list_is_one_line(capsys):
    from megafusion.commands.main import main

    assert main(["plan", "--config", str(ROOT / "none.yaml"), "--gpus", "4", "--cp", "0,2"]) == 2
    assert capsys.readouterr().err == (
        "megafusion plan: --cp 0,2: expected positive integers (context-parallel sizes, 1 = none)\n"
    )
    with pytest.raises(UsageError):
        plan(load_config(TINY, []), 4, hardware("h100"), cp_sizes=[3])  # no layout validates
