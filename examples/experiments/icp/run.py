"""In-Context Pretraining at CPU scale: {random, ICP} document order x {isolated, causal} attention
across the documents of a row, at equal steps, with the same model, seed and data; then each run's
held-out loss on the later documents of a row and the in-context probe's accuracy (evaluate.py),
and the report (analyze.py).

``python -m examples.experiments.icp.run [--quick] [--jobs N] [--out-dir DIR] [--results DIR]
[--config FILE] [--launcher subprocess|inprocess] [--analyze-only] [section.key=value ...]`` (from
the repository root)

The steps, each in the repository root with this folder's ``config.yaml`` and the overrides (which
apply to every run):

1. ``data``: the run's data built once per order in this process (``build_data``), which trains
   and caches the tokenizer and the ICP orders in ``data.cache_dir`` before the runs start (two
   runs would otherwise compute them side by side), and records each order's rows and the share
   of ``facts`` documents whose group has a document earlier in the same row (``OUT/data.json``);
2. one training run per cell of :data:`RUNS` (``data.order`` x ``data.attention``),
   ``python -m megafusion.train --config FILE [overrides] data.order=O data.attention=A
   logging.out_dir=OUT/<run> checkpoint.dir=OUT/<run>/checkpoints``, its final checkpoint saved;
3. each run evaluated: ``python -m examples.experiments.icp.evaluate --ckpt OUT/<run>/checkpoints
   --output OUT/<run>/eval.json``.

Steps 2 and 3 run ``--jobs`` processes side by side (default 2: the report compares losses, not
wall clocks), each run with one torch thread (``OMP_NUM_THREADS=1``, unless the environment sets
it). Each run's console output is kept in ``OUT/<run>/train.log`` and ``eval.log``; the commands
and wall clocks go to ``OUT/run_info.json``, rewritten after every step.

``--quick``: a tiny model and a few steps, in this process one after the other (``--launcher
inprocess``); runs go to ``runs/icp_quick`` and the report to ``runs/icp_quick/results``, so a
smoke run never replaces ``bench/results/icp.*``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

# One torch thread per run unless the environment says otherwise (two runs share the two cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.provenance import ROOT, git_commit, machine, utc_now  # noqa: E402
from examples.experiments.harness import (  # noqa: E402
    StepFailed,
    add_run_arguments,
    clean,
    command_line,
    finish,
    load_config,
    parse_run_arguments,
    recorded_command,
    run_inprocess,
    shown,
)
from examples.experiments.icp import analyze  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "config.yaml"
TAG = "[icp]"
RUNS = analyze.RUNS  # name -> (data.order, data.attention)
# Set per run by this script: overriding them would break the comparison.
RESERVED = ("data.order", "data.attention", "logging.out_dir", "checkpoint.dir", "checkpoint.save", "checkpoint.resume")
QUICK = [
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "model.num_query_groups=1",
    "model.ffn_hidden_size=64",
    "model.seq_length=64",
    "train.steps=6",
    "train.micro_batch_size=4",
    "train.global_batch_size=4",
    "train.warmup_steps=1",
    "data.num_samples=300",
    "data.text_vocab_size=128",
    "eval.interval=3",
    "eval.batches=1",
]
EVALUATE = "examples.experiments.icp.evaluate"


def train_args(config: Path, overrides: list[str], name: str, run_dir: Path) -> list[str]:
    order, attention = RUNS[name]
    return [
        "train",
        "--config",
        shown(config),
        *overrides,
        f"data.order={order}",
        f"data.attention={attention}",
        "checkpoint.save=true",
        "checkpoint.resume=false",
        f"checkpoint.dir={shown(run_dir / 'checkpoints')}",
        f"logging.out_dir={shown(run_dir)}",
    ]


def eval_args(run_dir: Path) -> list[str]:
    return ["--ckpt", shown(run_dir / "checkpoints"), "--output", shown(run_dir / analyze.EVAL_FILE)]


def data_report(cfg) -> dict:
    """Each order's rows, and the share of facts documents with a group partner earlier in their
    row, per split (building the data also caches the tokenizer and the ICP orders)."""
    import copy

    from examples.experiments.icp.evaluate import facts_index, partner_share
    from megafusion.config import apply_overrides
    from megafusion.data.sources import build_data

    report = {}
    for order in dict.fromkeys(o for o, _ in RUNS.values()):
        bundle = build_data(apply_overrides(copy.deepcopy(cfg), [f"data.order={order}"]))
        index = facts_index(cfg, bundle.tokenizer)
        report[order] = {
            split: {"rows": source.num_rows, "partner_before": partner_share(source.rows, index)}
            for split, source in (("train", bundle.train), ("val", bundle.val))
        }
        if "order" in bundle.meta:
            report[order]["meta"] = bundle.meta["order"]
    return report


class Runner:
    """Runs the steps under ``out_dir``, ``jobs`` side by side, each recorded in ``info``."""

    def __init__(self, out_dir: Path, info: dict, launcher: str, jobs: int):
        self.out_dir, self.info, self.launcher, self.jobs = out_dir, info, launcher, jobs

    def save_info(self) -> None:
        (self.out_dir / "run_info.json").write_text(json.dumps(self.info, indent=1) + "\n")

    def process(self, step: tuple[str, str, list[str]]) -> list[str]:
        kind, _, args = step
        return command_line(args) if kind == "megafusion" else [shown(sys.executable), "-m", EVALUATE, *args]

    def run_all(self, steps: list[tuple[str, str, list[str], Path]]) -> None:
        """``steps``: ``(kind, name, args, log)``, kind ``megafusion`` (``megafusion <args>``) or
        ``evaluate`` (evaluate.py ``<args>``); at most ``jobs`` at a time. StepFailed names the log
        of the first that fails (the others are let finish)."""
        pending, running, failed = list(steps), [], []
        while pending or running:
            while pending and len(running) < self.jobs and not failed:
                kind, name, args, log = pending.pop(0)
                cmd = self.process((kind, name, args))
                self.info["commands"][name] = cmd
                print(f"{TAG} {name}: {shlex.join(cmd)}", flush=True)
                if self.launcher == "inprocess":
                    start = time.perf_counter()
                    with open(log, "w", encoding="utf-8") as f:
                        rc = run_inprocess(args, f)[0] if kind == "megafusion" else self._evaluate_inprocess(args, f)
                    self._done(name, rc, time.perf_counter() - start, log, failed)
                    continue
                with open(log, "w", encoding="utf-8") as f:
                    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
                running.append((proc, name, log, time.perf_counter()))
            if not running:
                break
            time.sleep(0.5)
            for item in list(running):
                proc, name, log, start = item
                if proc.poll() is not None:
                    running.remove(item)
                    self._done(name, proc.returncode, time.perf_counter() - start, log, failed)
        if failed:
            raise StepFailed(failed[0])

    @staticmethod
    def _evaluate_inprocess(args: list[str], log) -> int:
        import contextlib

        from examples.experiments.harness import Tee
        from examples.experiments.icp import evaluate

        with contextlib.redirect_stdout(Tee(sys.__stdout__, log)), contextlib.redirect_stderr(Tee(sys.__stderr__, log)):
            return evaluate.main(args)

    def _done(self, name: str, rc: int, seconds: float, log: Path, failed: list) -> None:
        self.info["run_seconds"][name] = seconds
        self.save_info()
        if rc != 0:
            failed.append(f"{name} failed (exit code {rc}); its output is in {shown(log)}")
            print(f"{TAG} {failed[-1]}", file=sys.stderr, flush=True)
        else:
            print(f"{TAG} {name} took {seconds:.1f} s", flush=True)


def run_experiment(runner: Runner, config: Path, overrides: list[str]) -> None:
    out = runner.out_dir
    trains, evals = [], []
    for name in RUNS:
        run_dir = out / name
        clean(run_dir)
        run_dir.mkdir(parents=True)
        trains.append(("megafusion", name, train_args(config, overrides, name, run_dir), run_dir / "train.log"))
        evals.append(("evaluate", f"{name}/eval", eval_args(run_dir), run_dir / "eval.log"))
    runner.run_all(trains)
    runner.run_all(evals)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps (the smoke test)")
    parser.add_argument("--jobs", type=int, default=None, help="processes side by side (default 2; --quick: 1)")
    add_run_arguments(parser, "icp", CONFIG)
    args, out_dir, results = parse_run_arguments(parser, argv, "icp", RESERVED)
    if not args.analyze_only:
        config, launcher = Path(args.config).resolve(), args.launcher
        jobs = args.jobs or (1 if launcher == "inprocess" else 2)
        if jobs < 1 or (launcher == "inprocess" and jobs != 1):
            parser.error(f"--jobs {jobs}: give 1 or more (and 1 with --launcher inprocess: one run at a time)")
        overrides = [*(QUICK + [f"data.cache_dir={shown(out_dir / 'cache')}"] if args.quick else []), *args.overrides]
        try:
            cfg = load_config(config, overrides)
        except ValueError as err:
            parser.error(str(err))
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (*RUNS, "run_info.json", analyze.DATA_FILE):
            clean(out_dir / name)
        info = {
            "command": recorded_command(analyze.RUN_COMMAND, argv),
            "commit": git_commit(),
            "machine": machine(),
            "date_utc": utc_now(),
            "quick": args.quick,
            "launcher": launcher,
            "jobs": jobs,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "steps": cfg.train.steps,
            "runs": {name: {"order": o, "attention": a} for name, (o, a) in RUNS.items()},
            "commands": {},
            "run_seconds": {},
        }
        runner = Runner(out_dir, info, launcher, jobs)
        runner.save_info()
        start = time.perf_counter()
        (out_dir / analyze.DATA_FILE).write_text(json.dumps(data_report(cfg), indent=1) + "\n")
        info["run_seconds"]["data"] = time.perf_counter() - start
        try:
            run_experiment(runner, config, overrides)
        except StepFailed as err:
            print(f"{TAG} {err}", file=sys.stderr)
            return 1
        info["total_seconds"] = time.perf_counter() - start
        runner.save_info()
        print(f"{TAG} all steps took {info['total_seconds']:.0f} s", flush=True)
    return finish(
        TAG, lambda: analyze.write_results(out_dir, results), analyze.markdown, lambda _: results / analyze.RESULT_NAME
    )


if __name__ == "__main__":
    sys.exit(main())
