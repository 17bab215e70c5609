"""``python -m bench.plan_papers``: ``megafusion plan`` for the paper configurations on 8 to 256 H100s.

Writes ``bench/results/plan_<name>.md`` (per GPU count: the fastest layouts that fit and the
smallest that do not, with every memory and time column, and the top row worked by hand) and
``plan_<name>.json`` (the assumptions and, per GPU count, the counts and the first rows) for
``examples/configs/papers/{mot_7b, moma_1.4b_4t4i, transfusion_7b}.yaml``. Options:
``--gpus 8,16`` (default 8..256), ``--only mot_7b``, ``--top N`` (rows per group, default 10).
Nothing runs on a GPU: these are predictions. When a GPU run of one of these layouts is measured,
its step time and peak memory go in the "measured" columns of the same table (none yet).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from bench.provenance import ROOT, git_commit, utc_now
from megafusion.config import load_config
from megafusion.planning.hardware import hardware
from megafusion.planning.plan import GB, describe_assumptions, format_table, plan

PAPERS = {
    "mot_7b": {"config": "examples/configs/papers/mot_7b.yaml", "latent_shape": None},
    "moma_1.4b_4t4i": {"config": "examples/configs/papers/moma_1.4b_4t4i.yaml", "latent_shape": None},
    "transfusion_7b": {"config": "examples/configs/papers/transfusion_7b.yaml", "latent_shape": (8, 32, 32)},
}
GPU_COUNTS = (8, 16, 32, 64, 128, 256)
KEEP_JSON_ROWS = 20


def worked_example(row: dict, result: dict) -> list[str]:
    """The top row's memory and time, redone with the numbers in front of the reader."""
    a, c, m, t = result["assumptions"], row["check"], row["memory_bytes"], row["time_s"]
    p = 2 if a["params_dtype"] == "bf16" else 4
    rate = a["peak_tflops"] * 1e12 * a["efficiency"]
    tp, M, dist = row["tp"], row["num_microbatches"], row["distributed_optimizer"]
    tokens, f_layers, f_out = (
        c["tokens_per_microbatch"],
        c["last_stage_layer_flops_per_token"],
        c["output_layer_flops_per_token"],
    )
    per_mb = (t["compute"] + t["tp_comm"] + t["cp_comm"] + t["pp_p2p"] + t["ep_a2a"]) / M
    held = c["buffer_numel"] if dist else c["params_on_rank"]
    share = f"/ DP = {row['dp']}" if dist else "all"
    parts = " + ".join(
        f"{t[k]:.3f}" for k in ("compute", "tp_comm", "cp_comm", "pp_p2p", "bubble", "dp_comm", "ep_a2a", "optimizer")
    )
    full = " (x 4/3 on the layers for full recompute)" if row["recompute"] == "full" else ""
    return [
        f"Worked by hand, row 1 ({row['layout']}, distributed optimizer {'on' if dist else 'off'}, recompute "
        f"{row['recompute']}, micro-batch {row['micro_batch_size']}, M = {M}; pipeline stage {row['memory_stage']} "
        "is the fullest):",
        f"- parameters on the rank: {c['params_on_rank']:,} elements; DDP buffer {c['buffer_numel']:,} elements "
        "(padding: 64-element tensor starts and a multiple of lcm(DP, 128) with the distributed optimizer)",
        f"- params {p} B x {held:,} = {m['params'] / GB:.2f} GB; grads 4 B x {c['buffer_numel']:,} = "
        f"{m['grads'] / GB:.2f} GB; optimizer {12 if p == 2 else 8} B x its share ({share}) = "
        f"{m['optimizer'] / GB:.2f} GB; activations {m['activations'] / GB:.2f} GB (planning/memory.py: per-token "
        "terms x tokens x layers per stage x microbatches in flight)",
        f"- compute: M x T x (F_layers + F_output) / TP / (peak x efficiency) = {M} x {tokens} x ({f_layers:.4g} + "
        f"{f_out:.4g}) / {tp} / {rate:.4g} = {M * tokens * (f_layers + f_out) / tp / rate:.3f} s{full}",
        f"- bubble: (P - 1) / v = ({row['pp']} - 1) / {row['vpp']} microbatch times of {per_mb:.4f} s = "
        f"{t['bubble']:.3f} s (bubble fraction (P - 1) / (v M) = {row['bubble_fraction']:.4f})",
        f"- step = {parts} = {t['step']:.3f} s",
    ]


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m bench.plan_papers", description=__doc__.splitlines()[0])
    cli.add_argument("--gpus", default=",".join(map(str, GPU_COUNTS)))
    cli.add_argument("--only", help="one of " + ", ".join(PAPERS))
    cli.add_argument("--top", type=int, default=10)
    args = cli.parse_args(argv)
    counts = [int(x) for x in args.gpus.split(",")]
    names = [args.only] if args.only else list(PAPERS)
    hw = hardware("h100")
    command = "python -m bench.plan_papers " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    for name in names:
        paper = PAPERS[name]
        cfg = load_config(str(ROOT / paper["config"]), [])
        header = [
            f"# megafusion plan: {name} on 8 to 256 H100s (predicted)",
            "",
            f"commit {git_commit()}, {utc_now()}, `{command}` (config `{paper['config']}`"
            + (f", latent shape {paper['latent_shape']}" if paper["latent_shape"] else "")
            + "). Predictions only: no GPU was available; a measured step time and peak memory go in a "
            "`measured` column of these tables when a run of one of these layouts is made.",
            "",
        ]
        body, record = [], {"name": name, "config": paper["config"], "command": command, "by_gpus": {}}
        for n in counts:
            start = time.perf_counter()
            result = plan(cfg, n, hw, latent_shape=paper["latent_shape"])
            elapsed = time.perf_counter() - start
            if not record.get("assumptions"):
                header += ["Assumptions:", "", *(f"- {line}" for line in describe_assumptions(result)), ""]
                record["assumptions"], record["model"] = result["assumptions"], result["model"]
            rows = result["rows"]
            fit = [r for r in rows if r["fits"]]
            body += [f"## {n} GPUs ({n // hw.gpus_per_node} nodes): {len(rows)} layouts validate, {len(fit)} fit", ""]
            table = format_table(result, top=args.top, markdown=True).split("\n\n", 1)[1]
            body += [table, ""]
            if fit:
                body += [*worked_example(fit[0], result), ""]
            body.append(f"({elapsed:.1f} s to plan)")
            body.append("")
            record["by_gpus"][str(n)] = {
                "layouts": len(rows),
                "fit": len(fit),
                "rows": fit[:KEEP_JSON_ROWS] + [r for r in rows if not r["fits"]][: KEEP_JSON_ROWS // 4],
            }
            print(
                f"{name} {n} GPUs: {len(rows)} layouts, {len(fit)} fit, best "
                f"{fit[0]['layout'] + ' ' + format(fit[0]['time_s']['step'], '.3f') + ' s' if fit else 'none'} "
                f"({elapsed:.1f} s)",
                flush=True,
            )
        out = ROOT / "bench/results" / f"plan_{name}"  # not with_suffix: the names hold dots (1.4b)
        Path(f"{out}.md").write_text("\n".join(header + body))
        Path(f"{out}.json").write_text(json.dumps(record, indent=1))
        print(f"wrote {out}.md / .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
