"""Compare a dense and a MoT run: loss vs training FLOPs and vs wall clock, and how much of
dense's budget MoT needs to reach dense's final loss.

``python examples/experiments/mot_vs_dense/analyze.py [--out-dir runs/mot_vs_dense] [--results bench/results]``

Reads ``<out-dir>/dense/metrics.jsonl`` and ``<out-dir>/mot/metrics.jsonl`` (written by
``megafusion train``; ``run.py`` produces both) and, when present, ``<out-dir>/run_info.json``
(the commands, written by ``run.py``) and ``<out-dir>/<arch>/train.log`` (the run banner, for
the vocabulary size). For each modality (text, image) and overall:

- the validation-loss curve against cumulative training FLOPs (``flops_total`` of the step the
  evaluation follows) and cumulative wall clock (the sum of ``step_time_s``: optimizer steps
  only, so start-up and evaluation time are left out of both runs alike);
- dense's final validation loss, and the first point where MoT's validation loss is <= it,
  linearly interpolated between evaluation points on the FLOPs axis (the wall clock is
  interpolated at the same position); its FLOPs and wall clock as fractions of dense's totals,
  or "not reached";
- the same on the training loss smoothed by a bias-corrected EMA over steps: a denser but
  in-sample measure (one point per step instead of one per evaluation).

Writes ``mot_vs_dense.json`` (every number), ``mot_vs_dense.md`` (the table) and
``mot_vs_dense.png`` (the curves) into the results directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the repository (for git and the default paths)
sys.path.insert(0, str(ROOT))  # bench/ is a folder of the repository, not an installed package
from bench.provenance import git_commit, machine  # noqa: E402
ARCHS = ("dense", "mot")
MODALITIES = ("overall", "text", "image")
EMA_BETA = 0.95  # ~20-step window: smooths step-to-step batch noise, lags the curve by ~20 steps
RESULT_NAME = "mot_vs_dense"
RUN_COMMAND = "python examples/experiments/mot_vs_dense/run.py"


class AnalysisError(RuntimeError):
    """The runs to compare are missing or unusable; the message says which file and what to do."""


# --------------------------------------------------------------------------- reading runs
def _key(modality: str, prefix: str) -> str:
    """metrics.jsonl key of a loss: ``loss`` / ``loss/text`` / ``val/loss/image`` ..."""
    return prefix if modality == "overall" else f"{prefix}/{modality}"


def load_run(run_dir: Path) -> dict:
    """Training and evaluation records of one run, as per-step lists (steps strictly increasing)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise AnalysisError(f"{path} does not exist: produce both runs with `{RUN_COMMAND}` "
                            f"(or analyse another directory with --out-dir)")
    train, evals = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise AnalysisError(f"{path}:{n} is not JSON ({err}): the run was cut off mid-write? Rerun it") from None
            (evals if "val/loss" in record else train).append(record)
    for kind, records in (("training", train), ("evaluation", evals)):
        steps = [r["step"] for r in records]
        if any(b <= a for a, b in zip(steps, steps[1:])):
            # MetricsLogger appends: a second run into the same directory repeats steps.
            raise AnalysisError(f"{path}: {kind} steps are not increasing (a second run appended to the same "
                                f"file?): delete {run_dir} and rerun `{RUN_COMMAND}`")
    if not train or not evals:
        raise AnalysisError(f"{path} has {len(train)} training and {len(evals)} evaluation records; need both "
                            f"(log every step: logging.log_interval=1)")
    missing = [k for k in ("step_time_s", "flops_total") if k not in train[0]]
    if missing:
        raise AnalysisError(f"{path}: training records lack {', '.join(missing)} (written by a megafusion older "
                            f"than the FLOPs metrics?): rerun `{RUN_COMMAND}`")
    steps = [r["step"] for r in train]
    if steps != list(range(steps[0], steps[0] + len(steps))):
        raise AnalysisError(f"{path}: training steps are not consecutive; the wall-clock and EMA curves need "
                            f"every step logged (logging.log_interval=1)")
    return {"path": str(path), "train": train, "eval": evals}


def cumulative_axes(run: dict) -> dict[int, tuple[float, float]]:
    """step -> (cumulative training FLOPs, cumulative step wall clock in s) after that step."""
    out, wall = {}, 0.0
    for r in run["train"]:
        wall += r["step_time_s"]
        out[r["step"]] = (float(r["flops_total"]), wall)
    return out


def val_curves(run: dict) -> dict:
    """Per evaluation: step, FLOPs and wall clock so far, and the validation loss per modality."""
    axes = cumulative_axes(run)
    points = [r for r in run["eval"] if r["step"] in axes]  # an evaluation follows a logged step
    curve = {"step": [r["step"] for r in points], "flops": [axes[r["step"]][0] for r in points],
             "wall_s": [axes[r["step"]][1] for r in points]}
    for m in MODALITIES:
        curve[m] = [r.get(_key(m, "val/loss"), math.nan) for r in points]
    return curve


def ema(values: list[float], beta: float = EMA_BETA) -> list[float]:
    """Bias-corrected exponential moving average (as Adam's moments): no pull towards 0 at the start."""
    out, avg, t = [], 0.0, 0
    for v in values:
        if not math.isnan(v):  # a step whose batch had no token of a modality has no loss for it
            t += 1
            avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** t) if t else math.nan)
    return out


def train_curves(run: dict, beta: float = EMA_BETA) -> dict:
    """Per step: FLOPs and wall clock so far, and the EMA-smoothed training loss per modality."""
    axes = cumulative_axes(run)
    curve = {"step": [r["step"] for r in run["train"]], "flops": [axes[r["step"]][0] for r in run["train"]],
             "wall_s": [axes[r["step"]][1] for r in run["train"]]}
    for m in MODALITIES:
        curve[m] = ema([r.get(_key(m, "loss"), math.nan) for r in run["train"]], beta)
    return curve


# --------------------------------------------------------------------------- the comparison
def first_crossing(xs: list[float], ys: list[float], target: float) -> tuple[float, float] | None:
    """(x, t) where ``ys`` first reaches <= ``target``, linearly interpolated between points.

    ``t`` locates it: point ``i - 1 + t`` (so other axes can be interpolated at the same place).
    At the first point it is that point (no earlier point to interpolate from: an upper bound).
    None if it never does.
    """
    for i, y in enumerate(ys):
        if not y <= target:  # NaN never counts
            continue
        if i == 0:
            return xs[0], 0.0
        y0 = ys[i - 1]
        t = (y0 - target) / (y0 - y) if y0 != y else 1.0
        return xs[i - 1] + t * (xs[i] - xs[i - 1]), float(i - 1 + t)
    return None


def _at(values: list[float], position: float) -> float:
    """``values`` linearly interpolated at a fractional index."""
    i = min(int(position), len(values) - 1)
    frac = position - i
    return values[i] if frac == 0 else values[i] + frac * (values[i + 1] - values[i])


def compare(dense: dict, mot: dict) -> dict:
    """Per modality: final losses and what MoT needed to reach dense's final loss (curves from *_curves)."""
    total_flops, total_wall = dense["flops"][-1], dense["wall_s"][-1]
    out = {}
    for m in MODALITIES:
        target = dense[m][-1]
        # at_first_point: MoT was already below at its first point, so the fractions are upper bounds.
        row = {"dense_final": target, "mot_final": mot[m][-1], "reached": False, "at_first_point": False,
               "mot_step": None, "mot_flops": None, "mot_wall_s": None, "flops_fraction": None,
               "wall_fraction": None}
        hit = first_crossing(mot["flops"], mot[m], target) if not math.isnan(target) else None
        if hit is not None:
            flops, pos = hit
            wall = _at(mot["wall_s"], pos)
            row.update(reached=True, at_first_point=pos == 0, mot_step=_at(mot["step"], pos), mot_flops=flops, mot_wall_s=wall,
                       flops_fraction=flops / total_flops, wall_fraction=wall / total_wall)
        out[m] = row
    return out


def analyze_runs(out_dir: Path) -> dict:
    """Load both runs under ``out_dir`` and compute every number of the report (no files written)."""
    runs = {a: load_run(out_dir / a) for a in ARCHS}
    val = {a: val_curves(runs[a]) for a in ARCHS}
    smooth = {a: train_curves(runs[a]) for a in ARCHS}
    summary = {}
    for a in ARCHS:
        axes = cumulative_axes(runs[a])
        last = runs[a]["train"][-1]["step"]
        times = sorted(r["step_time_s"] for r in runs[a]["train"])
        # The median step time is robust to a few steps slowed by other work on the machine; a sum
        # far above steps x median says the wall clock was disturbed.
        summary[a] = {"metrics": runs[a]["path"], "steps": last, "flops_total": axes[last][0],
                      "wall_clock_s": axes[last][1], "median_step_s": times[len(times) // 2],
                      "final_eval_step": val[a]["step"][-1]}
    if summary["dense"]["steps"] != summary["mot"]["steps"]:
        print(f"warning: dense ran {summary['dense']['steps']} steps and MoT {summary['mot']['steps']}: the "
              f"fractions are still relative to dense's totals", file=sys.stderr)
    return {"runs": summary, "validation": compare(val["dense"], val["mot"]),
            "train_loss_ema": compare(smooth["dense"], smooth["mot"]), "ema_beta": EMA_BETA,
            "curves": {"validation": val, "train_loss_ema": {a: _thin(smooth[a]) for a in ARCHS}}}


def _thin(curve: dict, every: int = 5) -> dict:
    """Every ``every``-th point (and the last) of a per-step curve: keeps the JSON small."""
    keep = sorted(set(range(0, len(curve["step"]), every)) | {len(curve["step"]) - 1})
    return {k: [v[i] for i in keep] for k, v in curve.items()}


# --------------------------------------------------------------------------- provenance
def parameter_counts(out_dir: Path, info: dict) -> dict:
    """Exact total / active parameters of both models, from the config run.py used and the
    vocabulary size the run banner printed (the data decides the vocabulary)."""
    from megafusion.config import load_config
    from megafusion.models.flops import parameter_counts as counts

    out = {}
    for a in ARCHS:
        log, cmd = out_dir / a / "train.log", info.get("train_commands", {}).get(a)
        found = re.search(r"parameters \([\d.]+M active\), vocab (\d+)", log.read_text()) if log.is_file() else None
        if not found or not cmd:
            out[a] = None  # e.g. metrics files from elsewhere: no banner to read
            continue
        config = cmd[cmd.index("--config") + 1]
        overrides = [t for t in cmd[cmd.index("--config") + 2:] if "=" in t]
        cfg = load_config(str(ROOT / config) if not os.path.isabs(config) else config, overrides)
        cfg.model.vocab_size = int(found.group(1))
        c = counts(cfg)
        out[a] = {"total": c["total"], "active": c["active"], "non_embedding": c["non_embedding"],
                  "vocab_size": cfg.model.vocab_size}
    return out


# --------------------------------------------------------------------------- writing results
def _pct(x, upper_bound: bool = False) -> str:
    return "not reached" if x is None else f"{'<= ' if upper_bound else ''}{100 * x:.1f}%"


def _loss(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.4f}"


def markdown(result: dict) -> str:
    r, p = result["runs"], result["parameters"]
    lines = ["# MoT vs dense (Chameleon setting, built-in shapes + digits, vq image codes)", "",
             f"- commit: `{result['commit']}`", f"- machine: {result['machine']}", f"- date (UTC): {result['date_utc']}",
             f"- command: `{result['command']}`"]
    for a in ARCHS:
        cmd = result["train_commands"].get(a)
        if cmd:
            lines.append(f"- {a} run: `{' '.join(cmd)}`")
    for a in ARCHS:
        params = (f"{p[a]['total'] / 1e6:.3f}M parameters, {p[a]['active'] / 1e6:.3f}M active per token"
                  if p.get(a) else "parameters unknown (no train.log)")
        lines.append(f"- {a}: {r[a]['steps']} steps, {r[a]['flops_total']:.4g} training FLOPs, "
                     f"{r[a]['wall_clock_s']:.1f} s of step wall clock (median step {r[a]['median_step_s']:.3f} s); {params}")
    for title, key in (("Validation loss (held-out documents, evaluated every few steps)", "validation"),
                       (f"Training loss, EMA-smoothed (beta {result['ema_beta']}; in-sample, every step)",
                        "train_loss_ema")):
        lines += ["", f"## {title}", "",
                  "| modality | dense final | MoT final | FLOPs fraction to match | wall-clock fraction to match |",
                  "|---|---|---|---|---|"]
        for m in MODALITIES:
            row = result[key][m]
            lines.append(f"| {m} | {_loss(row['dense_final'])} | {_loss(row['mot_final'])} | "
                         f"{_pct(row['flops_fraction'], row['at_first_point'])} | "
                         f"{_pct(row['wall_fraction'], row['at_first_point'])} |")
    lines += ["", "Fraction to match: the training FLOPs (or step wall clock) MoT spent until its loss first "
              "reached dense's final loss, over dense's total; linear interpolation between evaluation points "
              "('<=': already below at MoT's first point, an upper bound). "
              "The MoT paper reports 55.8% of the FLOPs for the 7B Chameleon setting; this is a tiny model on "
              "a CPU, one seed.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """2 x 3 panels: validation loss (overall, text, image) vs training FLOPs (top) and wall clock (bottom)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    curves, val = result["curves"]["validation"], result["validation"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), squeeze=False)
    colours = {"dense": "tab:blue", "mot": "tab:orange"}
    for row, (axis, label) in enumerate((("flops", "training FLOPs"), ("wall_s", "wall clock of steps (s)"))):
        for col, m in enumerate(MODALITIES):
            ax = axes[row][col]
            for a in ARCHS:
                ax.plot(curves[a][axis], curves[a][m], marker=".", color=colours[a], label="MoT" if a == "mot" else a)
            ax.axhline(val[m]["dense_final"], color=colours["dense"], linestyle="--", linewidth=0.8,
                       label="dense final")
            hit = val[m]["mot_flops" if axis == "flops" else "mot_wall_s"]
            frac = val[m]["flops_fraction" if axis == "flops" else "wall_fraction"]
            if hit is not None:
                ax.axvline(hit, color=colours["mot"], linestyle=":", linewidth=0.8,
                           label=f"MoT matches at {_pct(frac)}")
            ax.set_title(f"val loss, {m}: MoT needs {_pct(frac, val[m]['at_first_point'])}")
            ax.set_xlabel(label)
            ax.set_ylabel("validation loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"MoT vs dense, commit {result['commit']}, {result['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_results(out_dir: Path, results_dir: Path) -> dict:
    """Analyse the runs under ``out_dir`` and write the json / md / png into ``results_dir``."""
    result = analyze_runs(out_dir)
    info_path = out_dir / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    # The runs' provenance (from run.py) where known; else this analysis's, which is all we have.
    result = {"commit": info.get("commit", git_commit()), "machine": info.get("machine", machine()),
              "date_utc": info.get("date_utc", utc_now()),
              "command": info.get("command", f"(analysis only) {' '.join(sys.argv)}"),
              "train_commands": info.get("train_commands", {}), "run_seconds": info.get("run_seconds", {}),
              "parameters": parameter_counts(out_dir, info), **result}
    results_dir.mkdir(parents=True, exist_ok=True)
    base = results_dir / RESULT_NAME
    Path(f"{base}.json").write_text(json.dumps(result, indent=1) + "\n")
    Path(f"{base}.md").write_text(markdown(result))
    plot(result, Path(f"{base}.png"))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/mot_vs_dense", help="holds dense/ and mot/ (default: %(default)s)")
    parser.add_argument("--results", default="bench/results", help="where the json/md/png go (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        result = write_results(Path(args.out_dir), Path(args.results))
    except AnalysisError as err:
        print(f"analyze: {err}", file=sys.stderr)
        return 2
    print(markdown(result))
    print(f"wrote {Path(args.results) / RESULT_NAME}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
