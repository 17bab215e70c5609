"""The ICP experiment's report: each cell of {random, ICP} order x {isolated, causal} attention, its
held-out loss on the later documents of a row, overall, and the in-context probe's accuracy.

``python -m examples.experiments.icp.analyze [--out-dir runs/icp] [--results bench/results]`` (from
the repository root)

Reads ``<out-dir>/run_info.json`` (commands, provenance), ``<out-dir>/data.json`` (each order's rows
and how many probe documents have a group partner earlier in their row), and per run
``<out-dir>/<run>/eval.json`` (evaluate.py: the definitions of every number) and ``metrics.jsonl``
(the validation curve). Writes ``<results>/icp.json`` (every number), ``icp.md`` (the tables and the
paper's directions) and ``icp.png`` (the losses, the probe's accuracy, the validation curves).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bench.provenance import recorded_or_now
from examples.experiments import harness
from examples.experiments.harness import AnalysisError, finish, fmt_loss, fmt_pct, provenance_lines
from megafusion.evaluation.curves import read_metrics

RESULT_NAME = "icp"
RUN_COMMAND = "python -m examples.experiments.icp.run"
EVAL_FILE = "eval.json"  # OUT/<run>/<this>: evaluate.py's result
DATA_FILE = "data.json"  # OUT/<this>: run.py's report of the data of each order
# name -> (data.order, data.attention); in this order the runs go, two at a time.
RUNS = {
    "random_isolated": ("random", "isolated"),
    "icp_isolated": ("icp", "isolated"),
    "random_causal": ("random", "causal"),
    "icp_causal": ("icp", "causal"),
}


def label(name: str) -> str:
    order, attention = RUNS[name]
    return f"{'ICP' if order == 'icp' else 'random'} order, {attention} attention"


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AnalysisError(f"{path} does not exist ({what}): run `{RUN_COMMAND}`") from None
    except json.JSONDecodeError as err:
        raise AnalysisError(f"{path} is not JSON ({err}): rerun `{RUN_COMMAND}`") from None


def analyze_runs(out_dir: Path) -> dict:
    """Every number of the report from the runs under ``out_dir`` (no files written)."""
    out_dir = Path(out_dir)
    info = harness.read_run_info(out_dir, f"rerun `{RUN_COMMAND}`")
    data = _read_json(out_dir / DATA_FILE, "the data of each order") if (out_dir / DATA_FILE).exists() else {}
    rows, curves = {}, {}
    for name, (order, attention) in RUNS.items():
        ev = _read_json(out_dir / name / EVAL_FILE, f"the evaluation of run {name}")
        if (ev.get("order"), ev.get("attention")) != (order, attention):
            raise AnalysisError(
                f"{out_dir / name / EVAL_FILE} is of data.order={ev.get('order')} data.attention="
                f"{ev.get('attention')}, not the run {name}'s {order} / {attention}: rerun `{RUN_COMMAND}`"
            )
        _, evals = read_metrics(out_dir / name / "metrics.jsonl", RUN_COMMAND, AnalysisError)
        curves[name] = {"step": [r["step"] for r in evals], "val_loss": [r["val/loss"] for r in evals]}
        probe, chance = ev["probe"], ev["chance"]
        rows[name] = {
            "label": label(name),
            "order": order,
            "attention": attention,
            "loss": ev["loss"],
            "tokens": ev["tokens"],
            "probe": probe,
            "steps": ev["step"],
            "wall_clock_s": (info.get("run_seconds") or {}).get(name),
        }
    later = {n: r["loss"]["later"] for n, r in rows.items()}
    directions = {
        "icp_causal_lowest_later_loss": min(later, key=later.get) == "icp_causal",
        "random_causal_highest_later_loss": max(later, key=later.get) == "random_causal",
        # later-document loss differences (negative: the first named is better)
        "order_under_isolated": later["icp_isolated"] - later["random_isolated"],
        "order_under_causal": later["icp_causal"] - later["random_causal"],
        "causal_over_isolated_icp": later["icp_causal"] - later["icp_isolated"],
        "causal_over_isolated_random": later["random_causal"] - later["random_isolated"],
        "probe_icp_causal_over_chance": (rows["icp_causal"]["probe"]["partner_before"]["accuracy"] or 0) - chance,
    }
    return {
        "runs": {n: {"order": o, "attention": a} for n, (o, a) in RUNS.items()},
        "steps": info.get("steps"),
        "chance": chance,
        "rows": rows,
        "data": data,
        "directions": directions,
        "curves": curves,
    }


def pct(x) -> str:
    """A share as the tables show it ("n/a" where nothing was counted)."""
    return "n/a" if x is None else fmt_pct(x)


def markdown(result: dict) -> str:
    rows, d, chance = result["rows"], result["directions"], result["chance"]
    lines = [
        "# In-Context Pretraining at CPU scale: document order x attention across documents",
        "",
        *provenance_lines(result),
        "",
        f"Every run: the same model, seed, data and {result['steps']} steps; `data.order` and `data.attention` "
        "differ. Held-out rows (the same held-out documents in every run, packed in the run's order), "
        "evaluated once each by `examples/experiments/icp/evaluate.py`: loss = mean next-token cross-entropy "
        "of the tokens the loss counts; *first* = the first document of each row, *later* = every other "
        "document (those with earlier documents in their row). Probe: the colour of each held-out `facts` "
        "document, predicted (greedy, every token of it) given the true tokens before it; *partner before* = "
        "the documents with a document of their group earlier in their row (the only ones whose colour the "
        f"context holds); chance = {fmt_pct(chance)}; fact loss = the colour's negative log-likelihood in nats "
        f"(uniform over the colours: {math.log(1 / chance):.3f}).",
        "",
        "| run | held-out loss | first documents | later documents | probe, partner before | probe, all | "
        "fact loss, partner before | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        p, loss = r["probe"], r["loss"]
        wall = f"{r['wall_clock_s']:.0f}" if r["wall_clock_s"] is not None else "n/a"
        lines.append(
            f"| {r['label']} | {fmt_loss(loss['all'])} | {fmt_loss(loss['first'])} | {fmt_loss(loss['later'])} | "
            f"{pct(p['partner_before']['accuracy'])} ({p['partner_before']['documents']}) | "
            f"{pct(p['all']['accuracy'])} ({p['all']['documents']}) | "
            f"{fmt_loss(p['partner_before']['fact_loss'])} | {wall} |"
        )
    lines += [
        "",
        "## The paper's directions (arXiv 2310.10638; 2402.13991)",
        "",
        f"- ICP + causal has the lowest later-documents loss: {'yes' if d['icp_causal_lowest_later_loss'] else 'no'}",
        f"- random + causal has the highest: {'yes' if d['random_causal_highest_later_loss'] else 'no'}",
        f"- the order under isolated attention (ICP - random, later documents): {d['order_under_isolated']:+.4f}; "
        f"under causal attention: {d['order_under_causal']:+.4f}",
        f"- causal - isolated attention (later documents): ICP order {d['causal_over_isolated_icp']:+.4f}, "
        f"random order {d['causal_over_isolated_random']:+.4f}",
        f"- the probe under ICP + causal, partner before, over chance: {100 * d['probe_icp_causal_over_chance']:+.1f} "
        "points",
    ]
    if result["data"]:
        lines += [
            "",
            "## The rows of each order",
            "",
            "| order | split | rows | facts documents | with a group partner earlier in the row |",
            "|---|---|---|---|---|",
        ]
        for order, splits in result["data"].items():
            for split in ("train", "val"):
                s = splits[split]
                share = s["partner_before"]
                lines.append(f"| {order} | {split} | {s['rows']} | {share['documents']} | {fmt_pct(share['share'])} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    plt = harness.pyplot()
    rows = result["rows"]
    names = list(rows)
    fig, (losses, probe, curve) = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.25
    for k, key in enumerate(("all", "first", "later")):
        losses.bar([i + k * width for i in range(len(names))], [rows[n]["loss"][key] for n in names], width, label=key)
    losses.set_xticks([i + width for i in range(len(names))], [n.replace("_", "\n") for n in names])
    losses.set_ylabel("held-out loss")
    lo = min(rows[n]["loss"][k] for n in names for k in ("all", "first", "later"))
    losses.set_ylim(bottom=max(0.0, lo - 0.3))
    losses.legend(title="documents", fontsize=8)
    for k, key in enumerate(("partner_before", "all", "no_partner_before")):
        values = [100 * (rows[n]["probe"][key]["accuracy"] or 0) for n in names]
        probe.bar([i + k * width for i in range(len(names))], values, width, label=key.replace("_", " "))
    probe.axhline(100 * result["chance"], color="k", ls="--", lw=1, label="chance")
    probe.set_xticks([i + width for i in range(len(names))], [n.replace("_", "\n") for n in names])
    probe.set_ylabel("probe accuracy (%)")
    probe.legend(fontsize=8)
    for n in names:
        curve.plot(
            result["curves"][n]["step"], result["curves"][n]["val_loss"], marker="o", ms=3, label=rows[n]["label"]
        )
    curve.set_xlabel("step")
    curve.set_ylabel("validation loss (the trainer's)")
    curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out_dir: Path, results_dir: Path) -> dict:
    result = analyze_runs(out_dir)
    info = harness.read_run_info(out_dir, f"rerun `{RUN_COMMAND}`")
    result.update(recorded_or_now(info))
    result["run_info"] = {
        k: info.get(k) for k in ("quick", "launcher", "jobs", "omp_num_threads", "commands", "run_seconds")
    }
    harness.write_report(result, Path(results_dir) / RESULT_NAME, markdown, plot)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/icp")
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args(argv)
    results = Path(args.results)
    return finish(
        "[icp]", lambda: write_results(Path(args.out_dir), results), markdown, lambda _: results / RESULT_NAME
    )


if __name__ == "__main__":
    sys.exit(main())
