"""Compare a dense and a MoT run: loss vs training FLOPs and vs wall clock, and how much of
dense's budget MoT needs to reach dense's final loss.

``python -m examples.experiments.mot_vs_dense.analyze [--setting lm|transfusion] [--out-dir DIR]
[--results bench/results]`` (from the repository root)

Reads ``<out-dir>/dense/metrics.jsonl`` and ``<out-dir>/mot/metrics.jsonl`` (written by
``megafusion train``; ``run.py`` produces both) and, when present, ``<out-dir>/run_info.json``
(the commands, written by ``run.py``) and ``<out-dir>/<arch>/train.log`` (the run banner, for
the vocabulary size).

Two settings (``SETTINGS``), told apart by the ``objective.name`` the runs trained with:

- ``lm`` (Chameleon): text pieces and discrete image codes, one next-token loss; the image loss
  is ``loss/image`` / ``val/loss/image``. Default runs ``runs/mot_vs_dense``, results
  ``mot_vs_dense.*``.
- ``transfusion``: text next-token loss + diffusion loss on continuous image latents; the image
  loss is ``loss/diffusion`` / ``val/loss/diffusion`` and ``loss`` (overall) is text +
  ``objective.diffusion_weight`` x diffusion. Default runs ``runs/mot_vs_dense_transfusion``,
  results ``mot_vs_dense_transfusion.*``.

The setting is ``--setting`` where given, else the ``objective.name`` of the config the runs used
(``run_info.json``'s commands), else whichever image loss the metrics files log. For each
modality (text, image) and overall:

- the validation-loss curve against cumulative training FLOPs (``flops_total`` of the step the
  evaluation follows) and cumulative wall clock (the sum of ``step_time_s``: optimizer steps
  only, so start-up and evaluation time are left out of both runs alike);
- dense's final validation loss, and the first point where MoT's validation loss is <= it,
  linearly interpolated between evaluation points on the FLOPs axis (the wall clock is
  interpolated at the same position); its FLOPs and wall clock as fractions of dense's totals,
  or "not reached";
- the same on the training loss smoothed by a bias-corrected EMA over steps: a denser but
  in-sample measure (one point per step instead of one per evaluation).

Writes ``<name>.json`` (every number), ``<name>.md`` (the table) and ``<name>.png`` (the
curves) into the results directory, ``<name>`` being the setting's ``result_name``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.provenance import ROOT, recorded_or_now
from examples.experiments import harness
from examples.experiments.harness import (
    AnalysisError,
    finish,
    fmt_loss,
    fmt_pct,
    provenance_lines,
    pyplot,
    write_report,
)
from megafusion.evaluation.curves import first_crossing, read_metrics, value_at

ARCHS = ("dense", "mot")
MODALITIES = ("overall", "text", "image")
EMA_BETA = 0.95  # ~20-step window: smooths step-to-step batch noise, lags the curve by ~20 steps
RESULT_NAME = "mot_vs_dense"  # the lm setting's; see Setting.result_name
RUN_COMMAND = "python -m examples.experiments.mot_vs_dense.run"


@dataclass(frozen=True)
class Setting:
    """What differs between the experiment's two settings; everything else is shared."""

    name: str  # the runs' objective.name
    image_loss: str  # metrics suffix of the image loss: loss/<image_loss>, val/loss/<image_loss>
    image_label: str  # the image row's name in the table and the plot
    result_name: str  # <results>/<result_name>.{json,md,png}
    out_dir: str  # default directory of the runs (relative: the scripts are run from the repository root)
    config: str  # default config: a file in this folder
    title: str  # heading of the markdown report
    plot_title: str  # start of the figure's title
    paper: str  # what the MoT paper reports for this setting (the report's closing note)

    @property
    def run_command(self) -> str:
        """The command that produces this setting's runs (for error messages)."""
        return RUN_COMMAND if self.name == "lm" else f"{RUN_COMMAND} --setting {self.name}"

    def label(self, modality: str) -> str:
        return self.image_label if modality == "image" else modality


SETTINGS = {
    # The lm strings are those of the first published report: its files must not change.
    "lm": Setting(
        name="lm",
        image_loss="image",
        image_label="image",
        result_name=RESULT_NAME,
        out_dir="runs/mot_vs_dense",
        config="config.yaml",
        title="MoT vs dense (Chameleon setting, built-in shapes + digits, vq image codes)",
        plot_title="MoT vs dense",
        paper="The MoT paper reports 55.8% of the FLOPs for the 7B Chameleon setting",
    ),
    "transfusion": Setting(
        name="transfusion",
        image_loss="diffusion",
        image_label="image (diffusion)",
        result_name=f"{RESULT_NAME}_transfusion",
        out_dir="runs/mot_vs_dense_transfusion",
        config="config_transfusion.yaml",
        title="MoT vs dense (Transfusion setting, built-in shapes: text next-token loss + diffusion loss on "
        "pixel latents)",
        plot_title="MoT vs dense, Transfusion setting",
        paper="The MoT paper reports that in the 7B Transfusion setting MoT matches dense's image performance "
        "with one third of the FLOPs",
    ),
}


def get_setting(name: str) -> Setting:
    if name not in SETTINGS:
        raise AnalysisError(f"unknown setting {name!r}: use one of {', '.join(SETTINGS)}")
    return SETTINGS[name]


# --------------------------------------------------------------------------- reading runs
def _key(modality: str, prefix: str, setting: Setting) -> str:
    """metrics.jsonl key of a loss: ``loss`` / ``loss/text`` / ``val/loss/image`` / ``val/loss/diffusion`` ..."""
    if modality == "overall":
        return prefix
    return f"{prefix}/{setting.image_loss if modality == 'image' else modality}"


def load_run(run_dir: Path, run_command: str = RUN_COMMAND) -> dict:
    """Training and evaluation records of one run, as per-step lists (steps strictly increasing).

    ``run_command`` is what the error messages tell the user to (re)run."""
    path = run_dir / "metrics.jsonl"
    train, evals = read_metrics(path, run_command, AnalysisError)
    if not train or not evals:
        raise AnalysisError(
            f"{path} has {len(train)} training and {len(evals)} evaluation records; need both "
            f"(log every step: logging.log_interval=1)"
        )
    missing = [k for k in ("step_time_s", "flops_total") if k not in train[0]]
    if missing:
        raise AnalysisError(
            f"{path}: training records lack {', '.join(missing)} (written by a megafusion older "
            f"than the FLOPs metrics?): rerun `{run_command}`"
        )
    steps = [r["step"] for r in train]
    if steps != list(range(steps[0], steps[0] + len(steps))):
        raise AnalysisError(
            f"{path}: training steps are not consecutive; the wall-clock and EMA curves need "
            f"every step logged (logging.log_interval=1)"
        )
    return {"path": str(path), "train": train, "eval": evals}


def cumulative_axes(run: dict) -> dict[int, tuple[float, float]]:
    """step -> (cumulative training FLOPs, cumulative step wall clock in s) after that step."""
    out, wall = {}, 0.0
    for r in run["train"]:
        wall += r["step_time_s"]
        out[r["step"]] = (float(r["flops_total"]), wall)
    return out


def val_curves(run: dict, setting: Setting) -> dict:
    """Per evaluation: step, FLOPs and wall clock so far, and the validation loss per modality."""
    axes = cumulative_axes(run)
    points = [r for r in run["eval"] if r["step"] in axes]  # an evaluation follows a logged step
    curve = {
        "step": [r["step"] for r in points],
        "flops": [axes[r["step"]][0] for r in points],
        "wall_s": [axes[r["step"]][1] for r in points],
    }
    for m in MODALITIES:
        curve[m] = [r.get(_key(m, "val/loss", setting), math.nan) for r in points]
    return curve


def ema(values: list[float], beta: float = EMA_BETA) -> list[float]:
    """Bias-corrected exponential moving average (as Adam's moments): no pull towards 0 at the start."""
    out, avg, t = [], 0.0, 0
    for v in values:
        if not math.isnan(v):  # a step whose batch had no token of a modality has no loss for it
            t += 1
            avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**t) if t else math.nan)
    return out


def train_curves(run: dict, setting: Setting, beta: float = EMA_BETA) -> dict:
    """Per step: FLOPs and wall clock so far, and the EMA-smoothed training loss per modality."""
    axes = cumulative_axes(run)
    curve = {
        "step": [r["step"] for r in run["train"]],
        "flops": [axes[r["step"]][0] for r in run["train"]],
        "wall_s": [axes[r["step"]][1] for r in run["train"]],
    }
    for m in MODALITIES:
        curve[m] = ema([r.get(_key(m, "loss", setting), math.nan) for r in run["train"]], beta)
    return curve


# --------------------------------------------------------------------------- which setting
def read_run_info(out_dir: Path) -> dict:
    """``run_info.json`` of run.py (the commands, provenance), or {} where there is none."""
    return harness.read_run_info(
        out_dir, "delete it (the analysis then infers the setting from the metrics) or rerun the runs"
    )


def run_config(info: dict, arch: str):
    """The config one run trained with: the file and overrides of its command in run_info.json
    (None where unknown: no command, or the file has gone since)."""
    cmd = info.get("train_commands", {}).get(arch)
    if not cmd or "--config" not in cmd:
        return None
    from megafusion.config import ConfigError, load_config  # only needed (and imported) with run_info.json

    config = cmd[cmd.index("--config") + 1]
    path = config if os.path.isabs(config) else str(ROOT / config)
    if not os.path.isfile(path):
        return None  # parameter_counts says so; the setting then comes from the metrics
    overrides = [t for t in cmd[cmd.index("--config") + 2 :] if "=" in t]
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        raise AnalysisError(f"the {arch} run's command in run_info.json no longer loads ({err}): rerun it") from None


def setting_from_info(info: dict, out_dir: Path) -> str | None:
    """objective.name of the configs both runs used (None where run_info.json does not say)."""
    names = {a: cfg.objective.name for a in ARCHS if (cfg := run_config(info, a)) is not None}
    if len(set(names.values())) > 1:  # run.py never does this; a hand-edited run_info.json might
        raise AnalysisError(
            f"{out_dir / 'run_info.json'}: the runs trained with different objectives {names}: "
            f"rerun both with one config"
        )
    return next(iter(names.values()), None)


def setting_from_metrics(runs: dict) -> str:
    """The setting whose image loss the evaluation records log (for runs without run_info.json)."""
    logged = {
        name
        for name, s in SETTINGS.items()
        if any(f"val/loss/{s.image_loss}" in r for run in runs.values() for r in run["eval"])
    }
    if len(logged) != 1:
        paths = " and ".join(run["path"] for run in runs.values())
        keys = " or ".join(f"val/loss/{s.image_loss} ({s.name})" for s in SETTINGS.values())
        raise AnalysisError(
            f"{paths}: cannot tell the setting from the metrics (they log "
            f"{'both' if logged else 'neither'} of {keys}): pass --setting lm|transfusion"
        )
    return logged.pop()


def check_image_loss(runs: dict, setting: Setting) -> None:
    """Both runs must log the setting's image loss: without it the image row would be all n/a."""
    key = f"val/loss/{setting.image_loss}"
    for run in runs.values():
        if any(key in r for r in run["eval"]):
            continue
        others = [
            s
            for s in SETTINGS.values()
            if s is not setting and any(f"val/loss/{s.image_loss}" in r for r in run["eval"])
        ]
        why = (
            f"it logs val/loss/{others[0].image_loss}, so these look like {others[0].name}-setting runs: "
            f"analyse them with --setting {others[0].name}"
            if others
            else f"no held-out image was evaluated? produce the runs with `{setting.run_command}`"
        )
        raise AnalysisError(
            f"{run['path']}: no evaluation record has {key}, the image loss of the "
            f"{setting.name} setting (objective.name={setting.name}); {why}"
        )


def resolve_setting(explicit: str | None, info: dict, out_dir: Path) -> str | None:
    """--setting, checked against the runs' configs; else the configs' (None: ask the metrics)."""
    declared = setting_from_info(info, out_dir)
    if explicit is not None:
        get_setting(explicit)
        if declared is not None and declared != explicit:
            raise AnalysisError(
                f"--setting {explicit}, but the runs in {out_dir} trained with objective.name="
                f"{declared} (per {out_dir / 'run_info.json'}): pass --setting {declared} "
                f"or leave it out"
            )
        return explicit
    return declared


# --------------------------------------------------------------------------- the comparison
def reach(reference: dict, other: dict) -> dict:
    """Per modality: the reference's final loss, the other run's, and where the other run's curve
    first reaches the reference's final loss (curves from *_curves; any two runs).

    ``step`` / ``flops`` / ``wall_s`` of that point (linearly interpolated) and its FLOPs and wall
    clock as fractions of the reference's totals; None where it never did. ``at_first_point``: the
    other run was already below at its first point, so the fractions are upper bounds."""
    total_flops, total_wall = reference["flops"][-1], reference["wall_s"][-1]
    out = {}
    for m in MODALITIES:
        target = reference[m][-1]
        row = {
            "reference_final": target,
            "final": other[m][-1],
            "reached": False,
            "at_first_point": False,
            "step": None,
            "flops": None,
            "wall_s": None,
            "flops_fraction": None,
            "wall_fraction": None,
        }
        hit = first_crossing(other["flops"], other[m], target) if not math.isnan(target) else None
        if hit is not None:
            flops, pos = hit
            wall = value_at(other["wall_s"], pos)
            row.update(
                reached=True,
                at_first_point=pos == 0,
                step=value_at(other["step"], pos),
                flops=flops,
                wall_s=wall,
                flops_fraction=flops / total_flops,
                wall_fraction=wall / total_wall,
            )
        out[m] = row
    return out


def compare(dense: dict, mot: dict) -> dict:
    """Per modality: final losses and what MoT needed to reach dense's final loss (curves from *_curves).

    :func:`reach` with this report's key names (its JSON and tables read them)."""
    return {
        m: {
            "dense_final": row["reference_final"],
            "mot_final": row["final"],
            "reached": row["reached"],
            "at_first_point": row["at_first_point"],
            "mot_step": row["step"],
            "mot_flops": row["flops"],
            "mot_wall_s": row["wall_s"],
            "flops_fraction": row["flops_fraction"],
            "wall_fraction": row["wall_fraction"],
        }
        for m, row in reach(dense, mot).items()
    }


def analyze_runs(out_dir: Path, setting: str | None = None) -> dict:
    """Load both runs under ``out_dir`` and compute every number of the report (no files written).

    ``setting`` (lm / transfusion) decides which metrics key is the image loss; None: the one the
    runs' configs (run_info.json), else their metrics, say."""
    known = resolve_setting(setting, read_run_info(out_dir), out_dir)
    runs = {a: load_run(out_dir / a, get_setting(known).run_command if known else RUN_COMMAND) for a in ARCHS}
    chosen = get_setting(known or setting_from_metrics(runs))
    check_image_loss(runs, chosen)
    val = {a: val_curves(runs[a], chosen) for a in ARCHS}
    smooth = {a: train_curves(runs[a], chosen) for a in ARCHS}
    summary = {a: run_summary(runs[a], val[a]) for a in ARCHS}
    if summary["dense"]["steps"] != summary["mot"]["steps"]:
        print(
            f"warning: dense ran {summary['dense']['steps']} steps and MoT {summary['mot']['steps']}: the "
            f"fractions are still relative to dense's totals",
            file=sys.stderr,
        )
    return {
        "setting": chosen.name,
        "image_loss": f"val/loss/{chosen.image_loss}",
        "runs": summary,
        "validation": compare(val["dense"], val["mot"]),
        "train_loss_ema": compare(smooth["dense"], smooth["mot"]),
        "ema_beta": EMA_BETA,
        "curves": {"validation": val, "train_loss_ema": {a: _thin(smooth[a]) for a in ARCHS}},
    }


def run_summary(run: dict, val: dict) -> dict:
    """Steps, training FLOPs, summed step wall clock, median step time and the last evaluation of one run
    (``run`` from :func:`load_run`, ``val`` its :func:`val_curves`)."""
    axes = cumulative_axes(run)
    last = run["train"][-1]["step"]
    times = sorted(r["step_time_s"] for r in run["train"])
    # The median step time is robust to a few steps slowed by other work on the machine; a sum
    # far above steps x median says the wall clock was disturbed.
    return {
        "metrics": run["path"],
        "steps": last,
        "flops_total": axes[last][0],
        "wall_clock_s": axes[last][1],
        "median_step_s": times[len(times) // 2],
        "final_eval_step": val["step"][-1],
    }


def _thin(curve: dict, every: int = 5) -> dict:
    """Every ``every``-th point (and the last) of a per-step curve: keeps the JSON small."""
    keep = sorted(set(range(0, len(curve["step"]), every)) | {len(curve["step"]) - 1})
    return {k: [v[i] for i in keep] for k, v in curve.items()}


# --------------------------------------------------------------------------- provenance
def parameter_counts(out_dir: Path, info: dict, names: tuple[str, ...] = ARCHS) -> dict:
    """Exact total / active parameters of the runs ``names`` (both models here), from the config
    run.py used (run_info.json's command under that name) and the vocabulary size the run banner
    in ``<out_dir>/<name>/train.log`` printed (the data decides the vocabulary)."""
    from megafusion.accounting.params import parameter_counts as counts

    out = {}
    for a in names:
        log = out_dir / a / "train.log"
        # "(0.92M active)", or "(0.92M active per token)" where the banner says so (sparse families)
        banner = r"parameters \([\d.]+M active[^)]*\), vocab (\d+)"
        found = re.search(banner, log.read_text()) if log.is_file() else None
        cfg = run_config(info, a) if found else None
        if cfg is None:
            out[a] = None  # e.g. metrics files from elsewhere: no banner or command to read
            if found and info.get("train_commands", {}).get(a):
                print(
                    f"warning: the config of the {a} run (run_info.json's command) no longer exists: "
                    f"its parameter counts are unknown",
                    file=sys.stderr,
                )
            continue
        cfg.model.vocab_size = int(found.group(1))
        c = counts(cfg)
        out[a] = {
            "total": c["total"],
            "active": c["active"],
            "non_embedding": c["non_embedding"],
            "vocab_size": cfg.model.vocab_size,
        }
    return out


# --------------------------------------------------------------------------- writing results
def _objective_line(result: dict) -> list[str]:
    """Transfusion only: what the image row and the overall row measure (the lm report has no such line)."""
    if result["setting"] != "transfusion":
        return []
    o = result.get("objective") or {}
    weight = o.get("diffusion_weight", "objective.diffusion_weight")
    target = f", {o['prediction']} target" if "prediction" in o else ""
    return [
        f"- objective: text next-token loss + diffusion loss on image latents{target}; the "
        f"*{SETTINGS['transfusion'].image_label}* row is `{result['image_loss']}` (mean squared error per "
        f"latent element, noise draws fixed per held-out image), *overall* is the training loss "
        f"text + {weight} x diffusion (+ z-loss)"
    ]


def markdown(result: dict) -> str:
    r, p = result["runs"], result["parameters"]
    setting = get_setting(result.get("setting", "lm"))
    lines = [
        f"# {setting.title}",
        "",
        *provenance_lines(result),
        *_objective_line(result),
    ]
    for a in ARCHS:
        cmd = result["train_commands"].get(a)
        if cmd:
            lines.append(f"- {a} run: `{' '.join(cmd)}`")
    for a in ARCHS:
        params = (
            f"{p[a]['total'] / 1e6:.3f}M parameters, {p[a]['active'] / 1e6:.3f}M active per token"
            if p.get(a)
            else "parameters unknown (no train.log)"
        )
        lines.append(
            f"- {a}: {r[a]['steps']} steps, {r[a]['flops_total']:.4g} training FLOPs, "
            f"{r[a]['wall_clock_s']:.1f} s of step wall clock (median step {r[a]['median_step_s']:.3f} s); {params}"
        )
    for title, key in (
        ("Validation loss (held-out documents, evaluated every few steps)", "validation"),
        (f"Training loss, EMA-smoothed (beta {result['ema_beta']}; in-sample, every step)", "train_loss_ema"),
    ):
        lines += [
            "",
            f"## {title}",
            "",
            "| modality | dense final | MoT final | FLOPs fraction to match | wall-clock fraction to match |",
            "|---|---|---|---|---|",
        ]
        for m in MODALITIES:
            row = result[key][m]
            lines.append(
                f"| {setting.label(m)} | {fmt_loss(row['dense_final'])} | {fmt_loss(row['mot_final'])} | "
                f"{fmt_pct(row['flops_fraction'], row['at_first_point'])} | "
                f"{fmt_pct(row['wall_fraction'], row['at_first_point'])} |"
            )
    lines += [
        "",
        "Fraction to match: the training FLOPs (or step wall clock) MoT spent until its loss first "
        "reached dense's final loss, over dense's total; linear interpolation between evaluation points "
        "('<=': already below at MoT's first point, an upper bound). "
        f"{setting.paper}; this is a tiny model on a CPU, one seed.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """2 x 3 panels: validation loss (overall, text, image) vs training FLOPs (top) and wall clock (bottom)."""
    plt = pyplot()
    curves, val = result["curves"]["validation"], result["validation"]
    setting = get_setting(result.get("setting", "lm"))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), squeeze=False)
    colours = {"dense": "tab:blue", "mot": "tab:orange"}
    for row, (axis, label) in enumerate((("flops", "training FLOPs"), ("wall_s", "wall clock of steps (s)"))):
        for col, m in enumerate(MODALITIES):
            ax = axes[row][col]
            for a in ARCHS:
                ax.plot(curves[a][axis], curves[a][m], marker=".", color=colours[a], label="MoT" if a == "mot" else a)
            ax.axhline(
                val[m]["dense_final"], color=colours["dense"], linestyle="--", linewidth=0.8, label="dense final"
            )
            hit = val[m]["mot_flops" if axis == "flops" else "mot_wall_s"]
            frac = val[m]["flops_fraction" if axis == "flops" else "wall_fraction"]
            if hit is not None:
                ax.axvline(
                    hit, color=colours["mot"], linestyle=":", linewidth=0.8, label=f"MoT matches at {fmt_pct(frac)}"
                )
            ax.set_title(f"val loss, {setting.label(m)}: MoT needs {fmt_pct(frac, val[m]['at_first_point'])}")
            ax.set_xlabel(label)
            ax.set_ylabel("validation loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{setting.plot_title}, commit {result['commit']}, {result['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def result_base(results_dir: Path, setting: str) -> Path:
    """``<results_dir>/<name>``: the json / md / png of a setting's report differ only in suffix."""
    return Path(results_dir) / get_setting(setting).result_name


def write_results(out_dir: Path, results_dir: Path, setting: str | None = None) -> dict:
    """Analyse the runs under ``out_dir`` and write the json / md / png into ``results_dir``
    (file names per setting: see :func:`analyze_runs` for how it is chosen when None)."""
    result = analyze_runs(out_dir, setting)
    info = read_run_info(out_dir)
    config = run_config(info, "dense")
    # The runs' provenance (from run.py) where known; else this analysis's, which is all we have.
    result = {
        **recorded_or_now(info),
        "train_commands": info.get("train_commands", {}),
        "run_seconds": info.get("run_seconds", {}),
        "objective": asdict(config.objective) if config is not None else None,
        "parameters": parameter_counts(out_dir, info),
        **result,
    }
    write_report(result, result_base(results_dir, result["setting"]), markdown, plot)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--setting",
        choices=list(SETTINGS),
        default=None,
        help="lm (Chameleon) or transfusion; default: the runs' objective.name (run_info.json), "
        "else the image loss their metrics log",
    )
    parser.add_argument(
        "--out-dir",
        default=None,
        help="holds dense/ and mot/ (default: runs/mot_vs_dense, "
        "or runs/mot_vs_dense_transfusion with --setting transfusion)",
    )
    parser.add_argument("--results", default="bench/results", help="where the json/md/png go (default: %(default)s)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir or SETTINGS[args.setting or "lm"].out_dir)
    return finish(
        "[mot_vs_dense]",
        lambda: write_results(out_dir, Path(args.results), args.setting),
        markdown,
        lambda result: result_base(Path(args.results), result["setting"]),
    )


if __name__ == "__main__":
    sys.exit(main())
