"""The resolved parallel layout of a run, computed before any process group exists.

``megafusion train --dry-run --config FILE [section.key=value ...] --world-size 16 --nproc-per-node 8``
(its command line: :mod:`megafusion.commands.dry_run`)
prints, for the given number of processes, which tensor / pipeline / data (/ context / expert)
parallel coordinates every global rank gets, which transformer layers it builds (per virtual
pipeline chunk) and whether it holds the embedding or the output layer.

The rules are megatron-core's, restated in plain Python so that a dry-run imports neither torch
nor megatron (it answers in a moment): the coordinates are those of ``RankGenerator`` (its
``generate_masked_orthogonal_rank_groups``) as ``parallel_state.initialize_model_parallel`` builds
it for megafusion (default order ``tp-cp-ep-dp-pp``; the expert generator with
``expert_tensor_parallel_size=1``, as :mod:`megafusion.runtime.distributed` asks), and the layers
those of ``get_num_layers_to_build`` / ``get_transformer_layer_offset`` for an even split (the only
one megafusion configures). ``tests/launch/test_launch.py`` checks both against megatron-core's own
functions over a grid of layouts, and against the groups of a real 2-node torchrun job.

API:

- ``layout(cfg, world_size, nproc_per_node) -> list[dict]``: one dict per global rank with
  ``rank, node, local_rank, tp, pp, dp, cp, ep`` (ranks inside each group), ``chunks`` (global
  0-based layer indices per virtual chunk, one list without VPP; megatron's 1-based
  ``TransformerLayer.layer_number`` is index + 1), ``layers`` (all of them, sorted),
  ``embedding`` and ``output_layer`` (bools).
- ``groups(cfg, world_size) -> dict[str, list[list[int]]]``: the rank groups per dimension.
- ``format_layout(cfg, world_size, nproc_per_node, per_rank=None) -> str``: header + table.
- ``dry_run(argv) -> int``: what the command line prints (ConfigError on a bad config).

``node`` is torchrun's node rank (GROUP_RANK): global rank = node x nproc_per_node + local_rank.
With the c10d rendezvous torchrun does not promise which host gets which node rank, so the
table says nothing about host names.
"""

from __future__ import annotations

import json
import os
import re

from megafusion.config import ConfigError, load_config, parse_cli, validate

USAGE = """usage: megafusion train --dry-run --config FILE [section.key=value ...]
                                        [--world-size N] [--nnodes N] [--nproc-per-node M]
                                        [--per-rank | --grouped] [--json]

Prints the parallel layout megatron-core will build for N processes, M per node, without
starting any process. N and M default to torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE, else to
SLURM_NNODES x (GPUS_PER_NODE or SLURM_GPUS_ON_NODE or SLURM_GPUS_PER_NODE), else to 1.
Exit status 2 when the configuration cannot run on that many processes.
"""

# Above this many ranks the table has one line per (node, pipeline stage) instead of per rank.
PER_RANK_MAX = 32


# initialize_model_parallel's default ``order`` (megafusion's runtime passes none).
ORDER = "tp-cp-ep-dp-pp"
# megafusion.runtime.distributed passes expert_tensor_parallel_size=1: whole experts on every rank.
EXPERT_TP = 1


class RankGenerator:
    """megatron-core's ``parallel_state.RankGenerator`` (sizes, order, ``get_ranks(token)``), in plain
    Python: a rank is ``sum(coordinate x stride)`` over the dimensions in ``order`` (strides: the
    prefix products of the sizes); a group holds the ranks that differ only in ``token``'s
    dimensions, groups and members both counted in that order."""

    def __init__(self, tp: int, ep: int, dp: int, pp: int, cp: int, order: str = ORDER):
        sizes = {"tp": tp, "pp": pp, "dp": dp, "ep": ep, "cp": cp}
        names = order.lower().split("-")
        names += [name for name in sizes if name not in names]  # size 1 (megatron refuses others)
        self.names, self.sizes = names, [sizes[name] for name in names]
        self.world_size = tp * ep * dp * pp * cp

    def get_ranks(self, token: str) -> list[list[int]]:
        wanted = token.split("-")
        strides = [1]
        for size in self.sizes[:-1]:
            strides.append(strides[-1] * size)
        inside = [(size, stride) for name, size, stride in zip(self.names, self.sizes, strides) if name in wanted]
        outside = [(size, stride) for name, size, stride in zip(self.names, self.sizes, strides) if name not in wanted]
        group_size = 1
        for size, _ in inside:
            group_size *= size
        return [
            [_offset(member, inside) + _offset(group, outside) for member in range(group_size)]
            for group in range(self.world_size // group_size)
        ]


def _offset(index: int, dims: list[tuple[int, int]]) -> int:
    """The rank offset of the ``index``-th combination of ``dims`` (size, stride), first dimension fastest."""
    total = 0
    for size, stride in dims:
        total += (index % size) * stride
        index //= size
    return total


def _sizes(cfg, world_size: int) -> dict:
    """Group sizes; raises ConfigError when megatron-core would refuse the world size."""
    p = cfg.parallel
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1")
    model = p.tp * p.pp * p.cp
    if world_size % model:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp x parallel.cp = "
            f"{p.tp} x {p.pp} x {p.cp} = {model}"
        )
    expert = EXPERT_TP * p.ep * p.pp  # megatron's expert_tensor x expert_model x pipeline parallel size
    if world_size % expert:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.ep x parallel.pp = {p.ep} x {p.pp} = {expert}"
        )
    return {
        "tp": p.tp,
        "pp": p.pp,
        "cp": p.cp,
        "ep": p.ep,
        "dp": world_size // model,
        "expert_dp": world_size // expert,
    }


def _generators(cfg, world_size: int):
    """(decoder, expert) rank generators, as initialize_model_parallel creates them for megafusion."""
    s = _sizes(cfg, world_size)
    decoder = RankGenerator(tp=s["tp"], ep=1, dp=s["dp"], pp=s["pp"], cp=s["cp"])
    expert = RankGenerator(tp=EXPERT_TP, ep=s["ep"], dp=s["expert_dp"], pp=s["pp"], cp=1)
    return decoder, expert


def groups(cfg, world_size: int) -> dict[str, list[list[int]]]:
    """Rank groups per dimension: tp, pp, dp, cp (decoder) and ep (expert generator)."""
    decoder, expert = _generators(cfg, world_size)
    out = {name: decoder.get_ranks(name) for name in ("tp", "pp", "dp", "cp")}
    out["ep"] = expert.get_ranks("ep")
    return out


def _rank_in_group(group_lists: list[list[int]], world_size: int) -> list[int]:
    """Position of every global rank inside its group (torch sorts a new group's ranks)."""
    where = [-1] * world_size
    for ranks in group_lists:
        for i, r in enumerate(sorted(ranks)):
            where[r] = i
    assert -1 not in where, "rank groups do not cover the world"
    return where


def _stage_layers(cfg) -> dict[int, list[list[int]]]:
    """pp rank -> per virtual chunk, the global 0-based layer indices megatron builds there: an even
    split into pp x vpp chunks, chunk ``v`` of stage ``p`` being the ``(v x pp + p)``-th."""
    p, m = cfg.parallel, cfg.model
    vpp = p.vpp if p.vpp and p.vpp > 1 else None
    if vpp is not None and p.pp == 1:
        raise ConfigError(f"parallel.vpp={p.vpp} needs parallel.pp>1")
    chunks = p.pp * (vpp or 1)
    if m.num_layers % chunks:
        raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by parallel.pp x parallel.vpp = {chunks}")
    per_chunk = m.num_layers // chunks
    return {
        pp_rank: [
            list(range((v * p.pp + pp_rank) * per_chunk, (v * p.pp + pp_rank + 1) * per_chunk)) for v in range(vpp or 1)
        ]
        for pp_rank in range(p.pp)
    }


def layout(cfg, world_size: int, nproc_per_node: int) -> list[dict]:
    """One dict per global rank (see the module docstring); creates no process group."""
    if nproc_per_node < 1 or world_size % nproc_per_node:
        raise ConfigError(
            f"world size {world_size} is not a multiple of the processes per node {nproc_per_node} "
            f"(--nproc-per-node): torchrun starts nnodes x nproc-per-node processes"
        )
    decoder, expert = _generators(cfg, world_size)
    coords = {name: _rank_in_group(decoder.get_ranks(name), world_size) for name in ("tp", "pp", "dp", "cp")}
    coords["ep"] = _rank_in_group(expert.get_ranks("ep"), world_size)
    stage_layers = _stage_layers(cfg)
    last_pp = cfg.parallel.pp - 1
    rows = []
    for rank in range(world_size):
        pp = coords["pp"][rank]
        chunks = stage_layers[pp]
        rows.append(
            {
                "rank": rank,
                "node": rank // nproc_per_node,
                "local_rank": rank % nproc_per_node,
                "tp": coords["tp"][rank],
                "pp": pp,
                "dp": coords["dp"][rank],
                "cp": coords["cp"][rank],
                "ep": coords["ep"][rank],
                "chunks": [list(c) for c in chunks],
                "layers": sorted(i for c in chunks for i in c),
                # GPTModel pre_process / post_process: first (last) pp stage, first (last) virtual chunk.
                "embedding": pp == 0,
                "output_layer": pp == last_pp,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Formatting


def _ranges(values) -> str:
    """[0, 1, 2, 3, 8, 9] -> '0-3,8-9'."""
    vs = sorted(set(values))
    if not vs:
        return "-"
    parts, start, prev = [], vs[0], vs[0]
    for v in vs[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)


def _chunks_text(chunks: list[list[int]]) -> str:
    if len(chunks) == 1:
        return _ranges(chunks[0])
    return " ".join(f"[{_ranges(c)}]" for c in chunks)


def _holds(row: dict) -> str:
    return ",".join(x for x, on in (("emb", row["embedding"]), ("out", row["output_layer"])) if on) or "-"


def _rank_formula(cfg, world_size: int, order: str) -> str:
    s = _sizes(cfg, world_size)
    sizes = {"tp": s["tp"], "cp": s["cp"], "ep": 1, "dp": s["dp"], "pp": s["pp"]}
    terms, stride = [], 1
    for name in order.split("-"):
        if sizes[name] > 1:
            terms.append(name if stride == 1 else f"{stride}*{name}")
        stride *= sizes[name]
    return "rank = " + (" + ".join(terms) if terms else "0")


def _group_summary(name: str, lists: list[list[int]], nproc_per_node: int) -> str:
    size = len(lists[0])
    if size == 1:
        return f"{name} {len(lists)} x [1]"
    nodes = max(len({r // nproc_per_node for r in g}) for g in lists)
    where = "within a node" if nodes == 1 else f"across {nodes} nodes"
    example = (
        _ranges(lists[0])
        if size > 4 and lists[0] == list(range(lists[0][0], lists[0][0] + size))
        else ",".join(map(str, lists[0][:6])) + (",..." if size > 6 else "")
    )
    return f"{name} {len(lists)} x [{size}] {where} (e.g. {example})"


def _fmt_table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    line = lambda cells: "  ".join(
        c.rjust(w) if i < len(cells) - 2 else c.ljust(w)  # noqa: E731
        for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()
    return [line(header)] + [line(r) for r in rows]


def format_layout(cfg, world_size: int, nproc_per_node: int, per_rank: bool | None = None) -> str:
    """A readable header and a table: per rank up to PER_RANK_MAX ranks, else per (node, pp stage)."""
    rows = layout(cfg, world_size, nproc_per_node)
    grp = groups(cfg, world_size)
    order = ORDER
    p, m, t = cfg.parallel, cfg.model, cfg.train
    s = _sizes(cfg, world_size)
    nnodes = world_size // nproc_per_node
    vpp = p.vpp if p.vpp and p.vpp > 1 else None

    dims = f"tp {p.tp} x pp {p.pp} x dp {s['dp']}" + (f" x cp {p.cp}" if p.cp > 1 else "")
    out = [
        f"megafusion launch plan: {world_size} processes = {nnodes} node{'s' if nnodes > 1 else ''}"
        f" x {nproc_per_node} per node",
        f"  world {world_size} = {dims}   (megatron-core order {order}: {_rank_formula(cfg, world_size, order)})",
    ]
    if p.ep > 1:
        out.append(
            f"  ep {p.ep}: expert-parallel groups are carved out of tp x dp x cp, whole experts on every rank "
            f"(expert dp {s['expert_dp']} = {world_size} / (ep {p.ep} x pp {p.pp}))"
        )
    out.append(
        f"  vpp {vpp if vpp else 'off'} | sp {'on' if p.sp else 'off'} | "
        f"distributed optimizer {'on' if p.distributed_optimizer else 'off'} | recompute {t.recompute}"
    )
    per_stage = m.num_layers // p.pp
    chunk_note = f", {per_stage // vpp} per virtual chunk (interleaved)" if vpp else ""
    out.append(
        f"  model {m.arch}: {m.num_layers} layers, {per_stage} per pipeline stage{chunk_note}; "
        f"hidden {m.hidden_size}, seq {m.seq_length}"
    )
    step = t.micro_batch_size * s["dp"]
    if t.global_batch_size % step == 0:
        n_micro = t.global_batch_size // step
        out.append(
            f"  batch: global {t.global_batch_size} = micro {t.micro_batch_size} x dp {s['dp']} x "
            f"{n_micro} microbatch{'es' if n_micro != 1 else ''} per step "
            f"({t.global_batch_size * m.seq_length:,} tokens per step)"
        )
    else:
        out.append(
            f"  batch: global {t.global_batch_size} is not divisible by micro {t.micro_batch_size} x "
            f"dp {s['dp']} = {step}"
        )
    summary = [
        _group_summary("tp", grp["tp"], nproc_per_node),
        _group_summary("pp", grp["pp"], nproc_per_node),
        _group_summary("dp", grp["dp"], nproc_per_node),
    ]
    if p.cp > 1:
        summary.append(_group_summary("cp", grp["cp"], nproc_per_node))
    if p.ep > 1:
        summary.append(_group_summary("ep", grp["ep"], nproc_per_node))
    out.append("  groups: " + "; ".join(summary))
    if any(len({r // nproc_per_node for r in g}) > 1 for g in grp["tp"]):
        out.append(
            f"  WARNING: tensor-parallel groups span nodes (parallel.tp={p.tp} > {nproc_per_node} "
            f"processes per node): TP traffic leaves NVLink; keep parallel.tp <= GPUs per node"
        )
    out.append(
        "  node = torchrun node rank (global rank = node x nproc-per-node + local rank); layers are "
        "global 0-based indices (megatron layer_number = index + 1)"
    )
    out.append("")

    show = ["cp"] if p.cp > 1 else []
    show += ["ep"] if p.ep > 1 else []
    if per_rank is None:
        per_rank = world_size <= PER_RANK_MAX
    if per_rank:
        header = ["rank", "node", "local", "tp", "pp", "dp", *show, "layers", "holds"]
        table = [
            [
                str(r["rank"]),
                str(r["node"]),
                str(r["local_rank"]),
                str(r["tp"]),
                str(r["pp"]),
                str(r["dp"]),
                *(str(r[k]) for k in show),
                _chunks_text(r["chunks"]),
                _holds(r),
            ]
            for r in rows
        ]
    else:
        header = ["node", "ranks", "local", "pp", "tp", "dp", *show, "layers", "holds"]
        table, bucket = [], {}
        for r in rows:
            bucket.setdefault((r["node"], r["pp"]), []).append(r)
        for (node, pp), rs in sorted(bucket.items()):
            table.append(
                [
                    str(node),
                    _ranges(x["rank"] for x in rs),
                    _ranges(x["local_rank"] for x in rs),
                    str(pp),
                    _ranges(x["tp"] for x in rs),
                    _ranges(x["dp"] for x in rs),
                    *(_ranges(x[k] for x in rs) for k in show),
                    _chunks_text(rs[0]["chunks"]),
                    _holds(rs[0]),
                ]
            )
    out += _fmt_table(table, header)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Command line


def _gpus_from_slurm(env) -> int | None:
    for key in ("GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        raw = env.get(key, "")
        # SLURM_GPUS_PER_NODE may read "8", "h100:8" or "gpu:h100:8".
        m = re.search(r"(\d+)\s*$", raw.split(",")[0])
        if m and int(m.group(1)) > 0:
            return int(m.group(1))
    return None


def _take_flags(argv: list[str]) -> tuple[dict, list[str]]:
    """Pull the launch-plan flags out of argv; the rest goes to parse_cli."""
    names = {
        "--world-size": "world_size",
        "--world_size": "world_size",
        "--nnodes": "nnodes",
        "--nproc-per-node": "nproc_per_node",
        "--nproc_per_node": "nproc_per_node",
    }
    flags: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, eq, value = tok.partition("=")
        if name in names:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name} needs a number: {name} N")
                value = argv[i + 1]
                i += 1
            try:
                n = int(value)
            except ValueError:
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}") from None
            if n < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {n}")
            flags[names[name]] = n
        elif tok in ("--json", "--per-rank", "--grouped", "-h", "--help"):
            flags[tok.lstrip("-")] = True
        elif tok == "--dry-run":
            pass  # accepted so that `megafusion.commands.train --dry-run ...` can forward its argv unchanged
        else:
            rest.append(tok)
        i += 1
    return flags, rest


def resolve_world(flags: dict, env=None) -> tuple[int, int, str]:
    """(world size, processes per node, where they came from) from flags, else the environment."""
    env = os.environ if env is None else env
    world, nnodes, nproc = flags.get("world_size"), flags.get("nnodes"), flags.get("nproc_per_node")
    source = "flags"
    if world is None and nnodes is None and nproc is None:
        if "WORLD_SIZE" in env:  # inside torchrun
            world = int(env["WORLD_SIZE"])
            nproc = int(env.get("LOCAL_WORLD_SIZE", world))
            source = "torchrun environment (WORLD_SIZE, LOCAL_WORLD_SIZE)"
        elif "SLURM_NNODES" in env:
            nnodes = int(env["SLURM_NNODES"])
            nproc = _gpus_from_slurm(env) or 8
            source = "SLURM environment (SLURM_NNODES x GPUs per node)"
        else:
            world, nproc, source = 1, 1, "default (one process; pass --world-size / --nproc-per-node)"
    if nproc is None:
        nproc = int(env["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in env else _gpus_from_slurm(env)
        if nproc is None:
            if world is None:
                raise ConfigError("--nnodes needs --nproc-per-node")
            nproc = 8 if world > 8 and world % 8 == 0 else world
            source += f" (--nproc-per-node not given: assumed {nproc})"
    if nnodes is not None:
        if world is not None and world != nnodes * nproc:
            raise ConfigError(f"--world-size {world} != --nnodes {nnodes} x --nproc-per-node {nproc}")
        world = nnodes * nproc
    if world is None:
        world = nproc
    return world, nproc, source


def layout_json(cfg, world_size: int, nproc_per_node: int, source: str = "") -> str:
    """The layout as JSON: sizes and groups on one line each, then one line per rank."""
    rows = layout(cfg, world_size, nproc_per_node)
    head = {
        "world_size": world_size,
        "nproc_per_node": nproc_per_node,
        "source": source,
        "order": ORDER,
        "sizes": _sizes(cfg, world_size),
    }
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    lines.append(f' "groups": {json.dumps(groups(cfg, world_size))},')
    ranks = ",\n".join(f"  {json.dumps(r)}" for r in rows)
    return "{\n" + "\n".join(lines) + '\n "ranks": [\n' + ranks + "\n ]\n}"


def dry_run(argv: list[str]) -> int:
    """``--config FILE [key=value ...] [--world-size N] [--nproc-per-node M]``: print the layout;
    a configuration that cannot run raises ConfigError."""
    flags, rest = _take_flags(list(argv))
    if flags.get("help") or flags.get("h"):
        print(USAGE)
        return 0
    path, overrides = parse_cli(rest)
    cfg = load_config(path, overrides)
    world, nproc, source = resolve_world(flags)

    validate(cfg, world)
    if flags.get("json"):
        text = layout_json(cfg, world, nproc, source)
    else:
        per_rank = True if flags.get("per-rank") else False if flags.get("grouped") else None
        text = format_layout(cfg, world, nproc, per_rank=per_rank) + f"\n(world size from {source})"
    print(text, flush=True)
    return 0
