"""What ``megafusion flops`` prints: exact parameter counts, forward + backward model FLOPs per
token at full causal attention over ``model.seq_length``, and a per-modality report on a
microbatch with the mask training counts (causal, same document, and the objective's own: e.g.
bidirectional within Transfusion's images, its caption dropout) next to the ``6 * N`` rule of
thumb. Nothing is built or run: the numbers are analytic (:mod:`megafusion.accounting.flops`).

An objective's extra modules (Transfusion: timestep embedding, patch embedding and head) are
counted per image; their latent shape and the number of images come from the microbatch's
``latents`` ``[images, C, H, W]``.

MoMa: total parameters (every expert and router) next to the active ones (what a token meets:
the router and its group's nominal experts per token), and on the microbatch each group's
experts on the tokens they take (``k_g`` each, from its routable tokens).

With ``train.recompute`` on, the microbatch's hardware FLOPs (model FLOPs plus the forward run
again in the backward pass, :mod:`megafusion.accounting.recompute`) follow the model FLOPs.
"""

from __future__ import annotations

from megafusion.accounting import flops as F
from megafusion.accounting import image_modules, params
from megafusion.accounting.recompute import recompute_flops
from megafusion.core.modality import MODALITY_NAMES, Modality
from megafusion.objectives.registry import get_objective


def _n(x: float) -> str:
    """Human-readable FLOPs: 1.23e9 -> '1.23 GFLOP'."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {suffix}FLOP"
    return f"{x:.4g} FLOP"


def flops_report(cfg, batch: dict) -> str:
    """Per-modality forward + backward model FLOPs of one microbatch, with the real mask.

    ``batch`` needs ``document_ids`` ``[b, s]``; ``modality_ids`` (absent = all text) and
    ``loss_mask`` are optional.
    """
    doc = batch["document_ids"]
    images = _images(batch)
    objective = get_objective(cfg.objective.name)
    stats = F.batch_flops(
        cfg,
        doc,
        batch.get("modality_ids"),
        batch.get("loss_mask"),
        **{**objective.flops_inputs(batch, cfg.data.cross_document()), **images},
    )
    full = F.batch_flops(cfg, doc, batch.get("modality_ids"), attention="full", **images)
    n = params.parameter_counts(cfg, images["latent_shape"])
    tokens = stats["tokens"]
    b, s = tuple(doc.shape) if doc.dim() == 2 else (1, doc.shape[-1])
    six_n = 6 * n["active"] * tokens
    lines = [
        f"microbatch [{b} x {s}] = {tokens} tokens, mean {stats['mean_attended_keys']:.2f} keys per query "
        f"(causal, {'across documents' if cfg.data.cross_document() else 'same document'}"
        f"{', bidirectional within each image' if 'image_ids' in batch else ''})",
        f"  {'modality':<10}{'tokens':>10}{'FLOPs/token':>14}{'attention':>11}{'share':>8}",
    ]
    for name in MODALITY_NAMES:
        t = stats["tokens_per_modality"][name]
        f = stats["per_modality"][name]
        a = stats["attention_per_modality"][name]
        per_tok = f"{_n(f / t)}" if t else "-"
        attn = f"{100 * a / f:.1f}%" if f else "-"
        share = f"{100 * f / stats['total']:.1f}%" if stats["total"] else "-"
        lines.append(f"  {name:<10}{t:>10}{per_tok:>14}{attn:>11}{share:>8}")
    lines += [
        *_routing_lines(cfg, stats),
        f"  total     {_n(stats['total'])} = {_n(stats['total'] / tokens)}/token "
        f"(dense matmuls {_n(stats['dense'])}, "
        + (f"experts {_n(stats['experts'])}, " if stats["experts"] else "")
        + f"attention {_n(stats['attention'])}"
        + (f", image modules {_n(stats['image_modules'])} for {stats['images']} images" if stats["images"] else "")
        + ")",
        f"  6*N*tokens {_n(six_n)} (N = {n['active']:,} active params; exact / 6NT = {stats['total'] / six_n:.3f})",
        f"  mask ignored (every query x all {s} keys, the mask-blind count of FlopCounterMode): "
        f"{_n(full['total'])} ({full['total'] / stats['total']:.3f}x)",
    ]
    lines.append(
        _recompute_line(cfg, batch, stats, {**objective.flops_inputs(batch, cfg.data.cross_document()), **images})
    )
    if "loss_tokens_per_modality" in stats:
        loss = ", ".join(f"{k} {v:g}" for k, v in stats["loss_tokens_per_modality"].items())
        diffusion = "; image patches train through the diffusion loss" if objective.image_latents else ""
        lines.append(f"  next-token loss tokens: {loss} (FLOPs are spent on every position regardless{diffusion})")
    return "\n".join(lines)


RECOMPUTED = {"selective": "core attention's forward", "full": "the transformer layers' forward"}


def _recompute_line(cfg, batch: dict, stats: dict, inputs: dict) -> str:
    """Hardware FLOPs under ``train.recompute`` (= the model FLOPs without recomputation)."""
    mode = cfg.train.recompute
    if mode == "none":
        return "  train.recompute=none: hardware FLOPs = model FLOPs (nothing is recomputed)"
    again = recompute_flops(cfg, batch["document_ids"], batch.get("modality_ids"), **inputs)["total"]
    return (
        f"  train.recompute={mode}: hardware FLOPs {_n(stats['total'] + again)} = model {_n(stats['total'])} + "
        f"{_n(again)} recomputed ({RECOMPUTED[mode]} again in the backward pass, "
        f"{100 * again / stats['total']:.1f}% more; MFU counts model FLOPs, HFU hardware FLOPs)"
    )


def _routing_lines(cfg, stats: dict) -> list[str]:
    """What the routed layers did with the microbatch ([] when no layer's FFN is routed)."""
    routable = [stats["routable_tokens_per_modality"][name] for name in MODALITY_NAMES]
    said = []
    for cost in params.layer_costs(cfg):
        if cost.explain is None:
            continue
        if cost.block_routable is None:
            line = ("other layers: " if any(c.block_routable for c in params.layer_costs(cfg)) else "") + cost.explain(
                routable
            )
        else:  # a Mixture-of-Depths layer routes only the tokens it picked
            picked = cost.block_routable(stats["routable_tokens_per_row"])
            line = f"MoD layers, of the picked tokens: {cost.explain(picked)}"
        if line not in said:
            said.append(line)
    if not said:
        return []
    padding = stats["tokens"] - sum(routable)
    return [
        f"  routed layers (per layer): {'; '.join(said)}; the router on all {stats['tokens']} tokens"
        + (f" ({padding} padding, never routed)" if padding else "")
    ]


def _images(batch: dict) -> dict:
    """``num_images`` and ``latent_shape`` for ``batch_flops`` from a Transfusion microbatch's ``latents``."""
    latents = batch.get("latents")
    if latents is None:
        return {"num_images": None, "latent_shape": None}
    return {"num_images": int(latents.shape[0]), "latent_shape": tuple(latents.shape[1:])}


def summary(cfg, latent_shape: tuple[int, int, int] | None = None) -> str:
    """Parameters and per-token FLOPs at full causal attention over ``model.seq_length``, and
    (Transfusion) the image modules' per image; ``latent_shape`` is needed for ``latent_codec=kl``."""
    m = cfg.model
    n = params.parameter_counts(cfg, latent_shape)
    s = m.seq_length
    keys = F.causal_mean_attended_keys(s)
    # LMFusion: a text token's frozen weights skip their weight gradients; MoMa groups of different
    # E_g * c_g meet different numbers of experts: report text tokens' count (image tokens' is on
    # its own line).
    dense = F.dense_flops_per_token(cfg, modality=Modality.TEXT)
    image_dense = F.dense_flops_per_token(cfg, modality=Modality.IMAGE)
    split = dense != image_dense
    attn = F.attention_flops_per_key(cfg) * keys
    total = dense + attn
    w = 22
    experts = params.describe_layers(cfg)
    active_note = (
        "  (per token: router + nominal experts; "
        + ", ".join(f"{name} {n[f'active/{name}']:,}" for name in MODALITY_NAMES)
        + ")"
        if experts and len({n[f"active/{name}"] for name in MODALITY_NAMES}) > 1
        else "  (per token: router + nominal experts)"
        if experts
        else ""
    )
    matmul_note = (
        "  (attention, router and the nominal experts per token; the microbatch below is exact)"
        if experts
        else f"  (= 6 x {n['matmul']:,} matmul weights)"
    )
    lines = [
        f"model: arch {m.arch}, {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads} "
        f"({m.effective_num_query_groups()} kv), ffn {m.effective_ffn_hidden_size()}, vocab {m.vocab_size}, "
        f"seq {s}",
        *([f"layers: {experts}"] if experts else []),
        "parameters:",
        f"  {'total':<{w}}{n['total']:>16,}",
        f"  {'embedding':<{w}}{n['embedding']:>16,}  (input lookup: 0 FLOPs)",
        f"  {'output layer':<{w}}{n['output_layer']:>16,}",
        f"  {'non-embedding':<{w}}{n['non_embedding']:>16,}  (total - embedding - output layer)",
        *(
            [
                f"  {'experts':<{w}}{n['experts']:>16,}  (every expert of every layer)",
                f"  {'routers':<{w}}{n['router']:>16,}  (fp32, every token)",
            ]
            if experts
            else []
        ),
        f"  {'active':<{w}}{n['active']:>16,}{active_note}",
        *([f"  {'trainable':<{w}}{n['trainable']:>16,}  (LMFusion: the rest is frozen)"] if m.freeze_text else []),
        *(
            [
                f"  {'image modules':<{w}}{n['image_modules']:>16,}  (objective.patchify={cfg.objective.patchify}; "
                "in total, non-embedding and active)"
            ]
            if n["image_modules"]
            else []
        ),
        "model FLOPs per token, forward + backward (matmuls only, multiply-add = 2, backward = 2 x forward):",
        *(
            [
                f"  {'dense matmuls, text':<{w}}{_n(dense):>16}"
                + ("  (frozen weights: forward + input gradient only)" if m.freeze_text else ""),
                f"  {'dense matmuls, image':<{w}}{_n(image_dense):>16}",
            ]
            if split
            else [f"  {'matmuls' if experts else 'dense matmuls':<{w}}{_n(dense):>16}{matmul_note}"]
        ),
        f"  {'causal attention':<{w}}{_n(attn):>16}  (seq {s}: mean {keys:g} keys per query)",
        f"  {'total' + (', text' if split else ''):<{w}}{_n(total):>16}",
        f"  {'6N rule (N = active)':<{w}}{_n(6 * n['active']):>16}  (exact / 6N = {total / (6 * n['active']):.3f})",
        f"  {'forward only':<{w}}{_n(F.flops_per_token(cfg, keys, forward_only=True, modality=Modality.TEXT)):>16}",
    ]
    if n["image_modules"]:
        per_image = image_modules.image_flops_per_image(cfg, latent_shape)
        lines.append(
            f"image modules per image, forward + backward: {_n(per_image['total'])} ("
            + ", ".join(f"{name} {_n(flops)}" for name, flops in per_image.items() if name != "total")
            + ")"
        )
    return "\n".join(lines)
