"""The training loop: model chunks + DDP + optimizer + megatron-core pipeline schedules.

``train(cfg)`` runs ``cfg.train.steps`` optimizer steps on any TP x PP (x VPP) x DP layout and
returns the per-step losses (identical on every rank). Each step pulls
``global_batch_size / (micro_batch_size x dp)`` microbatches per data-parallel rank; rank d
takes the d-th contiguous slice of the global batch, so the samples of a step are the same
in every layout.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megafusion.data.synthetic import synthetic_microbatch
from megafusion.models.registry import build_model_chunks
from megafusion.models.transformer_config import build_transformer_config
from megafusion.runtime import initialize, seed_everything
from megafusion.training.forward_step import make_forward_step
from megafusion.training.grads import full_gradients
from megafusion.training.optim import build_optimizer


def _microbatches(cfg, step: int, runtime):
    t, m = cfg.train, cfg.model
    per_rank = t.global_batch_size // runtime.dp
    first = step * t.global_batch_size + runtime.dp_rank * per_rank
    for k in range(per_rank // t.micro_batch_size):
        yield synthetic_microbatch(
            first + k * t.micro_batch_size, t.micro_batch_size, t.seed, m.seq_length, m.vocab_size,
            cfg.data.docs_per_sequence,
        )


def _step_sums(forward_data_store, device) -> torch.Tensor:
    """[total, lm, z, tokens] summed over the global batch, known on every rank."""
    sums = torch.zeros(4, device=device)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for item in forward_data_store:
            sums += item["sums"]
        dist.all_reduce(sums, group=ps.get_data_parallel_group())
    dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())  # other stages add zeros
    return sums


def _gather_to_rank0(obj: dict) -> dict | None:
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    if parts is None:
        return None
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def build(cfg, runtime):
    """Model chunks wrapped in megatron DDP, optimizer, scheduler, and the TransformerConfig."""
    tconfig = build_transformer_config(cfg, runtime.device)
    chunks = build_model_chunks(cfg, tconfig, runtime)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    model = [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    optimizer, scheduler = build_optimizer(cfg, tconfig, model)
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    return model, optimizer, scheduler, tconfig


def train(cfg, runtime=None) -> list[float]:
    runtime = runtime or initialize(cfg)
    seed_everything(cfg.train.seed)
    model, optimizer, scheduler, tconfig = build(cfg, runtime)
    forward_step = make_forward_step(cfg, runtime.device)
    forward_backward = get_forward_backward_func()
    t = cfg.train
    num_microbatches = t.global_batch_size // (t.micro_batch_size * runtime.dp)
    log = runtime.is_logging_rank
    if log:
        print(
            f"[megafusion] {cfg.model.arch}: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size} | "
            f"world {runtime.world_size} = tp {runtime.tp} x pp {runtime.pp}"
            f"{f' (vpp {runtime.vpp})' if runtime.vpp else ''} x dp {runtime.dp}"
            f"{' | sequence parallel' if cfg.parallel.sp else ''}"
            f"{' | distributed optimizer' if cfg.parallel.distributed_optimizer else ''} | "
            f"{runtime.device.type} / {runtime.backend} | {num_microbatches} microbatches/step",
            flush=True,
        )
    losses = []
    for step in range(t.steps):
        start = time.perf_counter()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        iterators = [_microbatches(cfg, step, runtime) for _ in model]
        store = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iterators if len(model) > 1 else iterators[0],
            model=model if len(model) > 1 else model[0],
            num_microbatches=num_microbatches,
            seq_length=cfg.model.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=False,
        )
        if step == 0 and cfg.logging.dump_grads:
            grads = _gather_to_rank0(full_gradients(model, cfg.parallel.distributed_optimizer))
            if grads is not None:
                os.makedirs(os.path.dirname(os.path.abspath(cfg.logging.dump_grads)), exist_ok=True)
                torch.save(grads, cfg.logging.dump_grads)
        # Step the schedule first, so that step k trains at lr(k): warmup starts at lr/warmup, not 0.
        scheduler.step(increment=1)
        lr = optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = optimizer.step()
        sums = _step_sums(store, runtime.device)
        tokens = sums[3].item()
        loss = sums[0].item() / tokens
        losses.append(loss)
        elapsed = time.perf_counter() - start
        if log and (step + 1) % cfg.logging.log_interval == 0:
            print(
                f"step {step + 1:>5}/{t.steps} | loss {loss:.5f} | lm {sums[1].item() / tokens:.5f} | "
                f"z {sums[2].item() / tokens:.4f} | lr {lr:.3e} | "
                f"grad_norm {grad_norm:.4f} | {tokens / elapsed:,.0f} tok/s | {elapsed:.2f}s",
                flush=True,
            )
    if cfg.logging.dump_losses and dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.logging.dump_losses)), exist_ok=True)
        with open(cfg.logging.dump_losses, "w") as f:
            json.dump({"losses": losses, "world_size": runtime.world_size, "config": cfg.to_dict()}, f, indent=1)
    return losses
