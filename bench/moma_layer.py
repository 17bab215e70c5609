"""One MoMa layer against one dense (and one MoT) layer of equal active FLOPs: forward + backward.

The sibling of :mod:`bench.mot_layer`, whose inputs, layers, timing, FLOP counting and provenance it
reuses. Three single megatron-core ``TransformerLayer`` modules, built from the project's own specs,
get the same random hidden states ``[s, b, h]`` with RoPE and plain causal attention on the same
interleaved text / image / text ... layout:

- dense: ``dense_layer_spec`` (one SwiGLU MLP of width ``--ffn``);
- MoT: ``mot_layer_spec`` with ``untie=all`` (attention, MLP and norms per modality);
- MoMa: ``moma_layer_spec`` (``model.arch=moma``): attention and norms per modality as in MoT, the
  FFN megatron's ``MoELayer`` with megafusion's expert-choice router inside modality groups
  (``--experts``, default 4 text + 4 image experts), every expert a SwiGLU MLP of width ``--ffn``.

Equal active FLOPs: at the default capacity every expert of a group of ``E_g`` experts takes
``k_g = ceil(n_g / E_g)`` of the ``n_g`` tokens of its modality, so the experts run
``sum_g E_g k_g`` ~ ``n`` token-FFNs, one per token on average, like the dense MLP. The MoMa layer
then counts the dense layer's FLOPs plus the router's (``2 h E`` per token, x3 for forward +
backward) plus the ceil rounding. The run fails if FlopCounterMode's MoMa / dense ratio is off 1 by
more than ``FLOPS_TOLERANCE``; it records the ratio and whether the count equals that prediction.
MoT must count exactly the dense FLOPs, as in ``bench.mot_layer``.

Measured, alternating the cases every iteration (``bench.mot_layer.time_cases``):

- the whole layer, forward + backward, dense / MoT / MoMa;
- the MLP alone: megatron's ``MLP`` / MoT's ``ModalityMLP`` / MoMa's ``MoELayer`` (router, token
  dispatch, experts, combine);
- the expert-choice router alone (gating matmul, per-group top-k, sigmoid gates), forward + backward;
- Mixture-of-Depths: the dense layer as a MoD layer (``mod.capacity`` = ``--mod-capacity``, default
  0.125: each row's top ``floor(c x s)`` tokens run the block, the rest pass through), forward +
  backward. Its FLOPs are ``c`` of the dense layer's linear FLOPs and ``~c^2`` of its attention
  scores, plus the router; the GPU target is a time proportional to ``c`` within 10%
  (``|(MoD / dense) / c - 1| <= 0.10``): what skipping buys if the gather, the router and the
  shorter GEMMs cost nothing extra.

Usage::

    python -m bench.moma_layer [--hidden 512 --heads 8 --ffn 1376 --seq 1024 --batch 4
        --image-fraction 0.5 --iters 20 --warmup 5 --dtype auto --experts text=4,image=4
        --capacity text=0.25,image=0.25 --out PATH] [--quick]
    python -m bench.moma_layer --table-only       # re-render bench/results/moma_layer.md

Results go to ``--out`` (default ``bench/results/moma_layer_<device>.json``) and the markdown
table ``moma_layer.md`` beside it is re-rendered from every ``moma_layer_*.json`` there.
``--quick`` uses tiny sizes for tests; it writes only where ``--out`` says (else prints).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

from bench import mot_layer
from bench.mot_layer import (
    build_layer,
    count_flops,
    layer_flops,
    layer_shape,
    layer_step,
    make_cfg,
    make_inputs,
    mlp_step,
    peak_tflops,
    summary,
    time_cases,
)
from bench.provenance import write_table as write_results_table

BENCHMARK = "moma_layer"
RESULTS = mot_layer.RESULTS
RESULT_GLOB = "moma_layer_*.json"
TABLE_NAME = "moma_layer.md"
DEFAULT_EXPERTS = "text=4,image=4"  # MoMa 4t4i
# The router (2 h E per token) and the ceil of k_g are the only FLOPs MoMa adds to dense: 0.1 % at
# the default shape, 1 % at --quick. More than this means the experts are not at equal active FLOPs.
FLOPS_TOLERANCE = 0.03
GPU_TARGET_RATIO = 1.05  # the project's target for MoMa / dense on a GPU (the paper's MoMa lost 17 %)
CASES = ("dense", "mot", "moma")
DEFAULT_MOD_CAPACITY = 0.125  # the MoD paper's best capacity
MOD_TARGET_ERROR = 0.10  # GPU target: MoD / dense time within 10 % of the picked fraction


def parse_groups(text: str, kind: type, option: str, example: str) -> dict:
    """``text=4,image=4`` -> ``{"text": 4, "image": 4}`` (values of ``kind``)."""
    groups = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            groups[name.strip()] = kind(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"{option} {text!r}: write name=value pairs, e.g. {example}")
    return groups


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = mot_layer.argument_parser(BENCHMARK, __doc__.split("\n")[0])
    p.add_argument(
        "--experts",
        default=DEFAULT_EXPERTS,
        help=f"experts per group, moe.experts (default {DEFAULT_EXPERTS}; mixed=8: the modality-blind MoE)",
    )
    p.add_argument(
        "--capacity",
        default=None,
        help="expert-choice capacity per group, moe.capacity, e.g. text=0.25,image=0.25 (default 1/experts)",
    )
    p.add_argument(
        "--mod-capacity",
        type=float,
        default=DEFAULT_MOD_CAPACITY,
        help=f"the Mixture-of-Depths case's mod.capacity (default {DEFAULT_MOD_CAPACITY})",
    )
    args = mot_layer.resolve_sizes(p, p.parse_args(argv))
    try:
        args.experts = parse_groups(args.experts, int, "--experts", DEFAULT_EXPERTS)
        if args.capacity is not None:
            args.capacity = parse_groups(args.capacity, float, "--capacity", "text=0.25,image=0.25")
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    if not args.table_only:
        from megafusion.config.validate import validate
        from megafusion.core.errors import ConfigError

        try:  # megafusion's own checks of the moe section (groups, counts, capacities)
            validate(moma_cfg(make_cfg(args), args), world_size=1)
            validate(mod_cfg(make_cfg(args), args), world_size=1)
        except ConfigError as err:
            p.error(str(err))
    return args


def moma_cfg(cfg, args):
    """``cfg`` (dense / MoT) as ``model.arch=moma`` with the requested expert groups."""
    cfg = copy.deepcopy(cfg)
    cfg.model.arch = "moma"
    cfg.moe.experts, cfg.moe.capacity = dict(args.experts), args.capacity and dict(args.capacity)
    return cfg


def mod_cfg(cfg, args):
    """``cfg`` (dense) with its one layer a Mixture-of-Depths layer at ``--mod-capacity``."""
    cfg = copy.deepcopy(cfg)
    cfg.mod.capacity, cfg.mod.first, cfg.mod.every = args.mod_capacity, 1, 1
    return cfg


# ---------------------------------------------------------------------------- measurement


def router_step(router, inputs, device: torch.device):
    """Forward + backward of the expert-choice router alone: the gates' gradient reaches the router
    weight and the input (the selection itself carries none)."""
    x = inputs.x
    n = x.shape[0] * x.shape[1]
    # The router computes in fp32 (moe_router_dtype), whatever the layer's dtype.
    grad = torch.randn(n, router.weight.shape[0], generator=inputs.gen).to(device, torch.float32)

    def step():
        probs, _ = router(x)
        probs.backward(grad)

    return step, [x, *router.parameters()]


def group_tokens(groups, tokens: dict) -> list[int]:
    """Tokens of each expert group: a modality's own, or every token for the modality-blind group."""
    return [sum(tokens.values())] if groups.modality_blind else [tokens[name] for name in groups.names]


def expected_moma_flops(dense: int, groups, tokens: dict, hidden: int, ffn: int) -> dict:
    """What FlopCounterMode should count for the MoMa layer, from the dense layer's count.

    The layers differ only in the FFN (MoT-style attention multiplies each token by one copy, as
    dense does): the router's ``[N, h] x [h, E]`` matmul, and each expert's SwiGLU on its ``k_g``
    tokens instead of one MLP on every token. Every matmul counts x3 (forward, input and weight
    gradients): the router's gradient flows through the gates.
    """
    from megafusion.accounting.flops import BACKWARD_FACTOR
    from megafusion.accounting.image_modules import MATMUL_FLOPS_PER_MAC

    passes = 1 + BACKWARD_FACTOR
    n = sum(tokens.values())
    router = MATMUL_FLOPS_PER_MAC * passes * hidden * groups.total * n
    counts = group_tokens(groups, tokens)
    expert_tokens = sum(size * groups.tokens_per_expert(g, c) for g, (size, c) in enumerate(zip(groups.sizes, counts)))
    ffn_per_token = MATMUL_FLOPS_PER_MAC * passes * 3 * hidden * ffn  # fc1 h -> 2f ([gate; up]), fc2 f -> h
    rounding = (expert_tokens - n) * ffn_per_token
    return {"moma": dense + router + rounding, "router": router, "rounding": rounding, "expert_tokens": expert_tokens}


def measure(args, cfg, device: torch.device) -> dict:
    from megafusion.layers.expert_groups import ExpertGroups
    from megafusion.layers.routing import modality_routing
    from megafusion.models.dense import dense_layer_spec
    from megafusion.models.moma import manifest_keys, moma_layer_spec
    from megafusion.models.mot import mot_layer_spec
    from megafusion.models.registry import layer_spec
    from megafusion.models.transformer_config import build_transformer_config

    mcfg = moma_cfg(cfg, args)
    tconfig = build_transformer_config(cfg, device)
    # MoMa's own: megatron's MoE settings (experts, expert width = --ffn, dispatcher) on top.
    moma_tconfig = build_transformer_config(mcfg, device)
    dtype = tconfig.params_dtype
    layers = {
        "dense": build_layer(dense_layer_spec(cfg), tconfig, device, args.seed),
        "mot": build_layer(mot_layer_spec(cfg), tconfig, device, args.seed),
        "moma": build_layer(moma_layer_spec(mcfg), moma_tconfig, device, args.seed),
        "mod": build_layer(layer_spec(mod_cfg(cfg, args), 1), tconfig, device, args.seed),
    }
    inputs = make_inputs(args, cfg, tconfig, device)
    cases = {name: layer_step(layers[name], inputs) for name in (*CASES, "mod")}
    cases.update({f"mlp_{name}": mlp_step(layers[name].mlp, inputs) for name in CASES})
    cases["router"] = router_step(layers["moma"].mlp.router, inputs, device)

    groups = ExpertGroups.from_config(mcfg.moe)
    shape = layer_shape(args, cfg, tconfig, inputs.modality_ids)
    # Every MoT / MoMa module reads the routing; the dense layer ignores it.
    with modality_routing(inputs.routing):
        counted = {name: count_flops(*cases[name]) for name in (*CASES, "mod", "mlp_dense", "mlp_moma")}
        if counted["dense"] != counted["mot"]:
            raise RuntimeError(
                f"FlopCounterMode counts {counted['mot']} FLOPs for the MoT layer but {counted['dense']} for "
                f"dense: MoT must multiply each token by one modality's weights only (megafusion.ops.grouped_linear)"
            )
        expected = expected_moma_flops(counted["dense"], groups, shape["tokens"], args.hidden, args.ffn)
        flops_ratio = counted["moma"] / counted["dense"]
        if abs(flops_ratio - 1) > FLOPS_TOLERANCE:
            raise RuntimeError(
                f"FlopCounterMode counts {counted['moma']} FLOPs for the MoMa layer, x{flops_ratio:.4f} the dense "
                f"layer's {counted['dense']}: not equal active FLOPs (tolerance {FLOPS_TOLERANCE:.0%}). Predicted: "
                f"x{expected['moma'] / counted['dense']:.4f}, with the router's {expected['router']} and "
                f"{expected['rounding']} for the experts' {expected['expert_tokens']} token-FFNs on "
                f"{sum(shape['tokens'].values())} tokens. Each group's experts x capacity should give about one "
                f"expert per token (--capacity default 1/experts) on enough tokens that ceil(n_g / E_g) ~ n_g / E_g"
            )
        times = time_cases(cases, args.iters, args.warmup, device)

    analytic, model_flops = layer_flops(cfg, args.batch, args.seq)
    # MoMa's model FLOPs: the dense layer's plus what it adds (router, rounding), all matmuls.
    model = {"dense": model_flops, "mot": model_flops, "moma": model_flops + counted["moma"] - counted["dense"]}
    stats = {name: summary(ms) for name, ms in times.items()}
    tflops = {n: float(f"{model[n] / (stats[n]['median'] * 1e-3) / 1e12:.4g}") for n in CASES}
    peak = peak_tflops(device)

    def ratio(a: str, b: str) -> float:
        return round(stats[a]["median"] / stats[b]["median"], 4)

    per_expert = [groups.tokens_per_expert(g, n) for g, n in enumerate(group_tokens(groups, shape["tokens"]))]
    return {
        "shape": {
            **shape,
            "experts": dict(zip(groups.names, groups.sizes)),
            "capacity": dict(zip(groups.names, groups.capacities)),  # None: 1 / experts of the group
            "tokens_per_expert": dict(zip(groups.names, per_expert)),
            "expert_ffn": moma_tconfig.moe_ffn_hidden_size,
            "moma_untie": manifest_keys(mcfg)["untie"],  # the parts MoMa unties per modality, as MoT does
            "dispatcher": mcfg.moe.dispatcher,
        },
        "dtype": {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype],
        "iters": args.iters,
        "warmup": args.warmup,
        "seed": args.seed,
        "params": {n: sum(p.numel() for p in layer.parameters()) for n, layer in layers.items()},
        "layer_ms": {n: stats[n] for n in CASES},
        "ratio": ratio("moma", "dense"),
        "mot_ratio": ratio("mot", "dense"),
        "moma_over_mot": ratio("moma", "mot"),
        "mlp_ms": {n: stats[f"mlp_{n}"] for n in CASES},
        "mlp_ratio": ratio("mlp_moma", "mlp_dense"),
        "mlp_mot_ratio": ratio("mlp_mot", "mlp_dense"),
        "router_ms": {
            **stats["router"],
            "what": "expert-choice router alone (gating matmul, per-group top-k, sigmoid gates), forward + backward",
        },
        "flops": {
            "dense": counted["dense"],
            "mot": counted["mot"],
            "moma": counted["moma"],
            "ratio": round(flops_ratio, 6),
            "tolerance": FLOPS_TOLERANCE,
            "expected_moma": expected["moma"],
            "matches_expected": expected["moma"] == counted["moma"],
            "router": expected["router"],
            "rounding": expected["rounding"],
            "expert_tokens": expected["expert_tokens"],
            "mlp": {
                "dense": counted["mlp_dense"],
                "moma": counted["mlp_moma"],
                "ratio": round(counted["mlp_moma"] / counted["mlp_dense"], 6),
            },
            "counter": "FlopCounterMode, SDPBackend.MATH (full s x s attention)",
            "analytic": analytic,
            "matches_analytic": analytic == counted["dense"],
            "model": model,
            "model_note": "causal attention, megafusion.accounting.flops; MoMa's adds its counted router + rounding",
        },
        "tflops": tflops,
        "peak_tflops": peak,
        "mfu": None if peak is None else {n: round(v / peak, 4) for n, v in tflops.items()},
        "gpu_target": {
            "max_ratio": GPU_TARGET_RATIO,
            "met": None if device.type != "cuda" else ratio("moma", "dense") <= GPU_TARGET_RATIO,
        },
        "mod": mod_result(args, cfg, stats, counted, device),
    }


def mod_result(args, cfg, stats: dict, counted: dict, device: torch.device) -> dict:
    """The Mixture-of-Depths case: its time and FLOPs against dense's, and the GPU target.

    Expected FLOPs: the dense layer's on the ``k`` picked tokens of each row (math-kernel attention
    over ``k x k``) plus the router (``h -> 1`` per token, x3: its weight and input get gradients)."""
    from megafusion.accounting.flops import BACKWARD_FACTOR
    from megafusion.accounting.image_modules import MATMUL_FLOPS_PER_MAC

    c = args.mod_capacity
    ratio = round(stats["mod"]["median"] / stats["dense"]["median"], 4)
    picked = math.floor(round(c * args.seq, 9))
    router = MATMUL_FLOPS_PER_MAC * (1 + BACKWARD_FACTOR) * args.hidden * args.seq * args.batch
    expected = layer_flops(cfg, args.batch, picked)[0] + router
    return {
        "capacity": c,
        "picked_per_row": picked,
        "expected_flops": expected,
        "matches_expected": expected == counted["mod"],
        "layer_ms": stats["mod"],
        "ratio": ratio,
        "ratio_over_capacity": round(ratio / c, 4),
        "flops": counted["mod"],
        "flops_ratio": round(counted["mod"] / counted["dense"], 6),
        "gpu_target": {
            "max_error": MOD_TARGET_ERROR,
            "met": None if device.type != "cuda" else abs(ratio / c - 1) <= MOD_TARGET_ERROR,
        },
    }


# ---------------------------------------------------------------------------- table


def _ms(stat: dict) -> str:
    return f"{stat['median']:.2f} ({stat['p10']:.2f}-{stat['p90']:.2f})"


def _experts(shape: dict) -> str:
    """``4t4i`` (the paper's naming), ``8 mixed``; with the capacities when not 1 / experts."""
    experts, capacity = shape["experts"], shape["capacity"]
    if "mixed" in experts:
        text = f"{experts['mixed']} mixed"
    else:
        text = "".join(f"{v}{k[0]}" for k, v in experts.items())
    if any(c is not None for c in capacity.values()):
        text += " c=" + "/".join("1/E" if c is None else f"{c:g}" for c in capacity.values())
    return text


def _mod_cells(mod: dict | None) -> str:
    if not mod:
        return "- | -"
    return f"{mod['capacity']:g} | {mod['ratio']:.3f} ({mod['ratio_over_capacity']:.2f}, {mod['flops_ratio']:.4f})"


def render_table(results_dir: Path) -> str:
    """Markdown table, one row per ``moma_layer_*.json`` in ``results_dir``."""
    results = []
    for path in sorted(Path(results_dir).glob(RESULT_GLOB)):
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable moma_layer result ({err}); fix or remove it") from err
    lines = [
        "# One MoMa layer vs one dense and one MoT layer (forward + backward)",
        "",
        f"Generated by `python -m bench.moma_layer` from `{RESULT_GLOB}` in this folder; do not edit by hand.",
        "Times are the median (p10-p90) in ms over the timed iterations; ratios of medians. Shape: h hidden,",
        "H heads, f ffn (dense MLP and every expert), s sequence, b batch, img image fraction; experts: 4t4i =",
        "4 text + 4 image experts, expert-choice at capacity 1/E unless c= says. FLOPs = MoMa / dense",
        f"(FlopCounterMode; the router and ceil rounding only). GPU target: MoMa/dense <= {GPU_TARGET_RATIO}.",
        "MoD c: the dense layer as a Mixture-of-Depths layer at capacity c (each row's top floor(c x s) tokens",
        "run it); MoD/dense: its time over dense's, with (in brackets) that ratio over c and FlopCounterMode's",
        f"MoD/dense FLOPs. GPU target: MoD/dense within {MOD_TARGET_ERROR:.0%} of c. '-': measured before the",
        "MoD case existed.",
        "Rows marked (quick) are tiny smoke-test sizes, not results.",
        "",
        "| device | commit | date (UTC) | shape | experts | dtype, ops | dense ms | MoT ms | MoMa ms | MoT/dense "
        "| MoMa/dense | MLP MoMa/dense | FLOPs | MoD c | MoD/dense (/c, FLOPs) | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["device"]["name"], r["date"])):
        sh = r["shape"]
        shape = f"h{sh['hidden']} H{sh['heads']} f{sh['ffn']} s{sh['seq']} b{sh['batch']} img{sh['image_fraction']:g}"
        device = r["device"]["name"] + (" (quick)" if r.get("quick") else "")
        command = r["command"].replace("|", "\\|")
        ms = r["layer_ms"]
        lines.append(
            f"| {device} | {r['commit']} | {r['date']} | {shape} | {_experts(sh)} | "
            f"{r['dtype']}, {r.get('ops_backend', 'torch')} | "
            f"{_ms(ms['dense'])} | {_ms(ms['mot'])} | {_ms(ms['moma'])} | {r['mot_ratio']:.3f} | "
            f"{r['ratio']:.3f} | {r['mlp_ratio']:.3f} | {r['flops']['ratio']:.4f} | {_mod_cells(r.get('mod'))} | "
            f"`{command}` |"
        )
    return "\n".join(lines) + "\n"


def write_table(results_dir: Path) -> Path:
    return write_results_table(results_dir, TABLE_NAME, render_table)


# ---------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.table_only:
        print(f"wrote {write_table(Path(args.out).parent if args.out else RESULTS)}")
        return 0
    result = mot_layer.run(args, argv, benchmark=BENCHMARK, measure_fn=measure)
    lm, mm, fl = result["layer_ms"], result["mlp_ms"], result["flops"]
    print(
        f"{result['device']['name']} {result['dtype']} {_experts(result['shape'])}: layer dense "
        f"{lm['dense']['median']:.3f} ms, MoT {lm['mot']['median']:.3f} ms (x{result['mot_ratio']:.3f}), MoMa "
        f"{lm['moma']['median']:.3f} ms (x{result['ratio']:.3f}); MLP dense {mm['dense']['median']:.3f} ms, MoMa "
        f"{mm['moma']['median']:.3f} ms (x{result['mlp_ratio']:.3f}); router alone "
        f"{result['router_ms']['median']:.3f} ms; FLOPs MoMa/dense x{fl['ratio']:.4f}"
        f"{' (router + rounding, as expected)' if fl['matches_expected'] else ' (NOT the expected count)'}; MoD "
        f"c={result['mod']['capacity']:g} {result['mod']['layer_ms']['median']:.3f} ms (x{result['mod']['ratio']:.3f} "
        f"dense, x{result['mod']['ratio_over_capacity']:.2f} of c; FLOPs x{result['mod']['flops_ratio']:.4f})"
    )
    mot_layer.save_result(args, result, BENCHMARK, write_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
