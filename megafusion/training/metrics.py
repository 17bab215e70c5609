"""Where a run's numbers go: ``metrics.jsonl``, the console, Weights & Biases, TensorBoard.

Only the logging rank (the last global rank, which holds the last pipeline stage) writes.
Each logged step is one JSON line in ``<logging.out_dir>/metrics.jsonl`` with at least
``step``, ``loss``, ``loss/<modality>``, ``lr``, ``grad_norm``, ``tokens_per_s``,
``tflops_per_gpu``, ``mfu`` (null where the device's peak is unknown) and ``mem_gb`` (peak
CUDA memory on a GPU, resident set size on a CPU), ``flops`` (model FLOPs of the step, all ranks),
``flops/<modality>`` and ``flops_total`` (since step 0, kept across resumes), ``hardware_flops``,
``hardware_tflops_per_gpu`` and ``hfu`` (the model FLOPs plus the forward that ``train.recompute``
runs again: :mod:`megafusion.accounting.recompute`; equal to the model's without recomputation);
evaluations add ``val/...`` keys.
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
    """Writes ``metrics.jsonl`` (and W&B / TensorBoard / the console) on the logging rank.

    A run that resumes at step N first drops the lines of steps after N (written after that
    checkpoint by the run that stopped; the resumed run writes them again), then marks the
    restart with an ``{"event": "resumed"}`` line, so each step appears once."""

    def __init__(self, cfg, enabled: bool, total_steps: int, start_step: int, device_type: str = "cpu"):
        self.enabled = enabled
        self.per = "gpu" if device_type == "cuda" else "device"
        self.total_steps = total_steps
        self.out_dir = cfg.logging.out_dir
        self._wandb = self._tb = self._bar = None
        if not enabled:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        self.path = os.path.join(self.out_dir, "metrics.jsonl")
        earlier = _drop_after(self.path, start_step) if os.path.exists(self.path) else False
        self._file = open(self.path, "a")
        if earlier:  # a resume, or a restart of a run that died before its first checkpoint
            self._write({"step": start_step, "event": "resumed"})
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

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def event(self, record: dict) -> None:
        """Something that happened at a step (a loss spike, a skipped step): a line of its own
        with an ``event`` key (readers of training records skip those) and a console line."""
        if not self.enabled:
            return
        self._write(record)
        self.say(f"[megafusion] {record.get('message', record['event'])}")

    def log(self, record: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        self._write(record)
        step = record["step"]
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._bar is not None and "loss" in record:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(_compact(record, self.per, with_step=False))
        elif console:
            self.say(_compact(record, self.per))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            # Stop W&B's service process now: the command reaps its children on the way out
            # (runtime/children.py), after which wandb's own atexit teardown would find the
            # service gone and print a "Connection lost" traceback.
            wandb.teardown()
        if self._tb is not None:
            self._tb.close()


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _drop_after(path: str, step: int) -> bool:
    """Rewrite ``path`` without the records of steps after ``step``; whether it held any record."""
    from megafusion.core.io import atomic_write

    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off when the run stopped
        if record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        atomic_write(path, "".join(kept))
    return bool(lines)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _compact(r: dict, device_label: str = "device", with_step: bool = True) -> str:
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
        f"{r['tflops_per_gpu']:.3g} TFLOP/s/{device_label}",
        f"mfu {_fmt(r['mfu'], '.1%')}",
        *([f"hfu {_fmt(r['hfu'], '.1%')}"] if r.get("hardware_flops", r.get("flops")) != r.get("flops") else []),
        f"mem {r['mem_gb']:.2f} GB",
        f"{r['step_time_s']:.2f}s",
    ]
    if "eta_s" in r:
        parts.append(f"{duration(r['elapsed_s'])} elapsed, ETA {duration(r['eta_s'])}")
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
