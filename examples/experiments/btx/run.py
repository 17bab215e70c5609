"""Branch-Train-MiX at CPU scale: seed, one branch per domain, merge, fine-tune; against the merge before
fine-tuning and a dense model trained on the mixture with the same total training FLOPs. Then the
report (analyze.py).

``python -m examples.experiments.btx.run [--quick] [--seed-steps N] [--branch-steps N]
[--finetune-steps N] [--no-seed-expert] [--out-dir DIR] [--results DIR] [--config FILE]
[--launcher subprocess|inprocess] [--analyze-only] [section.key=value ...]`` (from the repository root)

The steps, one after the other (their wall clocks are recorded), each a megafusion command in the
repository root with this folder's ``config.yaml`` and the overrides (which apply to every run):

1. ``seed``: a dense model on the mixture of every domain (``data.builtin``, each at its natural
   share: ``data.domains`` names them all), saved;
2. ``branch_<domain>``, one per domain: ``checkpoint.init_from`` the seed, trained on that domain
   alone (``data.domains=<domain>``), saved; no communication between branches;
3. ``megafusion convert btx-merge --seed ... --branch ... [--keep-seed-expert] --output OUT/merged``:
   every branch's FFN (and the seed's, as the paper's fourth "generalist" expert, unless
   ``--no-seed-expert``) becomes one expert per layer; every other tensor is their fp32 mean;
4. ``merged``: the merged model before any fine-tuning, evaluated by ``megafusion eval`` (its
   held-out loss per domain, ``OUT/merged/eval.json``);
5. ``btx``: the merged model fine-tuned on the mixture (``model.arch=btx``: top-2 token choice, load
   balancing 0.01), a new run from ``OUT/merged``;
6. ``dense``: a dense model trained from scratch on the mixture for as many steps as the seed,
   the branches and the fine-tuning took training FLOPs together (their ``flops`` per step summed,
   divided by the seed's mean FLOPs per step, rounded).

Every run evaluates every domain's held-out documents (``val/domain/<domain>/...``). Each run's
console output is kept in ``OUT/<run>/train.log`` (``OUT/logs/merge.log`` for the merge,
``OUT/merged/eval.log`` for its evaluation); the commands and wall clocks go to
``OUT/run_info.json``, rewritten after every step.

``--quick``: tiny models and a few steps, in this process by default; runs go to ``runs/btx_quick``
and the report to ``runs/btx_quick/results``, so a smoke run never replaces ``bench/results/btx.*``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# One torch thread per run unless the environment says otherwise (as in the MoMa experiment: the
# many small MoE operations degrade evenly under load with one thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.provenance import git_commit, machine, utc_now  # noqa: E402
from examples.experiments.btx import analyze  # noqa: E402
from examples.experiments.harness import (  # noqa: E402
    StepFailed,
    add_run_arguments,
    clean,
    command_line,
    finish,
    load_config,
    parse_run_arguments,
    recorded_command,
    run_megafusion,
    shown,
)

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "config.yaml"
TAG = "[btx]"
# Set per run by this script: overriding them would break the comparison.
RESERVED = (
    "model.arch",
    "btx.experts",
    "data.domains",
    "train.steps",
    "logging.out_dir",
    "checkpoint.init_from",
    "checkpoint.save",
    "checkpoint.dir",
)
STEPS = {"seed": 150, "branch": 150, "finetune": 150}
QUICK_STEPS = {"seed": 4, "branch": 3, "finetune": 3}
QUICK = [
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "model.num_query_groups=1",
    "model.ffn_hidden_size=64",
    "model.seq_length=128",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.warmup_steps=1",
    "data.num_samples=200",
    "data.text_vocab_size=64",
    "data.vq_codebook_size=24",
    "eval.interval=2",
    "eval.batches=1",
]
MERGED = "merged_weights"  # OUT/<this>: the merged weights (convert btx-merge's output)


def domains_of(cfg) -> list[str]:
    """The experiment's domains: the built-in sets of ``data.builtin``, one branch each."""
    return [d.strip() for d in cfg.data.builtin.split(",") if d.strip()]


def dense_steps(flops: float, step_flops: float) -> int:
    """Steps of the compute-matched dense run: ``flops`` in steps of ``step_flops``, rounded, at least 1."""
    return max(1, round(flops / step_flops))


def merged_overrides(merged: Path) -> list[str]:
    """What a run from the merged weights sets to load them (the keys a warm start compares): the
    merge's ``model.arch``, ``model.untie`` and ``btx.experts``, and ``checkpoint.init_from``."""
    from megafusion.checkpoint.directory import resolve_checkpoint
    from megafusion.checkpoint.manifest import run_config

    cfg = run_config(resolve_checkpoint(merged))
    experts = "{" + ", ".join(f"{k}: {v}" for k, v in cfg.btx.experts.items()) + "}"
    return [
        f"model.arch={cfg.model.arch}",
        f"model.untie={cfg.model.untie}",
        f"btx.experts={experts}",
        f"checkpoint.init_from={shown(merged)}",
    ]


def printed_json(output: str) -> dict:
    """The JSON object a command printed last (``megafusion eval`` prints one, indented)."""
    lines = output.splitlines()
    for start in range(len(lines) - 1, -1, -1):
        if lines[start].startswith("{"):
            try:
                return json.loads("\n".join(lines[start:]))
            except json.JSONDecodeError:
                continue
    raise StepFailed("megafusion eval printed no JSON result")


def run_flops(run_dir: Path) -> list[float]:
    """Training FLOPs of every step of a finished run (its ``metrics.jsonl``)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [float(r["flops"]) for r in records if "flops" in r and "val/loss" not in r]


class Runner:
    """Runs the steps under ``out_dir``, each recorded in ``info`` (run_info.json)."""

    def __init__(self, out_dir: Path, config: Path, overrides: list[str], info: dict, launcher: str):
        self.out_dir, self.config, self.overrides, self.info, self.launcher = out_dir, config, overrides, info, launcher

    def save_info(self) -> None:
        (self.out_dir / "run_info.json").write_text(json.dumps(self.info, indent=1) + "\n")

    def step(self, name: str, args: list[str], log: Path) -> None:
        self.info["commands"][name] = command_line(args)
        self.info["run_seconds"][name] = run_megafusion(args, log, self.launcher, TAG)
        print(f"{TAG} {name} took {self.info['run_seconds'][name]:.1f} s", flush=True)
        self.save_info()

    def train(self, name: str, run: list[str], save: bool = False) -> Path:
        run_dir = self.out_dir / name
        clean(run_dir)
        run_dir.mkdir(parents=True)
        saving = [f"checkpoint.save={str(save).lower()}"]
        if save:
            saving.append(f"checkpoint.dir={shown(run_dir / 'checkpoints')}")
        args = ["train", "--config", shown(self.config), *self.overrides, *run, *saving]
        self.step(name, [*args, f"logging.out_dir={shown(run_dir)}"], run_dir / "train.log")
        return run_dir / "checkpoints"


def run_experiment(runner: Runner, domains: list[str], steps: dict, seed_expert: bool) -> None:
    out = runner.out_dir
    # Every domain at its natural share: the same rows as data.domains=null, and every evaluation
    # reports each domain's held-out loss (val/domain/<domain>/...), as the branches' do.
    mixture = f"data.domains={','.join(domains)}"
    seed = runner.train("seed", ["model.arch=dense", mixture, f"train.steps={steps['seed']}"], save=True)
    branches = []
    for d in domains:
        run = ["model.arch=dense", f"data.domains={d}", f"train.steps={steps['branch']}"]
        branches.append(runner.train(f"branch_{d}", [*run, f"checkpoint.init_from={shown(seed)}"], save=True))
    merged = out / MERGED
    clean(merged)
    merge = ["convert", "btx-merge", "--seed", shown(seed)]
    for b in branches:
        merge += ["--branch", shown(b)]
    merge += [*(["--keep-seed-expert"] if seed_expert else []), "--output", shown(merged)]
    (out / "logs").mkdir(exist_ok=True)
    runner.step("merge", merge, out / "logs" / "merge.log")
    # The merged model as it is: `megafusion eval` reports its held-out loss per domain (one image
    # sampled for the caption check, which the report does not use).
    evaluated = out / "merged"
    clean(evaluated)
    evaluated.mkdir()
    runner.step("merged", ["eval", "--ckpt", shown(merged), "--samples", "1"], evaluated / "eval.log")
    (evaluated / analyze.EVAL_FILE).write_text(json.dumps(printed_json((evaluated / "eval.log").read_text())))
    runner.train("btx", [*merged_overrides(merged), mixture, f"train.steps={steps['finetune']}"])
    seed_flops = run_flops(out / "seed")
    spent = sum(seed_flops) + sum(sum(run_flops(out / f"branch_{d}")) for d in domains) + sum(run_flops(out / "btx"))
    n = dense_steps(spent, sum(seed_flops) / len(seed_flops))
    runner.info["dense_steps"] = n
    runner.info["matched_flops"] = spent
    runner.train("dense", ["model.arch=dense", mixture, f"train.steps={n}"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and a few steps (the smoke test)")
    for key in STEPS:
        parser.add_argument(f"--{key}-steps", type=int, default=None, help=f"steps of the {key} run(s)")
    parser.add_argument(
        "--no-seed-expert", action="store_true", help="merge the branches only (default: the seed is an expert too)"
    )
    add_run_arguments(parser, "btx", CONFIG)
    args, out_dir, results = parse_run_arguments(parser, argv, "btx", RESERVED)
    if not args.analyze_only:
        config, launcher = Path(args.config).resolve(), args.launcher
        overrides = [*(QUICK + [f"data.cache_dir={shown(out_dir / 'cache')}"] if args.quick else []), *args.overrides]
        steps = dict(QUICK_STEPS if args.quick else STEPS)
        for key in STEPS:
            given = getattr(args, f"{key}_steps")
            if given is not None:
                if given < 1:
                    parser.error(f"--{key}-steps must be >= 1")
                steps[key] = given
        try:
            cfg = load_config(config, overrides)
        except ValueError as err:
            parser.error(str(err))
        domains = domains_of(cfg)
        if len(domains) < 2:
            parser.error(f"data.builtin={cfg.data.builtin!r}: BTX needs two or more domains (one branch each)")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (*analyze.run_names(domains), MERGED, "logs", "run_info.json"):
            clean(out_dir / name)
        info = {
            "command": recorded_command(analyze.RUN_COMMAND, argv),
            "commit": git_commit(),
            "machine": machine(),
            "date_utc": utc_now(),
            "quick": args.quick,
            "launcher": launcher,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "domains": domains,
            "steps": steps,
            "seed_expert": not args.no_seed_expert,
            "commands": {},
            "run_seconds": {},
        }
        runner = Runner(out_dir, config, overrides, info, launcher)
        try:
            run_experiment(runner, domains, steps, not args.no_seed_expert)
        except StepFailed as err:
            print(f"{TAG} {err}", file=sys.stderr)
            return 1
        print(f"{TAG} all steps took {sum(info['run_seconds'].values()):.0f} s", flush=True)
    return finish(
        TAG, lambda: analyze.write_results(out_dir, results), analyze.markdown, lambda _: results / analyze.RESULT_NAME
    )


if __name__ == "__main__":
    sys.exit(main())
