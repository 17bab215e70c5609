"""``megafusion convert ...``: the command line of the checkpoint conversions.

    megafusion convert dense-to-mot --ckpt CKPT --output DIR [--untie all]
    megafusion convert upcycle --ckpt CKPT --output DIR [--experts E] [--capacity C] [--untie U] [--keep-data-order]
    megafusion convert btx-merge --seed CKPT --branch CKPT [--branch CKPT ...] --output DIR [--keep-seed-expert]
    megafusion convert hf-to-mf --hf DIR --output CKPT_DIR [--config-out FILE.yaml] [--vocab-size N]
    megafusion convert mf-to-hf --ckpt CKPT --output DIR [--vocab-size N]

``dense-to-mot`` warm-starts a Mixture-of-Transformers from a dense checkpoint
(:mod:`megafusion.interop.dense_to_mot`); ``upcycle`` starts a MoMa from a MoT or dense checkpoint,
every expert a copy of its modality's FFN (:mod:`megafusion.interop.upcycle`); ``btx-merge``
merges the branches of one seed into a Branch-Train-MiX MoE, every branch's FFN an expert and
the rest averaged (:mod:`megafusion.interop.btx_merge`); ``hf-to-mf`` /
``mf-to-hf`` import and export Hugging Face ``LlamaForCausalLM`` checkpoints
(:mod:`megafusion.interop.hf_io`). ``CKPT`` is a step directory or a run's checkpoint directory
(its ``latest`` step), saved in any parallel layout. ``--input`` is still accepted for ``--ckpt``.
Every output location is checked to be writable before a checkpoint or model is loaded.
"""

from __future__ import annotations

import argparse
import sys

from megafusion.commands.main import run
from megafusion.commands.parsing import add_ckpt, add_output, check_ckpt, command_parser, subcommand
from megafusion.core.io import ensure_exists, ensure_writable_dir, ensure_writable_file_parent

PROG = "megafusion convert"
SUBCOMMANDS = ("dense-to-mot", "upcycle", "btx-merge", "hf-to-mf", "mf-to-hf")


D2M_EXAMPLES = (
    "megafusion convert dense-to-mot --ckpt runs/tiny_mixed/checkpoints --output runs/mot_init",
    "megafusion convert dense-to-mot --ckpt runs/tiny_mixed/checkpoints --output runs/mot_ffn --untie ffn",
)
UPCYCLE_EXAMPLES = (
    "megafusion convert upcycle --ckpt runs/tiny_mot/checkpoints --output runs/moma_init",
    "megafusion convert upcycle --ckpt runs/tiny_mot/checkpoints --output runs/moma_2t2i "
    '--experts "{text: 2, image: 2}" --keep-data-order',
)
BTX_EXAMPLES = (
    "megafusion convert btx-merge --seed runs/seed/checkpoints --branch runs/math/checkpoints "
    "--branch runs/code/checkpoints --output runs/btx_init",
    "megafusion convert btx-merge --seed runs/seed/checkpoints --branch runs/math/checkpoints "
    "--branch runs/code/checkpoints --branch runs/wiki/checkpoints --keep-seed-expert --output runs/btx_4x",
)
H2M_EXAMPLES = (
    "megafusion convert hf-to-mf --hf path/to/Llama-3.2-1B --output runs/llama_init --config-out runs/llama_init.yaml",
)
M2H_EXAMPLES = (
    "megafusion convert mf-to-hf --ckpt runs/my_run/checkpoints --output runs/my_run_hf",
    "megafusion convert mf-to-hf --ckpt runs/tiny_transfusion/checkpoints --output runs/llama_again",
)


def _parser() -> argparse.ArgumentParser:
    parser = command_parser(
        PROG,
        "Convert checkpoints between model families, and to and from Hugging Face Llama.",
        (D2M_EXAMPLES[0], H2M_EXAMPLES[0], M2H_EXAMPLES[0]),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    d2m = subcommand(
        commands,
        "dense-to-mot",
        "a MoT whose per-modality modules are copies of a dense model's",
        "Warm-start a Mixture-of-Transformers: every untied module of a dense checkpoint is copied once\n"
        "per modality (a weights-only checkpoint; until the copies drift apart it computes the dense\n"
        "model's logits). Train from it with model.arch=mot model.untie=<same> checkpoint.init_from=DIR.",
        D2M_EXAMPLES,
    )
    add_ckpt(d2m, "dense step directory or checkpoint.dir (any parallel layout)", "--input")
    add_output(d2m, "new, empty directory for the MoT weights")
    d2m.add_argument(
        "--untie", default="all", help="parts to untie: comma-separated attention, ffn, norms, or all (default all)"
    )
    up = subcommand(
        commands,
        "upcycle",
        "a MoMa whose experts are copies of a MoT's (or dense model's) FFNs",
        "Upcycle a MoT (or dense) checkpoint into MoMa: every expert starts as a copy of its modality's\n"
        "FFN (a modality-blind group: the text FFN; from a dense model: the one FFN), attention and norms\n"
        "as in the source, the routers freshly initialised (seeded, as a new MoMa's). A weights-only\n"
        "checkpoint: the run that trains from it (checkpoint.init_from=DIR, with the model.arch=moma and\n"
        "moe settings this prints) starts at step 0 with a fresh optimizer and LR schedule.",
        UPCYCLE_EXAMPLES,
        notes="Gumbel noise on the routers (the paper's upcycling recipe) is a training setting: moe.router_noise.",
    )
    add_ckpt(up, "MoT or dense step directory or checkpoint.dir (any parallel layout)", "--input")
    add_output(up, "new, empty directory for the MoMa weights")
    up.add_argument(
        "--experts",
        metavar="E",
        help="moe.experts, as the config spells it: '{text: 4, image: 4}' (MoMa 4t4i) or '{mixed: 8}' "
        "(default: {text: 4, image: 4}; a dense or MoT run cannot set the moe section)",
    )
    up.add_argument(
        "--capacity",
        metavar="C",
        help="moe.capacity, e.g. '{text: 0.25, image: 0.25}' (default: the source run's; null = 1/experts per group)",
    )
    up.add_argument(
        "--untie",
        help="model.untie for attention and norms (default: the MoT's; from a dense model: all); it may not "
        "tie a part the MoT unties",
    )
    up.add_argument(
        "--keep-data-order",
        action="store_true",
        help="record in the output's megafusion.json that the upcycled run is to continue the source run's data "
        "stream (origin.keep_data_order; origin.consumed_samples, where the source stopped, is always recorded)",
    )
    btx = subcommand(
        commands,
        "btx-merge",
        "a Branch-Train-MiX MoE from branches of one seed: each branch's FFN an expert, the rest averaged",
        "Merge branches (runs started with checkpoint.init_from=SEED, each on its own data) into one\n"
        "token-choice MoE (model.arch=btx): in every layer expert j is branch j's FFN (--branch order;\n"
        "a MoT seed with an untied FFN: one expert group per modality), every other tensor the fp32 mean\n"
        "of the branches' (LMFusion's frozen text weights: checked equal and copied), the routers freshly\n"
        "initialised. Branches that do not descend from --seed (megafusion.json lineage) or differ from it\n"
        "in architecture, tokenizer or vocabulary are refused. A weights-only checkpoint: train it with the\n"
        "overrides this prints and checkpoint.init_from=DIR (step 0, fresh optimizer and LR schedule).",
        BTX_EXAMPLES,
        notes="--keep-seed-expert adds the seed's FFN as the last expert and the seed to the average (the paper's "
        "4-expert model: three branches and the seed); without it the average is over the branches only.",
    )
    btx.add_argument(
        "--seed",
        required=True,
        metavar="CKPT",
        help="the seed the branches started from (step directory or checkpoint.dir)",
    )
    btx.add_argument(
        "--branch",
        required=True,
        action="append",
        metavar="CKPT",
        help="a branch (step directory or checkpoint.dir, any parallel layout); repeat it, one per expert, "
        "in expert order",
    )
    add_output(btx, "new, empty directory for the merged weights")
    btx.add_argument(
        "--keep-seed-expert",
        action="store_true",
        help="the seed's FFN is one more expert (the last), and the seed joins the average of the other tensors",
    )
    h2m = subcommand(
        commands,
        "hf-to-mf",
        "a dense megafusion checkpoint from a Hugging Face LlamaForCausalLM",
        "Import a Hugging Face LlamaForCausalLM directory (config.json + safetensors) as a weights-only\n"
        "dense checkpoint that checkpoint.init_from loads into any layout, and print (--config-out:\n"
        "write) the matching model: section. Needs transformers (pip install 'megafusion[hf]').",
        H2M_EXAMPLES,
    )
    # --hf, not --ckpt: it reads a Hugging Face directory, not a megafusion checkpoint.
    h2m.add_argument("--hf", required=True, metavar="DIR", help="directory with config.json and *.safetensors")
    add_output(h2m, "new, empty directory for the weights", metavar="CKPT_DIR")
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
    m2h = subcommand(
        commands,
        "mf-to-hf",
        "a Hugging Face LlamaForCausalLM from a megafusion checkpoint's "
        "text path (dense, or a MoT / Transfusion / LMFusion model's text half)",
        "Export a megafusion checkpoint of any layout as a Hugging Face LlamaForCausalLM (config.json +\n"
        "safetensors): a dense model, or the text path of a MoT / Transfusion / LMFusion model. Needs\n"
        "transformers (pip install 'megafusion[hf]').",
        M2H_EXAMPLES,
    )
    add_ckpt(m2h, "step directory or checkpoint.dir (any parallel layout)", "--input")
    add_output(m2h, "new, empty directory for the HF model")
    m2h.add_argument(
        "--vocab-size", type=int, help="vocabulary rows to keep (default: the imported HF model's, else all)"
    )
    return parser


def convert_command(argv: list[str]) -> int:
    """Run the chosen conversion and print what to do with its output."""
    args = _parser().parse_args(argv)
    # Before any checkpoint or model is loaded: an output that cannot be written fails now.
    ensure_writable_dir(args.output, "--output")
    if getattr(args, "config_out", None):
        ensure_writable_file_parent(args.config_out, "--config-out")
    # Then the input, before torch is imported.
    if args.command == "hf-to-mf":
        ensure_exists(args.hf, "--hf", "a Hugging Face model directory (config.json and *.safetensors)", kind="dir")
    elif args.command == "btx-merge":
        for flag, ckpt in (("--seed", args.seed), *(("--branch", b) for b in args.branch)):
            check_ckpt(ckpt, flag)
    else:
        check_ckpt(args.ckpt)
    if args.command == "dense-to-mot":
        from megafusion.interop.dense_to_mot import dense_to_mot

        out = dense_to_mot(args.ckpt, args.output, args.untie)
        print(
            f"[megafusion] wrote MoT weights to {out}: train with model.arch=mot model.untie={args.untie} "
            f"checkpoint.init_from={out}"
        )
        return 0
    if args.command == "upcycle":
        from megafusion.interop.upcycle import train_overrides, upcycle

        cfg, origin = upcycle(args.ckpt, args.output, args.experts, args.capacity, args.untie, args.keep_data_order)
        kept = f"; recorded origin.keep_data_order (the source run stopped at sample {origin['consumed_samples']})"
        print(
            f"[megafusion] wrote MoMa weights to {args.output} (every expert a copy of its modality's FFN from "
            f"the {origin['source_arch']} checkpoint, routers initialised): train with "
            f"{' '.join(train_overrides(cfg))} checkpoint.init_from={args.output} "
            f"(a new run: step 0, fresh optimizer and LR schedule)" + (kept if args.keep_data_order else "")
        )
        return 0
    if args.command == "btx-merge":
        from megafusion.interop.btx_merge import btx_merge, train_overrides

        cfg, origin = btx_merge(args.seed, args.branch, args.output, args.keep_seed_expert)
        experts = ", ".join(f"{k} {v}" for k, v in origin["experts"].items())
        print(
            f"[megafusion] wrote BTX weights to {args.output} ({len(origin['branches'])} branches"
            f"{' and the seed' if args.keep_seed_expert else ''} merged: experts {experts}, routers initialised): "
            f"train with {' '.join(train_overrides(cfg, origin))} checkpoint.init_from={args.output} "
            f"(a new run: step 0, fresh optimizer and LR schedule)"
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
    out, text_half = hf_io.mf_to_hf(args.ckpt, args.output, args.vocab_size)
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
    prog = f"{PROG} {argv[0]}" if argv and argv[0] in SUBCOMMANDS else PROG
    return run(convert_command, argv, prog, runtime=True)


if __name__ == "__main__":
    sys.exit(main())
