"""The training loop: data, model chunks + DDP + optimizer, megatron-core pipeline schedules,
evaluation, checkpoints and metrics.

``train(cfg)`` runs optimizer steps up to ``cfg.train.steps`` on any TP x PP (x VPP) x DP
layout, resuming from ``checkpoint.dir/latest`` when there is one, and returns the per-step
losses of the steps it ran (identical on every rank). Each step takes
``global_batch_size / (micro_batch_size x dp)`` microbatches per data-parallel rank; rank d
reads the d-th contiguous slice of the global batch, so the samples of a step are the same
in every layout and after a resume.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megafusion import checkpoint as ckpt
from megafusion.accounting.flops import batch_flops
from megafusion.accounting.mfu import describe_peak, mfu, peak_tflops
from megafusion.accounting.params import describe_layers, layer_costs, parameter_counts
from megafusion.accounting.recompute import recompute_flops
from megafusion.core.errors import NumericsError
from megafusion.core.modality import MODALITY_NAMES
from megafusion.data.sources import build_data
from megafusion.layers import load_balance
from megafusion.layers.aux_router import aux_routers_of, summarize, take_stats
from megafusion.layers.expert_choice_router import routers_of, take_min_margin
from megafusion.layers.token_choice_router import token_choice_routers_of
from megafusion.models.registry import causal_routing
from megafusion.models.transformer_config import build_transformer_config
from megafusion.objectives.build import build_model_chunks
from megafusion.objectives.registry import get_objective
from megafusion.runtime import initialize, seed_everything, stage_channel
from megafusion.runtime.children import die_with_parent
from megafusion.training import numerics, resume_changes, run_dir
from megafusion.training.forward_step import make_forward_step, report_fields
from megafusion.training.grads import full_gradients
from megafusion.training.metrics import MetricsLogger, duration, memory_gb
from megafusion.training.optim import build_optimizer
from megafusion.training.preemption import Preempted, StopSignals, write_status


def build(cfg, runtime, latent_shape=None):
    """Model chunks wrapped in megatron DDP, optimizer, scheduler, and the TransformerConfig."""
    tconfig = build_transformer_config(cfg, runtime.device)
    chunks = build_model_chunks(cfg, tconfig, runtime, latent_shape)
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


class Trainer:
    """One run: holds the pieces and runs steps / evaluations on them."""

    def __init__(self, cfg, runtime):
        self.cfg, self.rt = cfg, runtime
        t = cfg.train
        self.per_rank = t.global_batch_size // runtime.dp
        self.num_microbatches = self.per_rank // t.micro_batch_size
        self.data = build_data(cfg, runtime.tp, dist.get_rank() == 0, dist.barrier)
        self.data.set_model_vocabulary(cfg.model)
        codec = getattr(self.data.tokenizer, "codec", None)
        latent_shape = codec.latent_codec.latent_shape if hasattr(codec, "latent_codec") else None
        self.latent_shape = latent_shape  # Transfusion: what the image modules' FLOPs and parameters depend on
        self.objective = get_objective(cfg.objective.name)
        self.fields = report_fields(self.objective)
        self.model, self.optimizer, self.scheduler, self.tconfig = build(cfg, runtime, latent_shape)
        self.forward_step = make_forward_step(cfg, runtime.device)
        self.forward_backward = get_forward_backward_func()
        self.flops_seen = 0.0  # model FLOPs trained so far (restored on resume)
        self.spikes = numerics.SpikeWatch(cfg.train.spike_factor)  # its recent losses are restored on resume
        self.pinned: list[Path] = []  # the last checkpoint before each loss spike: never pruned (kept on resume)
        self.lineage: dict | None = None  # the seed of checkpoint.init_from, recorded in every save (kept on resume)
        self.last_spike: int | None = None
        # Layers with a router: the routers whose smallest selection margin a step reports.
        self.routers = None
        if any(c.router for c in layer_costs(cfg)):
            self.routers = routers_of(self.model) + token_choice_routers_of(self.model)
        # Top-k token choice (megatron's aux_loss balancing, the same config on every rank): its
        # load-balancing loss and expert shares, summed over every rank once per step.
        self.balance = token_choice_routers_of(self.model)
        tc = self.tconfig
        self.logs_balance = bool(tc.num_moe_experts) and tc.moe_router_load_balancing_type == "aux_loss"
        # Auxiliary routers (causal predictors of a non-causal router): their BCE and accuracy are
        # logged; evaluation then reports the losses under causal routing too.
        self.aux_routers = aux_routers_of(self.model)
        self.causal_eval = bool(self.aux_routers) and causal_routing(cfg)

    def _microbatches(self, source, first_sample: int, training: bool = True) -> list[dict]:
        mbs = self.cfg.train.micro_batch_size
        first = first_sample + self.rt.dp_rank * self.per_rank
        batches = [source.microbatch(first + k * mbs, mbs) for k in range(self.num_microbatches)]
        for k, batch in enumerate(batches):  # each row's sample number keys its random draws (router noise)
            batch.setdefault("sample_ids", torch.arange(first + k * mbs, first + (k + 1) * mbs))
        self.objective.prepare_step(self.cfg, source, first_sample, batches, training)
        return batches

    def _run(self, microbatches: list[dict], forward_only: bool):
        iterators = [iter(microbatches) for _ in self.model]
        store = self.forward_backward(
            forward_step_func=self.forward_step,
            data_iterator=iterators if len(self.model) > 1 else iterators[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )
        stage_channel.drain()  # the U-Net's first-to-last-stage sends (pp > 1) still in flight
        return store

    def _reduce(self, store, extra: torch.Tensor) -> dict[str, float]:
        """Sum the loss reports over microbatches and DP ranks (+ ``extra``, summed over DP)."""
        report = torch.zeros(len(self.fields), device=self.rt.device, dtype=torch.float64)  # FLOPs need 64 bits
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for item in store:
                report += item["report"]
        vec = torch.cat([report, extra.to(report.device, report.dtype)])
        # Every pipeline stage holds the same `extra`: reduce it over DP only, the report over
        # DP and then PP (stages without the loss add zeros).
        dist.all_reduce(vec, group=ps.get_data_parallel_group())
        report = vec[: len(self.fields)]
        dist.all_reduce(report, group=ps.get_pipeline_model_parallel_group())
        out = dict(zip(self.fields, report.tolist()))
        out["extra"] = vec[len(self.fields) :].tolist()
        return out

    def train_step(self, step: int, consumed: int, dump_grads: str | None) -> dict:
        """One optimizer step. A step whose loss or gradient norm is not finite updates nothing and
        comes back with ``skipped`` (what was not finite, and where); the loop applies train.on_nan."""
        start = time.perf_counter()
        microbatches = self._microbatches(self.data.train, consumed)
        poisoned = _injected_nan(step + 1)
        if poisoned is not None:
            microbatches[poisoned]["inject_nan"] = True
        # Model FLOPs of this rank's microbatches: [total, per modality..., the recomputed forward
        # (train.recompute; hardware FLOPs = model + it)], summed over DP below.
        flops = torch.zeros(2 + len(MODALITY_NAMES), dtype=torch.float64)
        for mb in microbatches:
            # The objective's mask and extra modules (Transfusion: each image's time embedding,
            # patch embedding and head) are counted too.
            keys = self.objective.flops_inputs(mb, self.cfg.data.cross_document())
            inputs = {"latent_shape": self.latent_shape, **keys}
            counted = batch_flops(self.cfg, mb["document_ids"], mb["modality_ids"], **inputs)
            again = recompute_flops(self.cfg, mb["document_ids"], mb["modality_ids"], **inputs)["total"]
            flops += torch.tensor(
                [counted["total"], *(counted["per_modality"][m] for m in MODALITY_NAMES), again], dtype=torch.float64
            )
        flops = torch.cat([flops, _served_tokens(microbatches, self.data.train)])
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        store = self._run(microbatches, forward_only=False)
        margin = self._min_margin()
        aux = self._aux_stats()
        balance = self._balance_stats()
        if dump_grads:
            _dump_gradients(self.model, self.cfg.parallel.distributed_optimizer, dump_grads)
        # Step the schedule first, so that step k trains at lr(k): warmup starts at lr/warmup, not 0.
        self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        r = self._reduce(store, flops)  # the losses are known before the weights change
        skipped = None
        bad = numerics.nonfinite_fields(r, self.fields)
        if bad:
            mbs = self.cfg.train.micro_batch_size
            where = numerics.locate(store, self.fields, consumed + self.rt.dp_rank * self.per_rank, mbs)
            skipped = {"what": "loss", "fields": bad, "where": where}
            grad_norm = float("nan")
        else:
            updated, grad_norm = numerics.guarded_optimizer_step(self.optimizer)
            if not updated:
                skipped = {"what": "gradient norm", "fields": [], "where": None}
        elapsed = time.perf_counter() - start
        tokens = self.cfg.train.global_batch_size * self.cfg.model.seq_length
        tflops = r["extra"][0] / elapsed / self.rt.world_size / 1e12
        hardware = r["extra"][0] + r["extra"][1 + len(MODALITY_NAMES)]  # + the recomputed forward
        hardware_tflops = hardware / elapsed / self.rt.world_size / 1e12
        self.flops_seen += r["extra"][0]
        record = {
            "step": step + 1,
            "total_steps": self.cfg.train.steps,
            "consumed_samples": consumed + self.cfg.train.global_batch_size,
            "loss": r["total"] / r["tokens"],
            "loss/lm": r["lm"] / r["tokens"],
            "z_loss": r["z"] / r["tokens"],
        }
        record.update(self._per_modality(r, "loss"))
        record.update(
            {
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens / elapsed,
                "tflops_per_gpu": tflops,
                "mfu": mfu(tflops * 1e12, self.peak),
                "mem_gb": memory_gb(self.rt.device),
                "step_time_s": elapsed,
                # model FLOPs (forward + backward, all ranks): this step, per modality, and
                # since step 0 (kept across resumes): the x axis of loss-vs-compute curves
                "flops": r["extra"][0],
                "flops_total": self.flops_seen,
                # hardware FLOPs: the model's plus the forward that train.recompute runs again
                # (equal without recomputation); HFU = their rate over the peak
                "hardware_flops": hardware,
                "hardware_tflops_per_gpu": hardware_tflops,
                "hfu": mfu(hardware_tflops * 1e12, self.peak),
            }
        )
        record.update({f"flops/{m}": v for m, v in zip(MODALITY_NAMES, r["extra"][1 : 1 + len(MODALITY_NAMES)])})
        record.update(_token_shares(r["extra"][2 + len(MODALITY_NAMES) :], self.data.train))
        if margin is not None and math.isfinite(smallest := margin.item()):  # after _reduce's sync: no wait
            record["moe/min_margin"] = smallest
        if aux is not None:
            record.update(summarize(aux.tolist(), "aux"))
        if balance is not None and self.balance:
            record.update(load_balance.summarize(balance.cpu(), self.balance[0].groups, self.balance[0].topk))
        if skipped:
            record["skipped"] = skipped
        return record

    def _aux_stats(self) -> torch.Tensor | None:
        """The auxiliary routers' statistics since the last call, summed over every rank (each
        token counted once per layer: :mod:`megafusion.layers.aux_router`); None without them."""
        if not self.aux_routers:
            return None
        stats = take_stats(self.aux_routers, self.rt.device)
        dist.all_reduce(stats)
        return stats

    def _balance_stats(self) -> torch.Tensor | None:
        """The token-choice routers' statistics of the step by layer, summed over every rank (one
        all-reduce; :mod:`megafusion.layers.load_balance`); None without such routers."""
        if not self.logs_balance:
            return None
        stats = load_balance.take_stats(
            self.balance, self.cfg.model.num_layers, self.tconfig.num_moe_experts, self.rt.device
        )
        dist.all_reduce(stats)
        return stats

    def _min_margin(self) -> torch.Tensor | None:
        """The step's smallest expert-choice selection margin over all ranks (one all-reduce), or
        None for a family without experts; +inf when every expert took every token."""
        if self.routers is None:
            return None
        margin = take_min_margin(self.routers, self.rt.device)
        dist.all_reduce(margin, op=dist.ReduceOp.MIN)
        return margin

    def evaluate(self, step: int, per_domain: bool | None = None) -> dict | None:
        """Validation losses (``val/...``) under the training routing; with auxiliary routers also
        their precision, recall and accuracy against it (``val/aux/...``) and the losses under
        causal routing (``val_causal/...``: each token routed from its own state, as in generation).

        ``per_domain`` (default: whether ``data.domains`` is set): every domain's held-out documents
        evaluated alone, ``eval.batches`` batches each (``val/domain/<name>/loss``, per modality,
        ``.../tokens``), the trained domains and the others; ``val/loss`` is then the token-weighted
        loss over them all. Otherwise the held-out documents of all the data, packed together."""
        per_domain = bool(self.cfg.data.domains) if per_domain is None else per_domain
        sources = self.data.val_domains if per_domain else {"": self.data.val} if self.data.val is not None else {}
        if not sources:
            return None
        for chunk in self.model:
            chunk.eval()
        take_stats(self.aux_routers, self.rt.device)  # what training left: not validation's
        record = {"step": step, **self._domain_losses(self.forward_step, sources, "val")}
        if self.aux_routers:
            record.update(summarize(self._aux_stats().tolist(), "val/aux"))
        if self.causal_eval:
            causal = make_forward_step(self.cfg, self.rt.device, causal=True)
            record.update(self._domain_losses(causal, sources, "val_causal", tokens=False))
        for chunk in self.model:
            chunk.train()
        return record

    def _domain_losses(self, forward_step, sources: dict, prefix: str, tokens: bool = True) -> dict:
        """``<prefix>/loss`` (+ per modality) over all ``sources`` ({domain: source}; one unnamed
        source: no per-domain keys) and each named domain's ``<prefix>/domain/<name>/loss``."""
        reports = {name: self._validation(forward_step, source) for name, source in sources.items()}
        total = {k: sum(r[k] for r in reports.values()) for k in self.fields}
        record = {f"{prefix}/loss": total["total"] / total["tokens"]}
        if tokens:
            record[f"{prefix}/tokens"] = int(total["tokens"])
        record.update(self._per_modality(total, f"{prefix}/loss"))
        for name, r in reports.items():
            if name:
                record[f"{prefix}/domain/{name}/loss"] = r["total"] / r["tokens"]
                record.update(self._per_modality(r, f"{prefix}/domain/{name}/loss"))
                if tokens:
                    record[f"{prefix}/domain/{name}/tokens"] = int(r["tokens"])
        return record

    def _validation(self, forward_step, source) -> dict:
        """The reports of ``eval.batches`` batches of the validation ``source``, summed."""
        total, train_step = None, self.forward_step
        self.forward_step = forward_step
        try:
            with torch.no_grad():
                for b in range(self.cfg.eval.batches):
                    first = b * self.cfg.train.global_batch_size
                    r = self._reduce(
                        self._run(self._microbatches(source, first, training=False), forward_only=True),
                        torch.zeros(0),
                    )
                    total = r if total is None else {k: total[k] + r[k] for k in self.fields}
        finally:
            self.forward_step = train_step
        return total

    def _per_modality(self, r: dict, prefix: str) -> dict:
        """LM loss per modality (where it has tokens), then the objective's (Transfusion: diffusion)."""
        out = {f"{prefix}/{m}": r[f"lm/{m}"] / r[f"tokens/{m}"] for m in MODALITY_NAMES if r[f"tokens/{m}"] > 0}
        out.update(self.objective.metrics(r, prefix))
        return out

    @property
    def peak(self):
        return peak_tflops(self.rt.device, self.cfg.logging.peak_tflops)


def _served_tokens(microbatches: list[dict], source) -> torch.Tensor:
    """Document tokens (padding excluded) of this rank's microbatches: per modality, then per
    dataset of a blend (``dataset_tokens``)."""
    counts = torch.zeros(len(MODALITY_NAMES) + len(getattr(source, "names", ())), dtype=torch.float64)
    for mb in microbatches:
        real = mb["document_ids"] >= 0
        counts[: len(MODALITY_NAMES)] += torch.bincount(
            mb["modality_ids"][real], minlength=len(MODALITY_NAMES)
        ).double()
        if "dataset_tokens" in mb:
            counts[len(MODALITY_NAMES) :] += mb["dataset_tokens"].double()
    return counts


def _token_shares(counts: list[float], source) -> dict:
    """``data/share/<modality>`` and, for a blend, ``data/blend/<dataset>/share`` (with data.domains
    ``data/domain/<domain>/share``): the realised token shares of the step (all ranks); sum the
    ``.../tokens`` counts over steps for any longer window."""
    m = len(MODALITY_NAMES)
    keys = [(f"data/tokens/{n}", f"data/share/{n}") for n in MODALITY_NAMES]
    group = getattr(source, "share_group", "blend")
    keys += [(f"data/{group}/{n}/tokens", f"data/{group}/{n}/share") for n in getattr(source, "names", ())]
    out = {}
    for group in (slice(0, m), slice(m, len(keys))):
        total = sum(counts[group]) or 1.0
        for (tokens, share), count in zip(keys[group], counts[group]):
            out[tokens], out[share] = count, count / total
    return out


def _dump_gradients(model, distributed_optimizer: bool, path: str) -> None:
    grads = full_gradients(model, distributed_optimizer)
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(grads, parts, dst=0)
    if parts is not None:
        merged = {}
        for part in parts:
            merged.update(part)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(merged, path)


def _banner(trainer: Trainer, log: MetricsLogger, ckpt_root, origin) -> None:
    cfg, rt = trainer.cfg, trainer.rt
    params = parameter_counts(cfg, trainer.latent_shape)
    frozen = (
        f", {params['trainable'] / 1e6:.2f}M trainable: LMFusion, text rows < {cfg.model.frozen_vocab_rows} "
        f"and text copies frozen"
        if cfg.model.freeze_text
        else ""
    )
    log.say(
        f"[megafusion] {cfg.model.arch}: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"{params['total'] / 1e6:.2f}M parameters ({params['active'] / 1e6:.2f}M active"
        # MoMa: total holds every expert; a token meets the router and about one expert of its group.
        f"{' per token' if params['experts'] else ''}{frozen}), "
        f"vocab {cfg.model.vocab_size} | "
        f"world {rt.world_size} = tp {rt.tp} x pp {rt.pp}{f' (vpp {rt.vpp})' if rt.vpp else ''} x dp {rt.dp}"
        f"{' | sequence parallel' if cfg.parallel.sp else ''}"
        f"{' | distributed optimizer' if cfg.parallel.distributed_optimizer else ''}"
        f"{f' | recompute {cfg.train.recompute}' if cfg.train.recompute != 'none' else ''} | "
        f"{rt.device.type} / {rt.backend} | {trainer.num_microbatches} microbatches/step"
    )
    routing = describe_layers(cfg)
    if routing:
        log.say(f"[megafusion] layers: {routing}")
    for line in trainer.data.describe().splitlines():
        log.say(f"[megafusion] data {line}")
    if trainer.peak is None:
        log.say(f"[megafusion] {describe_peak(rt.device, cfg.logging.peak_tflops)}")
    log.say(
        f"[megafusion] metrics -> {os.path.join(cfg.logging.out_dir, 'metrics.jsonl')}"
        f"{' (+ wandb offline)' if cfg.logging.wandb else ''} | checkpoints -> "
        f"{ckpt_root if cfg.checkpoint.save else 'off (checkpoint.save=false)'}"
    )
    if origin:
        log.say(f"[megafusion] {origin}")


def _resume(trainer: Trainer, path: Path | None) -> tuple[int, int, str | None, list[str]]:
    """(first step, consumed samples, where the weights came from, the settings changed since the
    checkpoint) for a resume from ``path``, a warm start or neither."""
    cfg = trainer.cfg
    if path is None:
        if cfg.checkpoint.init_from:  # a new run that starts from another run's weights
            init = ckpt.resolve_checkpoint(cfg.checkpoint.init_from)
            manifest = ckpt.read_manifest(init)
            # check_compatible has compared the data (tokenizer, sources): continuing the source
            # run's stream is meaningful.
            warm = ckpt.check_compatible(init, manifest, cfg, trainer.data.meta, weights_only=True)
            checked = ckpt.load_weights(init, trainer.model, warm, verify=cfg.checkpoint.verify)
            # After the load verified it: the seed's identity, which every checkpoint of this run records.
            trainer.lineage = ckpt.seed_lineage(init, manifest)
            # Mixed-precision optimizers keep fp32 main copies made at build time: refresh them,
            # or the first step would write the random init back over the loaded weights.
            trainer.optimizer.reload_model_params()
            how = warm.describe()
            how = f"; {how}" if how else ""
            first = ckpt.data_position(manifest)
            data = f"; data from sample {first}, where the source run stopped" if first else ""
            return (
                0,
                first,
                f"initialised from {init} (model weights only: step 0, fresh optimizer{how}{data}; {checked}; "
                f"lineage seed {trainer.lineage['seed'][:12]})",
                [],
            )
        if cfg.model.freeze_text:
            raise ckpt.CheckpointError(
                "model.freeze_text=true (LMFusion) freezes the text half of a pretrained model: "
                "give it with checkpoint.init_from (a dense or MoT checkpoint, e.g. from "
                "`megafusion convert hf-to-mf`)"
            )
        return 0, 0, None, []
    manifest = ckpt.read_manifest(path)
    ckpt.check_compatible(path, manifest, cfg, trainer.data.meta)
    changes = resume_changes.review(path, manifest.get("config", {}), cfg)
    progress = ckpt.load_checkpoint(
        path, trainer.model, trainer.optimizer, trainer.scheduler, verify=cfg.checkpoint.verify
    )
    resume_changes.apply_optimizer_settings(trainer.optimizer, cfg)
    trainer.flops_seen = float(progress.get("flops_total", 0.0))
    trainer.spikes.recent.extend(progress.get("recent_losses", ()))  # none in checkpoints from before
    trainer.pinned = [path.parent / name for name in progress.get("pinned", ()) if (path.parent / name).is_dir()]
    trainer.lineage = ckpt.recorded_lineage(manifest)  # the same run: the same seed (none if it had none)
    return progress["step"], progress["consumed_samples"], f"resumed from {path} ({progress['verified']})", changes


def _injected_nan(step: int) -> int | None:
    """Test hook: ``MEGAFUSION_FAULT=nan:<step>[:<microbatch>]``: the microbatch (of this rank's) whose
    output that step poisons."""
    fault = os.environ.get("MEGAFUSION_FAULT", "").split(":")
    if fault[0] == "nan" and int(fault[1]) == step:
        return int(fault[2]) if len(fault) > 2 else 0
    return None


def _modalities(fields: list[str]) -> str:
    """``lm/text``, ``lm/image``, ``diffusion`` -> "modalities text, image; diffusion loss"."""
    named = [f.split("/", 1)[1] for f in fields if f.startswith("lm/")]
    own = [f for f in fields if "/" not in f and f not in ("total", "lm", "z")]
    parts = [f"modalit{'y' if len(named) == 1 else 'ies'} {', '.join(named)}"] if named else []
    parts += [f"{f} loss" for f in own]
    return "; ".join(parts) or ", ".join(fields)


def _last_safe(root: Path, saved_at: int | None) -> str:
    """Which checkpoint a run stopped now would continue from, for the lines that say it stopped."""
    if saved_at:
        return f"the last checkpoint is {ckpt.step_dir(root, saved_at)}"
    return "no checkpoint was saved yet"


def _nan_message(cfg, record: dict, root: Path, saved_at: int | None) -> str:
    step, skipped = record["step"], record["skipped"]
    if skipped["what"] == "loss":
        where = skipped["where"]
        what = f"the loss is not finite ({_modalities(skipped['fields'])})"
        if where:
            mbs = cfg.train.micro_batch_size
            sample = where["sample"]
            first = sample - (record["consumed_samples"] - cfg.train.global_batch_size)
            what += (
                f", first in microbatch {first // mbs} of the step (samples {sample}-{sample + mbs - 1}"
                f" of the run; {_modalities(where['fields'])})"
            )
    else:
        what = f"the gradient norm is {record['grad_norm']} (losses finite: {record['loss']:.4f})"
    if cfg.train.on_nan == "skip":  # the run goes on: say what was dropped, not how to drop it
        return f"step {step}: {what}; the step's update was not applied (train.on_nan=skip)"
    return (
        f"step {step}: {what}; the step's update was not applied and nothing was saved "
        f"({_last_safe(root, saved_at)}). Lower train.lr (now {cfg.train.lr:g}) or raise train.warmup_steps, check "
        f"those samples, or resume with train.on_nan=skip to drop such steps"
    )


def _summary(cfg, start_step: int, last: dict | None, val: dict | None, wall: float, saved: Path | None) -> str:
    if last is None:
        return f"[megafusion] nothing to do: the checkpoint is at step {start_step} >= train.steps={cfg.train.steps}"
    steps = last["step"] - start_step
    tokens = steps * cfg.train.global_batch_size * cfg.model.seq_length
    per = " ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in last.items() if k.startswith("loss/") and k != "loss/lm")
    text = (
        f"[megafusion] done: steps {start_step + 1}-{last['step']} ({steps} steps, {tokens:,} tokens) in "
        f"{duration(wall)} | final train loss {last['loss']:.4f}" + (f" ({per})" if per else "")
    )
    if val is not None:
        vper = " ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in val.items() if k.startswith("val/loss/"))
        text += f" | val loss {val['val/loss']:.4f}" + (f" ({vper})" if vper else "")
    return text + f" | checkpoint {saved if saved else 'none saved'}"


TINY_DATA_EPOCHS = 10  # warn from this many passes over the training set


def _epochs_note(trainer: Trainer) -> str | None:
    """A warning when the steps ask for many passes over a small training set."""
    rows = getattr(trainer.data.train, "num_rows", None)
    t = trainer.cfg.train
    if not rows:
        return None
    epochs = t.steps * t.global_batch_size / rows
    if epochs < TINY_DATA_EPOCHS:
        return None
    return (
        f"[megafusion] warning: the training set holds {rows:,} rows and train.steps={t.steps} x "
        f"train.global_batch_size={t.global_batch_size} read {epochs:.0f} epochs of it: the model will memorise "
        f"it; use more data (data.num_samples for the built-in sets) or fewer steps"
    )


def _save(trainer: Trainer, root: Path, step: int, consumed: int, saved_at: int | None) -> Path:
    if not numerics.weights_finite(trainer.model, trainer.rt.device):
        raise NumericsError(
            f"step {step}: some weights are not finite although the loss and gradient norm were: nothing was "
            f"saved ({_last_safe(root, saved_at)}); lower train.lr or train.clip_grad"
        )
    return ckpt.save_checkpoint(
        root,
        step,
        trainer.model,
        trainer.optimizer,
        trainer.scheduler,
        consumed,
        trainer.cfg,
        trainer.data.meta,
        trainer.cfg.checkpoint.keep_last,
        # The recent losses, so that a resumed run watches for loss spikes from its first step.
        # The pins too: a resumed run keeps them out of pruning as well.
        progress={
            "flops_total": trainer.flops_seen,
            "recent_losses": list(trainer.spikes.recent),
            "pinned": [p.name for p in trainer.pinned],
        },
        pinned=trainer.pinned,
        lineage=trainer.lineage,
    )


def train(cfg, runtime=None) -> list[float]:
    device = runtime.device.type if runtime else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.model.attention_backend == "flex" and device != "cuda":
        from megafusion.config import ConfigError

        # torch's FlexAttention runs forward on CPU but has no CPU backward (NotImplementedError
        # at the first step): say so before building anything.
        raise ConfigError(
            f"model.attention_backend=flex trains on CUDA only (torch's FlexAttention has no "
            f"backward on {device}): use model.attention_backend=sdpa (or auto) here"
        )
    try:
        if int(os.environ.get("RANK", "0")) == 0:  # locks, a lost `latest`, another run's files
            run_dir.prepare(cfg, print)
        return _train(cfg, runtime or initialize(cfg))
    finally:
        run_dir.release()


def _train(cfg, runtime) -> list[float]:
    dist.barrier()  # rank 0 has prepared the directories: every rank reads what it left
    root = ckpt.resolve_dir(cfg)
    run_dir.check_output_paths(cfg, root)
    resume_from = ckpt.checkpoint_to_resume(root, cfg.checkpoint.load_step) if cfg.checkpoint.resume else None
    # The stop signals are handled from here on: a signal while the model is built stops the run
    # after its first step (saved), not with a half-built process killed outright.
    with StopSignals(cfg.train.stop_signals, cfg.train.stop_deadline_s, runtime.rank) as stop:
        die_with_parent()  # checkpoint writer processes die with this one, whatever kills it
        seed_everything(cfg.train.seed)
        trainer = Trainer(cfg, runtime)
        start_step, consumed, origin, changes = _resume(trainer, resume_from)
        t, c = cfg.train, cfg.checkpoint
        log = MetricsLogger(cfg, runtime.is_logging_rank, t.steps, start_step, runtime.device.type)
        _banner(trainer, log, root, origin)
        for line in changes:
            log.say(f"[megafusion] resume: {line}")
        note = _epochs_note(trainer)
        if note:
            log.say(note)
        losses, saved_at, saved_path, last, last_val = [], start_step or None, resume_from, None, None
        stop.last_checkpoint = str(resume_from) if resume_from else None
        skipped_in_a_row = 0
        began = time.perf_counter()
        try:
            for step in range(start_step, t.steps):
                stop.injected(step + 1)
                dump = cfg.logging.dump_grads if step == 0 else None
                record = trainer.train_step(step, consumed, dump)
                consumed = record["consumed_samples"]
                if "skipped" in record:
                    message = _nan_message(cfg, record, root, saved_at)
                    skipped_in_a_row += 1
                    if t.on_nan == "stop":
                        raise NumericsError(message + " (train.on_nan=stop)")
                    if skipped_in_a_row > t.nan_skip_limit:
                        raise NumericsError(
                            f"{skipped_in_a_row} steps in a row were not finite (train.nan_skip_limit="
                            f"{t.nan_skip_limit}); the last: {message}. Stopped, nothing saved "
                            f"({_last_safe(root, saved_at)}): lower train.lr (now {t.lr:g}), or check those samples"
                        )
                    log.event({"step": step + 1, "event": "skipped_step", "message": f"skipped: {message}"})
                else:
                    skipped_in_a_row = 0
                    spike = trainer.spikes.check(step + 1, record["loss"])
                    if spike:
                        # The first spike of an episode (none in the steps the running mean spans)
                        # pins the checkpoint saved before it, which later saves would prune.
                        first = trainer.last_spike is None or step + 1 - trainer.last_spike > numerics.SPIKE_WINDOW
                        trainer.last_spike = step + 1
                        before = ckpt.step_dir(root, saved_at) if saved_at and c.save and first else None
                        if before is not None and before not in trainer.pinned:
                            trainer.pinned.append(before)
                            spike["message"] += (
                                f"; {before}, saved before it, is kept (checkpoint.keep_last will not prune it)"
                            )
                        log.event(spike)
                record.pop("skipped", None)
                losses.append(record["loss"])
                last = record
                done = step + 1 == t.steps
                elapsed = time.perf_counter() - began
                record["elapsed_s"] = elapsed
                record["eta_s"] = elapsed / (step + 1 - start_step) * (t.steps - step - 1)
                if (step + 1) % cfg.logging.log_interval == 0 or done:
                    log.log(record)
                if (cfg.eval.interval and (step + 1) % cfg.eval.interval == 0) or done:
                    val = trainer.evaluate(step + 1)
                    if val is not None:
                        log.log(val)
                        last_val = val
                stopping = stop.agreed(runtime.device)
                if c.save and ((c.interval and (step + 1) % c.interval == 0) or done or stopping):
                    saved_path = _save(trainer, root, step + 1, consumed, saved_at)
                    saved_at = step + 1
                    stop.last_checkpoint = str(saved_path)
                    log.say(f"[megafusion] saved checkpoint {saved_path}")
                if stopping and not done:
                    where = f"saved {saved_path}" if saved_at == step + 1 else "checkpoint.save=false: nothing saved"
                    message = (
                        f"[megafusion] stopped at step {step + 1} on {stopping}: {where}; run the same command "
                        f"again to continue (exit status 75)"
                    )
                    log.say(message)
                    if runtime.rank == 0:
                        write_status(f"preempted step {step + 1} {saved_path if saved_at == step + 1 else ''}".strip())
                    raise Preempted(message)
            log.say(_summary(cfg, start_step, last, last_val, time.perf_counter() - began, saved_path))
            if runtime.rank == 0:
                write_status(f"done step {t.steps}")
        finally:
            log.close()
    if cfg.logging.dump_losses and dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.logging.dump_losses)), exist_ok=True)
        with open(cfg.logging.dump_losses, "w") as f:
            json.dump(
                {
                    "first_step": start_step + 1,
                    "losses": losses,
                    "saved_at": saved_at or start_step,
                    "world_size": runtime.world_size,
                    "config": cfg.to_dict(),
                },
                f,
                indent=1,
            )
    return losses
