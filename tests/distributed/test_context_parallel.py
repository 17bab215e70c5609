"""Context parallelism (``parallel.cp``): shards, the attention against one process, resume into CP=1.

The training layouts with CP (CP=2 with full recomputation, CP x TP=2 + SP, CP x PP=2 with the
distributed optimizer) are in ``test_parallel_parity.py``, against the same single-process run as
every other layout; the families' own parity tests add theirs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megafusion.config.loader import load_config
from megafusion.config.validate import validate
from megafusion.core.errors import ConfigError
from megafusion.layers.attended_keys import attended_keys
from megafusion.runtime.context_parallel import PER_TOKEN_KEYS, ContextShard, query_key_pairs, shard_batch
from tests.helpers import ROOT, run_train


@pytest.mark.parametrize("size", [2, 4])
def test_shard_then_unshard_is_the_identity_for_every_per_token_tensor(size):
    s, b = 32, 3
    gen = torch.Generator().manual_seed(1)
    batch = {key: torch.randint(0, 100, (b, s), generator=gen) for key in PER_TOKEN_KEYS}
    batch["modality_ids"] = torch.randint(0, 2, (b, s), generator=gen)
    batch["modality_counts"] = torch.bincount(batch["modality_ids"].reshape(-1), minlength=2)
    batch["latents"] = torch.randn(2, 3, 4, 4)  # not per token: untouched
    shards = [ContextShard(r, size, s) for r in range(size)]
    parts = [shard_batch(batch, shard) for shard in shards]
    for key in PER_TOKEN_KEYS:
        assert all(p[key].shape == (b, s // size) for p in parts)
        assert torch.equal(shards[0].unshard([p[key] for p in parts]), batch[key]), key
    # Every position is held by exactly one rank; the shards' modality counts add up to the batch's.
    held = torch.cat([shard.positions for shard in shards])
    assert torch.equal(torch.sort(held).values, torch.arange(s))
    assert torch.equal(sum(p["modality_counts"] for p in parts), batch["modality_counts"])
    assert all(p["latents"] is batch["latents"] for p in parts)


def test_head_tail_split_balances_one_causal_document_exactly():
    s = 64
    one_doc = attended_keys(torch.zeros(4, s, dtype=torch.int64))
    for size in (2, 4):
        pairs = query_key_pairs(one_doc, size)
        assert len(set(pairs)) == 1 and sum(pairs) == 4 * s * (s + 1) // 2
        # Balancing by cost with one chunk pair per rank (s = 2 cp x 5: no finer chunks) is the
        # head-tail split itself.
        odd = 2 * size * 5
        balanced = ContextShard(0, size, odd, attended_keys(torch.zeros(1, odd, dtype=torch.int64)).sum(0))
        assert all(torch.equal(a, b) for a, b in zip(balanced.by_rank, ContextShard(0, size, odd).by_rank))


@pytest.mark.parametrize("s, shortest, longest", [(64, 8, 40), (256, 8, 100), (1024, 50, 400), (4096, 100, 3000)])
def test_balanced_chunks_keep_packed_rows_within_ten_percent(s, shortest, longest):
    """Random packed rows (a microbatch of 8): the most loaded rank computes at most 1.10x the mean
    query-key pairs with balanced chunks, where megatron's head-tail split can reach 1.4x."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(shortest, longest, (8, s // shortest + 1), generator=gen)
    docs = torch.stack([torch.repeat_interleave(torch.arange(len(row)), row)[:s] for row in lengths])
    keys = attended_keys(docs)
    for size in (2, 4):
        shard = ContextShard(0, size, s, keys.sum(0))
        pairs = shard.pairs(keys)
        assert sum(pairs) == int(keys.sum())
        assert max(pairs) / (sum(pairs) / size) <= 1.10, (size, pairs, query_key_pairs(keys, size))
        held = torch.sort(shard.key_positions).values
        assert torch.equal(held, torch.arange(s)) and all(len(p) == s // size for p in shard.by_rank)


def test_context_parallel_config_checks():
    cfg = load_config(str(ROOT / "tests/configs/parity.yaml"), ["parallel.cp=2", "model.seq_length=30"])
    with pytest.raises(ConfigError, match=r"model.seq_length=30 is not divisible by 2 x parallel.cp = 2 x 2 = 4"):
        validate(cfg, world_size=2)
    cfg = load_config(str(ROOT / "tests/configs/parity.yaml"), ["parallel.cp=2", "model.attention_backend=te"])
    with pytest.raises(ConfigError, match="Transformer Engine's context parallelism takes causal or no masks"):
        validate(cfg, world_size=2)
    cfg = load_config(str(ROOT / "tests/configs/parity.yaml"), ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true"])
    validate(cfg, world_size=4)  # 32 = 2 x 2 x 2 x 4


@pytest.mark.torchrun
def test_attention_under_cp2_and_cp4_equals_one_process(tmp_path):
    """Forward and every input gradient, fp64 within 1e-12 and fp32 within 1e-6 (relative), for a
    causal row, packed documents, padding, image spans crossing the chunk boundaries, caption
    dropout, cross-document attention (``data.attention=causal``); the FlexAttention block mask's
    output too (its backward does not run on CPU); a plain causal mask on packed documents (the
    mistake a CP hook can make) differs."""
    out = tmp_path / "errors.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    proc = subprocess.run(
        [*cmd, str(ROOT / "tests/distributed/cp_attention_worker.py"), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(out.read_text())
    cases = {key.split("/")[0] for key in errors}
    assert {"causal", "documents", "padding", "image_spans", "caption_dropout", "cross_document"} <= cases
    assert {"image_spans_block_mask", "cross_document_block_mask"} <= cases  # FlexAttention (forward)
    for key, err in errors.items():
        if key.startswith("control"):
            assert err > 0.5, f"{key}: the wrong mask went unnoticed ({err:.2e})"
        else:
            assert err <= (1e-12 if key.endswith("float64") else 1e-6), f"{key}: {err:.2e}"


@pytest.mark.torchrun
def test_stopped_under_cp4_resumes_under_cp1_exactly(tmp_path):
    """CP=4 trains like one process and a run stopped right after its step-3 checkpoint under CP=4
    resumes in one process where the uninterrupted one-process run is (every loss within 1e-6
    relative; mixed-modal built-in data: packed documents, padding); the CP=4 steps log their
    query-key pair imbalance."""
    config = "tests/configs/mixed_small.yaml"
    ref, _, _ = run_train(tmp_path, 1, config, [], "ref")
    save = ["checkpoint.save=true", f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.interval=3"]
    stop = {"MEGAFUSION_FAULT": "after_save:3"}
    _, _, out = run_train(tmp_path, 4, config, [*save, "parallel.cp=4"], "cp4", env=stop, expect_rc=1)
    assert "x cp 4" in out
    logged = [json.loads(line) for line in (tmp_path / "cp4" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "cp/pair_imbalance" in r]
    assert len(steps) == 3 and all(1.0 <= r["cp/pair_imbalance"] <= 1.10 for r in steps), steps
    resumed, _, out = run_train(tmp_path, 1, config, save, "cp1")
    assert "resumed from" in out and "step_0000003" in out
    losses = [r["loss"] for r in steps] + resumed
    assert len(losses) == len(ref) == 6
    for got, want in zip(losses, ref):  # CP sums attention and losses in another order: rounding only
        assert abs(got - want) <= 1e-6 * abs(want), (losses, ref)


def test_inference_refuses_context_parallelism():
    """Logits, text evaluation and generation feed whole rows: parallel.cp>1 is refused by name."""
    from megafusion.inference.load import CheckpointRun, model_from_checkpoint

    cfg = load_config(str(ROOT / "tests/configs/parity.yaml"), ["parallel.cp=2"])
    with pytest.raises(ConfigError, match="parallel.cp=2: context parallelism is for training"):
        model_from_checkpoint(CheckpointRun(ROOT / "no-checkpoint", {}, cfg), rows=(1, 32))
