"""Context-parallel attention, one layer: CP=1 against CP=2 (and 4), wall time and bytes per rank.

What is timed is the attention of one transformer layer as training runs it under
``parallel.cp`` (:mod:`megafusion.layers.core_attention`): every rank holds its head-tail share of
the row's queries, keys and values (:mod:`megafusion.runtime.context_parallel`), all-gathers the
keys and values over the context-parallel group, runs the masked attention of its query rows
against every key, and in the backward reduce-scatters the keys' and values' gradients. One
forward + backward of ``MaskedCoreAttention`` on random ``q, k, v`` (GQA: ``--groups`` key / value
heads) with its mask cut from the whole row's metadata by :func:`megafusion.layers.masks.context_mask`
(the forward step's own call), for the masks:

- ``causal``: one document per row (head-tail shards give every rank the same query-key pairs);
- ``documents``: each row packs 4 documents of random lengths, causal inside each;
- ``images``: each row packs 2 documents of text, an image (a bidirectional span), text, another
  image, text: half of the tokens are image patches (Transfusion's mask).

Per sequence length, mask and CP size it records the median (p10-p90) step time of the slowest
rank (each iteration starts at a barrier; a CP step is as slow as its slowest rank), the time of the
K/V all-gather + reduce-scatter alone, the bytes each rank's collectives moved (counted at
megatron-core's all-gather / reduce-scatter functions) beside the planner's formula
(:func:`megafusion.planning.step_time.cp_bytes_per_layer` x ``(c - 1) / c``), the unmasked
query-key pairs per rank (:func:`megafusion.runtime.context_parallel.query_key_pairs`), the
scaling efficiency ``time(CP=1) / (c x time(CP=c))`` (1 = linear), and the largest difference of
the CP output and input gradients from the one-process attention (checked, not assumed).

Every CP size runs in processes of its own (``torch.multiprocessing`` spawn, one per rank; gloo on
CPU with one thread per rank, so that a rank stands for one device; NCCL with one GPU per rank).
CP sizes above the machine's devices (CPU cores, GPUs) are skipped unless ``--cp`` names them; a run
that oversubscribes the cores is marked so (its times say nothing about scaling, its bytes do).

Usage::

    python -m bench.cp_attention                     # CPU sizes (~1-2 min on 2 cores): seq 512..2048
    python -m bench.cp_attention --gpu               # >= 2 GPUs: seq 8k..32k, bf16, flex backend
    python -m bench.cp_attention --quick --out /tmp/cp.json   # smoke test (tests)
    python -m bench.cp_attention --table-only        # re-render bench/results/cp_attention.md

Results go to ``--out`` (default ``bench/results/cp_attention.json``, with ``--gpu``
``cp_attention_gpu.json``); ``cp_attention.md`` beside it is re-rendered from every
``cp_attention*.json`` there. ``--quick`` writes only where ``--out`` says (else prints).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.provenance import cpu_cores, cpu_name, git_commit, machine, recorded_command, utc_now
from bench.provenance import write_table as write_results_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RESULT_GLOB = "cp_attention*.json"
TABLE_NAME = "cp_attention.md"
MASKS = ("causal", "documents", "images")

PRESETS = {
    # CPU: small enough that every size, mask and CP size runs in about a minute on 2 cores.
    "cpu": dict(seqs=[512, 1024, 2048], heads=8, groups=2, head_dim=32, batch=1, iters=6, warmup=2, dtype="fp32",
                backend="sdpa", masks=["documents", "images"]),
    # The target: 32k tokens, a 7B-like attention (32 heads, 8 kv groups, head dim 128), bf16.
    "gpu": dict(seqs=[8192, 16384, 32768], heads=32, groups=8, head_dim=128, batch=1, iters=20, warmup=5,
                dtype="bf16", backend="flex", masks=list(MASKS)),
    "quick": dict(seqs=[128], heads=4, groups=2, head_dim=8, batch=1, iters=3, warmup=1, dtype="fp32",
                  backend="sdpa", masks=["documents", "images"]),
}  # fmt: skip
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}  # largest |CP - one process| / max |one process|


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cp_attention", description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="the GPU preset: seq 8192,16384,32768, 32 heads, bf16, flex")
    p.add_argument("--quick", action="store_true", help="tiny sizes (tests); writes only to --out")
    p.add_argument("--seqs", help="sequence lengths, comma-separated (default: the preset's)")
    p.add_argument("--cp", help="CP sizes besides 1, comma-separated (default: 2, 4, 8 up to the devices)")
    p.add_argument("--masks", help=f"some of {', '.join(MASKS)} (default: documents,images; --gpu: all)")
    for name in ("heads", "groups", "head-dim", "batch", "iters", "warmup"):
        p.add_argument(f"--{name}", type=int, help="default: the preset's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="result JSON (default bench/results/cp_attention.json; --gpu: cp_attention_gpu.json)")
    p.add_argument("--table-only", action="store_true", help="only re-render the markdown table")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "gpu" if args.gpu else "cpu"]
    args.seqs = [int(x) for x in args.seqs.split(",")] if args.seqs else preset["seqs"]
    for key in ("heads", "groups", "head_dim", "batch", "iters", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.dtype, args.backend = preset["dtype"], preset["backend"]
    args.masks = [m.strip() for m in args.masks.split(",")] if args.masks else preset["masks"]
    bad = [m for m in args.masks if m not in MASKS]
    if bad:
        p.error(f"--masks: {', '.join(bad)} is not one of {', '.join(MASKS)}")
    if args.heads % args.groups:
        p.error(f"--heads {args.heads} is not divisible by --groups {args.groups}")
    if args.iters < 2 or args.warmup < 0:
        p.error("need --iters >= 2 and --warmup >= 0")
    args.explicit_cp = args.cp is not None
    args.cp = [int(x) for x in args.cp.split(",")] if args.cp else [2, 4, 8]
    for c in args.cp:
        odd = [s for s in args.seqs if s % (2 * c)]
        if c < 2 or odd:
            p.error(f"--cp {c}: needs CP >= 2 and every --seqs a multiple of 2 x CP = {2 * c} (not {odd})")
    return args


# ---------------------------------------------------------------------------- inputs


def row_metadata(mask: str, batch: int, seq: int, seed: int) -> dict:
    """``document_ids`` (and ``image_ids``) ``[b, s]`` of a packed row for the mask (module docstring)."""
    from megafusion.core.modality import NO_IMAGE

    gen = torch.Generator().manual_seed(seed)
    docs = torch.zeros(batch, seq, dtype=torch.int64)
    images = torch.full((batch, seq), NO_IMAGE, dtype=torch.int64)
    for row in range(batch):
        if mask == "causal":
            continue
        if mask == "documents":  # 4 documents, cut at 3 random points (each at least s / 16 long)
            cuts = sorted((torch.randperm(11, generator=gen)[:3] + 2).tolist())
            for cut in cuts:
                docs[row, cut * seq // 16 :] += 1
        else:  # 2 documents of s / 2: text s/16, image 3s/16, text s/16, image s/16, text s/8 ... (halves)
            half, unit = seq // 2, seq // 16
            for d in range(2):
                start = d * half
                docs[row, start:] = d
                for i, (a, b) in enumerate(((unit, 4 * unit), (5 * unit, 6 * unit))):
                    images[row, start + a : start + b] = 2 * d + i
    out = {"document_ids": docs}
    if mask == "images":
        out["image_ids"] = images
    return out


def dtype_of(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def summary(ms: list[float]) -> dict:
    deciles = statistics.quantiles(ms, n=10, method="inclusive")
    return {"median": round(statistics.median(ms), 4), "p10": round(deciles[0], 4), "p90": round(deciles[-1], 4)}


# ---------------------------------------------------------------------------- one CP size (spawned ranks)


def _counting(counts: dict, name: str, fn, received):
    """``fn`` (megatron-core's all-gather / reduce-scatter) counting the bytes it moves per rank."""

    def wrapped(output, input_, *args, **kwargs):
        counts[name] = counts.get(name, 0) + received(output, input_)
        return fn(output, input_, *args, **kwargs)

    return wrapped


def _worker(rank: int, cp: int, args_dict: dict, init_file: str, out_file: str) -> None:
    """One rank of a CP group of ``cp``: every (seq, mask) case, rows written by rank 0."""
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's renamed collectives, megatron's calls
    args = argparse.Namespace(**args_dict)
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        torch.set_num_threads(1)  # one core per rank: a rank stands for one device
    if use_cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        from megafusion.runtime import cpu_compat

        cpu_compat.enable()
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=cp)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import mappings

    ps.initialize_model_parallel(context_parallel_size=cp)
    counts: dict[str, int] = {}
    mappings.dist_all_gather_func = _counting(
        counts, "all_gather", mappings.dist_all_gather_func, lambda o, i: o.numel() * o.element_size() - i.nbytes
    )
    mappings.dist_reduce_scatter_func = _counting(
        counts,
        "reduce_scatter",
        mappings.dist_reduce_scatter_func,
        lambda o, i: i.nbytes - o.numel() * o.element_size(),
    )
    rows = []
    try:
        for seq in args.seqs:
            for mask in args.masks:
                rows.append(_case(args, cp, rank, seq, mask, device, counts))
    finally:
        if rank == 0:
            Path(out_file).write_text(json.dumps(rows))
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def _attention(args, seq: int, cp: int, device):
    """``MaskedCoreAttention`` as a layer builds it (context parallel when ``cp`` > 1)."""
    from megatron.core.transformer.enums import AttnMaskType

    from megafusion.config import Config
    from megafusion.layers.core_attention import MaskedCoreAttention
    from megafusion.models.transformer_config import build_transformer_config

    cfg = Config()
    m = cfg.model
    m.num_layers, m.num_attention_heads, m.num_query_groups = 1, args.heads, args.groups
    m.hidden_size, m.seq_length, m.params_dtype = args.heads * args.head_dim, seq, args.dtype
    m.vocab_size = 256
    cfg.parallel.cp = cp
    return cfg, MaskedCoreAttention(build_transformer_config(cfg, device), 1, AttnMaskType.arbitrary)


def _case(args, cp: int, rank: int, seq: int, mask_name: str, device, counts: dict) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    from megafusion.layers.attended_keys import attended_keys
    from megafusion.layers.masks import context_mask
    from megafusion.planning.step_time import cp_bytes_per_layer, ring
    from megafusion.runtime.context_parallel import ContextShard, query_key_pairs

    dtype, b, H, G, d = dtype_of(args.dtype), args.batch, args.heads, args.groups, args.head_dim
    cfg, attention = _attention(args, seq, cp, device)
    meta = row_metadata(mask_name, b, seq, args.seed)
    # The forward step's shards: chunks balanced by the keys each query attends.
    attended = attended_keys(meta["document_ids"], meta.get("image_ids"))
    shard = ContextShard(rank, cp, seq, attended.sum(0))
    positions = shard.positions if cp > 1 else torch.arange(seq)
    keys = shard.key_positions if cp > 1 else torch.arange(seq)
    # The forward step's own call; with CP=1 the identity cut gives the whole row's mask in the same form.
    mask = context_mask(meta, args.backend, device, positions, keys)

    gen = torch.Generator().manual_seed(args.seed + seq)
    full = {
        "q": torch.randn(seq, b, H, d, generator=gen),
        "k": torch.randn(seq, b, G, d, generator=gen),
        "v": torch.randn(seq, b, G, d, generator=gen),
        "grad": torch.randn(seq, b, H * d, generator=gen),
    }
    local = {n: t.index_select(0, positions).to(device, dtype).contiguous() for n, t in full.items()}
    q, k, v = (local[n].requires_grad_() for n in ("q", "k", "v"))
    group = ps.get_context_parallel_group()

    def step():
        out = attention(q, k, v, mask)
        out.backward(local["grad"])
        return out

    def comm():  # the K/V all-gather forward and the reduce-scatter of their gradients backward
        gk = gather_from_sequence_parallel_region(k, True, group=group)
        gv = gather_from_sequence_parallel_region(v, True, group=group)
        torch.autograd.backward([gk, gv], [torch.ones_like(gk), torch.ones_like(gv)])

    def timed(fn) -> list[float]:
        times = []
        for i in range(args.warmup + args.iters):
            q.grad = k.grad = v.grad = None
            dist.barrier()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if i >= args.warmup:
                times.append((time.perf_counter() - start) * 1e3)
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a CP step lasts as long as its slowest rank
        return slowest.tolist()

    counts.clear()
    q.grad = k.grad = v.grad = None
    out = step()  # one step whose bytes are counted and whose results are checked
    moved = dict(counts)
    error = _check(out, q, k, v, full, shard if cp > 1 else None, cfg, args, seq, mask_name, device, dtype)
    step_ms = timed(step)
    comm_ms = timed(comm) if cp > 1 else None

    pairs = shard.pairs(attended)
    head_tail = query_key_pairs(attended, cp)  # megatron's split, for comparison
    kv = cp_bytes_per_layer(cfg, 1, args.dtype, b)
    return {
        "seq": seq,
        "mask": mask_name,
        "cp": cp,
        "mask_kind": type(mask).__name__ + (f" {list(mask.shape)} {mask.dtype}" if torch.is_tensor(mask) else ""),
        "step_ms": summary(step_ms),
        "comm_ms": summary(comm_ms) if comm_ms else None,
        "bytes_per_rank": {"all_gather": moved.get("all_gather", 0), "reduce_scatter": moved.get("reduce_scatter", 0)},
        "predicted_bytes_per_rank": {"all_gather": ring(cp) * kv, "reduce_scatter": ring(cp) * kv},
        "query_key_pairs": pairs,
        "pair_imbalance": round(max(pairs) / (sum(pairs) / len(pairs)), 4),
        "head_tail_pair_imbalance": round(max(head_tail) / (sum(head_tail) / len(head_tail)), 4),
        "max_error": error,
    }


def _check(out, q, k, v, full, shard, cfg, args, seq, mask_name, device, dtype) -> float | None:
    """Largest |CP - one process| over the output and the q, k, v gradients, relative to the one
    process's largest value, on rank 0 (None with CP=1: it is the reference)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if shard is None:
        return None
    group = ps.get_context_parallel_group()
    mine = [out.detach(), q.grad, k.grad, v.grad]
    gathered = []
    for t in mine:
        parts = [torch.empty_like(t) for _ in range(shard.size)]
        dist.all_gather(parts, t.contiguous(), group=group)
        gathered.append(shard.unshard(parts, dim=0).float().cpu())
    if shard.rank != 0:
        return None
    from megafusion.layers.masks import context_mask

    _, reference = _attention(args, seq, 1, device)
    reference.cp_group = None  # one process: no gather, the whole row's mask
    meta = row_metadata(mask_name, args.batch, seq, args.seed)
    whole = torch.arange(seq)
    mask = context_mask(meta, args.backend, device, whole, whole)
    rq, rk, rv = (full[n].to(device, dtype).requires_grad_() for n in ("q", "k", "v"))
    ref_out = reference(rq, rk, rv, mask)
    ref_out.backward(full["grad"].to(device, dtype))
    worst = 0.0
    for got, want in zip(gathered, (ref_out.detach(), rq.grad, rk.grad, rv.grad)):
        want = want.float().cpu()
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_cp(args, cp: int) -> list[dict]:
    """Spawn ``cp`` ranks for every case; rank 0's rows."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(cp, vars(args), init_file, out_file), nprocs=cp, join=True)
        return json.loads(Path(out_file).read_text())


# ---------------------------------------------------------------------------- the run


def devices() -> int:
    """Ranks the machine holds without sharing: GPUs, else CPU cores (one thread per rank)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else cpu_cores()


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run(args, argv: list[str]) -> dict:
    units = devices()
    sizes = [c for c in args.cp if args.explicit_cp or c <= units]
    if not sizes:
        kind = "GPUs" if torch.cuda.is_available() else "CPU cores"
        raise SystemExit(
            f"python -m bench.cp_attention: CP={min(args.cp)} needs {min(args.cp)} {kind} (one per rank), this "
            f"machine has {units}: run on more, or name the sizes with --cp to share them"
        )
    started, load_before = utc_now(), load_average()
    rows = run_cp(args, 1)
    base = {(r["seq"], r["mask"]): r["step_ms"]["median"] for r in rows}
    for c in sizes:
        for r in run_cp(args, c):
            r["oversubscribed"] = c > units
            r["scaling_efficiency"] = round(base[(r["seq"], r["mask"])] / (c * r["step_ms"]["median"]), 4)
            rows.append(r)
    import megatron.core

    return {
        "benchmark": "cp_attention",
        "quick": args.quick,
        "preset": "quick" if args.quick else "gpu" if args.gpu else "cpu",
        # the ranks' machine (the launcher's own torch threads say nothing: each rank runs one)
        "device": machine() if torch.cuda.is_available() else f"{cpu_name()}, {cpu_cores()} cores",
        "device_type": "cuda" if torch.cuda.is_available() else "cpu",
        "ranks_without_sharing": units,
        "threads_per_rank": None if torch.cuda.is_available() else 1,
        "versions": {"torch": torch.__version__, "megatron_core": getattr(megatron.core, "__version__", "unknown")},
        "commit": git_commit(),
        "date": started,
        "command": recorded_command("bench.cp_attention", argv),
        "load_average_1min": {"start": load_before, "end": load_average()},
        "shape": {
            "heads": args.heads,
            "groups": args.groups,
            "head_dim": args.head_dim,
            "batch": args.batch,
            "dtype": args.dtype,
            "backend": args.backend,
        },
        "rows": rows,
    }


# ---------------------------------------------------------------------------- table


def _ms(stat: dict | None) -> str:
    return "-" if stat is None else f"{stat['median']:.2f} ({stat['p10']:.2f}-{stat['p90']:.2f})"


def _mb(x: float) -> str:
    return f"{x / 1e6:.3f}"


def render_table(results_dir: Path) -> str:
    """Markdown: per result file its provenance, then one line per (seq, mask, CP)."""
    lines = [
        "# Context-parallel attention, one layer (forward + backward)",
        "",
        f"Generated by `python -m bench.cp_attention` from `{RESULT_GLOB}` in this folder; do not edit by hand.",
        "Step: the masked attention forward + backward with the K/V all-gather and the reduce-scatter of their",
        "gradients, the slowest rank's median (p10-p90) ms; comm: the all-gather + reduce-scatter alone. Bytes:",
        "per rank and layer, all-gather received + reduce-scatter sent, measured at megatron-core's collectives,",
        "and the planner's `2 s b (G/t) d a x (c-1)/c` each. Efficiency: time(CP=1) / (c x time(CP=c)).",
        "Pairs: unmasked query-key pairs of the busiest rank over the mean, with the forward step's shards (chunks",
        "balanced by attended keys) and with megatron's head-tail split. Error: |CP - one process| / max.",
        "",
    ]
    for path in sorted(Path(results_dir).glob(RESULT_GLOB)):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable cp_attention result ({err}); fix or remove it") from err
        sh = r["shape"]
        lines += [
            f"## {path.name}: {r['device']}" + (" (quick)" if r.get("quick") else ""),
            "",
            f"commit {r['commit']}, {r['date']}, `{r['command']}`; torch {r['versions']['torch']}, megatron-core "
            f"{r['versions']['megatron_core']}; {sh['heads']} heads, {sh['groups']} kv groups, head dim "
            f"{sh['head_dim']}, batch {sh['batch']}, {sh['dtype']}, backend {sh['backend']}; "
            f"{r['ranks_without_sharing']} ranks fit without sharing"
            + (f", {r['threads_per_rank']} thread per rank" if r.get("threads_per_rank") else "")
            + f"; load average {r['load_average_1min']['start']} -> {r['load_average_1min']['end']}",
            "",
            "| seq | mask | CP | step ms | comm ms | efficiency | bytes/rank MB (measured) | bytes/rank MB (planner) "
            "| pairs max/mean (balanced; head-tail) | error | mask |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            got, want = row["bytes_per_rank"], row["predicted_bytes_per_rank"]
            eff, err = row.get("scaling_efficiency"), row["max_error"]
            oversubscribed = " (oversubscribed)" if row.get("oversubscribed") else ""
            lines.append(
                f"| {row['seq']} | {row['mask']} | {row['cp']}{oversubscribed}"
                f" | {_ms(row['step_ms'])} | {_ms(row['comm_ms'])} | {'-' if eff is None else f'{eff:.3f}'} | "
                f"{_mb(got['all_gather'])} + {_mb(got['reduce_scatter'])} | "
                f"{_mb(want['all_gather'])} + {_mb(want['reduce_scatter'])} | {row['pair_imbalance']:.3f}; "
                f"{row.get('head_tail_pair_imbalance', row['pair_imbalance']):.3f} | "
                f"{'-' if err is None else format(err, '.1e')} | {row['mask_kind']} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_table(results_dir: Path) -> Path:
    return write_results_table(results_dir, TABLE_NAME, render_table)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.table_only:
        print(f"wrote {write_table(Path(args.out).parent if args.out else RESULTS)}")
        return 0
    result = run(args, argv)
    failed = [r for r in result["rows"] if r["max_error"] is not None and r["max_error"] > TOLERANCE[args.dtype]]
    for r in result["rows"]:
        eff = r.get("scaling_efficiency")
        print(
            f"seq {r['seq']} {r['mask']} CP={r['cp']}: {r['step_ms']['median']:.2f} ms"
            + (f", efficiency {eff:.3f}" if eff is not None else "")
            + f", bytes/rank {r['bytes_per_rank']['all_gather']} + {r['bytes_per_rank']['reduce_scatter']}"
            + f" (planner {r['predicted_bytes_per_rank']['all_gather']:.0f} each)",
            flush=True,
        )
    if failed:
        print(f"CP output differs from one process beyond {TOLERANCE[args.dtype]:g}: {failed}", file=sys.stderr)
        return 1
    if args.out is None and args.quick:
        print("--quick without --out writes nothing (recorded results are left alone):")
        print(json.dumps(result, indent=1))
        return 0
    default = "cp_attention_gpu.json" if args.gpu else "cp_attention.json"
    out = Path(args.out) if args.out else RESULTS / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} and {write_table(out.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
