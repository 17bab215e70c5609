"""The Branch-Train-MiX report: every model's held-out loss on every domain, and the paper's directions.

``python -m examples.experiments.btx.analyze [--out-dir runs/btx] [--results bench/results]`` (from the
repository root)

Reads ``<out-dir>/run_info.json`` (domains, commands, provenance) and ``<out-dir>/<run>/metrics.jsonl``
of every run ``run.py`` made: the seed, one branch per domain, the merge before fine-tuning, the
fine-tuned merge and the compute-matched dense model. Each row's loss per domain is its last
evaluation's ``val/domain/<domain>/loss`` (the domain's held-out documents, packed alone); "mean" is
their unweighted mean over the domains (each domain counts once, as the paper averages tasks). Its
training FLOPs are everything that went into the model: a branch's include the seed's, the merge's
the seed's and every branch's, the fine-tuned merge's those plus its own.

Writes ``<results>/btx.json`` (every number), ``btx.md`` (the table and the directions) and
``btx.png`` (the table as bars, and mean loss against training FLOPs for the fine-tuning and dense).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from bench.provenance import recorded_or_now
from examples.experiments import harness
from examples.experiments.harness import AnalysisError, finish, fmt_loss, provenance_lines
from examples.experiments.mot_vs_dense import analyze as base

RESULT_NAME = "btx"
RUN_COMMAND = "python -m examples.experiments.btx.run"
DOMAIN_KEY = "val/domain/{}/loss"
EVAL_FILE = "eval.json"  # OUT/merged/<this>: `megafusion eval`'s result for the merge before fine-tuning


def run_names(domains: list[str]) -> list[str]:
    """Every run of the experiment, in run order."""
    return ["seed", *(f"branch_{d}" for d in domains), "merged", "btx", "dense"]


def labels(domains: list[str]) -> dict[str, str]:
    return {
        "seed": "seed (dense)",
        **{f"branch_{d}": f"branch: {d}" for d in domains},
        "merged": "merged, before fine-tuning",
        "btx": "BTX (merged + fine-tuned)",
        "dense": "dense, same total FLOPs",
    }


def domain_losses(record: dict, domains: list[str], path: str) -> dict[str, float]:
    missing = [d for d in domains if DOMAIN_KEY.format(d) not in record]
    if missing:
        raise AnalysisError(
            f"{path}: its last evaluation has no {', '.join(DOMAIN_KEY.format(d) for d in missing)} (per-domain "
            f"held-out loss, written by runs with data.domains): rerun `{RUN_COMMAND}`"
        )
    return {d: float(record[DOMAIN_KEY.format(d)]) for d in domains}


def merged_losses(path: Path, domains: list[str]) -> dict[str, float]:
    """The merge's held-out loss per domain, from ``megafusion eval``'s result (``domains``)."""
    import json

    try:
        found = json.loads(path.read_text()).get("domains") or {}
    except (OSError, json.JSONDecodeError) as err:
        raise AnalysisError(
            f"{path}: cannot read the merged model's evaluation ({err}): rerun `{RUN_COMMAND}`"
        ) from None
    missing = [d for d in domains if "loss" not in found.get(d, {})]
    if missing:
        raise AnalysisError(f"{path} has no held-out loss for {', '.join(missing)}: rerun `{RUN_COMMAND}`")
    return {d: float(found[d]["loss"]) for d in domains}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def analyze_runs(out_dir: Path) -> dict:
    """Every number of the report from the runs under ``out_dir`` (no files written)."""
    out_dir = Path(out_dir)
    info = harness.read_run_info(out_dir, f"rerun `{RUN_COMMAND}`")
    if not info.get("domains"):
        raise AnalysisError(f"{out_dir}/run_info.json is missing or names no domains: run `{RUN_COMMAND}`")
    domains = list(info["domains"])
    runs = {n: base.load_run(out_dir / n, RUN_COMMAND) for n in run_names(domains) if n != "merged"}
    own_flops = {n: sum(float(r["flops"]) for r in run["train"]) for n, run in runs.items()}
    branch_flops = sum(own_flops[f"branch_{d}"] for d in domains)
    behind = {
        "seed": own_flops["seed"],
        **{f"branch_{d}": own_flops["seed"] + own_flops[f"branch_{d}"] for d in domains},
        "merged": own_flops["seed"] + branch_flops,
        "btx": own_flops["seed"] + branch_flops + own_flops["btx"],
        "dense": own_flops["dense"],
    }
    names = labels(domains)
    rows = {}
    for n in run_names(domains):
        if n == "merged":
            losses, steps = merged_losses(out_dir / n / EVAL_FILE, domains), 0
        else:
            losses, steps = domain_losses(runs[n]["eval"][-1], domains, runs[n]["path"]), runs[n]["train"][-1]["step"]
        rows[n] = {
            "label": names[n],
            "loss": losses,
            "mean": _mean(losses.values()),
            "steps": steps,
            "training_flops": behind[n],
            "wall_clock_s": (info.get("run_seconds") or {}).get(n),
        }
    seed, btx, dense, merged = rows["seed"], rows["btx"], rows["dense"], rows["merged"]
    best_branch = {d: min(rows[f"branch_{b}"]["loss"][d] for b in domains) for d in domains}
    directions = {
        "branch_beats_seed_on_own_domain": {d: rows[f"branch_{d}"]["loss"][d] < seed["loss"][d] for d in domains},
        "btx_minus_best_branch": {d: btx["loss"][d] - best_branch[d] for d in domains},
        "btx_beats_dense_on_mean": btx["mean"] < dense["mean"],
        "merge_worse_before_finetuning": merged["mean"] > btx["mean"],
        "flops_dense_over_btx": dense["training_flops"] / btx["training_flops"],
    }
    curves = {n: mean_curve(runs[n], domains, behind[n] - own_flops[n]) for n in ("btx", "dense")}
    # Where dense's curve first reaches the fine-tuned merge's final mean loss, as a fraction of the
    # merge's training FLOPs (None: not within dense's run); below 1, dense got there with less compute.
    reached = first_reach(curves["dense"], btx["mean"])
    directions["dense_reaches_btx_at_flops_fraction"] = None if reached is None else reached / btx["training_flops"]
    return {
        "domains": domains,
        "seed_expert": info.get("seed_expert"),
        "steps": info.get("steps"),
        "rows": rows,
        "best_branch": best_branch,
        "directions": directions,
        "curves": curves,
    }


def first_reach(curve: dict, target: float) -> float | None:
    """The FLOPs at which ``curve`` (``flops``, ``mean``) first reaches ``target`` (linear between
    evaluation points; the first point's FLOPs if it starts there), or None if it never does."""
    points = list(zip(curve["flops"], curve["mean"]))
    for i, (x, y) in enumerate(points):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = points[i - 1]
            return x0 + (x - x0) * (y0 - target) / (y0 - y)
    return None


def mean_curve(run: dict, domains: list[str], offset: float) -> dict:
    """The mean per-domain validation loss after each evaluation, against the training FLOPs behind
    the model at that step (``offset``: what came before the run)."""
    axes = base.cumulative_axes(run)
    evals = run["eval"]
    return {
        "flops": [offset + axes[r["step"]][0] for r in evals],
        "mean": [_mean(domain_losses(r, domains, run["path"]).values()) for r in evals],
    }


def markdown(result: dict) -> str:
    domains, rows, d = result["domains"], result["rows"], result["directions"]
    head = "| model | " + " | ".join(domains) + " | mean | steps | training FLOPs |"
    lines = [
        "# Branch-Train-MiX at CPU scale: per-domain held-out loss",
        "",
        *provenance_lines(result),
        "",
        f"Domains: {', '.join(domains)}. Experts of the merge: one per branch"
        + (" and the seed's FFN" if result["seed_expert"] else "")
        + f". Steps: {result['steps']}. Loss: each domain's held-out documents (`val/domain/<domain>/loss`), "
        "mean = unweighted over the domains; training FLOPs: everything behind the model (a branch includes "
        "the seed, the merge every branch).",
        "",
        head,
        "|" + "---|" * (len(domains) + 4),
    ]
    for row in rows.values():
        cells = [fmt_loss(row["loss"][x]) for x in domains]
        lines.append(
            f"| {row['label']} | " + " | ".join(cells) + f" | {fmt_loss(row['mean'])} | {row['steps']} | "
            f"{row['training_flops']:.3e} |"
        )
    own = ", ".join(f"{x} {'yes' if ok else 'no'}" for x, ok in d["branch_beats_seed_on_own_domain"].items())
    gap = ", ".join(f"{x} {v:+.4f}" for x, v in d["btx_minus_best_branch"].items())
    lines += [
        "",
        "## The paper's directions",
        "",
        f"- each branch beats the seed on its own domain: {own}",
        f"- the fine-tuned merge against the best branch per domain (loss difference): {gap}",
        f"- the fine-tuned merge beats the dense model of the same total training FLOPs on the mean: "
        f"{'yes' if d['btx_beats_dense_on_mean'] else 'no'} ({fmt_loss(rows['btx']['mean'])} vs "
        f"{fmt_loss(rows['dense']['mean'])}; dense's FLOPs / BTX's: {d['flops_dense_over_btx']:.3f}); dense "
        + (
            "never reaches the fine-tuned merge's mean loss"
            if d["dense_reaches_btx_at_flops_fraction"] is None
            else f"reaches the fine-tuned merge's mean loss with {100 * d['dense_reaches_btx_at_flops_fraction']:.1f}% "
            "of its training FLOPs"
        ),
        f"- merging before fine-tuning is worse than after: {'yes' if d['merge_worse_before_finetuning'] else 'no'} "
        f"({fmt_loss(rows['merged']['mean'])} vs {fmt_loss(rows['btx']['mean'])})",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt = harness.pyplot()
    domains, rows = result["domains"], result["rows"]
    fig, (bars, curve) = plt.subplots(1, 2, figsize=(13, 4.5))
    groups = [*domains, "mean"]
    width = 0.8 / len(rows)
    for k, row in enumerate(rows.values()):
        values = [row["loss"][x] for x in domains] + [row["mean"]]
        bars.bar([g + k * width for g in range(len(groups))], values, width, label=row["label"])
    bars.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    bars.set_ylabel("held-out loss")
    bars.legend(fontsize=7)
    for name, c in result["curves"].items():
        curve.plot(c["flops"], c["mean"], marker="o", ms=3, label=rows[name]["label"])
    merged = rows["merged"]
    curve.scatter([merged["training_flops"]], [merged["mean"]], marker="x", color="k", label=merged["label"])
    curve.set_xlabel("training FLOPs behind the model")
    curve.set_ylabel("mean held-out loss over the domains")
    curve.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out_dir: Path, results_dir: Path) -> dict:
    result = analyze_runs(out_dir)
    info = harness.read_run_info(out_dir, f"rerun `{RUN_COMMAND}`")
    result.update(recorded_or_now(info))
    result["run_info"] = {k: info.get(k) for k in ("quick", "launcher", "omp_num_threads", "commands", "run_seconds")}
    if any(isinstance(v, float) and math.isnan(v) for row in result["rows"].values() for v in row["loss"].values()):
        print("warning: a per-domain loss is NaN", file=sys.stderr)
    harness.write_report(result, Path(results_dir) / RESULT_NAME, markdown, plot)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/btx")
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args(argv)
    results = Path(args.results)
    return finish(
        "[btx]", lambda: write_results(Path(args.out_dir), results), markdown, lambda _: results / RESULT_NAME
    )


if __name__ == "__main__":
    sys.exit(main())
