"""``megafusion convert ...``: turn one model family's checkpoint into another's.

    megafusion convert dense-to-mot --input CKPT --output DIR [--untie all]
    megafusion convert hf-to-mf --hf DIR --output CKPT_DIR [--config-out FILE.yaml] [--vocab-size N]
    megafusion convert mf-to-hf --input CKPT --output DIR [--vocab-size N]

``dense-to-mot`` warm-starts a Mixture-of-Transformers from a dense checkpoint (MoT paper, and the first step
of LMFusion): every untied module gets one copy of the dense module per modality, tied
modules, the embedding and the output layer are copied as they are. The result is a
model-only checkpoint (no optimizer, step 0) with the dense run's data description; train
from it with ``model.arch=mot model.untie=<same> checkpoint.init_from=DIR``. Until the copies
drift apart in training, the MoT computes exactly the dense model's logits.

``CKPT`` is a step directory or a run's checkpoint directory (its ``latest`` step), saved
in any parallel layout; the conversion runs in one process and the output loads into any
layout (megatron-core dist_checkpointing reshards at load).

``hf-to-mf`` / ``mf-to-hf`` import and export Hugging Face ``LlamaForCausalLM`` checkpoints:
see :mod:`megafusion.interop.hf_io`.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from megafusion.config import load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megafusion convert", description="convert checkpoints between families")
    commands = parser.add_subparsers(dest="command", required=True)
    d2m = commands.add_parser("dense-to-mot", help="a MoT whose per-modality modules are copies of a dense model's")
    d2m.add_argument("--input", required=True, metavar="CKPT", help="dense step directory or checkpoint.dir")
    d2m.add_argument("--output", required=True, metavar="DIR", help="new, empty directory for the MoT weights")
    d2m.add_argument("--untie", default="all",
                     help="parts to untie: comma-separated attention, ffn, norms, or all (default all)")
    h2m = commands.add_parser("hf-to-mf", help="a dense megafusion checkpoint from a Hugging Face LlamaForCausalLM")
    h2m.add_argument("--hf", required=True, metavar="DIR", help="directory with config.json and *.safetensors")
    h2m.add_argument("--output", required=True, metavar="CKPT_DIR", help="new, empty directory for the weights")
    h2m.add_argument("--config-out", metavar="FILE", help="also write the model: section as YAML here")
    h2m.add_argument("--vocab-multiple", type=int, default=128,
                     help="pad the vocabulary with zero rows to a multiple of this (default 128)")
    h2m.add_argument("--vocab-size", type=int,
                     help="pad the vocabulary with zero rows to exactly this many (e.g. room for image codes)")
    m2h = commands.add_parser("mf-to-hf", help="a Hugging Face LlamaForCausalLM from a megafusion checkpoint's "
                                               "text path (dense, or a MoT / Transfusion / LMFusion model's text half)")
    m2h.add_argument("--input", required=True, metavar="CKPT", help="step directory or checkpoint.dir")
    m2h.add_argument("--output", required=True, metavar="DIR", help="new, empty directory for the HF model")
    m2h.add_argument("--vocab-size", type=int,
                     help="vocabulary rows to keep (default: the imported HF model's, else all)")
    return parser


def _run(args) -> str:
    """Run the chosen conversion; returns the line to print."""
    if args.command == "dense-to-mot":
        out = dense_to_mot(args.input, args.output, args.untie)
        return (f"[megafusion] wrote MoT weights to {out}: train with model.arch=mot model.untie={args.untie} "
                f"checkpoint.init_from={out}")
    from megafusion.interop import hf_io as hf_convert

    if args.command == "hf-to-mf":
        section = hf_convert.hf_to_mf(args.hf, args.output, args.config_out, args.vocab_multiple, args.vocab_size)
        overrides = " ".join(f"model.{k}={_cli_value(v)}" for k, v in section.items())
        where = f" (model section in {args.config_out})" if args.config_out else ""
        return (f"[megafusion] wrote dense weights to {args.output}{where}: use checkpoint.init_from={args.output} "
                f"with {overrides}")
    out, text_half = hf_convert.mf_to_hf(args.input, args.output, args.vocab_size)
    what = " (the model's text path: its image copies / image modules are not part of a Llama)" if text_half else ""
    return (f"[megafusion] wrote a LlamaForCausalLM to {out}{what}: transformers' from_pretrained({str(out)!r}) "
            f"loads it")


def _cli_value(value) -> str:
    """A value as a section.key=value override would spell it."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def dense_to_mot(src: str, out: str, untie: str = "all") -> str:
    """Convert (in this process, TP = PP = 1); returns the output directory."""
    from megafusion.models.init import tied_name
    from megafusion.models.param_layout import global_param_names
    from megafusion.objectives.build import build_model_chunks
    from megafusion.models.transformer_config import build_transformer_config
    from megafusion.runtime import initialize, shutdown
    from megafusion.training import checkpoint as ckpt

    path = ckpt.resolve_checkpoint(src)
    manifest = ckpt.read_manifest(path)
    dense_cfg = ckpt.run_config(path, manifest)
    if dense_cfg.model.arch != "dense":
        raise ckpt.CheckpointError(f"{path} holds a model.arch={dense_cfg.model.arch!r} model; dense-to-mot "
                                   f"converts dense checkpoints only")
    mot_cfg = copy.deepcopy(dense_cfg)
    mot_cfg.model.arch, mot_cfg.model.untie = "mot", untie
    load_config(None, [f"model.untie={untie}"])  # validates the spelling of --untie early
    runtime = initialize(dense_cfg)
    try:
        dense = build_model_chunks(dense_cfg, build_transformer_config(dense_cfg, runtime.device), runtime)
        ckpt.load_weights(path, dense)
        mot = build_model_chunks(mot_cfg, build_transformer_config(mot_cfg, runtime.device), runtime)
        dense_params = global_param_names(dense[0])
        with torch.no_grad():
            for name, param in global_param_names(mot[0]).items():
                param.copy_(dense_params[tied_name(name)])
        origin = {"converted_from": str(path), "conversion": "dense-to-mot", "step": manifest.get("step")}
        ckpt.save_weights(out, mot, mot_cfg, manifest.get("data"), origin)
    finally:
        shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    from megafusion.config import ConfigError
    from megafusion.training.checkpoint import CheckpointError

    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # argparse already printed the problem
        return int(exit_.code or 0)
    from megafusion.interop.hf_io import ConversionError
    from megafusion.interop.hf_llama import UnsupportedModel

    try:
        line = _run(args)
    except (CheckpointError, ConfigError, ConversionError, UnsupportedModel) as err:
        print(f"megafusion convert {args.command}: {err}", file=sys.stderr)
        return 2
    print(line)
    return 0
