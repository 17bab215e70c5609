"""Analyse the LMFusion experiment: LMFusion vs the same MoT trained from scratch on the same
mixed-modal data and training FLOPs; image validation loss vs FLOPs; text loss before / after.

``python -m examples.experiments.lmfusion.analyze [--out-dir runs/lmfusion] [--results bench/results]`` (from
the repository root)

Reads what ``run.py`` leaves in ``--out-dir``:

- ``run_info.json``: provenance (commit, machine, date, the command), every step's command and
  process wall clock, the text data's sizes, how the MoT's step count was chosen, and the
  ``megafusion eval --text`` results (``text_eval``: one JSON object per checkpoint);
- ``text_lm/metrics.jsonl`` (the text-only pretraining), ``lmfusion/metrics.jsonl`` and
  ``mot_scratch/metrics.jsonl`` (the two mixed-modal runs), written by ``megafusion train``;
- the runs' final checkpoints (``<run>/checkpoints``), for exact parameter counts
  (``megafusion.accounting.flops.parameter_counts`` of the saved config; skipped where absent).

Computes, for LMFusion and MoT from scratch:

- the held-out image (diffusion) loss ``val/loss/diffusion`` and the held-out text loss of the
  mixed-modal set ``val/loss/text`` at every evaluation, against the training FLOPs spent by then
  (``flops_total`` of the step the evaluation follows);
- the final values, the totals (steps, FLOPs, step wall clock = the sum of ``step_time_s``, process
  wall clock), and where each run first reaches the *other* run's final image loss (FLOPs and
  step, linearly interpolated between evaluations; "not reached" if it never does);
- text before / after: the mean next-token loss on the held-out caption text of the pretrained
  text model, its Hugging Face round trip, LMFusion and MoT from scratch (``eval --text``).

Writes ``lmfusion.json`` (every number and the curves), ``lmfusion.md`` (the tables) and
``lmfusion.png`` (image and text validation loss vs training FLOPs) into ``--results``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from bench.provenance import recorded_or_now
from examples.experiments import harness
from examples.experiments.harness import AnalysisError, finish, fmt_loss, provenance_lines
from megafusion.evaluation.curves import first_crossing, read_metrics, value_at

RESULT_NAME = "lmfusion"
RUN_COMMAND = "python -m examples.experiments.lmfusion.run"
MIXED_RUNS = ("lmfusion", "mot_scratch")  # the two mixed-modal runs compared
TEXT_RUN = "text_lm"  # the text-only pretraining
LABELS = {
    "text_lm": "text LM (pretraining)",
    "import": "HF round trip (import)",
    "lmfusion": "LMFusion",
    "mot_scratch": "MoT from scratch",
}
IMAGE_KEY, TEXT_KEY = "val/loss/diffusion", "val/loss/text"
EVAL_ORDER = ("text_lm", "import", "lmfusion", "mot_scratch")


def versions() -> dict:
    """torch, megatron-core and Python versions of this environment."""
    import platform

    import megatron.core
    import torch

    return {
        "torch": torch.__version__,
        "megatron_core": getattr(megatron.core, "__version__", "unknown"),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- reading
def read_run_info(out_dir: Path) -> dict:
    return harness.read_run_info(out_dir, f"rerun `{RUN_COMMAND}`")


def load_run(run_dir: Path) -> dict:
    """Training and evaluation records of one run (steps strictly increasing in each)."""
    path = run_dir / "metrics.jsonl"
    train, evals = read_metrics(path, RUN_COMMAND, AnalysisError)
    train = [r for r in train if "flops_total" in r]
    if not train:
        raise AnalysisError(f"{path} holds no training record with flops_total: was it written by megafusion train?")
    return {"path": str(path), "train": train, "eval": evals}


def val_curve(run: dict, keys: dict[str, str]) -> dict:
    """``{"step", "flops", <name>...}`` at every evaluation that logs all of ``keys`` (name -> metric);
    ``flops`` is the cumulative training FLOPs of the step the evaluation follows."""
    flops_at = {r["step"]: r["flops_total"] for r in run["train"]}
    out = {"step": [], "flops": [], **{name: [] for name in keys}}
    for record in run["eval"]:
        if record["step"] not in flops_at or not all(k in record for k in keys.values()):
            continue
        out["step"].append(record["step"])
        out["flops"].append(flops_at[record["step"]])
        for name, key in keys.items():
            out[name].append(record[key])
    if not out["step"]:
        raise AnalysisError(
            f"{run['path']}: no evaluation record has {' and '.join(keys.values())} (eval.interval=0 "
            f"and no final evaluation?): rerun `{RUN_COMMAND}`"
        )
    return out


def run_summary(run: dict, seconds: float | None) -> dict:
    train = run["train"]
    times = sorted(r["step_time_s"] for r in train)
    return {
        "metrics": run["path"],
        "steps": train[-1]["step"],
        "flops_total": train[-1]["flops_total"],
        "mean_flops_per_step": train[-1]["flops_total"] / train[-1]["step"],
        "step_wall_s": sum(r["step_time_s"] for r in train),
        "median_step_s": times[len(times) // 2],
        "process_wall_s": seconds,
    }


# --------------------------------------------------------------------------- the comparison
def reach(curve: dict, other: dict, metric: str = "image", best: bool = False) -> dict:
    """Where ``curve`` first reaches ``other``'s final ``metric`` loss (``best``: its lowest, which
    does not depend on the noise of the last evaluation alone)."""
    target = min(other[metric]) if best else other[metric][-1]
    row = {
        "target": target,
        "target_kind": "best" if best else "final",
        "reached": False,
        "at_first_point": False,
        "flops": None,
        "step": None,
        "fraction_of_other_flops": None,
        "fraction_of_own_flops": None,
    }
    hit = first_crossing(curve["flops"], curve[metric], target) if math.isfinite(target) else None
    if hit is not None:
        flops, pos = hit
        row.update(
            reached=True,
            at_first_point=pos == 0,
            flops=flops,
            step=value_at(curve["step"], pos),
            fraction_of_other_flops=flops / other["flops"][-1],
            fraction_of_own_flops=flops / curve["flops"][-1],
        )
    return row


def text_eval_table(info: dict) -> dict:
    """``eval --text`` results per checkpoint, and the differences that matter."""
    evals = info.get("text_eval") or {}
    out = {"results": {k: evals[k] for k in EVAL_ORDER if k in evals}}
    loss = {k: v["loss"] for k, v in out["results"].items()}
    if "text_lm" in loss and "import" in loss:
        out["round_trip_abs_diff"] = abs(loss["import"] - loss["text_lm"])
    if "text_lm" in loss and "lmfusion" in loss:
        out["lmfusion_minus_pretrained"] = loss["lmfusion"] - loss["text_lm"]
    if "text_lm" in loss and "mot_scratch" in loss:
        out["mot_scratch_minus_pretrained"] = loss["mot_scratch"] - loss["text_lm"]
    settings = info.get("settings") or {}
    counted = out["results"].get("text_lm") or next(iter(out["results"].values()), None)
    if counted and settings.get("heldout_captions") and settings.get("caption_choices"):
        # Each held-out caption is one uniform draw of caption_choices strings: ln(choices) nats of
        # information per caption, spread over the predicted tokens (approximate: the first token of
        # each window is not predicted).
        out["entropy_floor"] = settings["heldout_captions"] * math.log(settings["caption_choices"]) / counted["tokens"]
    return out


def parameter_counts(run_dir: Path) -> dict | None:
    """Exact counts of the model a run trained, from its final checkpoint's saved config
    (None where there is no checkpoint, e.g. metrics from elsewhere)."""
    try:
        from megafusion import checkpoint as ck
        from megafusion.accounting.params import parameter_counts as counts
        from megafusion.config.loader import config_from_dict

        path = ck.resolve_checkpoint(run_dir / "checkpoints")
        cfg = config_from_dict(ck.read_manifest(path)["config"])
        c = counts(cfg)
    except Exception:  # noqa: BLE001 -- no checkpoint, or one this megafusion cannot read: counts unknown
        return None
    return {
        "total": c["total"],
        "trainable": c["trainable"],
        "active": c["active"],
        "vocab_size": cfg.model.vocab_size,
        "frozen_vocab_rows": cfg.model.frozen_vocab_rows,
    }


def analyze_runs(out_dir: Path) -> dict:
    """Every number of the report from the runs in ``out_dir`` (no files written)."""
    info = read_run_info(out_dir)
    seconds = {s["name"]: s["seconds"] for s in info.get("steps", [])}
    runs = {name: load_run(out_dir / name) for name in MIXED_RUNS}
    curves = {
        name: val_curve(runs[name], {"image": IMAGE_KEY, "text": TEXT_KEY, "overall": "val/loss"})
        for name in MIXED_RUNS
    }
    summary = {
        name: {
            **run_summary(runs[name], seconds.get(name)),
            "final_image": curves[name]["image"][-1],
            "final_text": curves[name]["text"][-1],
            "first_image": curves[name]["image"][0],
            "first_text": curves[name]["text"][0],
            "final_eval_step": curves[name]["step"][-1],
            "parameters": parameter_counts(out_dir / name),
        }
        for name in MIXED_RUNS
    }
    text_lm = None
    if (out_dir / TEXT_RUN / "metrics.jsonl").is_file():
        run = load_run(out_dir / TEXT_RUN)
        curves[TEXT_RUN] = val_curve(run, {"text": TEXT_KEY})
        text_lm = {
            **run_summary(run, seconds.get(TEXT_RUN)),
            "final_text": curves[TEXT_RUN]["text"][-1],
            "parameters": parameter_counts(out_dir / TEXT_RUN),
        }
    lmf, mot = curves["lmfusion"], curves["mot_scratch"]
    return {
        "runs": summary,
        "text_lm": text_lm,
        "flops_ratio_mot_to_lmfusion": summary["mot_scratch"]["flops_total"] / summary["lmfusion"]["flops_total"],
        "per_step_flops_ratio_mot_to_lmfusion": (
            summary["mot_scratch"]["mean_flops_per_step"] / summary["lmfusion"]["mean_flops_per_step"]
        ),
        "image": {
            "lmfusion_reaches_mot_final": reach(lmf, mot),
            "mot_reaches_lmfusion_final": reach(mot, lmf),
            "lmfusion_reaches_mot_best": reach(lmf, mot, best=True),
            "mot_reaches_lmfusion_best": reach(mot, lmf, best=True),
        },
        "text_eval": text_eval_table(info),
        "curves": curves,
    }


# --------------------------------------------------------------------------- writing
def _params(p) -> str:
    if not p:
        return "n/a"
    return f"{p['total'] / 1e6:.3f}M / {p['trainable'] / 1e6:.3f}M"


def _secs(x) -> str:
    return "n/a" if x is None else f"{x:.0f} s"


def _reach_text(row: dict, own: str, other: str, pretraining: float | None = None) -> str:
    kind = row.get("target_kind", "final")
    kind = "lowest" if kind == "best" else kind
    if not row["reached"]:
        return f"{LABELS[own]} never reaches {LABELS[other]}'s {kind} image loss {row['target']:.4f} in its own run"
    bound = "<= " if row["at_first_point"] else ""
    text = (
        f"{LABELS[own]} reaches {LABELS[other]}'s {kind} image loss {row['target']:.4f} at {bound}"
        f"{row['flops']:.4g} FLOPs (step {row['step']:.0f}), {bound}{100 * row['fraction_of_other_flops']:.1f}% "
        f"of {LABELS[other]}'s training FLOPs"
    )
    if pretraining:
        share = (row["flops"] + pretraining) / (row["flops"] / row["fraction_of_other_flops"])
        text += f"; {bound}{100 * share:.1f}% counting the text pretraining's {pretraining:.4g} FLOPs too"
    return text


def markdown(result: dict) -> str:
    r, te, s = result["runs"], result["text_eval"], result.get("settings") or {}
    lines = [
        "# LMFusion vs MoT from scratch (built-in captioned shapes, Transfusion objective)",
        "",
        *provenance_lines(result),
    ]
    v = result.get("versions") or {}
    if v:
        note = f" ({v['recorded']})" if v.get("recorded") else ""
        lines.append(
            f"- versions: torch {v.get('torch')}, megatron-core {v.get('megatron_core')}, "
            f"Python {v.get('python')}{note}"
        )
    if result.get("launcher"):
        lines.append(f"- steps launched as: {result['launcher']}")
    if s:
        lines.append(
            f"- text data: {s.get('text_captions')} captions (shapes seed {s.get('text_seed')}) in "
            f"{s.get('text_documents')} text-only documents of 1-{s.get('captions_per_document')} captions; "
            f"SentencePiece model of {s.get('n_text')} pieces; held-out text: {s.get('heldout_captions')} "
            f"captions of shapes seed {s.get('heldout_seed')}"
        )
    budget = result.get("budget") or {}
    if budget:
        lines.append(f"- FLOPs budget: {budget.get('rule')}")
    lines += ["", "## Commands", ""]
    for step in result.get("steps", []):
        lines.append(f"- {step['name']} ({_secs(step.get('seconds'))}): `{step['command']}`")
    lines += [
        "",
        "## Mixed-modal runs (held-out shapes documents; losses at the last evaluation)",
        "",
        "| run | steps | training FLOPs | image (diffusion) val loss | text val loss (mixed set) | "
        "step wall clock | process wall clock | parameters total / trainable |",
        "|---|---|---|---|---|---|---|---|",
    ]
    t = result.get("text_lm")
    if t:
        lines.append(
            f"| {LABELS['text_lm']}, text-only data | {t['steps']} | {t['flops_total']:.4g} | - | "
            f"{fmt_loss(t['final_text'])} (its own held-out text documents) | {t['step_wall_s']:.0f} s | "
            f"{_secs(t['process_wall_s'])} | {_params(t['parameters'])} |"
        )
    for name in MIXED_RUNS:
        x = r[name]
        lines.append(
            f"| {LABELS[name]} | {x['steps']} | {x['flops_total']:.4g} | {fmt_loss(x['final_image'])} | "
            f"{fmt_loss(x['final_text'])} | {x['step_wall_s']:.0f} s (median step {x['median_step_s']:.2f} s) | "
            f"{_secs(x['process_wall_s'])} | {_params(x['parameters'])} |"
        )
    pre = t["flops_total"] if t else None
    lines += [
        "",
        f"MoT from scratch / LMFusion: {result['per_step_flops_ratio_mot_to_lmfusion']:.3f}x the FLOPs per "
        f"step, {result['flops_ratio_mot_to_lmfusion']:.4f}x the total (the budget).",
        "",
        "## Image loss: who reaches whose final (and lowest) loss",
        "",
        *(
            f"- {_reach_text(result['image'][key], own, other, pre if own == 'lmfusion' else None)}"
            for key, own, other in (
                ("lmfusion_reaches_mot_final", "lmfusion", "mot_scratch"),
                ("mot_reaches_lmfusion_final", "mot_scratch", "lmfusion"),
                ("lmfusion_reaches_mot_best", "lmfusion", "mot_scratch"),
                ("mot_reaches_lmfusion_best", "mot_scratch", "lmfusion"),
            )
            if key in result["image"]
        ),
        "",
        "## Text before / after (`megafusion eval --text` on the held-out caption text)",
        "",
        "| checkpoint | text loss (nats / token) | perplexity | tokens |",
        "|---|---|---|---|",
    ]
    for name, ev in te.get("results", {}).items():
        lines.append(f"| {LABELS[name]} | {ev['loss']:.6f} | {ev['perplexity']:.4f} | {ev['tokens']} |")
    if "entropy_floor" in te:
        lines += [
            "",
            f"Caption entropy (a uniform draw of colour x shape x position x phrasing: ln "
            f"{s.get('caption_choices', '?')} nats per caption) spread over the held-out tokens: "
            f"~{te['entropy_floor']:.4f} nats / token, about the best any model can do on this text.",
        ]
    notes = []
    if "round_trip_abs_diff" in te:
        notes.append(
            f"HF round trip (mf-to-hf, hf-to-mf) vs the pretrained checkpoint: |difference| = "
            f"{te['round_trip_abs_diff']:.3g}"
        )
    if "lmfusion_minus_pretrained" in te:
        notes.append(f"LMFusion - pretrained: {te['lmfusion_minus_pretrained']:+.3g} (text weights frozen)")
    if "mot_scratch_minus_pretrained" in te:
        notes.append(f"MoT from scratch - pretrained: {te['mot_scratch_minus_pretrained']:+.4f}")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    scale = (
        "--quick: a smoke test of the pipeline (1-layer, hidden-32 model, a few steps); its numbers mean nothing."
        if result.get("quick")
        else "Toy scale (4 layers, hidden 128, 16x16 images, a few hundred steps on a CPU), one seed."
    )
    lines += [
        "",
        f"{scale} The FLOPs are the mixed-modal training FLOPs only: the text pretraining (first row) is "
        "not counted in LMFusion's budget.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Image (diffusion) and text validation loss vs training FLOPs, LMFusion and MoT from scratch."""
    plt = harness.pyplot()
    curves = result["curves"]
    colours = {"lmfusion": "tab:green", "mot_scratch": "tab:orange"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    for ax, metric, title in (
        (axes[0][0], "image", "image (diffusion) validation loss"),
        (axes[0][1], "text", "text validation loss (mixed-modal set)"),
    ):
        for name in MIXED_RUNS:
            c = curves[name]
            ax.plot(c["flops"], c[metric], marker=".", color=colours[name], label=LABELS[name])
            ax.axhline(c[metric][-1], color=colours[name], linestyle="--", linewidth=0.7)
        if metric == "image":
            for name, key in (
                ("lmfusion", "lmfusion_reaches_mot_final"),
                ("mot_scratch", "mot_reaches_lmfusion_final"),
            ):
                row = result["image"][key]
                if row["reached"]:
                    ax.axvline(
                        row["flops"],
                        color=colours[name],
                        linestyle=":",
                        linewidth=0.9,
                        label=f"{LABELS[name]} reaches the other's final loss",
                    )
            ax.set_yscale("log")
        ax.set_xlabel("training FLOPs (mixed-modal stage)")
        ax.set_ylabel("validation loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"LMFusion vs MoT from scratch, commit {result['commit']}, {result['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out_dir: Path, results_dir: Path) -> dict:
    """Analyse the runs under ``out_dir``; write lmfusion.{json,md,png} into ``results_dir``."""
    out_dir, results_dir = Path(out_dir), Path(results_dir)
    analysed = analyze_runs(out_dir)
    info = read_run_info(out_dir)
    result = {
        **recorded_or_now(info),
        # run.py records them; else those of this analysis (the runs' are unknown)
        "versions": info.get("versions") or {**versions(), "recorded": "at analysis, not by run.py"},
        "launcher": info.get("launcher"),
        "quick": info.get("quick"),
        "settings": info.get("settings"),
        "budget": info.get("budget"),
        "steps": info.get("steps", []),
        **analysed,
    }
    harness.write_report(result, results_dir / RESULT_NAME, markdown, plot)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/lmfusion", help="the runs (default: %(default)s)")
    parser.add_argument(
        "--results", default="bench/results", help="where lmfusion.{json,md,png} go (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    results = Path(args.results)
    return finish(
        "[lmfusion]", lambda: write_results(Path(args.out_dir), results), markdown, lambda _: results / RESULT_NAME
    )


if __name__ == "__main__":
    sys.exit(main())
