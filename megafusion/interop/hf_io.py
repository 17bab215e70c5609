"""``megafusion convert hf-to-mf`` / ``mf-to-hf``: Hugging Face Llama checkpoints in and out.

    megafusion convert hf-to-mf --hf DIR --output CKPT_DIR [--config-out FILE.yaml]
        [--vocab-multiple 128 | --vocab-size N]
    megafusion convert mf-to-hf --ckpt CKPT --output DIR [--vocab-size N]

``hf-to-mf`` reads a ``LlamaForCausalLM`` directory (config.json + ``model.safetensors`` or
sharded ``model-*.safetensors`` with their index) and writes a weights-only megafusion
checkpoint of the dense model with exactly those weights (the vocabulary padded with zero
rows to a multiple of ``--vocab-multiple``, so any tensor-parallel size up to it divides it, or
to ``--vocab-size`` rows).
Train or evaluate from it in any TP / PP layout with ``checkpoint.init_from=CKPT_DIR`` and the
``model:`` section it prints (``--config-out`` also writes it as YAML). ``mf-to-hf`` loads a
checkpoint saved in any layout and writes ``config.json`` + safetensors with
transformers' ``save_pretrained``; the padding rows are dropped (``--vocab-size``, default:
the vocabulary of the HF model it was imported from, found through ``checkpoint.init_from``
for runs started from an import; else all rows are kept). From a MoT, Transfusion or LMFusion
checkpoint it exports the text path: the text copies under dense names, no image modules, and
LMFusion's new-token deltas folded into their rows (for an LMFusion model trained from an
import this gives back the imported Llama exactly).

Both run in one process (TP = PP = 1: megatron-core's dist_checkpointing reshards) and hold
the model once in the checkpoint's dtype plus one copy of its tensors. The tensor mapping is
:mod:`megafusion.interop.hf_llama`. Reading config.json and writing the HF model need
``transformers`` (``pip install 'megafusion[hf]'``), imported only here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megafusion import checkpoint as ck
from megafusion.core.errors import ConversionError
from megafusion.interop import hf_llama

# Non-architecture fields of the HF config that an export carries over from the imported model.
_KEPT_HF_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "initializer_range")
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ConversionError(
            "Hugging Face conversion needs transformers: pip install 'megafusion[hf]' (or pip install transformers)"
        ) from err
    return transformers


def _check_empty(path: Path) -> None:
    """Refuse a non-empty output directory before any work (nothing is ever overwritten)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConversionError(f"--output {path} exists and is not an empty directory: choose a new output directory")


# ------------------------------------------------------------------ reading an HF directory


def read_hf_config(hf_dir: Path) -> dict:
    """The full config dict (transformers' defaults filled in) of a Llama directory."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"{hf_dir} has no config.json: give the directory save_pretrained wrote (config.json + *.safetensors)"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path} is unreadable: {err}") from err
    hf_llama.model_section(raw)  # refuse other architectures before transformers interprets the file
    return _transformers().LlamaConfig.from_pretrained(str(hf_dir)).to_dict()


def read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors``, or of the shards its index lists."""
    from safetensors.torch import load_file

    index, single = hf_dir / "model.safetensors.index.json", hf_dir / "model.safetensors"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif single.is_file():
        files = [single.name]
    else:
        found = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
        raise ConversionError(
            f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json "
            f"(found {found or 'no weight files'}): only safetensors checkpoints are read; "
            f"convert with transformers: from_pretrained(DIR).save_pretrained(NEW_DIR)"
        )
    tensors = {}
    for name in files:
        tensors.update(load_file(str(hf_dir / name)))
    return tensors


# ------------------------------------------------------------------ hf-to-mf


def hf_to_mf(
    hf_dir: str, out: str, config_out: str | None = None, vocab_multiple: int = 128, vocab_size: int | None = None
) -> dict:
    """Convert; returns the ``model:`` section of the written checkpoint. ``vocab_size``: the
    model's rows (room for more ids, e.g. image codes after the text vocabulary); default
    HF's vocabulary rounded up to a multiple of ``vocab_multiple``."""
    from megafusion.config import validate
    from megafusion.config.schema import Config
    from megafusion.models.param_layout import global_param_names
    from megafusion.models.transformer_config import build_transformer_config
    from megafusion.objectives.build import build_model_chunks
    from megafusion.runtime import initialize, shutdown

    src = Path(hf_dir)
    if not src.is_dir():
        raise ConversionError(f"--hf {src} is not a directory: give a LlamaForCausalLM save_pretrained directory")
    if vocab_multiple < 1:
        raise ConversionError(f"--vocab-multiple={vocab_multiple} must be >= 1 (128 fits any TP size up to 128)")
    _check_empty(Path(out))
    hf_cfg = read_hf_config(src)
    section = hf_llama.model_section(hf_cfg)
    hf_vocab = int(hf_cfg["vocab_size"])
    if vocab_size is not None and vocab_size < hf_vocab:
        raise ConversionError(
            f"--vocab-size {vocab_size} is smaller than the HF vocabulary ({hf_vocab} rows): "
            f"give {hf_vocab} or more, or leave it out"
        )
    section["vocab_size"] = vocab_size or hf_llama.padded_vocab_size(hf_vocab, vocab_multiple)
    tensors = read_hf_tensors(src)
    dtype = tensors[hf_llama.EMBED].dtype if hf_llama.EMBED in tensors else torch.float32
    if dtype not in _DTYPES:  # fp16: fp32 holds it exactly
        dtype = torch.float32
    state = hf_llama.hf_to_mf({k: v.to(dtype) for k, v in tensors.items()}, section, section["vocab_size"])
    del tensors

    cfg = Config()
    for key, value in section.items():
        setattr(cfg.model, key, value)
    cfg.model.params_dtype = _DTYPES[dtype]
    validate(cfg, 1)
    runtime = initialize(cfg)
    try:
        model = build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime)
        params = global_param_names(model[0])
        if sorted(params) != sorted(state):
            raise ConversionError(
                f"internal: the dense model's parameters {sorted(set(params) ^ set(state))} "
                f"do not match the mapped tensors"
            )
        with torch.no_grad():
            for name, param in params.items():
                if param.shape != state[name].shape:
                    raise ConversionError(
                        f"{name}: the checkpoint gives shape {tuple(state[name].shape)}, the "
                        f"model from config.json needs {tuple(param.shape)}: config.json and "
                        f"the safetensors files do not belong together"
                    )
                param.copy_(state[name])
        origin = {
            "conversion": "hf-to-mf",
            "converted_from": str(src.resolve()),
            "hf_vocab_size": hf_vocab,
            "hf_config": {k: hf_cfg.get(k) for k in _KEPT_HF_FIELDS},
        }
        ck.save_weights(out, model, cfg, None, origin)
    finally:
        shutdown()
    if config_out:
        write_model_yaml(config_out, section, src)
    return section


def write_model_yaml(path: str, section: dict, src: Path) -> None:
    import yaml

    header = (
        f"# The model of the Hugging Face Llama in {src} (megafusion convert hf-to-mf).\n"
        f"# Use with checkpoint.init_from=<its converted checkpoint>; seq_length, params_dtype and\n"
        f"# the rest of the model section are the run's own choice. vocab_size is the import's rows: set\n"
        f"# model.vocab_size=null when the run's data adds ids (<boi>, <eoi>, image ids); the warm start\n"
        f"# grows the vocabulary (new rows start at zero).\n"
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(header + yaml.safe_dump({"model": section}, sort_keys=False))


# ------------------------------------------------------------------ mf-to-hf


def _parent(manifest: dict):
    """The checkpoint ``manifest``'s weights came from: ``checkpoint.init_from``, or the input of a
    ``convert dense-to-mot`` / ``convert upcycle``; None if neither."""
    parent = ((manifest.get("config") or {}).get("checkpoint") or {}).get("init_from")
    origin = manifest.get("origin") or {}
    if not parent and origin.get("conversion") in ("dense-to-mot", "upcycle"):
        parent = origin.get("converted_from")
    return parent


def hf_origin(manifest: dict, hops: int = 8) -> dict:
    """The ``origin`` of the ``hf-to-mf`` import a checkpoint descends from (its own, or through
    ``checkpoint.init_from`` / ``convert dense-to-mot``), {} if none (or the chain is broken)."""
    for _ in range(hops):
        origin = manifest.get("origin") or {}
        if origin.get("conversion") == "hf-to-mf":
            return origin
        parent = _parent(manifest)
        if not parent:
            break
        try:
            manifest = ck.read_manifest(ck.resolve_checkpoint(parent))
        except ck.CheckpointError:  # moved or deleted since: export every vocabulary row
            break
    return {}


def mf_to_hf(src: str, out: str, vocab_size: int | None = None) -> tuple[Path, bool]:
    """Convert; returns the output directory and whether only the model's text path was exported
    (a MoT's text copies, a Transfusion model without its image modules)."""
    from megafusion.core.choices import MOT_PARTS
    from megafusion.inference.load import checkpoint_config, model_from_checkpoint
    from megafusion.models.param_layout import global_param_names
    from megafusion.models.registry import layer_cost
    from megafusion.objectives.registry import get_objective
    from megafusion.runtime import shutdown

    transformers = _transformers()
    target = Path(out)
    _check_empty(target)
    source = checkpoint_config(src)
    manifest, cfg = source.manifest, source.cfg
    # The text path is the Llama: without the copies a family keeps per modality (MoT: the image
    # copies) and the modules an objective adds (Transfusion: the image modules); the plain LM
    # is built and the checkpoint's other tensors are simply not read.
    costs = [layer_cost(cfg, layer) for layer in range(1, cfg.model.num_layers + 1)]
    text_half = any(cost.copies_of(part) > 1 for cost in costs for part in MOT_PARTS) or bool(
        get_objective(cfg.objective.name).extra_modules
    )
    cfg.objective.name = "lm"
    model_section = {**cfg.to_dict()["model"], "arch": "dense"}
    hf_llama.check_exportable(model_section)
    origin = hf_origin(manifest)
    vocab = vocab_size or origin.get("hf_vocab_size") or cfg.model.vocab_size
    if not 1 <= vocab <= cfg.model.vocab_size:
        raise ConversionError(f"--vocab-size {vocab} must be between 1 and the model's {cfg.model.vocab_size} rows")
    model_section["num_query_groups"] = cfg.model.effective_num_query_groups()
    model_section["ffn_hidden_size"] = cfg.model.effective_ffn_hidden_size()
    loaded = model_from_checkpoint(source)
    try:
        state = {name: p.detach().cpu() for name, p in global_param_names(loaded.chunks[0]).items()}
    finally:
        shutdown()
    if text_half:
        state = text_path_state(state)
    hf_state = hf_llama.mf_to_hf(state, model_section, vocab)
    dtype = state[hf_llama.MF_EMBED].dtype
    kept = {k: v for k, v in (origin.get("hf_config") or {}).items() if k in _KEPT_HF_FIELDS}
    kept.setdefault("max_position_embeddings", cfg.model.seq_length)
    config = transformers.LlamaConfig(
        **hf_llama.llama_config_kwargs(model_section, vocab), **kept, architectures=[hf_llama.ARCHITECTURE], dtype=dtype
    )
    # No random init: the modules are created on the meta device and take our tensors as they are.
    with torch.device("meta"):
        hf_model = transformers.LlamaForCausalLM(config)
    result = hf_model.load_state_dict(hf_state, strict=False, assign=True)
    tied_head = [hf_llama.LM_HEAD] if model_section["tie_embeddings"] else []
    if result.unexpected_keys or sorted(result.missing_keys) != tied_head:
        raise ConversionError(
            f"internal: LlamaForCausalLM does not take the exported tensors (missing "
            f"{result.missing_keys}, unexpected {result.unexpected_keys})"
        )
    hf_model.tie_weights()
    hf_model.save_pretrained(str(target))
    return target, text_half


def text_path_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A MoT / LMFusion model's text path under dense names: the text copies (image copies dropped)
    and, for LMFusion, the embedding and output rows with their trained new-token deltas folded in."""
    from megafusion.models.init import tied_name
    from megafusion.models.lmfusion import INPUT_ROWS, OUTPUT_ROWS
    from megafusion.models.param_layout import EMBEDDING, OUTPUT_LAYER

    out = {
        tied_name(k): v
        for k, v in state.items()
        if "image" not in k.split(".") and not k.startswith((INPUT_ROWS, OUTPUT_ROWS))
    }
    for delta_key, key in ((INPUT_ROWS, EMBEDDING), (OUTPUT_ROWS, OUTPUT_LAYER)):
        delta = state.get(f"{delta_key}.weight")
        if delta is not None and key in out:
            out[key] = out[key].clone()
            out[key][out[key].shape[0] - delta.shape[0] :] += delta
    return out
