"""Hugging Face ``LlamaForCausalLM`` <-> megafusion dense model: config and tensors, both ways.

Pure mapping (torch only, no megatron-core, no transformers): the checkpoint I/O and the
command line live in :mod:`megafusion.interop.hf_io`.

Config: HF ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``, ``rms_norm_eps``, ``tie_word_embeddings`` and
RoPE (``rope_parameters`` in transformers >= 5, ``rope_theta`` + ``rope_scaling`` in older
config.json files; types ``default`` and ``llama3``) become ``model.num_layers`` ...
``model.tie_embeddings``, ``model.rope_theta`` and ``model.rope_scaling``; Llama has no
QK-norm (``model.qk_norm=false``), no biases and SiLU-gated MLPs, which is what megafusion's
dense model is. Anything else (biases, other activations, another head_dim, other RoPE types,
other architectures) is refused by name.

Tensors (HF name -> megafusion global name, ``L`` = layer index):

* ``model.embed_tokens.weight`` -> ``embedding.word_embeddings.weight``;
  ``lm_head.weight`` -> ``output_layer.weight`` (absent when tied);
  ``model.norm.weight`` -> ``decoder.final_layernorm.weight``. The vocabulary rows are kept
  and zero rows appended up to megafusion's (tensor-parallel divisible) ``vocab_size``; the
  export drops them again.
* ``model.layers.L.input_layernorm.weight`` -> ``decoder.layers.L.input_layernorm.weight``,
  ``model.layers.L.post_attention_layernorm.weight`` -> ``decoder.layers.L.pre_mlp_layernorm.weight``.
* ``q_proj``, ``k_proj``, ``v_proj`` -> ``self_attention.linear_qkv.weight``, megatron-core's
  fused ``[(heads + 2 * groups) * head_dim, hidden]`` laid out *per query group*: for group
  ``g`` its ``heads / groups`` query heads, then key head ``g``, then value head ``g``
  (``SelfAttention.get_query_key_value_tensors`` views the output as ``[.., groups,
  (heads/groups + 2) * head_dim]`` and splits it in that order). Query head ``i`` thereby
  reads kv head ``i // (heads/groups)``, as HF's ``repeat_kv`` does.
* ``o_proj`` -> ``self_attention.linear_proj.weight`` (as is).
* ``gate_proj``, ``up_proj`` -> ``mlp.linear_fc1.weight = [gate; up]``: megatron's MLP
  ``glu`` chunks fc1's output in two and applies SiLU to the *first* half, times the second
  (``down_proj(silu(gate(x)) * up(x))`` in HF). ``down_proj`` -> ``mlp.linear_fc2.weight``.

RoPE needs no permutation: HF's Llama checkpoints store q/k for ``rotate_half`` (the first
and second halves of each head form the rotated pairs), and megatron-core's non-interleaved
rotary embedding uses ``rotate_half`` too (the logits tests check this).
"""

from __future__ import annotations

import torch

from megafusion.core.errors import ConversionError

ARCHITECTURE = "LlamaForCausalLM"
ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
DEFAULT_THETA = 10000.0  # transformers' default when a config names no rope_theta

# Per-layer tensors that map one to one (HF suffix -> megafusion suffix).
_LAYER_SAME = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
EMBED, LM_HEAD, FINAL_NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
MF_EMBED, MF_OUTPUT, MF_FINAL_NORM = (
    "embedding.word_embeddings.weight",
    "output_layer.weight",
    "decoder.final_layernorm.weight",
)


class UnsupportedModel(ConversionError, ValueError):
    """An HF config or checkpoint this importer cannot represent exactly; the message says why."""


# ------------------------------------------------------------------ config


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, model.rope_scaling) of an HF config dict, either serialisation."""
    params = hf.get("rope_parameters")
    if params is None:  # config.json of transformers < 5: rope_theta + rope_scaling
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", DEFAULT_THETA))
    if not isinstance(params, dict) or set(params) & {"full_attention", "sliding_attention"}:
        raise UnsupportedModel(
            f"rope_parameters={params!r}: per-layer-type RoPE is not Llama's; "
            f"only one rope_type ({', '.join(ROPE_TYPES)}) for every layer is supported"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModel(
            f"rope_type={rope_type!r} is not supported: megafusion imports plain RoPE "
            f"('default') and Llama-3 scaling ('llama3')"
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModel(
            f"partial_rotary_factor={params['partial_rotary_factor']}: megafusion rotates whole heads (1.0) only"
        )
    theta = float(params.get("rope_theta", DEFAULT_THETA))
    if rope_type == "default":
        return theta, None
    missing = [k for k in LLAMA3_KEYS if k not in params]
    if missing:
        raise UnsupportedModel(f"rope_type='llama3' needs {', '.join(LLAMA3_KEYS)}; the config lacks {missing}")
    scaling = {k: params[k] for k in LLAMA3_KEYS}
    scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        scaling[k] = float(scaling[k])
    return theta, scaling


def model_section(hf: dict) -> dict:
    """The ``model:`` config section (without ``vocab_size``) equal to the HF Llama config ``hf``.

    ``hf`` is ``LlamaConfig.to_dict()`` (defaults filled in) or a raw config.json dict.
    """
    archs = hf.get("architectures") or [ARCHITECTURE]
    if hf.get("model_type", "llama") != "llama" or list(archs) != [ARCHITECTURE]:
        raise UnsupportedModel(
            f"model_type={hf.get('model_type')!r}, architectures={archs}: only Llama "
            f"(model_type 'llama', {ARCHITECTURE}) checkpoints can be imported"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise UnsupportedModel(
                f"{key}=true: megafusion's dense model has no biases; only {key}=false "
                f"Llama checkpoints can be imported"
            )
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act={hf['hidden_act']!r}: megafusion's MLP is SwiGLU; only 'silu' is supported")
    if hf.get("quantization_config"):
        raise UnsupportedModel("quantization_config is set: import an unquantised (fp32 / bf16 / fp16) checkpoint")
    heads, hidden = int(hf["num_attention_heads"]), int(hf["hidden_size"])
    groups = int(hf.get("num_key_value_heads") or heads)
    head_dim = hf.get("head_dim") or hidden // heads
    if hidden % heads or head_dim != hidden // heads:
        raise UnsupportedModel(
            f"head_dim={head_dim} with hidden_size={hidden} and num_attention_heads={heads}: "
            f"megafusion's heads are hidden_size / num_attention_heads wide"
        )
    if heads % groups:
        raise UnsupportedModel(f"num_key_value_heads={groups} does not divide num_attention_heads={heads}")
    theta, scaling = _rope(hf)
    return {
        "arch": "dense",
        "num_layers": int(hf["num_hidden_layers"]),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "ffn_hidden_size": int(hf["intermediate_size"]),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "qk_norm": False,
        "norm_placement": "pre",
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def padded_vocab_size(hf_vocab: int, multiple: int) -> int:
    """megafusion's vocabulary for ``hf_vocab`` ids: the next multiple of ``multiple``."""
    return -(-hf_vocab // multiple) * multiple


def llama_config_kwargs(model: dict, vocab_size: int) -> dict:
    """``LlamaConfig`` keyword arguments (transformers >= 5) of a megafusion ``model`` section."""
    m = model
    rope = {"rope_type": "default", "rope_theta": float(m["rope_theta"])}
    if m.get("rope_scaling"):
        rope = {"rope_type": "llama3", "rope_theta": float(m["rope_theta"]), **m["rope_scaling"]}
    heads = m["num_attention_heads"]
    return {
        "vocab_size": vocab_size,
        "hidden_size": m["hidden_size"],
        "intermediate_size": m["ffn_hidden_size"] or 4 * m["hidden_size"],
        "num_hidden_layers": m["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": m["num_query_groups"] or heads,
        "head_dim": m["hidden_size"] // heads,
        "hidden_act": "silu",
        "rms_norm_eps": m["norm_eps"],
        "tie_word_embeddings": bool(m.get("tie_embeddings")),
        "rope_parameters": rope,
        "attention_bias": False,
        "mlp_bias": False,
    }


def check_exportable(model: dict) -> None:
    """Refuse megafusion models that are not a Llama, naming the setting."""
    wrong = {
        k: model.get(k)
        for k, want in (("arch", "dense"), ("qk_norm", False), ("norm_placement", "pre"))
        if model.get(k) != want
    }
    if wrong:
        raise UnsupportedModel(
            "a Llama is a dense pre-norm model without QK-norm; this checkpoint has "
            + ", ".join(f"model.{k}={v!r}" for k, v in wrong.items())
            + " (needed: model.arch=dense, model.qk_norm=false, model.norm_placement=pre)"
        )


# ------------------------------------------------------------------ tensors


def _pad_rows(weight: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    if weight.shape[0] > rows:
        raise UnsupportedModel(f"{name} has {weight.shape[0]} rows, more than model.vocab_size={rows}")
    if weight.shape[0] == rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """HF q/k/v projections -> megatron's per-group ``[q heads of g; k_g; v_g]`` fused weight."""
    hidden, head_dim = q.shape[1], q.shape[0] // heads
    q = q.reshape(groups, heads // groups * head_dim, hidden)
    k, v = k.reshape(groups, head_dim, hidden), v.reshape(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`fuse_qkv`."""
    hidden = qkv.shape[1]
    head_dim = qkv.shape[0] // (heads + 2 * groups)
    per_group = qkv.reshape(groups, (heads // groups + 2) * head_dim, hidden)
    q, k, v = per_group.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def hf_to_mf(hf_state: dict[str, torch.Tensor], model: dict, vocab_size: int) -> dict[str, torch.Tensor]:
    """HF tensors -> ``{megafusion global name: tensor}`` for the model section ``model`` whose
    vocabulary is ``vocab_size`` rows (the HF rows, then zeros). Every HF tensor must be used."""
    heads, groups = model["num_attention_heads"], model["num_query_groups"]
    # Older exports carry RoPE's inverse frequencies as buffers; they are recomputed from the config.
    todo = {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}
    out = {}

    def take(name: str) -> torch.Tensor:
        if name not in todo:
            raise UnsupportedModel(
                f"the checkpoint has no tensor {name!r}, which a {ARCHITECTURE} with this "
                f"config.json must have: is the checkpoint complete?"
            )
        return todo.pop(name)

    out[MF_EMBED] = _pad_rows(take(EMBED), vocab_size, EMBED)
    if model["tie_embeddings"]:
        head = todo.pop(LM_HEAD, None)  # some exports store the tied head anyway
        if head is not None and not torch.equal(head, out[MF_EMBED][: head.shape[0]]):
            raise UnsupportedModel(
                f"tie_word_embeddings=true but {LM_HEAD} differs from {EMBED}: fix the "
                f"config.json's tie_word_embeddings"
            )
    else:
        out[MF_OUTPUT] = _pad_rows(take(LM_HEAD), vocab_size, LM_HEAD)
    out[MF_FINAL_NORM] = take(FINAL_NORM)
    for layer in range(model["num_layers"]):
        hf, mf = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        for src, dst in _LAYER_SAME.items():
            out[mf + dst] = take(hf + src)
        q, k, v = (take(hf + name) for name in _QKV)
        out[mf + "self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, heads, groups)
        out[mf + "mlp.linear_fc1.weight"] = torch.cat([take(hf + name) for name in _GATE_UP])
    if todo:
        raise UnsupportedModel(
            f"the checkpoint holds tensors a {ARCHITECTURE} with this config.json does not "
            f"have (biases? more layers?): {sorted(todo)[:8]}"
        )
    return out


def mf_to_hf(mf_state: dict[str, torch.Tensor], model: dict, vocab_size: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_mf`: HF tensors with the first ``vocab_size`` vocabulary rows
    (``lm_head.weight`` absent when tied, as ``save_pretrained`` writes it)."""
    heads, groups = model["num_attention_heads"], model["num_query_groups"] or model["num_attention_heads"]
    out = {EMBED: mf_state[MF_EMBED][:vocab_size], FINAL_NORM: mf_state[MF_FINAL_NORM]}
    if not model.get("tie_embeddings"):
        out[LM_HEAD] = mf_state[MF_OUTPUT][:vocab_size]
    for layer in range(model["num_layers"]):
        hf, mf = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        for src, dst in _LAYER_SAME.items():
            out[hf + src] = mf_state[mf + dst]
        qkv = split_qkv(mf_state[mf + "self_attention.linear_qkv.weight"], heads, groups)
        out.update({hf + name: t for name, t in zip(_QKV, qkv)})
        out.update({hf + name: t for name, t in zip(_GATE_UP, mf_state[mf + "mlp.linear_fc1.weight"].chunk(2))})
    # Own storage for every tensor: fc1's halves and the vocabulary slices are views, and shared
    # storage reads as tied weights to save_pretrained.
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}
