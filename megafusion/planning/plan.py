"""``megafusion plan``'s work: every layout that validates, its memory and step time, ranked.

:func:`plan` returns the assumptions and one row per layout (:mod:`megafusion.planning.search`),
each with the memory of its fullest rank (:mod:`megafusion.planning.memory`, the maximum over
pipeline stages; DP rank 0) and its step time (:mod:`megafusion.planning.step_time`). Layouts
that fit (``total + reserve <= GPU memory``) come first, fastest first; those that do not follow,
marked, smallest first. :func:`format_table` prints them with every column a reader needs to
redo the sums by hand (GB = 1e9 bytes, seconds).

Context parallelism (``parallel.cp``): the sizes given (``megafusion plan --cp 1,2,4``), else
automatic: CP 1, and the powers of two from 2 up to a node's GPUs that divide the GPU count when
a row holds at least :data:`LONG_ROW` tokens (where the ``s^2`` masks and the activations of a
whole row per GPU dominate) or when no layout without CP fits. At equal GPUs the model prices CP as DP
plus the K/V all-gathers, less pipeline bubble (each microbatch is ``1 / cp`` of the rows): it pays
where memory needs it or where the bubble shrinks by more than the gathers cost.
"""

from __future__ import annotations

from megafusion.accounting.flops import flops_per_token
from megafusion.core.errors import UsageError
from megafusion.objectives.registry import get_objective
from megafusion.planning import memory as mem
from megafusion.planning.search import layouts
from megafusion.planning.step_time import (
    bubble_fraction,
    cp_bytes_per_layer,
    mean_attended_keys,
    stage_flops_per_token,
    step_time,
)

GB = 1e9
# Rows of at least this many tokens: the automatic search tries context parallelism too.
LONG_ROW = 8192


def _rank(layout, pp_rank: int) -> mem.Rank:
    return mem.Rank(
        tp=layout.tp,
        pp=layout.pp,
        vpp=layout.vpp,
        dp=layout.dp,
        pp_rank=pp_rank,
        dp_rank=0,
        sp=layout.sp,
        ep=layout.ep,
        cp=layout.cp,
    )


def evaluate(cfg, layout, hw, params_dtype, efficiency, reserve_gb, latent_shape=None, image_fraction=0.5) -> dict:
    """One row: the layout, its fullest rank's memory and its step time."""
    run_cfg = layout.apply(cfg)
    t = run_cfg.train
    num_microbatches = t.global_batch_size // (t.micro_batch_size * layout.dp)
    worst, worst_stage = None, 0
    for pp_rank in range(layout.pp):
        m = mem.memory(
            run_cfg,
            _rank(layout, pp_rank),
            params_dtype,
            num_microbatches,
            layout.recompute,
            latent_shape,
            image_fraction,
        )
        if worst is None or m["total"] > worst["total"]:
            worst, worst_stage = m, pp_rank
    last = _rank(layout, layout.pp - 1)
    state = mem.state_bytes(run_cfg, last, params_dtype, latent_shape)
    times = step_time(run_cfg, last, hw, params_dtype, num_microbatches, layout.recompute, efficiency, state)
    tokens = t.global_batch_size * run_cfg.model.seq_length
    # What a reader needs to redo the sums: the fullest rank's tensors and buffer, the last stage's FLOPs.
    worst_rank = _rank(layout, worst_stage)
    numel = buffer = 0
    for chunk in range(layout.vpp):
        for kind, numels in mem.chunk_parameters(run_cfg, worst_rank, chunk, latent_shape).items():
            dp = layout.tp * layout.dp * layout.cp // layout.ep if kind == "expert" else layout.dp * layout.cp
            numel += sum(numels)
            buffer += mem.buffer_numel(numels, dp, layout.distributed_optimizer)
    flops = stage_flops_per_token(run_cfg, last)
    model_flops = tokens * flops_per_token(run_cfg, mean_attended_keys(run_cfg))
    world = layout.tp * layout.pp * layout.dp * layout.cp
    return {
        "layout": layout.label(),
        "tp": layout.tp,
        "sp": layout.sp,
        "cp": layout.cp,
        "pp": layout.pp,
        "vpp": layout.vpp,
        "dp": layout.dp,
        "ep": layout.ep,
        "distributed_optimizer": layout.distributed_optimizer,
        "recompute": layout.recompute,
        "micro_batch_size": layout.micro_batch_size,
        "num_microbatches": num_microbatches,
        "bubble_fraction": bubble_fraction(layout.pp, layout.vpp, num_microbatches),
        "memory_stage": worst_stage,
        "memory_bytes": worst,
        "check": {
            "params_on_rank": numel,
            "buffer_numel": buffer,
            # on one rank: s b / CP
            "tokens_per_microbatch": t.micro_batch_size * run_cfg.model.seq_length // layout.cp,
            # one layer's K/V all-gather under CP (whole row, this TP rank's kv heads); 0 without CP
            "cp_bytes_per_layer": cp_bytes_per_layer(run_cfg, layout.tp, params_dtype, t.micro_batch_size)
            if layout.cp > 1
            else 0.0,
            "last_stage_layer_flops_per_token": flops["layers"],
            "output_layer_flops_per_token": flops["output"],
        },
        "fits": worst["total"] + reserve_gb * GB <= hw.hbm_gb * GB,
        "time_s": times,
        "tokens_per_s_per_gpu": tokens / times["step"] / world,
        "mfu": model_flops / times["step"] / world / (hw.peak_tflops * 1e12),
    }


def plan(
    cfg,
    world_size: int,
    hw,
    params_dtype: str = "bf16",
    efficiency: float = 0.5,
    reserve_gb: float = 4.0,
    latent_shape=None,
    image_fraction: float = 0.5,
    recompute=None,
    micro_batch_sizes=None,
    cp_sizes=None,
) -> dict:
    """The assumptions and every layout's row, ranked (see the module docstring); ``cp_sizes``: the
    context-parallel sizes to try, None for the automatic choice."""
    if cfg.model.vocab_size is None:
        raise UsageError(
            "model.vocab_size is unset: the plan needs it; set model.vocab_size=N (the padded vocabulary a run takes "
            "from its data: megafusion.data.sources.data_vocabulary, as `megafusion plan` does)"
        )
    if not 0 < efficiency <= 1:
        raise UsageError(f"--efficiency {efficiency}: must be in (0, 1]")

    def rows_for(sizes) -> list[dict]:
        found = layouts(cfg, world_size, hw.gpus_per_node, recompute, micro_batch_sizes, sizes)
        return [
            evaluate(cfg, lay, hw, params_dtype, efficiency, reserve_gb, latent_shape, image_fraction) for lay in found
        ]

    if cp_sizes is not None:
        tried, why = sorted(set(cp_sizes)), "--cp"
        rows = rows_for(tried)
    else:
        more = [c for c in auto_cp_sizes(hw.gpus_per_node) if world_size % c == 0]
        if cfg.model.seq_length >= LONG_ROW and more:
            tried, why = [1, *more], f"automatic: rows of {cfg.model.seq_length} >= {LONG_ROW} tokens"
            rows = rows_for(tried)
        else:
            tried, why = [1], f"automatic: rows of {cfg.model.seq_length} < {LONG_ROW} tokens"
            rows = rows_for(tried)
            if more and not any(r["fits"] for r in rows):
                tried, why = [1, *more], "automatic: no layout without context parallelism fits"
                rows += rows_for(more)
    if not rows:
        raise UsageError(
            f"no layout of this config validates on {world_size} GPUs: check train.global_batch_size, "
            "model.num_layers and the head counts (megafusion train --dry-run shows why)"
        )
    rows.sort(key=lambda r: (not r["fits"], r["time_s"]["step"] if r["fits"] else r["memory_bytes"]["total"]))
    return {
        "world_size": world_size,
        "assumptions": {
            **hw.as_dict(),
            "params_dtype": params_dtype,
            "efficiency": efficiency,
            "reserve_gb": reserve_gb,
            "image_fraction": image_fraction if get_objective(cfg.objective.name).extra_modules else None,
            "mean_attended_keys": mean_attended_keys(cfg),
            "cp_sizes": tried,
            "cp_sizes_why": why,
        },
        "model": {
            "arch": cfg.model.arch,
            "objective": cfg.objective.name,
            "num_layers": cfg.model.num_layers,
            "hidden_size": cfg.model.hidden_size,
            "ffn_hidden_size": cfg.model.effective_ffn_hidden_size(),
            "heads": cfg.model.num_attention_heads,
            "query_groups": cfg.model.effective_num_query_groups(),
            "vocab_size": cfg.model.vocab_size,
            "seq_length": cfg.model.seq_length,
            "global_batch_size": cfg.train.global_batch_size,
        },
        "rows": rows,
    }


def auto_cp_sizes(gpus_per_node: int) -> list[int]:
    """The context-parallel sizes above 1 the automatic search tries: powers of two up to a node."""
    sizes, c = [], 2
    while c <= gpus_per_node:
        sizes.append(c)
        c *= 2
    return sizes


def describe_assumptions(result: dict) -> list[str]:
    a, m = result["assumptions"], result["model"]
    lines = [
        f"model: {m['arch']} / {m['objective']}, {m['num_layers']} layers, hidden {m['hidden_size']}, ffn "
        f"{m['ffn_hidden_size']}, heads {m['heads']} (kv {m['query_groups']}), vocab {m['vocab_size']}, seq "
        f"{m['seq_length']}, global batch {m['global_batch_size']} sequences",
        f"GPUs: {result['world_size']} x {a['name']}, {a['gpus_per_node']} per node: peak {a['peak_tflops']:g} "
        f"TFLOP/s bf16 x efficiency {a['efficiency']:g}; HBM {a['hbm_gb']:g} GB ({a['hbm_gbps']:g} GB/s), "
        f"reserve {a['reserve_gb']:g} GB; NVLink {a['nvlink_gbps']:g} GB/s, between nodes {a['nodes_gbps']:g} GB/s "
        "per GPU and direction",
        f"dtype {a['params_dtype']} (fp32 grads, fp32 Adam states); attention: mean {a['mean_attended_keys']:g} "
        "keys per query"
        + (f"; image share of tokens {a['image_fraction']:g}" if a["image_fraction"] is not None else ""),
        f"context parallel sizes tried: {', '.join(map(str, a['cp_sizes']))} ({a['cp_sizes_why']})",
    ]
    return lines


def _gb(x: float) -> str:
    """GB with 2 decimals; a tiny model's (under 0.1 GB) with 2 significant digits instead of 0.00."""
    return f"{x / GB:.2f}" if x >= 0.1 * GB or x == 0 else f"{x / GB:.2g}"


def _s(x: float) -> str:
    """Seconds with 3 decimals; under 10 ms with 2 significant digits."""
    return f"{x:.3f}" if x >= 0.01 or x == 0 else f"{x:.2g}"


def format_table(result: dict, top: int | None = 20, markdown: bool = False) -> str:
    """Assumptions, then one line per layout (``top`` fitting ones, then up to ``top`` that do not)."""
    rows = result["rows"]
    fit = [r for r in rows if r["fits"]]
    unfit = [r for r in rows if not r["fits"]]
    shown = (fit[:top] + unfit[:top]) if top else rows
    header = [
        "#", "layout", "dopt", "recomp", "mbs", "M", "bubble", "params", "grads", "optim", "activ", "total GB",
        "fits", "compute", "tp comm", "cp comm", "pp p2p", "bubble s", "dp comm", "ep a2a", "optim s", "step s",
        "tok/s/GPU", "MFU",
    ]  # fmt: skip
    table = []
    for i, r in enumerate(shown, 1):
        mb, ts = r["memory_bytes"], r["time_s"]
        table.append(
            [
                str(i),
                r["layout"],
                "on" if r["distributed_optimizer"] else "off",
                r["recompute"],
                str(r["micro_batch_size"]),
                str(r["num_microbatches"]),
                f"{r['bubble_fraction']:.3f}",
                _gb(mb["params"]),
                _gb(mb["grads"]),
                _gb(mb["optimizer"]),
                _gb(mb["activations"]),
                _gb(mb["total"]),
                "yes" if r["fits"] else "NO",
                *(
                    _s(ts[k])
                    for k in ("compute", "tp_comm", "cp_comm", "pp_p2p", "bubble", "dp_comm", "ep_a2a", "optimizer")
                ),
                _s(ts["step"]),
                f"{r['tokens_per_s_per_gpu']:.0f}",
                f"{r['mfu']:.3f}",
            ]
        )
    lines = [f"megafusion plan: {len(rows)} layouts validate, {len(fit)} fit"]
    lines += describe_assumptions(result)
    lines.append(
        "memory: the fullest pipeline stage's rank (GB = 1e9 bytes; total = params + grads + optim + activ, fits if "
        "total + reserve <= HBM); time: seconds per optimizer step, step = compute + tp comm + cp comm + pp p2p + "
        "bubble + dp comm + ep a2a + optim s"
    )
    if len(shown) < len(rows):
        lines.append(
            f"(showing the {min(top, len(fit))} fastest layouts that fit, then the {min(top, len(unfit))} that miss "
            f"by the least memory, of {len(rows)}; --top 0 or --json for all)"
        )
    lines.append("")
    if markdown:
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(row) + " |" for row in table]
    else:
        widths = [max(len(header[i]), *(len(row[i]) for row in table)) for i in range(len(header))]
        lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join(lines)
