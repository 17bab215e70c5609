"""Where a run's numbers go: ``metrics.jsonl``, the console, Weights & Biases, TensorBoard.

Only the logging rank (the last global rank, which holds the last pipeline stage) writes.
Each logged step is one JSON line in ``<logging.out_dir>/metrics.jsonl`` with at least
``step``, ``loss``, ``loss/<modality>``, ``lr``, ``grad_norm``, ``tokens_per_s``,
``tflops_per_gpu``, ``mfu`` (null where the device's peak is unknown) and ``mem_gb`` (peak
CUDA memory on a GPU, resident set size on a CPU), ``flops`` (model FLOPs of the step, all ranks),
``flops/<modality>`` and ``flops_total`` (since step 0, kept across resumes); evaluations add
``val/...`` keys.
The console gets a compact line with the same numbers, or a progress bar when a terminal
is attached. W&B runs offline unless ``WANDB_MODE`` says otherwise (sync later with
``wandb sync``); ``logging.wandb=false`` switches it off. TensorBoard is opt-in.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from megafusion.core.errors import MissingDependencyError
from megafusion.core.modality import MODALITY_NAMES


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class MetricsLogger:
    def __init__(self, cfg, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.total_steps = total_steps
        self.out_dir = cfg.logging.out_dir
        self._wandb = self._tb = self._bar = None
        if not enabled:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        self.path = os.path.join(self.out_dir, "metrics.jsonl")
        self._file = open(self.path, "a")
        if cfg.logging.wandb:
            self._wandb = _start_wandb(cfg)
        if cfg.logging.tensorboard:
            self._tb = _start_tensorboard(self.out_dir)
        if cfg.logging.progress and sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def say(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def log(self, record: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._bar is not None and "loss" in record:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(_compact(record, with_step=False))
        elif console:
            self.say(_compact(record))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _compact(r: dict, with_step: bool = True) -> str:
    """``step 12/200 | loss 3.210 (text 2.901 image 3.512) | lr ... | ...`` or a val line."""
    head = f"step {r['step']:>5}" if with_step else ""
    if "loss" not in r:  # an evaluation record
        per = " ".join(f"{m} {r[f'val/loss/{m}']:.4f}" for m in (*MODALITY_NAMES, "diffusion") if f"val/loss/{m}" in r)
        return f"{head} | val loss {r['val/loss']:.4f} ({per}) | {r.get('val/tokens', 0):,} tokens"
    per = " ".join(f"{m} {r[f'loss/{m}']:.4f}" for m in (*MODALITY_NAMES, "diffusion") if f"loss/{m}" in r)
    parts = [
        f"loss {r['loss']:.4f} ({per})" if per else f"loss {r['loss']:.4f}",
        f"lr {r['lr']:.2e}",
        f"gnorm {r['grad_norm']:.3f}",
        f"{r['tokens_per_s']:,.0f} tok/s",
        f"{r['tflops_per_gpu']:.3g} TFLOP/s/gpu",
        f"mfu {_fmt(r['mfu'], '.1%')}",
        f"mem {r['mem_gb']:.2f} GB",
        f"{r['step_time_s']:.2f}s",
    ]
    return " | ".join(([f"{head}/{r['total_steps']}"] if with_step else []) + parts)


def _start_wandb(cfg):
    try:
        import wandb
    except ImportError as err:
        raise MissingDependencyError(
            "logging.wandb=true needs the wandb package: pip install wandb, or set logging.wandb=false"
        ) from err
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.logging.wandb_project,
        dir=cfg.logging.out_dir,
        config=cfg.to_dict(),
        name=os.path.basename(os.path.normpath(cfg.logging.out_dir)),
        resume="allow",
    )


def _start_tensorboard(out_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise MissingDependencyError(
            "logging.tensorboard=true needs the tensorboard package: pip install tensorboard, "
            "or set logging.tensorboard=false"
        ) from err
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))
