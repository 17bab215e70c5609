"""Train a tiny Transfusion model on the built-in shapes and record how well its images follow
their captions: ``bench/results/transfusion_shapes.{json,md}``.

    python -m bench.transfusion_shapes [--config examples/configs/tiny_transfusion.yaml]
        [--samples 90] [--sampler ddpm] [--steps 50] [--cfg 3.0] [--seed 0]
        [--ckpt CKPT] [--out bench/results/transfusion_shapes.json] [section.key=value ...]

1. ``megafusion train --config CONFIG [overrides]`` from scratch, timed, into a new directory
   ``runs/transfusion_shapes/<UTC time>`` (unless ``logging.out_dir`` is overridden); ``--ckpt``
   skips training and evaluates that checkpoint instead;
2. ``megafusion eval`` on its last checkpoint: per-modality validation loss, and the caption
   consistency of images generated from held-out captions (captions of a seed training never
   drew), read back by the ``read_shape`` checker, against chance;
3. appends the result (every number, the commands, commit, machine, date) to the JSON, which
   keeps every earlier result, and re-renders the markdown table from all of them, oldest first.
   ``--quick`` (the tests) trains nothing of note and writes nothing unless given ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench.provenance import ROOT, git_commit, machine, recorded_command

DEFAULT_CONFIG = "examples/configs/tiny_transfusion.yaml"
DEFAULT_OUT = "bench/results/transfusion_shapes.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.transfusion_shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--samples", type=int, default=90, help="held-out captions to generate images for")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddpm", help="(flow models always use euler)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per image")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ckpt",
        default=None,
        help="evaluate this checkpoint instead of training (its config is "
        "the checkpoint's; --config and overrides are then only recorded)",
    )
    p.add_argument("--quick", action="store_true", help="a few steps and samples (tests); writes only with --out")
    p.add_argument("--out", default=None, help=f"result JSON (default {DEFAULT_OUT}; none for --quick)")
    p.add_argument("overrides", nargs="*", help="section.key=value for training")
    return p


def _run(cmd: list[str]) -> tuple[str, float]:
    """Run ``cmd`` in the repository root; its stdout and wall time. Stderr passes through."""
    print(f"[transfusion_shapes] {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-4000:])
        raise SystemExit(f"[transfusion_shapes] {cmd[2]} failed with exit code {proc.returncode}")
    return proc.stdout, time.perf_counter() - start


def _config_cell(result: dict) -> str:
    """The config file and the overrides that change what is trained (not where it is written);
    a result of ``--ckpt`` (no training) says it evaluated an existing checkpoint."""
    changed = [o for o in result.get("overrides", []) if not o.startswith("logging.out_dir=")]
    cell = " ".join(f"`{x}`" for x in [result["config"], *changed])
    return cell if result.get("train_command") else f"{cell} (its checkpoint, evaluated again)"


def markdown(results: list[dict]) -> str:
    lines = [
        "# Transfusion on the built-in shapes: caption consistency of generated images",
        "",
        "Images generated from held-out captions, read back by `read_shape` (colour, shape, grid "
        "position) and compared with the caption; chance = a uniformly random guess.",
        "",
        "| commit | machine | date (UTC) | config | train steps | train wall (s) | val text | val diffusion "
        "| samples | sampling | colour (chance) | shape (chance) | position (chance) | all (chance) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        acc, chance, val = r["accuracy"], r["chance"], r["validation"]
        cells = [f"{acc[k]:.3f} ({chance[k]:.3f})" for k in ("colour", "shape", "position", "all")]
        s = r["sampling"]
        wall = f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "n/a"
        lines.append(
            f"| `{r['commit']}` | {r['machine']} | {r['date_utc']} | {_config_cell(r)} | {r['step']} | {wall} "
            f"| {val.get('val/loss/text', float('nan')):.4f} | {val.get('val/loss/diffusion', float('nan')):.4f} "
            f"| {r['samples']} | {s['sampler']} {s['steps']} steps, cfg {s['cfg']} | {' | '.join(cells)} |"
        )
    # A checkpoint evaluated again has the same caption_gap (no sampling): listed once.
    gaps = [r for i, r in enumerate(results) if r.get("caption_gap") and (i == 0 or r.get("train_command"))]
    if gaps:
        lines += ["", "Diffusion loss of the held-out images under their own caption vs another's (`caption_gap`):", ""]
        for r in gaps:
            g = r["caption_gap"]
            pairs = ", ".join(
                f"noise {lv}: {m:.4f} vs {w:.4f}" for lv, m, w in zip(g["noise_level"], g["matching"], g["mismatched"])
            )
            lines.append(f"- `{r['commit']}`: {pairs}")
    lines += ["", "Commands:", ""]
    for r in results:
        train = f"train: `{r['train_command']}`; " if r["train_command"] else "(an existing checkpoint); "
        lines.append(f"- `{r['commit']}`: `{r['command']}`; {train}eval: `{r['eval_command']}`")
    return "\n".join(lines) + "\n"


def eval_fields(report: dict) -> dict:
    """The numbers of a ``megafusion eval`` report that a result keeps."""
    consistency = report["caption_consistency"]
    return {
        "step": report["step"],
        "validation": report["validation"],
        "samples": consistency["samples"],
        "accuracy": consistency["accuracy"],
        "chance": consistency["chance"],
        "sampling": report["sampling"],
        "caption_gap": report["caption_gap"],
    }


def append_result(path: Path, result: dict, render) -> int:
    """Append ``result`` to the results in ``path`` (JSON) and re-render ``render(results)`` beside
    it as ``.md``; the number of results now recorded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results = [*recorded(path), result]
    path.write_text(json.dumps(results, indent=1) + "\n")
    path.with_suffix(".md").write_text(render(results))
    return len(results)


def recorded(path: Path) -> list[dict]:
    """The results already in ``path`` (none if it does not exist; a single-result file is one)."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return data if isinstance(data, list) else [data]


def main(argv: list[str] | None = None) -> int:
    import datetime

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.quick:
        overrides += ["train.steps=2", "data.num_samples=200", "eval.interval=2", "eval.batches=1"]
        args.samples, args.steps = min(args.samples, 3), min(args.steps, 2)
    from megafusion.config import load_config

    if not any(o.startswith("logging.out_dir=") for o in overrides):
        # A fresh directory: resuming or appending to an earlier run would change what is measured.
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        overrides.append(f"logging.out_dir=runs/transfusion_shapes/{stamp}")
    cfg = load_config(str(ROOT / args.config), overrides)
    ckpt = args.ckpt or str(Path(cfg.logging.out_dir) / "checkpoints")
    train_cmd = [
        sys.executable,
        "-m",
        "megafusion.train",
        "--config",
        args.config,
        *overrides,
        f"checkpoint.dir={ckpt}",
        f"checkpoint.interval={cfg.train.steps}",
        "checkpoint.save=true",
        "checkpoint.resume=false",
    ]
    train_seconds = None
    if args.ckpt is None:
        _, train_seconds = _run(train_cmd)
    eval_cmd = [
        sys.executable,
        "-m",
        "megafusion",
        "eval",
        "--ckpt",
        ckpt,
        "--samples",
        str(args.samples),
        "--sampler",
        args.sampler,
        "--steps",
        str(args.steps),
        "--cfg",
        str(args.cfg),
        "--seed",
        str(args.seed),
        "--out",
        str(Path(ckpt).parent / "eval"),
    ]
    stdout, _ = _run(eval_cmd)
    report = json.loads(stdout[stdout.index("{") :])
    result = {
        "commit": git_commit(),
        "machine": machine(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": recorded_command("bench.transfusion_shapes", argv),
        "config": args.config,
        "overrides": overrides,
        "train_command": shlex.join(train_cmd[1:]) if args.ckpt is None else None,
        "eval_command": shlex.join(eval_cmd[1:]),
        "train_seconds": train_seconds,
        **eval_fields(report),
    }
    print(json.dumps(result, indent=1))
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out:
        count = append_result(ROOT / out, result, markdown)
        print(
            f"[transfusion_shapes] added a result to {out} ({count} in all) and re-rendered "
            f"{Path(out).with_suffix('.md')}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
