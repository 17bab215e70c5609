"""Train dense, MoT, MoMa 1t1i, MoMa 4t4i, the modality-blind MoE-8x, Mixture-of-Depths (MoD), MoMa 4t4i
+ MoD and MoMa 4t4i upcycled from MoT on one config at equal active FLOPs per token, one after the
other; then compare them (analyze.py).

``python -m examples.experiments.moma.run [--quick] [--steps N] [--upcycle-step K] [--no-upcycle]
[--upcycle-router-noise X] [--out-dir DIR] [--results DIR] [--config FILE]
[--launcher subprocess|inprocess] [--analyze-only] [section.key=value ...]`` (from the repository root)

Every run (``analyze.RUNS``, in that order) is ``python -m megafusion.train --config FILE
[overrides] <its model.arch / moe.experts> logging.out_dir=OUT/<run>`` in the repository root, with
the same config, data, seed and steps; the overrides apply to all of them. The runs go one after
the other, never side by side, because their wall clocks are compared. Each run's console output
is shown and kept in ``OUT/<run>/train.log``; the commands and process times go to
``OUT/run_info.json``, rewritten after every step. A run's folder is deleted before it starts.

Upcycling, the last step (``--no-upcycle`` leaves it out), is MoMa's recipe started from the MoT:

1. the MoT run also saves a checkpoint every K steps (``--upcycle-step``; default a quarter of
   ``train.steps``, rounded down to whole evaluation intervals), which leaves its training as it is;
2. ``megafusion convert upcycle --ckpt OUT/mot/checkpoints/step_<K> --output OUT/upcycle_init
   --experts "{text: 4, image: 4}" --keep-data-order``: every expert a copy of its modality's MoT
   FFN, attention and norms MoT's, the routers fresh; the run from it goes on with MoT's data
   stream after step K;
3. MoMa 4t4i trains from it (``checkpoint.init_from``) for the remaining steps, with
   ``moe.router_noise`` (Gumbel-sigmoid noise on the experts' choice in training): a new run, so a
   fresh optimizer and LR schedule, warmup included. The analysis puts MoT's first K steps in
   front of it, so its curve ends at the same total steps.

Without ``megafusion convert upcycle`` (:func:`upcycle_unavailable`) the script stops before
training anything and asks for ``--no-upcycle``; if the step fails, the other runs are
still analysed and the script exits with 1.

Every run gets one torch thread (``OMP_NUM_THREADS=1``) unless the environment sets
``OMP_NUM_THREADS``: see below, where it is set.

``--quick``: tiny models, a few steps per run, all in this process by default (``--launcher
inprocess``: the same commands through ``megafusion.commands.main.main``, which saves each run's
~10 s of imports); its runs go to ``runs/moma_quick`` and its report to ``runs/moma_quick/results``
unless ``--out-dir`` / ``--results`` say otherwise, so a smoke run never replaces
``bench/results/moma.*``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# One torch thread per run unless the environment says otherwise, set before torch is imported (the
# in-process runs, machine()) and inherited by the training processes. With two threads the MoMa
# runs' many small operations each wait at a thread barrier, which on a CPU shared with other work
# turned sub-second steps into 7-15 s ones (median); one thread degrades evenly under load and
# costs MoMa little (its small operations gain little from a second thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.provenance import git_commit, machine, utc_now  # noqa: E402
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
from examples.experiments.moma import analyze  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "config.yaml"
# Set per run by this script: overriding them would break the like-for-like comparison.
RESERVED = (
    "model.arch",
    "logging.out_dir",
    "moe.experts",
    "moe.capacity",
    "moe.aux_router",
    "mod.capacity",
    "mod.aux_router",
    "mod.split",
    "checkpoint.init_from",
)
UPCYCLE_INIT = "upcycle_init"  # OUT/<this>: the converted MoMa weights the upcycled run starts from
# Gumbel-sigmoid noise on the upcycled run's router logits while experts choose their tokens: at
# scale 1 (temperature 1) it outweighs a fresh router's logits, so the experts, all copies of one
# FFN, first see different tokens and drift apart; it fades in weight as the router's logits grow.
UPCYCLE_ROUTER_NOISE = 1.0
TAG = "[moma]"
QUICK = [
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "model.num_query_groups=1",
    "model.ffn_hidden_size=64",
    "model.seq_length=128",
    "train.steps=6",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.warmup_steps=1",
    "data.builtin=shapes",
    "data.num_samples=200",
    "data.text_vocab_size=64",
    "data.vq_codebook_size=24",
    "eval.interval=2",
    "eval.batches=1",
]


# --------------------------------------------------------------------------- the plan
def upcycle_unavailable() -> str | None:
    """Why the upcycling step cannot run with this megafusion, or None when it can."""
    from megafusion.commands import convert

    if "upcycle" not in getattr(convert, "SUBCOMMANDS", ()):
        return "`megafusion convert` has no upcycle subcommand (MoT checkpoint -> MoMa) in this checkout"
    return None


def default_upcycle_step(steps: int, eval_interval: int) -> int:
    """A quarter of the steps, rounded down to whole evaluation intervals (MoT's validation curve
    then has a point where the upcycled run leaves it), at least one interval."""
    quarter = steps // 4
    if 0 < eval_interval < steps:
        return max(eval_interval, quarter // eval_interval * eval_interval)
    return max(1, quarter)


def experts_value(name: str) -> str:
    """The ``moe.experts`` value of a run in analyze.RUNS (as the config overrides spell it)."""
    (value,) = [o.split("=", 1)[1] for o in analyze.RUNS[name].overrides if o.startswith("moe.experts=")]
    return value


def mod_depth(layers: int, capacity: float, every: int, first: int) -> int:
    """The depth of a Mixture-of-Depths model whose active FLOPs per token are closest to those of
    ``layers`` plain layers (the shallower one on a tie): a MoD layer (``first``, ``first + every``,
    ...) runs ``capacity`` of the tokens, so it counts ``capacity`` of a layer (its router and the
    attention over the picked subset aside: the report's FLOPs column shows the difference).
    4 layers at capacity 0.25, every other layer from the first: 7 (3 plain + 4 x 0.25)."""

    def equivalent(depth: int) -> float:
        routed = sum(1 for layer in range(first, depth + 1, every))
        return depth - routed + capacity * routed

    return min(range(1, 4 * layers + 1), key=lambda depth: (abs(equivalent(depth) - layers), depth))


def train_args(config: Path, overrides: list[str], run: list[str], run_dir: Path) -> list[str]:
    return ["train", "--config", shown(config), *overrides, *run, f"logging.out_dir={shown(run_dir)}"]


class Runner:
    """Runs megafusion steps one after the other under ``out_dir``, recording each in ``info``
    (run_info.json, rewritten after every step)."""

    def __init__(self, out_dir: Path, config: Path, overrides: list[str], info: dict, launcher: str, cfg):
        self.out_dir, self.config, self.overrides, self.info, self.launcher = out_dir, config, overrides, info, launcher
        self.cfg = cfg  # the shared config with the overrides (what every run starts from)

    def save_info(self) -> None:
        (self.out_dir / "run_info.json").write_text(json.dumps(self.info, indent=1) + "\n")

    def train(self, name: str, run: list[str]) -> None:
        run_dir = self.out_dir / name
        clean(run_dir)
        run_dir.mkdir(parents=True)
        cmd = train_args(self.config, self.overrides, run, run_dir)
        self.info["train_commands"][name] = command_line(cmd)
        self.info["run_seconds"][name] = run_megafusion(cmd, run_dir / "train.log", self.launcher, TAG)
        print(f"[moma] {name} took {self.info['run_seconds'][name]:.1f} s", flush=True)
        self.save_info()


def run_main(runner: Runner, upcycle_step: int | None) -> None:
    """The runs of analyze.RUNS, one after the other (never side by side: the wall clocks are
    compared); the MoT one also keeps the checkpoint the upcycling starts from."""
    total = runner.info["steps"]
    cfg = runner.cfg
    for name, run in analyze.RUNS.items():
        extra = []
        if run.mod:
            capacity = float(next(o.split("=", 1)[1] for o in run.overrides if o.startswith("mod.capacity=")))
            depth = mod_depth(cfg.model.num_layers, capacity, cfg.mod.every, cfg.mod.first)
            extra.append(f"model.num_layers={depth}")
        if name == analyze.UPCYCLED_SOURCE and upcycle_step is not None:
            # Checkpoints every K steps, all kept, so that step K is there for the upcycling.
            extra = [
                "checkpoint.save=true",
                "checkpoint.resume=false",
                f"checkpoint.dir={shown(runner.out_dir / name / 'checkpoints')}",
                f"checkpoint.interval={upcycle_step}",
                f"checkpoint.keep_last={total // upcycle_step + 1}",
            ]
        runner.train(name, [*run.overrides, *extra])


def run_upcycle(runner: Runner, upcycle_step: int, router_noise: float) -> None:
    """The upcycling step: MoT's step-K checkpoint -> MoMa 4t4i (``convert upcycle``), trained for the
    remaining steps as a new run. Its own function so that it can be left out (--no-upcycle) or
    fail without losing the other runs' report."""
    from megafusion.checkpoint.io import step_dir

    out_dir, total = runner.out_dir, runner.info["steps"]
    source = step_dir(out_dir / analyze.UPCYCLED_SOURCE / "checkpoints", upcycle_step)
    init = out_dir / UPCYCLE_INIT
    clean(init)
    convert = [
        "convert",
        "upcycle",
        "--ckpt",
        shown(source),
        "--output",
        shown(init),
        "--experts",
        experts_value(analyze.UPCYCLED_AS),
        # The upcycled run goes on with the data MoT saw after step K (the trainer starts it at the
        # checkpoint's sample), so over the same total steps it sees the batches the other runs see.
        "--keep-data-order",
    ]
    (out_dir / "logs").mkdir(exist_ok=True)
    runner.info["convert_command"] = command_line(convert)
    runner.info["run_seconds"]["upcycle_convert"] = run_megafusion(
        convert, out_dir / "logs" / "upcycle.log", runner.launcher, TAG
    )
    runner.save_info()
    runner.train(
        analyze.UPCYCLED,
        [
            *analyze.RUNS[analyze.UPCYCLED_AS].overrides,
            f"train.steps={total - upcycle_step}",
            f"moe.router_noise={router_noise}",
            f"checkpoint.init_from={shown(init)}",
        ],
    )
    runner.info["upcycle"] = {
        "from": analyze.UPCYCLED_SOURCE,
        "step": upcycle_step,
        "steps": total - upcycle_step,
        "checkpoint": shown(source),
        "router_noise": router_noise,
        "complete": True,
    }
    runner.save_info()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and a few steps (the smoke test; ~1 min)")
    parser.add_argument("--steps", type=int, default=None, help="train.steps of every run (default: the config's)")
    parser.add_argument(
        "--upcycle-step",
        type=int,
        default=None,
        help="the MoT step the upcycled run starts from (default: a quarter of the steps, whole eval intervals)",
    )
    parser.add_argument(
        "--no-upcycle", action="store_true", help="leave out the upcycled run (needs `megafusion convert upcycle`)"
    )
    parser.add_argument(
        "--upcycle-router-noise",
        type=float,
        default=UPCYCLE_ROUTER_NOISE,
        help="moe.router_noise of the upcycled run (default: %(default)s)",
    )
    add_run_arguments(parser, "moma", CONFIG)
    args, out_dir, results = parse_run_arguments(parser, argv, "moma", RESERVED)
    failed = False
    if not args.analyze_only:
        config = Path(args.config).resolve()
        # The tiny settings first: the user's overrides win over them, --steps over both.
        overrides = [*(QUICK + [f"data.cache_dir={shown(out_dir / 'cache')}"] if args.quick else []), *args.overrides]
        if args.steps is not None:
            if args.steps < 2:
                parser.error("--steps must be >= 2")
            overrides.append(f"train.steps={args.steps}")
        try:
            cfg = load_config(config, overrides)
        except ValueError as err:
            parser.error(str(err))
        total_steps = cfg.train.steps
        upcycle_step = None
        if not args.no_upcycle:
            why = upcycle_unavailable()
            if why:
                parser.error(f"{why}: pass --no-upcycle to run the other runs without it")
            upcycle_step = args.upcycle_step
            if upcycle_step is None:
                upcycle_step = default_upcycle_step(total_steps, cfg.eval.interval)
            if not 0 < upcycle_step < total_steps:
                parser.error(f"--upcycle-step {upcycle_step} must be between 1 and train.steps - 1 ({total_steps - 1})")
        elif args.upcycle_step is not None:
            parser.error("--upcycle-step and --no-upcycle together: drop one")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (*analyze.RUNS, analyze.UPCYCLED, UPCYCLE_INIT, "logs", "run_info.json"):
            clean(out_dir / name)  # nothing of an earlier run may be analysed with this one's
        # Provenance of the *runs* (an --analyze-only pass later must not restamp it).
        info = {
            "command": recorded_command(analyze.RUN_COMMAND, argv),
            "commit": git_commit(),
            "machine": machine(),
            "date_utc": utc_now(),
            "quick": args.quick,
            "launcher": args.launcher,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "steps": total_steps,
            "train_commands": {},
            "run_seconds": {},
            "convert_command": None,
            "upcycle": None,
            "upcycle_skipped": "--no-upcycle" if args.no_upcycle else None,
        }
        runner = Runner(out_dir, config, overrides, info, args.launcher, cfg)
        try:
            run_main(runner, upcycle_step)
        except StepFailed as err:
            print(f"[moma] {err}", file=sys.stderr)
            return 1
        if upcycle_step is not None:
            try:
                run_upcycle(runner, upcycle_step, args.upcycle_router_noise)
            except StepFailed as err:
                # The other runs are complete: report them, and say what went wrong with the upcycling.
                print(f"[moma] the upcycling step failed: {err}", file=sys.stderr)
                info["upcycle_skipped"] = f"the upcycling step failed: {err}"
                runner.save_info()
                failed = True
        total = sum(info["run_seconds"].values())
        print(f"[moma] all steps took {total:.0f} s", flush=True)
    rc = finish(
        "[moma]",
        lambda: analyze.write_results(out_dir, results),
        analyze.markdown,
        lambda _: results / analyze.RESULT_NAME,
    )
    return rc or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
