"""Train the README's main job longer (an LM over text and discrete image tokens, the Chameleon
setting) and record how well the images it samples follow their captions:
``bench/results/token_shapes.{json,md}``.

    python -m bench.token_shapes [--config examples/configs/tiny_mixed_long.yaml]
        [--samples 90] [--cfg 3.0] [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0]
        [--ckpt CKPT] [--out bench/results/token_shapes.json] [section.key=value ...]

1. ``megafusion train --config CONFIG [overrides]`` from scratch, timed, into a new directory
   ``runs/token_shapes/<UTC time>`` (unless ``logging.out_dir`` is overridden); ``--ckpt``
   skips training and evaluates that checkpoint instead, recording what its run directory says of
   its training (``run.json``'s start, ``metrics.jsonl``'s last ``elapsed_s``) and the commit and
   command it was trained with (``--train-commit``, ``--train-command``: as given);
2. ``megafusion eval`` on its last checkpoint: per-modality validation loss, the caption
   consistency of images sampled token by token from held-out captions (a seed training never
   drew), read back by the ``read_shape`` checker, against chance, and the token caption gap;
3. appends the result (every number, the commands, commit, machine, date) to the JSON, which
   keeps every earlier result, and re-renders the markdown table from all of them, oldest first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

from bench.provenance import ROOT, git_commit, machine, recorded_command, repo_relative
from bench.transfusion_shapes import _config_cell, _run, append_result, eval_fields

DEFAULT_CONFIG = "examples/configs/tiny_mixed_long.yaml"
DEFAULT_OUT = "bench/results/token_shapes.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.token_shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--samples", type=int, default=90, help="held-out captions to generate images for")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", default=None, help="evaluate this checkpoint of a finished run instead of training")
    p.add_argument("--train-commit", default=None, help="with --ckpt: its run's commit (as given)")
    p.add_argument("--train-command", default=None, help="with --ckpt: the command that trained it (recorded as given)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT})")
    p.add_argument("overrides", nargs="*", help="section.key=value for training")
    return p


def run_record(ckpt: str) -> dict:
    """What the run directory of checkpoint ``ckpt`` (a step directory or ``checkpoint.dir``, inside
    ``<logging.out_dir>/checkpoints``) says of its training up to that checkpoint's step: the run's
    start and the wall seconds its ``metrics.jsonl`` logged at that step."""
    from megafusion.checkpoint import read_manifest, resolve_checkpoint

    step_dir = resolve_checkpoint(ckpt)
    step = int(read_manifest(step_dir).get("step", 0))
    run = Path(step_dir).parent.parent
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    at_step = [m for m in map(json.loads, lines) if m.get("step") == step and "elapsed_s" in m]
    elapsed = at_step[-1]["elapsed_s"] if at_step else None
    total = info.get("config", {}).get("train", {}).get("steps")
    return {
        "run_dir": repo_relative(str(run)),
        "started": info.get("started"),
        "step": step,
        "total_steps": total,
        "elapsed_s": elapsed,
    }


def report_tag(args) -> str:
    """Where a run's evaluation PNGs go: named by the sampling settings, so evaluations do not mix."""
    return f"cfg{args.cfg:g}_t{args.temperature:g}_k{args.top_k}_p{args.top_p:g}_s{args.seed}"


def markdown(results: list[dict]) -> str:
    lines = [
        "# The main job trained longer: caption consistency of its discrete-token images",
        "",
        "An LM over text pieces and 16x16 pixel-patch image codes (the Chameleon setting). Images "
        "sampled token by token from held-out captions (classifier-free guidance on the image tokens' "
        "logits), read back by `read_shape` (colour, shape, grid position) and compared with the "
        "caption; chance = a uniformly random guess. Token gap: mean NLL per image token of held-out "
        "images after their own caption / another's / none (the unconditional view).",
        "",
        "| commit | machine | date (UTC) | config | train steps | train wall (s) | val text | val image "
        "| samples | sampling | colour (chance) | shape (chance) | position (chance) | all (chance) | token gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        acc, chance, val, s, gap = r["accuracy"], r["chance"], r["validation"], r["sampling"], r["caption_gap"]
        cells = [f"{acc[k]:.3f} ({chance[k]:.3f})" for k in ("colour", "shape", "position", "all")]
        wall = f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "n/a"
        sampling = f"cfg {s['cfg']}, temperature {s['temperature']}, top-k {s['top_k']}, top-p {s['top_p']}"
        lines.append(
            f"| `{r['commit']}` | {r['machine']} | {r['date_utc']} | {_config_cell(r)} | {r['step']} | {wall} "
            f"| {val.get('val/loss/text', float('nan')):.4f} | {val.get('val/loss/image', float('nan')):.4f} "
            f"| {r['samples']} | {sampling} | {' | '.join(cells)} "
            f"| {gap['matching']:.3f} / {gap['mismatched']:.3f} / {gap['unconditional']:.3f} |"
        )
    lines += ["", "Commands:", ""]
    for r in results:
        if r.get("train_command"):
            train = f"train: `{r['train_command']}`; "
        else:
            t = r.get("trained_run") or {}
            of = f" of {t['total_steps']}" if t.get("total_steps") else ""
            train = (
                f"(the step-{t.get('step', r['step'])}{of} checkpoint of the run in `{t.get('run_dir')}`, started "
                f"{t.get('started')} at `{t.get('commit')}` by `{t.get('command')}`); "
            )
        lines.append(f"- `{r['commit']}`: `{r['command']}`; {train}eval: `{r['eval_command']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    from megafusion.config import load_config

    if not any(o.startswith("logging.out_dir=") for o in overrides):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        overrides.append(f"logging.out_dir=runs/token_shapes/{stamp}")
    cfg = load_config(str(ROOT / args.config), overrides)
    ckpt = args.ckpt or str(Path(cfg.logging.out_dir) / "checkpoints")
    train_cmd = [sys.executable, "-m", "megafusion.train", "--config", args.config, *overrides]
    train_cmd += [f"checkpoint.dir={ckpt}", "checkpoint.save=true", "checkpoint.resume=false", "logging.wandb=false"]
    train_seconds, trained_run = None, None
    if args.ckpt is None:
        _, train_seconds = _run(train_cmd)
    else:
        trained_run = {**run_record(args.ckpt), "commit": args.train_commit, "command": args.train_command}
        train_seconds = trained_run["elapsed_s"]
    eval_cmd = [sys.executable, "-m", "megafusion", "eval", "--ckpt", ckpt, "--samples", str(args.samples)]
    eval_cmd += ["--cfg", str(args.cfg), "--temperature", str(args.temperature), "--top-k", str(args.top_k)]
    out_dir = Path(cfg.logging.out_dir) if args.ckpt is None else Path(trained_run["run_dir"])
    eval_cmd += ["--top-p", str(args.top_p), "--seed", str(args.seed)]
    eval_cmd += ["--out", str(out_dir / f"eval_{report_tag(args)}")]
    stdout, _ = _run(eval_cmd)
    report = json.loads(stdout[stdout.index("{") :])
    result = {
        "commit": git_commit(),
        "machine": machine(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": recorded_command("bench.token_shapes", argv),
        "config": args.config,
        "overrides": overrides if args.ckpt is None else [],
        "train_command": shlex.join(train_cmd[1:]) if args.ckpt is None else None,
        "trained_run": trained_run,
        "eval_command": shlex.join(eval_cmd[1:]),
        "train_seconds": train_seconds,
        **eval_fields(report),
    }
    print(json.dumps(result, indent=1))
    count = append_result(ROOT / args.out, result, markdown)
    md = Path(args.out).with_suffix(".md")
    print(f"[token_shapes] added a result to {args.out} ({count} in all) and re-rendered {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
