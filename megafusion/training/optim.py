"""Optimizer and LR schedule: megatron-core's (distributed) optimizer and param scheduler.

AdamW through ``get_megatron_optimizer`` (fused Adam from Transformer Engine / Apex when
installed, torch's otherwise), gradient clipping by global norm across every parallel
group, linear warmup then cosine decay to ``train.min_lr``.
"""

from __future__ import annotations

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def build_optimizer(cfg, tconfig, model_chunks):
    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=tconfig.bf16,
        params_dtype=tconfig.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.warmup_steps else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=max(t.steps, t.warmup_steps + 1),
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(t.steps, 1),
        wd_incr_style="constant",
        # On resume the schedule is this config's, continued at the saved step (megatron-core's
        # default keeps the checkpoint's: a run extended to more steps would stay at min_lr);
        # training.resume_changes says what changed.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return optimizer, scheduler
