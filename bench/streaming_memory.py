"""Train on an indexed dataset larger than the process may hold, and record its memory per step:
``bench/results/streaming_memory.{json,md}``.

    python -m bench.streaming_memory [--gb 4] [--steps 200] [--data-limit-gb 2]
        [--out bench/results/streaming_memory.json] [--quick]

1. Writes a generated mixed-modal dataset of ``--gb`` GB of uint16 tokens (documents of random
   text pieces, half of them with a ``<boi>`` 64 image codes ``<eoi>`` image) with a SentencePiece
   tokenizer trained on the built-in captions and the pixel codec, under
   ``runs/streaming_memory/`` (kept: a second run reuses it and its cached sample index);
2. ``megafusion train`` of a tiny dense model on it (``data.source=indexed``, sequence 1024) for
   ``--steps`` steps, with the trainer's private data capped by ``RLIMIT_DATA`` at
   ``--data-limit-gb`` (Linux counts anonymous and private writable memory there, not the
   read-only memory maps of the dataset): a process that loaded the dataset would die;
3. samples the trainer's ``RssAnon`` / ``RssFile`` every 0.5 s and records them with the step
   times, the index build time (the first run), commit, machine, date and command; the markdown
   table is re-rendered from every recorded run. ``--quick`` (the tests): 0.05 GB, 3 steps,
   writes nothing unless given ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.provenance import ROOT, git_commit, machine, recorded_command, utc_now

DEFAULT_OUT = "bench/results/streaming_memory.json"
WORK = ROOT / "runs" / "streaming_memory"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.streaming_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=4.0, help="dataset size in GB of tokens (default 4)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--data-limit-gb", type=float, default=2.0, help="RLIMIT_DATA of the trainer (default 2)")
    p.add_argument("--work", default=str(WORK), help=f"where the dataset and the run go (default {WORK})")
    p.add_argument("--quick", action="store_true", help="0.05 GB, 3 steps (tests); writes only with --out")
    p.add_argument("--out", default=None, help=f"result JSON (default {DEFAULT_OUT}; none for --quick)")
    return p


def make_dataset(prefix: str, gb: float, work: Path) -> dict:
    """The generated dataset at ``prefix`` (reused when its meta says it has this size)."""
    from megafusion.data.builtin.shapes import shapes_documents
    from megafusion.data.codecs.registry import build_codec
    from megafusion.data.formats.indexed import read_meta, write_indexed
    from megafusion.data.prepare import dataset_meta
    from megafusion.data.tokenizers.joint import MultimodalTokenizer, builtin_tokenizer
    from megafusion.data.types import TokenizedDocument

    tokens_wanted = int(gb * 1e9 / 2)
    if os.path.exists(prefix + ".meta.json"):
        meta = read_meta(prefix)
        if meta.get("generated_tokens") == tokens_wanted:
            return meta
    captions = [seg.text for doc in shapes_documents(200, 0, 16) for seg in doc.segments if hasattr(seg, "text")]
    tokenizer_path = builtin_tokenizer(str(work / "cache"), captions, 384)
    codec = build_codec("pixel", image_size=16, patch_size=2, levels=4)
    tok = MultimodalTokenizer.from_files(tokenizer_path, codec)
    rng = np.random.default_rng(0)
    pool = rng.integers(3, tok.text_vocab_size, 1 << 20)  # text pieces (ids 0-2 are specials)
    codes = tok.image_offset + rng.integers(0, codec.vocab_size, 1 << 16)

    def documents():
        made, index = 0, 0
        while made < tokens_wanted:
            n = int(rng.integers(100, 900))
            start = int(rng.integers(0, pool.size - n))
            parts, mods = [[tok.bos_id], pool[start : start + n]], [np.zeros(n + 1, np.uint8)]
            if rng.random() < 0.5:
                at = int(rng.integers(0, codes.size - 64))
                parts += [[tok.boi_id], codes[at : at + 64], [tok.eoi_id]]
                mods += [np.zeros(1, np.uint8), np.ones(64, np.uint8), np.zeros(1, np.uint8)]
            tokens = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
            made, index = made + tokens.size, index + 1
            # Consecutive source names compress to one run in the meta (as shard lines do).
            yield TokenizedDocument(tokens, np.concatenate(mods), f"generated:{index}")

    meta = dataset_meta(tok, codec, {"generated_tokens": tokens_wanted, "created_by": "bench.streaming_memory"})
    write_indexed(prefix, documents(), meta)
    return read_meta(prefix)


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmData"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def train(prefix: str, tokenizer: str, steps: int, limit_gb: float, out_dir: Path) -> tuple[dict, list]:
    """Run ``megafusion train`` on the dataset; its metrics records and the memory samples."""
    overrides = [
        "data.source=indexed",
        f"data.path={prefix}",
        f"data.tokenizer={tokenizer}",
        "data.val_fraction=0.001",
        "model.seq_length=1024",
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_attention_heads=4",
        "model.ffn_hidden_size=176",
        f"train.steps={steps}",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "eval.interval=0",
        "checkpoint.save=false",
        "logging.wandb=false",
        f"logging.out_dir={out_dir}",
    ]
    cmd = [sys.executable, "-m", "megafusion.train", "--config", "examples/configs/tiny_dense.yaml", *overrides]
    limit = int(limit_gb * 1e9)

    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    print(f"[streaming_memory] {shlex.join(cmd)}  (RLIMIT_DATA {limit_gb:g} GB)", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, preexec_fn=cap, env={**os.environ, "PYTHONPATH": str(ROOT)})
    samples, done = [], threading.Event()

    def watch():
        while not done.is_set():
            status = _status(proc.pid)
            if status:
                samples.append({"t": round(time.perf_counter() - start, 2), **status})
            done.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rc = proc.wait()
    done.set()
    watcher.join()
    if rc != 0:
        raise SystemExit(f"[streaming_memory] training exited {rc}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": time.perf_counter() - start, "records": [r for r in records if "loss" in r]}, samples


def summarise(meta: dict, run: dict, samples: list, args) -> dict:
    first_step_t = run["wall_s"] - sum(r["step_time_s"] for r in run["records"])
    after = [s for s in samples if s["t"] >= first_step_t] or samples
    anon = [s["RssAnon"] for s in after if "RssAnon" in s]
    quarter = max(1, len(anon) // 4)
    return {
        "dataset_gb": os.path.getsize(args.prefix + ".bin") / 1e9,
        "documents": meta["documents"],
        "tokens": sum(meta["tokens"].values()),
        "steps": len(run["records"]),
        "data_limit_gb": args.data_limit_gb,
        "wall_s": round(run["wall_s"], 1),
        "median_step_s": float(np.median([r["step_time_s"] for r in run["records"]])),
        "rss_anon_mb_first_quarter": round(float(np.mean(anon[:quarter])) / 1e6, 1),
        "rss_anon_mb_last_quarter": round(float(np.mean(anon[-quarter:])) / 1e6, 1),
        "rss_anon_mb_max": round(max(anon) / 1e6, 1),
        "rss_file_mb_max": round(max(s.get("RssFile", 0) for s in samples) / 1e6, 1),
        "samples": samples,
    }


def render(results: list[dict]) -> str:
    lines = [
        "# Streaming data: trainer memory on a dataset larger than its RLIMIT_DATA",
        "",
        "Generated by `python -m bench.streaming_memory` (see its docstring). `RssAnon` is the trainer's private",
        "memory (what a dataset loaded into Python would grow); `RssFile` is the dataset's pages in the",
        "kernel's file cache, shared and reclaimable. Quarters are of the samples taken while training.",
        "",
        "| date (UTC) | commit | machine | dataset GB | documents | steps | RLIMIT_DATA GB | RssAnon MB first / last"
        " quarter (max) | RssFile MB max | median step s | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        lines.append(
            f"| {r['date_utc']} | {r['commit']} | {r['machine']} | {s['dataset_gb']:.2f} | {s['documents']:,} | "
            f"{s['steps']} | {s['data_limit_gb']:g} | {s['rss_anon_mb_first_quarter']} / "
            f"{s['rss_anon_mb_last_quarter']} ({s['rss_anon_mb_max']}) | {s['rss_file_mb_max']} | "
            f"{s['median_step_s']:.3f} | `{r['command']}` |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.gb, args.steps, args.data_limit_gb = 0.05, 3, min(args.data_limit_gb, 2.0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.prefix = str(work / f"data_{args.gb:g}gb")
    started = time.perf_counter()
    meta = make_dataset(args.prefix, args.gb, work)
    made_s = time.perf_counter() - started
    run, samples = train(args.prefix, meta["tokenizer_file"], args.steps, args.data_limit_gb, work / f"run_{utc_now()}")
    summary = summarise(meta, run, samples, args)
    summary["dataset_s"] = round(made_s, 1)
    print(
        f"[streaming_memory] {summary['dataset_gb']:.2f} GB, {summary['steps']} steps under RLIMIT_DATA "
        f"{args.data_limit_gb:g} GB: RssAnon {summary['rss_anon_mb_first_quarter']} -> "
        f"{summary['rss_anon_mb_last_quarter']} MB (max {summary['rss_anon_mb_max']}), RssFile max "
        f"{summary['rss_file_mb_max']} MB",
        flush=True,
    )
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out:
        path = ROOT / out
        results = json.loads(path.read_text()) if path.exists() else []
        results.append(
            {
                "commit": git_commit(),
                "machine": machine(),
                "date_utc": utc_now(),
                "command": recorded_command("bench.streaming_memory", argv if argv is not None else sys.argv[1:]),
                "summary": summary,
            }
        )
        path.write_text(json.dumps(results, indent=1) + "\n")
        path.with_suffix(".md").write_text(render(results))
        print(f"[streaming_memory] wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
