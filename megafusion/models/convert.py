"""``megafusion convert ...``: turn one model family's checkpoint into another's.

    megafusion convert dense-to-mot --input CKPT --output DIR [--untie all]

warm-starts a Mixture-of-Transformers from a dense checkpoint (MoT paper, and the first step
of LMFusion): every untied module gets one copy of the dense module per modality, tied
modules, the embedding and the output layer are copied as they are. The result is a
model-only checkpoint (no optimizer, step 0) with the dense run's data description; train
from it with ``model.arch=mot model.untie=<same> checkpoint.init_from=DIR``. Until the copies
drift apart in training, the MoT computes exactly the dense model's logits.

``CKPT`` is a step directory or a run's checkpoint directory (its ``latest`` step), saved
in any parallel layout; the conversion runs in one process and the output loads into any
layout (megatron-core dist_checkpointing reshards at load).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from megafusion.config import load_config
from megafusion.config.loader import config_from_dict
from megafusion.config.schema import ParallelConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megafusion convert", description="convert checkpoints between families")
    commands = parser.add_subparsers(dest="command", required=True)
    d2m = commands.add_parser("dense-to-mot", help="a MoT whose per-modality modules are copies of a dense model's")
    d2m.add_argument("--input", required=True, metavar="CKPT", help="dense step directory or checkpoint.dir")
    d2m.add_argument("--output", required=True, metavar="DIR", help="new, empty directory for the MoT weights")
    d2m.add_argument("--untie", default="all",
                     help="parts to untie: comma-separated attention, ffn, norms, or all (default all)")
    return parser


def dense_to_mot(src: str, out: str, untie: str = "all") -> str:
    """Convert (in this process, TP = PP = 1); returns the output directory."""
    from megafusion.models.init import tied_name
    from megafusion.models.param_layout import global_param_names
    from megafusion.models.registry import build_model_chunks
    from megafusion.models.transformer_config import build_transformer_config
    from megafusion.runtime import initialize, shutdown
    from megafusion.training import checkpoint as ckpt

    path = ckpt.resolve_checkpoint(src)
    manifest = ckpt.read_manifest(path)
    dense_cfg = config_from_dict(manifest["config"], source=str(path / ckpt.MANIFEST))
    if dense_cfg.model.arch != "dense":
        raise ckpt.CheckpointError(f"{path} holds a model.arch={dense_cfg.model.arch!r} model; dense-to-mot "
                                   f"converts dense checkpoints only")
    dense_cfg.parallel = ParallelConfig()  # the checkpoint reshards into one process
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
    try:
        out = dense_to_mot(args.input, args.output, args.untie)
    except (CheckpointError, ConfigError) as err:
        print(f"megafusion convert: {err}", file=sys.stderr)
        return 2
    print(f"[megafusion] wrote MoT weights to {out}: train with model.arch=mot model.untie={args.untie} "
          f"checkpoint.init_from={out}")
    return 0
