"""Train dense, then MoT, on the same config, data, seed and steps; then compare them (analyze.py).

``python -m examples.experiments.mot_vs_dense.run [--setting lm|transfusion] [--steps N] [--out-dir DIR]
[--results bench/results] [--config FILE] [--analyze-only] [section.key=value ...]`` (from the
repository root)

The setting is the config's ``objective.name`` (after the overrides): ``lm`` (Chameleon:
``config.yaml``, the default) or ``transfusion`` (``config_transfusion.yaml``). ``--setting``
picks that setting's config when no ``--config`` is given; either way the setting chooses the
default ``--out-dir`` (``runs/mot_vs_dense`` / ``runs/mot_vs_dense_transfusion``) and the report's
name (``mot_vs_dense`` / ``mot_vs_dense_transfusion``). So ``--setting transfusion`` and
``--config examples/experiments/mot_vs_dense/config_transfusion.yaml`` do the same.

Each run is ``python -m megafusion.train --config FILE [overrides] model.arch=ARCH
logging.out_dir=OUT/ARCH`` in the repository root. The runs go one after the other, never side
by side, because their wall clocks are compared. Console output is shown and kept in
``OUT/ARCH/train.log``; the commands and process times go to ``OUT/run_info.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from bench.provenance import git_commit, machine, utc_now
from examples.experiments.harness import finish, recorded_command, run_logged, shown
from examples.experiments.mot_vs_dense import analyze

HERE = Path(__file__).resolve().parent
# Set per run by this script: overriding them would break the like-for-like comparison.
RESERVED = ("model.arch", "logging.out_dir")


def train_command(config: Path, overrides: list[str], arch: str, run_dir: Path, steps: int | None) -> list[str]:
    extra = [f"train.steps={steps}"] if steps is not None else []
    return [
        shown(sys.executable),
        "-m",
        "megafusion.train",
        "--config",
        shown(config),
        *overrides,
        *extra,
        f"model.arch={arch}",
        f"logging.out_dir={shown(run_dir)}",
    ]


def config_setting(config: Path, overrides: list[str]) -> str:
    """objective.name of ``config`` with ``overrides`` applied: the setting the runs will train in."""
    from megafusion.config import ConfigError, load_config

    try:
        name = load_config(str(config), overrides).objective.name
    except ConfigError as err:
        raise ValueError(str(err)) from None
    if name not in analyze.SETTINGS:
        raise ValueError(
            f"{shown(config)}: objective.name={name} is neither of "
            f"{', '.join(analyze.SETTINGS)}; this experiment compares in those settings only"
        )
    return name


def choose_setting(setting: str | None, config: str | None, overrides: list[str]) -> tuple[str | None, Path | None]:
    """(setting, config) from --setting / --config: the config decides, --setting only picks the default
    config and must agree with it. (None, None) when neither is given: analyze.py then asks the runs.
    ValueError (the message says what to change) on a missing config or a disagreement."""
    if config is None and setting is None:
        return None, None
    path = Path(config).resolve() if config is not None else HERE / analyze.SETTINGS[setting].config
    if not path.is_file():
        raise ValueError(f"--config {config}: no such file")
    found = config_setting(path, overrides)
    if setting is not None and found != setting:
        raise ValueError(
            f"--setting {setting}, but {shown(path)} (with the overrides) has "
            f"objective.name={found}: drop --setting or --config, or make them agree"
        )
    return found, path


def run_one(cmd: list[str], run_dir: Path) -> float:
    """Run one training to completion, echoing and logging its output; return its process wall time."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # MetricsLogger appends to metrics.jsonl: a leftover from an earlier run would be mixed in.
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    log_path = run_dir / "train.log"
    print(f"[mot_vs_dense] {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        rc, _ = run_logged(cmd, log)
    elapsed = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"[mot_vs_dense] training failed (exit code {rc}); its output is in {log_path}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--setting",
        choices=list(analyze.SETTINGS),
        default=None,
        help="lm (Chameleon, config.yaml) or transfusion (config_transfusion.yaml); default: "
        "the --config's objective.name, else lm",
    )
    parser.add_argument("--steps", type=int, default=None, help="train.steps of both runs (default: the config's)")
    parser.add_argument(
        "--out-dir",
        default=None,
        help="runs go to OUT/dense and OUT/mot (default: "
        "runs/mot_vs_dense, or runs/mot_vs_dense_transfusion in the transfusion setting)",
    )
    parser.add_argument(
        "--results",
        default="bench/results",
        help="where mot_vs_dense[_transfusion].{json,md,png} go (default: %(default)s)",
    )
    parser.add_argument("--config", default=None, help="the shared config (default: the setting's)")
    parser.add_argument("--analyze-only", action="store_true", help="skip training; analyse the runs in --out-dir")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to both runs")
    args = parser.parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o or o.split("=", 1)[0] in RESERVED]
    if bad:
        parser.error(
            f"{', '.join(bad)}: overrides must be section.key=value and may not set "
            f"{' or '.join(RESERVED)} (this script sets them per run; use --out-dir)"
        )
    # --analyze-only without --setting/--config: analyze.py reads the setting from the runs.
    try:
        setting, config = choose_setting(args.setting, args.config, args.overrides)
        if config is None and not args.analyze_only:
            setting, config = choose_setting("lm", None, args.overrides)
    except ValueError as err:
        parser.error(str(err))
    out_dir = Path(args.out_dir or analyze.SETTINGS[setting or "lm"].out_dir).resolve()
    results = Path(args.results).resolve()
    if not args.analyze_only:
        # Provenance of the *runs* (an --analyze-only pass later must not restamp it).
        info = {
            "command": recorded_command(analyze.RUN_COMMAND, argv),
            "commit": git_commit(),
            "machine": machine(),
            "date_utc": utc_now(),
            "train_commands": {},
            "run_seconds": {},
        }
        for arch in analyze.ARCHS:  # sequential on purpose: the wall clocks are compared
            cmd = train_command(config, args.overrides, arch, out_dir / arch, args.steps)
            info["train_commands"][arch] = cmd
            info["run_seconds"][arch] = run_one(cmd, out_dir / arch)
            print(f"[mot_vs_dense] {arch} took {info['run_seconds'][arch]:.1f} s", flush=True)
        (out_dir / "run_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return finish(
        "[mot_vs_dense]",
        lambda: analyze.write_results(out_dir, results, setting),
        analyze.markdown,
        lambda result: analyze.result_base(results, result["setting"]),
    )


if __name__ == "__main__":
    sys.exit(main())
