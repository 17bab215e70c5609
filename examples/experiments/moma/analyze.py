"""Compare dense, MoT, MoMa 1t1i / 4t4i, the modality-blind MoE-8x and MoMa 4t4i upcycled from MoT:
validation loss per modality against training FLOPs and wall clock, the fraction of dense's FLOPs
(and wall clock) each needs to reach dense's final loss, and step-time ratios.

``python -m examples.experiments.moma.analyze [--out-dir runs/moma] [--results bench/results]`` (from the
repository root)

Reads ``<out-dir>/<run>/metrics.jsonl`` of every run in ``RUNS`` (``run.py`` produces them) and,
where present, ``<out-dir>/run_info.json`` (commands, provenance, the upcycling) and
``<out-dir>/<run>/train.log`` (the run banner, for the vocabulary size of the parameter counts).
The upcycled run (``UPCYCLED``) is in the report when ``run_info.json`` records it as complete:
its curve is MoT's first ``upcycle.step`` steps (the checkpoint it was upcycled from) followed by
its own steps, shifted by them in steps, FLOPs and wall clock.

The curves and crossings are those of the MoT-vs-dense experiment
(:mod:`examples.experiments.mot_vs_dense.analyze`, its lm = Chameleon setting): validation loss
after each evaluation against cumulative ``flops_total`` and summed ``step_time_s``; the crossing
of dense's final loss interpolated linearly between evaluation points; the same on the
EMA-smoothed training loss.

Writes ``<results>/moma.json`` (every number and the curves), ``moma.md`` (the tables) and
``moma.png`` (the curves).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.provenance import recorded_or_now
from examples.experiments import harness
from examples.experiments.harness import AnalysisError, finish, fmt_loss, fmt_pct, provenance_lines
from examples.experiments.mot_vs_dense import analyze as base

MODALITIES = base.MODALITIES
SETTING = base.SETTINGS["lm"]  # the Chameleon setting: discrete image codes, image loss val/loss/image
RESULT_NAME = "moma"
RUN_COMMAND = "python -m examples.experiments.moma.run"


@dataclass(frozen=True)
class Run:
    """One run of the comparison: its name in the report and what run.py sets beyond the shared config."""

    label: str
    overrides: tuple[str, ...]
    # Mixture-of-Depths: run.py sets model.num_layers so that the run's active FLOPs per token match
    # dense's (``mod_depth``): a MoD layer at capacity c costs ~c of a layer.
    mod: bool = False


# In run order. Every run has the config's width, depth and ffn_hidden_size: MoT's token meets its
# modality's FFN, a MoMa token on average one expert of that width (moe.capacity null = 1 / experts
# of the group), so the active FLOPs per token are (nearly: the router, ceil of the capacity) equal.
# The runs with routing that is not causal (expert choice, MoD's top-k) also train auxiliary routers
# (stop-gradient: the main model trains as without them), so validation reports their losses under
# causal routing too (val_causal/...), as generation routes.
AUX = "moe.aux_router=true"
MOD = ("mod.capacity=0.25", "mod.aux_router=true")  # every other layer from layer 1 (mod.every=2, mod.first=1)
RUNS = {
    "dense": Run("dense", ("model.arch=dense",)),
    "mot": Run("MoT", ("model.arch=mot",)),
    "moma_1t1i": Run("MoMa 1t1i", ("model.arch=moma", "moe.experts={text: 1, image: 1}")),
    "moma_4t4i": Run("MoMa 4t4i", ("model.arch=moma", "moe.experts={text: 4, image: 4}", AUX)),
    "moe_8x": Run("MoE-8x", ("model.arch=moma", "moe.experts={mixed: 8}", AUX)),
    "mod": Run("MoD", ("model.arch=dense", *MOD), mod=True),
    "moma_4t4i_mod": Run(
        "MoMa 4t4i + MoD", ("model.arch=moma", "moe.experts={text: 4, image: 4}", AUX, *MOD), mod=True
    ),
    # MoD's selection per modality (each modality's own floor(c x n_m) of a row): the counts the experts
    # then see are known on the host, where the paper's selection (above) costs a device sync per MoD layer.
    "moma_4t4i_mod_pm": Run(
        "MoMa 4t4i + MoD per modality",
        ("model.arch=moma", "moe.experts={text: 4, image: 4}", AUX, *MOD, "mod.split=per_modality"),
        mod=True,
    ),
}
REFERENCE = "dense"
# MoMa 4t4i started from MoT's checkpoint part-way (run.py's upcycle step), to the same total steps.
UPCYCLED, UPCYCLED_SOURCE, UPCYCLED_AS = "moma_4t4i_upcycled", "mot", "moma_4t4i"
LABELS = {**{n: r.label for n, r in RUNS.items()}, UPCYCLED: "MoMa 4t4i upcycled"}


# --------------------------------------------------------------------------- reading runs
def stitch(source: dict, rest: dict, step: int) -> dict:
    """The upcycled run as one run: ``source``'s (MoT's) training steps 1..``step`` and its evaluations up
    to there, then ``rest`` (the upcycled run's own records) after them, its FLOPs and steps shifted."""
    head = [r for r in source["train"] if r["step"] <= step]
    if not head or head[-1]["step"] != step:
        raise AnalysisError(
            f"{source['path']} has no training step {step}, where the upcycled run started "
            f"(run_info.json's upcycle.step): rerun `{RUN_COMMAND}`"
        )
    first = rest["train"][0]["step"]
    if first not in (1, step + 1):
        raise AnalysisError(
            f"{rest['path']} starts at step {first}: an upcycled run starts at 1 (a new run from the "
            f"checkpoint) or at {step + 1} (counting on from it); rerun `{RUN_COMMAND}`"
        )
    shift = step if first == 1 else 0
    # Sum the run's own per-step FLOPs on top of the source's: right whether or not its flops_total
    # started from zero.
    flops = float(head[-1]["flops_total"])
    train = list(head)
    for r in rest["train"]:
        flops += float(r["flops"])
        train.append({**r, "step": r["step"] + shift, "flops_total": flops})
    evals = [r for r in source["eval"] if r["step"] <= step]
    evals += [{**r, "step": r["step"] + shift} for r in rest["eval"]]
    return {"path": rest["path"], "train": train, "eval": evals}


def upcycle_record(info: dict) -> dict | None:
    """run_info.json's ``upcycle`` entry when the upcycled run completed, else None."""
    up = info.get("upcycle") or {}
    return up if up.get("complete") else None


def load_runs(out_dir: Path, info: dict) -> dict:
    runs = {n: base.load_run(out_dir / n, RUN_COMMAND) for n in RUNS}
    up = upcycle_record(info)
    if up is not None:
        rest = base.load_run(out_dir / UPCYCLED, RUN_COMMAND)
        runs[UPCYCLED] = stitch(runs[UPCYCLED_SOURCE], rest, int(up["step"]))
        runs[UPCYCLED]["own"] = rest["train"]  # its own records (data order, step times after upcycling)
    return runs


# --------------------------------------------------------------------------- the comparison
AUX_STATS = ("accuracy", "precision", "recall")


def causal_summary(run: dict) -> dict:
    """The last evaluation's validation loss under causal routing (``val_causal/...``: every token
    routed by the auxiliary routers from its own state, as generation routes) per modality, and the
    auxiliary routers' accuracy, precision and recall against the training routing (``val/aux/...``);
    empty for a run without auxiliary routers."""
    last = run["eval"][-1] if run["eval"] else {}
    if "val_causal/loss" not in last:
        return {}
    return {
        "causal": {m: last.get(base._key(m, "val_causal/loss", SETTING), math.nan) for m in MODALITIES},
        "aux": {k: last.get(f"val/aux/{k}", math.nan) for k in AUX_STATS},
    }


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def analyze_runs(out_dir: Path) -> dict:
    """Load every run under ``out_dir`` and compute every number of the report (no files written)."""
    out_dir = Path(out_dir)
    info = harness.read_run_info(out_dir, f"rerun `{RUN_COMMAND}`")
    runs = load_runs(out_dir, info)
    base.check_image_loss(runs, SETTING)
    val = {n: base.val_curves(r, SETTING) for n, r in runs.items()}
    smooth = {n: base.train_curves(r, SETTING) for n, r in runs.items()}
    summary = {n: {"label": LABELS[n], **base.run_summary(runs[n], val[n]), **causal_summary(runs[n])} for n in runs}
    ref = summary[REFERENCE]
    for s in summary.values():
        # FLOPs ratio ~1 is the "equal active FLOPs" check; the step-time ratio is the cost of the
        # routing / dispatch on this hardware (median: robust to steps slowed by other work).
        s["flops_vs_dense"] = s["flops_total"] / ref["flops_total"]
        s["median_step_vs_dense"] = s["median_step_s"] / ref["median_step_s"]
        s["wall_clock_vs_dense"] = s["wall_clock_s"] / ref["wall_clock_s"]
    up = upcycle_record(info)
    upcycle = None
    if up is not None:
        own = runs[UPCYCLED]["own"]
        batch = own[1]["consumed_samples"] - own[0]["consumed_samples"] if len(own) > 1 else None
        upcycle = {
            **{k: v for k, v in up.items() if k != "complete"},
            "median_step_after_s": _median([r["step_time_s"] for r in own]),
            # consumed_samples of its first step: one batch (the data stream restarted) or the
            # source's position plus one batch (it went on where MoT's stream was at the checkpoint).
            "data_order_continued": batch is not None and own[0]["consumed_samples"] > batch,
        }
        upcycle["median_step_after_vs_dense"] = upcycle["median_step_after_s"] / ref["median_step_s"]
        # Where the branch sits on the plot's axes (not necessarily an evaluation point).
        upcycle["flops_at_step"], upcycle["wall_s_at_step"] = base.cumulative_axes(runs[UPCYCLED])[int(up["step"])]
    steps = {n: s["steps"] for n, s in summary.items()}
    if len(set(steps.values())) > 1:
        print(
            f"warning: the runs trained different step counts {steps}: fractions are of dense's totals", file=sys.stderr
        )
    others = [n for n in runs if n != REFERENCE]
    crossings = {}
    for key, curves in (("validation", val), ("train_loss_ema", smooth)):
        crossings[key] = {n: base.reach(curves[REFERENCE], curves[n]) for n in others}
        for rows in crossings[key].values():
            for row in rows.values():
                # Steps too: the FLOPs count what each model computes, and dense's and MoT's FFN
                # computes the padding that no expert takes, so equal steps are not quite equal FLOPs.
                row["step_fraction"] = row["step"] / ref["steps"] if row["reached"] else None
    return {
        "setting": SETTING.name,
        "image_loss": f"val/loss/{SETTING.image_loss}",
        "reference": REFERENCE,
        "runs": summary,
        "upcycle": upcycle,
        **crossings,
        "ema_beta": base.EMA_BETA,
        "curves": {"validation": val, "train_loss_ema": {n: base._thin(smooth[n]) for n in runs}},
    }


# --------------------------------------------------------------------------- writing results
def _fractions(row: dict) -> str:
    """``FLOPs% (wall%)`` of one crossing, or "not reached"."""
    if not row["reached"]:
        return "not reached"
    bound = row["at_first_point"]
    return f"{fmt_pct(row['flops_fraction'], bound)} ({fmt_pct(row['wall_fraction'], bound)})"


def _params(p: dict | None) -> tuple[str, str]:
    return ("?", "?") if not p else (f"{p['total'] / 1e6:.3f}M", f"{p['active'] / 1e6:.3f}M")


def markdown(result: dict) -> str:
    r, p, up = result["runs"], result["parameters"], result["upcycle"]
    lines = [
        "# MoMa vs MoT vs dense at equal active FLOPs (Chameleon setting, built-in shapes + digits, vq image codes)",
        "",
        *provenance_lines(result),
    ]
    if result.get("quick"):
        lines.append(
            "- **--quick**: tiny models and a few steps, a smoke test of the pipeline; the numbers mean nothing"
        )
    for n in r:
        cmd = result["train_commands"].get(n)
        if cmd:
            lines.append(f"- {LABELS[n]} run: `{shlex.join(cmd)}`")
    if up is not None:
        convert = result.get("convert_command")
        lines.append(
            f"- upcycling: MoT's checkpoint at step {up['step']} -> MoMa 4t4i"
            + (f" (`{shlex.join(convert)}`)" if convert else "")
            + f", trained {up['steps']} more steps (a new run: fresh optimizer and LR schedule) with "
            f"moe.router_noise={up['router_noise']}; data stream "
            + ("continued from MoT's position" if up["data_order_continued"] else "restarted from the first batch")
        )
    elif result.get("upcycle_skipped"):
        lines.append(f"- upcycled run: not run ({result['upcycle_skipped']})")
    lines += [
        "",
        "## Runs",
        "",
        "| run | steps | parameters | active | training FLOPs | vs dense | step wall clock (s) | median step (s) "
        "| median step vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, s in r.items():
        total, active = _params(p.get(n))
        lines.append(
            f"| {s['label']} | {s['steps']} | {total} | {active} | {s['flops_total']:.4g} | "
            f"{s['flops_vs_dense']:.3f}x | {s['wall_clock_s']:.1f} | {s['median_step_s']:.3f} | "
            f"{s['median_step_vs_dense']:.2f}x |"
        )
    if up is not None:
        lines += [
            "",
            f"The upcycled run's steps are MoT's up to step {up['step']}; after it its median step took "
            f"{up['median_step_after_s']:.3f} s ({up['median_step_after_vs_dense']:.2f}x dense's).",
        ]
    labels = [SETTING.label(m) for m in MODALITIES]
    lines += [
        "",
        "## Final validation loss (held-out documents)",
        "",
        "| run | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    finals = {n: result["curves"]["validation"][n] for n in r}
    for n in r:
        lines.append(f"| {LABELS[n]} | " + " | ".join(fmt_loss(finals[n][m][-1]) for m in MODALITIES) + " |")
    lines += causal_lines(result, finals, labels)
    for title, key in (
        ("Validation loss: fraction of dense's FLOPs (wall clock) to reach dense's final loss", "validation"),
        (
            f"Training loss, EMA-smoothed (beta {result['ema_beta']}; in-sample, every step): fraction of dense's "
            "FLOPs (wall clock) to reach dense's final loss",
            "train_loss_ema",
        ),
    ):
        lines += ["", f"## {title}", "", "| run | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for n, rows in result[key].items():
            lines.append(f"| {LABELS[n]} | " + " | ".join(_fractions(rows[m]) for m in MODALITIES) + " |")
    lines += [
        "",
        "Fraction: the training FLOPs (in brackets: the summed step wall clock) a run spent until its loss first "
        "reached dense's final loss, over dense's total; linear interpolation between evaluation points ('<=': "
        "already below at the run's first point, an upper bound); 'not reached': never within the run. Every run "
        "has the same width and FFN width and MoMa's default capacity (a token meets one expert on average); "
        "the MoD runs are deeper, at the depth whose plain layers plus MoD layers (each running a fraction "
        "mod.capacity of the tokens) are nearest the others' depth. So the FLOPs per step match up to the "
        "routers, the rounding of the capacity, the attention over the picked tokens and the padding, which "
        "dense's and MoT's FFN compute and no expert takes (the *vs dense* column; the fractions of dense's "
        "steps are in the JSON, `step_fraction`). The MoMa paper reports, for its 1.4B MoMa 4t4i "
        "under a 1T-token budget, 3.7x overall pre-training FLOPs savings (text 2.6x, image 5.2x) over a "
        "compute-equivalent dense model, and 3x for the expert-choice MoE-8x; this is a tiny model on a CPU, "
        "one seed.",
        "",
    ]
    return "\n".join(lines)


def causal_lines(result: dict, finals: dict, labels: list[str]) -> list[str]:
    """The table of the runs with auxiliary routers: final validation loss under teacher-forced routing
    (as trained) and under causal routing (as generated), their difference, and the routers' scores."""
    rows = {n: s for n, s in result["runs"].items() if s.get("causal")}
    if not rows:
        return []
    head = " | ".join(f"{label}: forced / causal (cost)" for label in labels)
    lines = [
        "",
        "## Causal routing: final validation loss, teacher-forced (training routing) / causal (auxiliary routers)",
        "",
        f"| run | {head} | aux accuracy | precision | recall |",
        "|---|" + "---|" * (len(labels) + 3),
    ]
    for n, s in rows.items():
        cells = []
        for m in MODALITIES:
            forced, causal = finals[n][m][-1], s["causal"][m]
            cells.append(f"{fmt_loss(forced)} / {fmt_loss(causal)} ({causal - forced:+.4f})")
        aux = " | ".join(f"{s['aux'][k]:.4f}" for k in AUX_STATS)
        lines.append(f"| {LABELS[n]} | " + " | ".join(cells) + f" | {aux} |")
    lines += [
        "",
        "Teacher-forced: expert choice (and MoD's top-k) over the whole microbatch, as the model trained, so a "
        "token's routing depends on later tokens (and other rows). Causal: each token routed from its own state "
        "by the auxiliary routers (an expert / a MoD layer takes it iff the router's predicted probability is "
        "above 0.5), as `megafusion generate` routes. The routers' accuracy, precision and recall are against "
        "the teacher-forced choices on the same held-out rows. The MoMa paper reports that MoD's gains shrink "
        "most under causal inference, and ~99% auxiliary-router accuracy (MoD paper).",
    ]
    return lines


COLOURS = {
    "dense": "tab:blue",
    "mot": "tab:orange",
    "moma_1t1i": "tab:green",
    "moma_4t4i": "tab:red",
    "moe_8x": "tab:purple",
    "mod": "tab:olive",
    "moma_4t4i_mod": "tab:cyan",
    "moma_4t4i_mod_pm": "tab:pink",
    UPCYCLED: "tab:brown",
}


def plot(result: dict, path: Path) -> None:
    """2 x 3 panels: validation loss (overall, text, image) of every run vs training FLOPs (top) and
    summed step wall clock (bottom), dense's final loss dashed, the upcycling point dotted."""
    plt = harness.pyplot()
    curves, up = result["curves"]["validation"], result["upcycle"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), squeeze=False)
    for row, (axis, xlabel) in enumerate((("flops", "training FLOPs"), ("wall_s", "wall clock of steps (s)"))):
        for col, m in enumerate(MODALITIES):
            ax = axes[row][col]
            for n, c in curves.items():
                ax.plot(
                    c[axis],
                    c[m],
                    marker=".",
                    markersize=3,
                    linestyle="--" if n == UPCYCLED else "-",
                    color=COLOURS.get(n),
                    label=LABELS[n],
                )
            ax.axhline(curves[REFERENCE][m][-1], color=COLOURS[REFERENCE], linestyle="--", linewidth=0.8)
            if up is not None:
                at = up["flops_at_step" if axis == "flops" else "wall_s_at_step"]
                ax.axvline(at, color=COLOURS[UPCYCLED], linestyle=":", linewidth=0.8)
            ax.set_title(f"validation loss, {SETTING.label(m)}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation loss")
            ax.grid(alpha=0.3)
            # The early losses are far above the rest: the interesting part is the end.
            finals = [c[m][-1] for c in curves.values() if not math.isnan(c[m][-1])]
            starts = [v for c in curves.values() for v in c[m][len(c[m]) // 4 :] if not math.isnan(v)]
            if finals and starts:
                low, high = min(finals), max(starts)
                ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low) + 1e-9)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    note = "; dotted: upcycling point" if up is not None else ""
    fig.suptitle(
        f"MoMa vs MoT vs dense (dashed horizontal: dense's final loss{note}), commit {result['commit']}, "
        f"{result['machine']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out_dir: Path, results_dir: Path) -> dict:
    """Analyse the runs under ``out_dir`` and write moma.{json,md,png} into ``results_dir``."""
    out_dir, results_dir = Path(out_dir), Path(results_dir)
    result = analyze_runs(out_dir)
    info = harness.read_run_info(out_dir, f"rerun `{RUN_COMMAND}`")
    # The runs' provenance (from run.py) where known; else this analysis's, which is all we have.
    result = {
        **recorded_or_now(info),
        "quick": info.get("quick", False),
        "omp_num_threads": info.get("omp_num_threads"),
        "train_commands": info.get("train_commands", {}),
        "convert_command": info.get("convert_command"),
        "run_seconds": info.get("run_seconds", {}),
        "upcycle_skipped": info.get("upcycle_skipped"),
        "parameters": base.parameter_counts(out_dir, info, tuple(result["runs"])),
        **result,
    }
    harness.write_report(result, results_dir / RESULT_NAME, markdown, plot)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/moma", help="holds one folder per run (default: %(default)s)")
    parser.add_argument("--results", default="bench/results", help="where moma.{json,md,png} go (default: %(default)s)")
    args = parser.parse_args(argv)
    results = Path(args.results)
    return finish(
        "[moma]", lambda: write_results(Path(args.out_dir), results), markdown, lambda _: results / RESULT_NAME
    )


if __name__ == "__main__":
    sys.exit(main())
