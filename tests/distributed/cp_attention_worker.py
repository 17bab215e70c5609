"""Run under ``torchrun --nproc-per-node 4``: context-parallel attention (CP=2 and CP=4) against one process.

For each mask case and dtype, every rank computes the whole row's attention (forward and the
gradients of q, k, v for a fixed upstream gradient) with :class:`MaskedCoreAttention` and no
context parallelism, then its own shard (megatron's head-tail split, or chunks balanced by cost)
with ``parallel.cp`` = 2 (ranks {0, 1} and {2, 3}) and 4: its query rows, keys and values of its
own positions, the mask made from the whole row's metadata
(:func:`megafusion.layers.masks.context_mask`). The shard's output and gradients must equal the
reference's rows at the shard's positions. Rank 0 writes ``{case: largest relative error}`` (the
worst rank's) to ``argv[1]``; ``control_causal_mask`` shards packed documents with a plain causal
mask, which must differ.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from megafusion.core.modality import NO_IMAGE
from megafusion.layers.attended_keys import attended_keys
from megafusion.layers.core_attention import MaskedCoreAttention
from megafusion.layers.masks import context_mask
from megafusion.runtime import cpu_compat
from megafusion.runtime.context_parallel import ContextShard

B, S, HEADS, GROUPS, DIM = 2, 32, 4, 2, 8


def cases() -> dict[str, dict]:
    """Per case, the whole microbatch's metadata (``[b, s]``)."""
    docs = torch.zeros(B, S, dtype=torch.int64)
    two_docs = docs.clone()
    two_docs[0, 11:] = 1  # row 0: documents of 11 and 21 tokens; row 1: 5, 14, 13
    two_docs[1, 5:] = 1
    two_docs[1, 19:] = 2
    padded = two_docs.clone()
    padded[0, 27:] = -1  # trailing padding
    padded[1, 30:] = -1
    images = torch.full((B, S), NO_IMAGE, dtype=torch.int64)
    images[0, 4:10] = 0  # inside one chunk
    images[0, 13:22] = 1  # straddles the CP=2 chunk boundary at 16 (and CP=4's at 16)
    images[1, 6:18] = 0  # straddles CP=2's boundary at 16 and CP=4's at 8 and 16
    first_key = torch.zeros(B, S, dtype=torch.int64)
    first_key[0, 13:22] = 12  # caption dropout: image 1's patches see <bos> and from position 12 on
    return {
        "causal": {"document_ids": docs},
        "documents": {"document_ids": two_docs},
        "padding": {"document_ids": padded},
        "image_spans": {"document_ids": two_docs, "image_ids": images},
        "caption_dropout": {"document_ids": two_docs, "image_ids": images, "first_key": first_key},
        # data.attention=causal: across documents, images bidirectional in their span, pads never keys
        "cross_document": {"document_ids": padded, "image_ids": images, "cross_document": True},
    }


def attention(cp_group=None, cp_size=1) -> MaskedCoreAttention:
    config = SimpleNamespace(context_parallel_size=cp_size, attention_dropout=0.0, kv_channels=DIM)
    return MaskedCoreAttention(config, 1, None, pg_collection=SimpleNamespace(cp=cp_group)).eval()


def run(module, q, k, v, mask, grad):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = module(q, k, v, mask)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def relative_error(got, ref, shard: ContextShard) -> float:
    """The largest of (output, dq, dk, dv)'s max abs difference over the reference's max abs value,
    the reference taken at the shard's positions."""
    return max(float((g - shard.shard(r, dim=0)).abs().max() / r.abs().max()) for g, r in zip(got, ref))


def main() -> None:
    dist.init_process_group("gloo")
    cpu_compat.enable()  # megatron's all-gather allocates on "the current CUDA device"
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 4, "run with --nproc-per-node 4"
    groups = {2: [dist.new_group([0, 1]), dist.new_group([2, 3])], 4: [dist.new_group([0, 1, 2, 3])]}
    errors, cpu = {}, torch.device("cpu")
    for dtype in (torch.float64, torch.float32):
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(S, B, HEADS, DIM, generator=gen, dtype=dtype)
        k = torch.randn(S, B, GROUPS, DIM, generator=gen, dtype=dtype)
        v = torch.randn(S, B, GROUPS, DIM, generator=gen, dtype=dtype)
        grad = torch.randn(S, B, HEADS * DIM, generator=gen, dtype=dtype)
        for name, batch in cases().items():
            everything = torch.arange(S)
            cross = batch.get("cross_document", False)
            full = context_mask(batch, "sdpa", cpu, everything, everything, cross)
            ref = run(attention(), q, k, v, full, grad)
            for size, group_list in groups.items():
                group = group_list[rank // size] if size == 2 else group_list[0]
                # The causal row: megatron's head-tail split; the rest: chunks balanced by their keys
                # (2-token chunks under CP=2, single positions under CP=4: scattered shards).
                keys = attended_keys(batch["document_ids"], batch.get("image_ids"), cross_document=cross)
                cost = None if name == "causal" else keys.sum(0)
                shard = ContextShard(rank % size, size, S, cost)
                mask = context_mask(batch, "sdpa", cpu, shard.positions, shard.key_positions, cross)
                local = [shard.shard(t, dim=0) for t in (q, k, v, grad)]
                got = run(attention(group, size), *local[:3], mask, local[3])
                errors[f"{name}/cp{size}/{str(dtype).split('.')[-1]}"] = relative_error(got, ref, shard)
                if name in ("image_spans", "cross_document"):  # the FlexAttention block mask, same rows
                    block = context_mask(batch, "flex", cpu, shard.positions, shard.key_positions, cross)
                    with torch.no_grad():  # FlexAttention has no backward on CPU: the forward only
                        flex = attention(group, size)(*local[:3], block)
                    err = float((flex - shard.shard(ref[0], dim=0)).abs().max() / ref[0].abs().max())
                    errors[f"{name}_block_mask/cp{size}/{str(dtype).split('.')[-1]}"] = err
                if name == "documents":  # the control: a plain causal mask on packed documents is wrong
                    causal = context_mask(cases()["causal"], "sdpa", cpu, shard.positions, shard.key_positions)
                    wrong = run(attention(group, size), *local[:3], causal, local[3])
                    errors[f"control_causal_mask/cp{size}/{str(dtype).split('.')[-1]}"] = relative_error(
                        wrong, ref, shard
                    )
    gathered = [None] * world
    dist.all_gather_object(gathered, errors)
    if rank == 0:
        worst = {key: max(e[key] for e in gathered) for key in errors}
        with open(sys.argv[1], "w") as f:
            json.dump(worst, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
