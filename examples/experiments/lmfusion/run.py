"""LMFusion from a pretrained text model vs the same MoT from scratch, at equal training FLOPs.

``python -m examples.experiments.lmfusion.run [--out-dir runs/lmfusion] [--results bench/results]
[--quick] [--analyze-only] [--launcher subprocess|inprocess] [--text-steps N] [--steps N]`` (from the
repository root)

One step after the other (never side by side: wall clocks are recorded), every megafusion step
being the ``megafusion`` command shown (run as ``python -m megafusion ...``):

1. text data: the captions of the built-in shapes (shapes seed ``TEXT_SEED``), grouped into
   text-only documents of 1 to N captions (one caption per line), written to a JSONL shard; a
   SentencePiece model trained on them (``megafusion tokenizer train``) -- the one tokenizer
   every later step is given explicitly (``data.tokenizer`` / ``--tokenizer``); ``megafusion
   data prepare`` -> an indexed text dataset; and a held-out text file, the captions of another
   shapes seed (``HELDOUT_SEED``), one per line, for ``megafusion eval --text``;
2. pretrain a small dense language model on it (``config_text.yaml``: the stand-in for Llama);
3. export it to Hugging Face (``convert mf-to-hf --vocab-size <text pieces>``) and import it
   back (``convert hf-to-mf --vocab-multiple 1``); ``eval --text`` of the pretrained checkpoint
   and of the import checks the round trip;
4. LMFusion: ``config_mixed.yaml`` (the built-in shapes, Transfusion objective) with
   ``model.arch=mot model.untie=all model.freeze_text=true model.vocab_size=null
   checkpoint.init_from=<import>`` and the import's model section;
5. MoT from scratch: the same config and model, random init, nothing frozen, at LMFusion's
   training FLOPs: a short pilot run of the MoT gives its FLOPs per step relative to LMFusion's
   on the same batches, and the MoT gets the most steps whose FLOPs stay within LMFusion's total;
6. ``eval --text`` of both mixed-modal checkpoints on the held-out text;
7. the analysis (``analyze.py``): ``<results>/lmfusion.{json,md,png}``.

Every step's output is shown and kept in ``<out-dir>/logs/<step>.log``; commands, process
wall clocks and the text evaluations go to ``<out-dir>/run_info.json`` (written after every
step). A rerun first deletes what an earlier run left in ``<out-dir>`` (its own files only).

``--quick``: a tiny version of every step (a 1-layer, hidden-32 model, a few steps each) for
the test, run in this process (``--launcher inprocess``: the same commands through
``megafusion.commands.main.main``, which saves each step's ~10 s of imports); the default launcher is one
process per step.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported (in-process steps, machine())

from bench.provenance import git_commit, machine, utc_now  # noqa: E402
from examples.experiments.harness import (  # noqa: E402
    finish,
    recorded_command,
    run_inprocess,
    run_logged,
    shown,
    shown_arg,
)
from examples.experiments.lmfusion import analyze  # noqa: E402

HERE = Path(__file__).resolve().parent
TEXT_CONFIG, MIXED_CONFIG = HERE / "config_text.yaml", HERE / "config_mixed.yaml"
TEXT_SEED, HELDOUT_SEED = 1001, 2002  # shapes seeds of the text data; the mixed-modal set uses train.seed (1234)
CAPTION_IMAGE_SIZE = 12  # the captions do not depend on it; the smallest size renders fastest

_TINY_MODEL = [
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "model.num_query_groups=1",
    "model.ffn_hidden_size=64",
]
_TINY_TRAIN = ["train.micro_batch_size=2", "train.global_batch_size=4", "train.warmup_steps=1"]
SCALES = {
    # text_steps / lmfusion_steps None: the configs' train.steps
    "full": {
        "text_captions": 16000,
        "captions_per_document": 20,
        "heldout_captions": 400,
        "sp_vocab": 256,
        "text_steps": None,
        "lmfusion_steps": None,
        "pilot_steps": 4,
        "eval_seq_length": 128,
        "text_overrides": [],
        "mixed_overrides": [],
    },
    "quick": {
        "text_captions": 600,
        "captions_per_document": 5,
        "heldout_captions": 40,
        "sp_vocab": 256,
        "text_steps": 3,
        "lmfusion_steps": 4,
        "pilot_steps": 2,
        "eval_seq_length": 64,
        "text_overrides": [*_TINY_MODEL, *_TINY_TRAIN, "model.seq_length=64", "eval.interval=1", "eval.batches=1"],
        "mixed_overrides": [
            *_TINY_MODEL,
            *_TINY_TRAIN,
            "model.seq_length=128",
            "data.num_samples=200",
            "eval.interval=2",
            "eval.batches=1",
        ],
    },
}
# Files and folders run.py writes under --out-dir (a rerun deletes these, nothing else).
OUTPUTS = (
    "data",
    "logs",
    "cache",
    "text_lm",
    "hf",
    "import",
    "import_model.yaml",
    "lmfusion",
    "pilot_mot",
    "mot_scratch",
    "run_info.json",
)


class StepFailed(RuntimeError):
    pass


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --------------------------------------------------------------------------- launching steps
class Runner:
    """Runs megafusion commands one after the other, logging each and recording it in run_info."""

    def __init__(self, out_dir: Path, launcher: str, info: dict):
        self.out_dir, self.launcher, self.info = out_dir, launcher, info
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)

    def save_info(self) -> None:
        (self.out_dir / "run_info.json").write_text(json.dumps(self.info, indent=1) + "\n")

    def record(self, name: str, command: str, seconds: float, log: Path | None, load: float | None = None) -> None:
        # load: the 1-minute load average at the start and the end (other work on the machine
        # slows the steps down; the wall clocks are only comparable under similar load)
        self.info["steps"].append(
            {
                "name": name,
                "command": command,
                "seconds": seconds,
                "log": shown(log) if log else None,
                "load_avg_1min": [load, _load()] if load is not None else None,
            }
        )
        self.save_info()

    def megafusion(self, name: str, args: list[str]) -> str:
        """Run ``megafusion <args>``; return its output (stdout and stderr)."""
        args = [str(a) for a in args]
        shown = "megafusion " + shlex.join(shown_arg(a) for a in args)
        log_path = self.out_dir / "logs" / f"{name}.log"
        print(f"[lmfusion] {name}: {shown}", flush=True)
        load, start = _load(), time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as log:
            if self.launcher == "subprocess":
                cmd = [sys.executable, "-m", "megafusion", *args]
                env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                rc, output = run_logged(cmd, log, env)
            else:
                rc, output = run_inprocess(args, log)
        seconds = time.perf_counter() - start
        if rc != 0:
            raise StepFailed(f"step {name} failed (exit code {rc}); its output is in {shown(log_path)}")
        print(f"[lmfusion] {name} took {seconds:.1f} s", flush=True)
        self.record(name, shown, seconds, log_path, load)
        return output


# --------------------------------------------------------------------------- the steps
def captions(num: int, seed: int) -> list[str]:
    """The captions of the first ``num`` built-in shapes samples of ``seed``."""
    from megafusion.data.builtin.shapes import shapes_documents

    return [
        seg.text
        for doc in shapes_documents(num, seed, CAPTION_IMAGE_SIZE)
        for seg in doc.segments
        if hasattr(seg, "text")
    ]


def caption_choices() -> int:
    """How many distinct captions the generator draws from, uniformly (colour x shape x position x phrasing)."""
    from megafusion.data.builtin import shapes as bs

    return len(bs.PALETTE) * len(bs.SHAPES) * len(bs.POSITIONS) * len(bs.TEMPLATES)


def write_text_data(data_dir: Path, scale: dict) -> dict:
    """The text-only JSONL shard (documents of 1..N captions, one per line) and the held-out text file."""
    import numpy as np

    data_dir.mkdir(parents=True, exist_ok=True)
    texts = captions(scale["text_captions"], TEXT_SEED)
    rng = np.random.default_rng(TEXT_SEED)
    documents, i = [], 0
    while i < len(texts):
        k = int(rng.integers(1, scale["captions_per_document"] + 1))
        documents.append("\n".join(texts[i : i + k]))
        i += k
    with open(data_dir / "captions.jsonl", "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"segments": [{"text": doc}]}) + "\n")
    heldout = captions(scale["heldout_captions"], HELDOUT_SEED)
    (data_dir / "heldout.txt").write_text("\n".join(heldout) + "\n", encoding="utf-8")
    return {
        "text_seed": TEXT_SEED,
        "text_captions": len(texts),
        "text_documents": len(documents),
        "captions_per_document": scale["captions_per_document"],
        "heldout_seed": HELDOUT_SEED,
        "heldout_captions": len(heldout),
        "caption_choices": caption_choices(),
        "distinct_text_captions": len(set(texts)),
        "heldout_captions_also_in_text_data": sum(c in set(texts) for c in heldout),
    }


def model_section_overrides(yaml_path: Path) -> list[str]:
    """``model.key=value`` of the import's model section (``--config-out``), but arch and vocab_size
    (the runs are MoT, and their vocabulary is the data's: the warm start grows the import's)."""
    import yaml

    section = yaml.safe_load(yaml_path.read_text())["model"]

    def value(v):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{a}: {b}" for a, b in v.items()) + "}"
        if v is None:
            return "null"
        return str(v).lower() if isinstance(v, bool) else str(v)

    return [f"model.{k}={value(v)}" for k, v in section.items() if k not in ("arch", "vocab_size")]


def last_json(output: str) -> dict:
    """The JSON object ``megafusion eval --text`` prints (its last line that is one)."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise StepFailed("megafusion eval --text printed no JSON result")


def training_flops(run_dir: Path) -> list[float]:
    """Per-step training FLOPs of a run (its metrics.jsonl), in step order."""
    return [r["flops"] for r in analyze.load_run(run_dir)["train"]]


def mot_steps_for_budget(lmfusion: list[float], pilot: list[float]) -> dict:
    """The MoT's step count at LMFusion's FLOPs: both runs see the same batches in the same order, so
    MoT step i costs ``ratio`` x LMFusion step i, ``ratio`` measured on the pilot's steps. The MoT gets
    the most steps whose predicted total stays within LMFusion's total."""
    n = len(pilot)
    if not n or len(lmfusion) < n:
        raise StepFailed(f"the pilot ran {n} steps and LMFusion {len(lmfusion)}: cannot compare their FLOPs")
    ratio = sum(pilot) / sum(lmfusion[:n])
    budget, spent, steps = sum(lmfusion), 0.0, 0
    mean = budget / len(lmfusion)
    while True:
        nxt = ratio * (lmfusion[steps] if steps < len(lmfusion) else mean)
        if spent + nxt > budget:
            break
        spent += nxt
        steps += 1
    return {
        "lmfusion_steps": len(lmfusion),
        "lmfusion_flops_total": budget,
        "pilot_steps": n,
        "mot_to_lmfusion_flops_per_step": ratio,
        "mot_steps": max(steps, 1),
        "mot_predicted_flops_total": spent,
    }


def clean(out_dir: Path) -> None:
    for name in OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_experiment(out_dir: Path, scale: dict, launcher: str, info: dict) -> None:
    runner = Runner(out_dir, launcher, info)
    data = out_dir / "data"
    sp, shard, heldout, text_prefix = data / "sp.model", data / "captions.jsonl", data / "heldout.txt", data / "text"
    cache = out_dir / "cache"

    # 1. text data, tokenizer, indexed dataset
    print("[lmfusion] text data: captions of the built-in shapes -> text-only documents", flush=True)
    start = time.perf_counter()
    info["settings"] = write_text_data(data, scale)
    runner.record(
        "text_data",
        f"(run.py) {scale['text_captions']} captions of shapes seed {TEXT_SEED} -> "
        f"{shown(shard)}; {scale['heldout_captions']} of seed {HELDOUT_SEED} -> {shown(heldout)}",
        time.perf_counter() - start,
        None,
    )
    runner.megafusion(
        "tokenizer",
        ["tokenizer", "train", "--input", shard, "--vocab-size", scale["sp_vocab"], "--output", data / "sp"],
    )
    runner.megafusion("data_prepare", ["data", "prepare", "--input", shard, "--tokenizer", sp, "--output", text_prefix])
    meta = json.loads(Path(f"{text_prefix}.meta.json").read_text())
    n_text = int(meta["tokenizer"]["n_text"])
    info["settings"].update(n_text=n_text, text_tokens=meta["tokens"]["text"], tokenizer=shown(sp))
    runner.save_info()

    # 2. the text-only pretraining
    steps = [f"train.steps={scale['text_steps']}"] if scale["text_steps"] else []
    runner.megafusion(
        "text_lm",
        [
            "train",
            "--config",
            TEXT_CONFIG,
            *scale["text_overrides"],
            *steps,
            f"data.path={text_prefix}",
            f"data.tokenizer={sp}",
            f"logging.out_dir={out_dir / 'text_lm'}",
        ],
    )

    # 3. the Hugging Face round trip, checked on the held-out text
    runner.megafusion(
        "export_hf",
        [
            "convert",
            "mf-to-hf",
            "--input",
            out_dir / "text_lm" / "checkpoints",
            "--output",
            out_dir / "hf",
            "--vocab-size",
            n_text,
        ],
    )
    runner.megafusion(
        "import_hf",
        [
            "convert",
            "hf-to-mf",
            "--hf",
            out_dir / "hf",
            "--output",
            out_dir / "import",
            "--vocab-multiple",
            "1",
            "--config-out",
            out_dir / "import_model.yaml",
        ],
    )
    info["text_eval"] = {}

    def eval_text(name: str, ckpt: Path) -> None:
        # The same windows and the same softmax columns (the text pieces) for every checkpoint.
        output = runner.megafusion(
            f"eval_{name}",
            [
                "eval",
                "--ckpt",
                ckpt,
                "--text",
                heldout,
                "--tokenizer",
                sp,
                "--loss-vocab",
                n_text,
                "--seq-length",
                scale["eval_seq_length"],
            ],
        )
        info["text_eval"][name] = last_json(output)
        runner.save_info()

    eval_text("text_lm", out_dir / "text_lm" / "checkpoints")
    eval_text("import", out_dir / "import")

    # 4. LMFusion from the import; 5. the same MoT from scratch at the same FLOPs
    model = model_section_overrides(out_dir / "import_model.yaml")
    mixed = [
        "train",
        "--config",
        MIXED_CONFIG,
        *scale["mixed_overrides"],
        *model,
        "model.arch=mot",
        "model.untie=all",
        "model.vocab_size=null",
        f"data.tokenizer={sp}",
        f"data.cache_dir={cache}",
    ]
    steps = [f"train.steps={scale['lmfusion_steps']}"] if scale["lmfusion_steps"] else []
    runner.megafusion(
        "lmfusion",
        [
            *mixed,
            *steps,
            "model.freeze_text=true",
            f"checkpoint.init_from={out_dir / 'import'}",
            f"logging.out_dir={out_dir / 'lmfusion'}",
        ],
    )
    runner.megafusion(
        "pilot_mot",
        [
            *mixed,
            f"train.steps={scale['pilot_steps']}",
            "checkpoint.save=false",
            "eval.batches=1",
            f"logging.out_dir={out_dir / 'pilot_mot'}",
        ],
    )
    budget = mot_steps_for_budget(training_flops(out_dir / "lmfusion"), training_flops(out_dir / "pilot_mot"))
    budget["rule"] = (
        f"LMFusion trains {budget['lmfusion_steps']} steps; a {budget['pilot_steps']}-step pilot of the "
        f"MoT from scratch costs {budget['mot_to_lmfusion_flops_per_step']:.4f}x LMFusion's FLOPs on the "
        f"same batches, so the MoT from scratch gets the most steps that stay within LMFusion's total: "
        f"{budget['mot_steps']}"
    )
    info["budget"] = budget
    runner.save_info()
    print(f"[lmfusion] budget: {budget['rule']}", flush=True)
    runner.megafusion(
        "mot_scratch", [*mixed, f"train.steps={budget['mot_steps']}", f"logging.out_dir={out_dir / 'mot_scratch'}"]
    )

    # 6. text after
    eval_text("lmfusion", out_dir / "lmfusion" / "checkpoints")
    eval_text("mot_scratch", out_dir / "mot_scratch" / "checkpoints")
    info["complete"] = True
    info["total_seconds"] = sum(s["seconds"] for s in info["steps"])
    runner.save_info()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/lmfusion", help="the runs and data (default: %(default)s)")
    parser.add_argument(
        "--results", default="bench/results", help="where lmfusion.{json,md,png} go (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (the test; < 1 min)")
    parser.add_argument("--analyze-only", action="store_true", help="skip the runs; analyse those in --out-dir")
    parser.add_argument(
        "--launcher",
        choices=("subprocess", "inprocess"),
        default=None,
        help="one process per step (default) or all in this one (default with --quick)",
    )
    parser.add_argument(
        "--text-steps", type=int, default=None, help="train.steps of the text pretraining (default: config_text.yaml's)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="LMFusion's train.steps (default: config_mixed.yaml's); the MoT from scratch gets the same FLOPs",
    )
    args = parser.parse_args(argv)
    out_dir, results = Path(args.out_dir).resolve(), Path(args.results).resolve()
    if not args.analyze_only:
        scale = dict(SCALES["quick" if args.quick else "full"])
        for key, value in (("text_steps", args.text_steps), ("lmfusion_steps", args.steps)):
            if value is not None:
                if value < 1:
                    parser.error(f"--{key.replace('_', '-')} must be >= 1")
                scale[key] = value
        launcher = args.launcher or ("inprocess" if args.quick else "subprocess")
        out_dir.mkdir(parents=True, exist_ok=True)
        clean(out_dir)
        info = {
            "command": recorded_command(analyze.RUN_COMMAND, argv),
            "commit": git_commit(),
            "machine": machine(),
            "versions": analyze.versions(),
            "date_utc": utc_now(),
            "launcher": launcher,
            "quick": args.quick,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "scale": scale,
            "steps": [],
            "complete": False,
        }
        try:
            run_experiment(out_dir, scale, launcher, info)
        except StepFailed as err:
            print(f"[lmfusion] {err}", file=sys.stderr)
            return 1
        print(f"[lmfusion] all steps took {info['total_seconds']:.0f} s", flush=True)
    return finish(
        "[lmfusion]",
        lambda: analyze.write_results(out_dir, results),
        analyze.markdown,
        lambda _: results / analyze.RESULT_NAME,
    )


if __name__ == "__main__":
    sys.exit(main())
