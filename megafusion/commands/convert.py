"""``megafusion convert ...``: the command line of the checkpoint conversions.

    megafusion convert dense-to-mot --input CKPT --output DIR [--untie all]
    megafusion convert hf-to-mf --hf DIR --output CKPT_DIR [--config-out FILE.yaml] [--vocab-size N]
    megafusion convert mf-to-hf --input CKPT --output DIR [--vocab-size N]

``dense-to-mot`` warm-starts a Mixture-of-Transformers from a dense checkpoint
(:mod:`megafusion.interop.dense_to_mot`); ``hf-to-mf`` / ``mf-to-hf`` import and export Hugging
Face ``LlamaForCausalLM`` checkpoints (:mod:`megafusion.interop.hf_io`). ``CKPT`` is a step
directory or a run's checkpoint directory (its ``latest`` step), saved in any parallel layout.
"""

from __future__ import annotations

import argparse
import sys

from megafusion.commands.main import run

SUBCOMMANDS = ("dense-to-mot", "hf-to-mf", "mf-to-hf")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megafusion convert", description="convert checkpoints between families")
    commands = parser.add_subparsers(dest="command", required=True)
    d2m = commands.add_parser("dense-to-mot", help="a MoT whose per-modality modules are copies of a dense model's")
    d2m.add_argument("--input", required=True, metavar="CKPT", help="dense step directory or checkpoint.dir")
    d2m.add_argument("--output", required=True, metavar="DIR", help="new, empty directory for the MoT weights")
    d2m.add_argument(
        "--untie", default="all", help="parts to untie: comma-separated attention, ffn, norms, or all (default all)"
    )
    h2m = commands.add_parser("hf-to-mf", help="a dense megafusion checkpoint from a Hugging Face LlamaForCausalLM")
    h2m.add_argument("--hf", required=True, metavar="DIR", help="directory with config.json and *.safetensors")
    h2m.add_argument("--output", required=True, metavar="CKPT_DIR", help="new, empty directory for the weights")
    h2m.add_argument("--config-out", metavar="FILE", help="also write the model: section as YAML here")
    h2m.add_argument(
        "--vocab-multiple",
        type=int,
        default=128,
        help="pad the vocabulary with zero rows to a multiple of this (default 128)",
    )
    h2m.add_argument(
        "--vocab-size",
        type=int,
        help="pad the vocabulary with zero rows to exactly this many (e.g. room for image codes)",
    )
    m2h = commands.add_parser(
        "mf-to-hf",
        help="a Hugging Face LlamaForCausalLM from a megafusion checkpoint's "
        "text path (dense, or a MoT / Transfusion / LMFusion model's text half)",
    )
    m2h.add_argument("--input", required=True, metavar="CKPT", help="step directory or checkpoint.dir")
    m2h.add_argument("--output", required=True, metavar="DIR", help="new, empty directory for the HF model")
    m2h.add_argument(
        "--vocab-size", type=int, help="vocabulary rows to keep (default: the imported HF model's, else all)"
    )
    return parser


def convert_command(argv: list[str]) -> int:
    """Run the chosen conversion and print what to do with its output."""
    args = _parser().parse_args(argv)
    if args.command == "dense-to-mot":
        from megafusion.interop.dense_to_mot import dense_to_mot

        out = dense_to_mot(args.input, args.output, args.untie)
        print(
            f"[megafusion] wrote MoT weights to {out}: train with model.arch=mot model.untie={args.untie} "
            f"checkpoint.init_from={out}"
        )
        return 0
    from megafusion.interop import hf_io

    if args.command == "hf-to-mf":
        section = hf_io.hf_to_mf(args.hf, args.output, args.config_out, args.vocab_multiple, args.vocab_size)
        overrides = " ".join(f"model.{k}={_cli_value(v)}" for k, v in section.items())
        where = f" (model section in {args.config_out})" if args.config_out else ""
        print(
            f"[megafusion] wrote dense weights to {args.output}{where}: use checkpoint.init_from={args.output} "
            f"with {overrides}"
        )
        return 0
    out, text_half = hf_io.mf_to_hf(args.input, args.output, args.vocab_size)
    what = " (the model's text path: its image copies / image modules are not part of a Llama)" if text_half else ""
    print(f"[megafusion] wrote a LlamaForCausalLM to {out}{what}: transformers' from_pretrained({str(out)!r}) loads it")
    return 0


def _cli_value(value) -> str:
    """A value as a section.key=value override would spell it."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Errors name the conversion (`megafusion convert mf-to-hf: ...`), as argparse's own do.
    prog = f"megafusion convert {argv[0]}" if argv and argv[0] in SUBCOMMANDS else "megafusion convert"
    return run(convert_command, argv, prog, runtime=True)


if __name__ == "__main__":
    sys.exit(main())
