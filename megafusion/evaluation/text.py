"""The mean next-token loss of a checkpoint on a plain text file: what ``megafusion eval --text`` runs
(its command line: :mod:`megafusion.commands.eval`).

    megafusion eval --ckpt CKPT --text FILE [--tokenizer PATH] [--seq-length N] [--batch 4]
        [--loss-vocab N] [section.key=value ...]
    torchrun --nproc-per-node N -m megafusion eval --ckpt CKPT --text FILE ... parallel.tp=2 ...

For checking a Hugging Face Llama import (``megafusion convert hf-to-mf``) against the original
model, and that training (e.g. LMFusion, whose text weights are frozen) left the text ability of
a model unchanged. The convention, so that transformers or any other tool gives the same number:

- Text: the whole file (UTF-8) is one document, encoded once: ``[bos] + encode(text)``, with the
  text tokenizer's own ``encode`` (no special tokens added; no ``eos`` at the end).
- Windows: the ids are cut into consecutive, non-overlapping windows of ``--seq-length`` tokens
  (default: the checkpoint's ``model.seq_length``). Each window is an independent row: causal
  attention over the row only, RoPE positions ``0 .. s-1``, no context from the window before
  (only the first window starts with ``bos``). A window of ``L`` tokens predicts its own next
  tokens: ``L - 1`` predictions (``s - 1`` for a full window). The last window may be shorter: it
  is padded to ``s``, and only its real positions are counted (the padding comes after them, so
  causal attention keeps it out of their logits); a last window of one token predicts nothing
  and is dropped.
- Loss: the mean over all predicted tokens of the cross-entropy, computed in float64, of the
  softmax over the logit columns ``[0, loss_vocab)``; ``perplexity = exp(loss)``. This is
  transformers' ``model(window, labels=window).loss`` of each window, averaged over the windows
  weighted by their number of predictions. ``loss_vocab`` is by default every row of the
  model's vocabulary (what training's loss is over), except for a checkpoint imported from
  Hugging Face or descending from such an import (through ``checkpoint.init_from`` or
  ``convert dense-to-mot``): then it is the HF model's own vocabulary (``origin.hf_vocab_size``),
  all of *its* logits, as transformers computes the loss. The rows the import padded the
  vocabulary with are not part of the HF model (zero weights: their logit 0 would enter the
  softmax). ``--loss-vocab N`` sets the columns explicitly. LMFusion (``model.freeze_text``)
  keeps the logit columns ``[0, model.frozen_vocab_rows)`` (the text tokenizer's ids) of text
  exactly and trains the rows after them: when the HF vocabulary is the text tokenizer's (Llama 2
  and 3), an LMFusion run from an import and the import give the same loss by default; when the
  HF config has more rows than the tokenizer, pass ``--loss-vocab <the tokenizer's size>`` to both.

Tokenizer: ``--tokenizer`` (a SentencePiece ``.model``, a Hugging Face ``tokenizer.json`` or the
directory holding it). Default: the one recorded for the checkpoint, if found: the
``data.tokenizer`` of its saved config, else (built-in data) the SentencePiece model training
cached in ``data.cache_dir``, else the directory of the Hugging Face model it was imported from
(when it holds ``tokenizer.json``). A checkpoint whose data recorded a tokenizer identity (its
content hash and bos / eos / pad ids) refuses any other tokenizer.

Models: dense and MoT (text routes to the text weights), LM and Transfusion checkpoints (run on
text alone, their image modules unused); any tensor / pipeline (incl. virtual) layout given by
``section.key=value`` overrides, as :mod:`megafusion.inference.logits` builds it. Data-parallel ranks
(the processes left over by ``tp x pp``) share the windows. ``--batch`` rows go through one
forward-only pipeline call (rounded up to a multiple of ``parallel.pp`` under virtual
pipelining, which megatron-core's interleaved schedule needs); each row's logits are reduced
to its loss sum on the device as soon as they exist and then dropped, never collected.

Output: one JSON object on one line of stdout (printed by one rank): ``checkpoint``, ``step``,
``text``, ``tokenizer``, ``tokens`` (predicted tokens counted), ``windows``, ``seq_length``,
``loss``, ``perplexity``, ``loss_vocab``, ``layout`` (``tp``, ``pp``, ``vpp``, ``dp``),
``causal_routing`` (whether the model can route causally: False for expert choice without
auxiliary routers, whose losses here use the training routing, which sees the later tokens of
each window; ``routing`` then says so); with auxiliary routers (MoMa's ``moe.aux_router``)
``loss`` is the teacher-forced routing's and ``loss_causal`` the causal routing's. Bad input
(a missing or empty text file, ids outside the model's vocabulary, a tokenizer that is not
the checkpoint's, none found) exits with code 2 and a message naming the fix.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from megafusion.core.errors import MegafusionError
from megafusion.interop.hf_io import hf_origin

# Keys of a checkpoint's recorded tokenizer (``MultimodalTokenizer.config()``) that are not the
# text tokenizer's identity.
_NOT_TEXT_IDENTITY = ("n_text", "vocab_size", "codec")
TOKENIZER_KINDS = "a SentencePiece .model, a Hugging Face tokenizer.json, or the directory holding it"


class TextEvalError(MegafusionError):
    """Input the text evaluation cannot use; the message names it and the fix."""


# ------------------------------------------------------------------ lineage and tokenizer


def default_tokenizer(path: Path, manifest: dict) -> tuple[str, str]:
    """(the tokenizer recorded for checkpoint ``path``, where it was found), or TextEvalError."""
    config = manifest.get("config") or {}
    data = config.get("data") or {}
    recorded = (manifest.get("data") or {}).get("tokenizer") or {}
    tried = []
    if data.get("tokenizer"):
        given = Path(data["tokenizer"])
        if given.exists():
            return str(given), "data.tokenizer"
        tried.append(f"its data.tokenizer {given} does not exist (here)")
    elif data.get("source") == "builtin" and recorded.get("sentencepiece_sha256"):
        cache = Path(data.get("cache_dir") or "runs/cache")
        for model in sorted(cache.glob("tokenizer-*.model")):
            if hashlib.sha256(model.read_bytes()).hexdigest() == recorded["sentencepiece_sha256"]:
                return str(model), "data.cache_dir"
        tried.append(f"the SentencePiece model trained for its built-in data is not in data.cache_dir={cache}")
    origin = hf_origin(manifest)
    if origin.get("converted_from"):
        hf_dir = Path(origin["converted_from"])
        if (hf_dir / "tokenizer.json").is_file():
            return str(hf_dir), "hf-to-mf origin"
        tried.append(f"the Hugging Face directory it was imported from, {hf_dir}, holds no tokenizer.json")
    why = "; ".join(tried) if tried else "it records no tokenizer (e.g. trained on synthetic data)"
    raise TextEvalError(f"{path}: no tokenizer found for this checkpoint ({why}): pass --tokenizer ({TOKENIZER_KINDS})")


def check_tokenizer(path: Path, manifest: dict, tok, found: str = "--tokenizer") -> None:
    """Refuse a tokenizer other than the one the checkpoint's data recorded (if it recorded one);
    ``found``: where ``tok`` came from (for the message)."""
    recorded = (manifest.get("data") or {}).get("tokenizer")
    if not recorded:
        return
    theirs = {k: v for k, v in recorded.items() if k not in _NOT_TEXT_IDENTITY}
    mine = tok.identity()
    keys = [*mine, *(k for k in theirs if k not in mine)]
    diffs = [f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in keys if theirs.get(k) != mine.get(k)]
    if diffs:
        known = ((manifest.get("config") or {}).get("data") or {}).get("tokenizer")
        made = f" ({known})" if known else ""
        this = f"--tokenizer {tok.path}" if found == "--tokenizer" else f"{tok.path} (its {found}, changed since)"
        raise TextEvalError(
            f"{path} was trained with a different tokenizer{made} than {this} "
            f"({'; '.join(diffs)}): pass --tokenizer with the tokenizer the checkpoint was "
            f"trained with"
        )


# ------------------------------------------------------------------ windows and losses


def make_windows(ids: list[int], seq_length: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of ``seq_length`` ids; a last window of one id is dropped."""
    windows = [ids[i : i + seq_length] for i in range(0, len(ids), seq_length)]
    return [w for w in windows if len(w) >= 2]


def row_nll(
    logits: torch.Tensor, row: torch.Tensor, length: int, loss_vocab: int, chunk_elements: int = 1 << 25
) -> torch.Tensor:
    """Summed float64 cross-entropy of positions ``0 .. length-2`` predicting ``row[1 .. length-1]``
    over logit columns ``[0, loss_vocab)``; ``logits`` ``[1, s, vocab]``. Processed in slices of
    positions, so the float64 copy stays under ``chunk_elements`` values."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    targets = row[1:length].to(logits.device)
    step = max(1, chunk_elements // loss_vocab)
    for start in range(0, length - 1, step):
        part = logits[0, start : min(start + step, length - 1), :loss_vocab].double()
        picked = part.gather(-1, targets[start : start + part.shape[0], None])[:, 0]
        total += (torch.logsumexp(part, -1) - picked).sum()
    return total


@dataclass
class Plan:
    """Everything the evaluation needs before a model is built (all input checks done)."""

    path: Path  # the checkpoint's step directory
    step: int
    overrides: list[str]
    text: Path
    tokenizer: object  # a TextTokenizer
    tokenizer_from: str  # --tokenizer, or where the default was found
    seq_length: int
    loss_vocab: int
    windows: list[list[int]]
    batch: int  # rows per forward call (a multiple of parallel.pp under virtual pipelining)
    interleaved: bool


def plan(args, overrides: list[str]) -> Plan:
    """Check every input (checkpoint, tokenizer, text) and cut the windows; no model, no process group."""
    from megafusion.data.tokenizers.text import load_text_tokenizer
    from megafusion.inference.load import checkpoint_config

    source = checkpoint_config(args.ckpt, overrides)
    path, manifest, cfg = source.path, source.manifest, source.cfg
    seq_length = args.seq_length or cfg.model.seq_length
    vocab = cfg.model.vocab_size
    if vocab is None:
        raise TextEvalError(f"{path}: its config records no model.vocab_size: the checkpoint is damaged")
    hf_vocab = hf_origin(manifest).get("hf_vocab_size")
    loss_vocab = args.loss_vocab or min(int(hf_vocab or vocab), vocab)
    if not 2 <= loss_vocab <= vocab:
        raise TextEvalError(f"--loss-vocab {loss_vocab} must be in [2, {vocab}] (the model's vocabulary rows)")

    if args.tokenizer:
        tok_path, found = args.tokenizer, "--tokenizer"
    else:
        tok_path, found = default_tokenizer(path, manifest)
    tok = load_text_tokenizer(tok_path)
    check_tokenizer(path, manifest, tok, found)

    text_file = Path(args.text)
    if not text_file.is_file():
        raise TextEvalError(f"--text {text_file}: no such file; give a plain text (UTF-8) file")
    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TextEvalError(f"--text {text_file}: not UTF-8 text ({err}); convert it to UTF-8") from None
    ids = [tok.bos_id, *tok.encode(text)]
    if len(ids) < 2:
        raise TextEvalError(f"--text {text_file} is empty (no tokens): give a file with text in it")
    top = max(ids)
    if top >= loss_vocab or min(ids) < 0:
        where = (
            f"the loss columns [0, {loss_vocab}) (--loss-vocab)"
            if args.loss_vocab
            else f"the model's vocabulary [0, {loss_vocab})"
            + (" (the Hugging Face model's it was imported from)" if loss_vocab < vocab else "")
        )
        raise TextEvalError(
            f"the tokenizer {tok.path} gives id {top} for {text_file}, outside {where}: it is not "
            f"this model's tokenizer; pass --tokenizer with the one the model was trained with or "
            f"imported with"
        )
    p = cfg.parallel
    interleaved = p.pp > 1 and p.vpp_size() > 1
    batch = -(-args.batch // p.pp) * p.pp if interleaved else args.batch  # the interleaved schedule's need
    return Plan(
        path,
        source.step,
        list(overrides),
        text_file,
        tok,
        found,
        seq_length,
        loss_vocab,
        make_windows(ids, seq_length),
        batch,
        interleaved,
    )


def evaluate_text(job: Plan) -> dict | None:
    """Build the model in the layout asked for and run every window; the result on the rank that
    prints it (last pipeline stage, tensor- and data-parallel rank 0), None on the others."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megafusion.inference.logits import forward_logits, load_model

    loaded = load_model(str(job.path), job.overrides, job.seq_length, job.batch, extra_modules=True)
    cfg, runtime, chunks = loaded.cfg, loaded.runtime, loaded.chunks
    pp, bos = runtime.pp, job.tokenizer.bos_id
    mine = job.windows[runtime.dp_rank :: runtime.dp]  # data-parallel ranks share the windows
    from megafusion.layers.aux_router import aux_routers_of
    from megafusion.models.registry import causal_routing

    # With auxiliary routers the losses under causal routing too (each token routed from itself).
    both = bool(aux_routers_of(chunks)) and causal_routing(cfg)
    sums = torch.zeros(3, dtype=torch.float64)  # summed loss, predicted tokens, summed causal-routing loss
    for first in range(0, len(mine), job.batch):
        group = mine[first : first + job.batch]
        rows = -(-len(group) // pp) * pp if job.interleaved else len(group)  # padded with empty rows
        lengths = [len(w) for w in group] + [0] * (rows - len(group))
        tokens = torch.full((rows, job.seq_length), bos, dtype=torch.int64)  # any valid id pads
        for i, w in enumerate(group):
            tokens[i, : len(w)] = torch.tensor(w)

        def reduce(logits, i, tokens=tokens, lengths=lengths):
            if lengths[i] < 2:
                return torch.zeros((), dtype=torch.float64)
            return row_nll(logits, tokens[i], lengths[i], job.loss_vocab).cpu()

        out = forward_logits(cfg, runtime, chunks, tokens, reduce=reduce)
        causal_out = forward_logits(cfg, runtime, chunks, tokens, reduce=reduce, causal=True) if both else None
        if out is not None:  # the last pipeline stage
            sums[0] += sum(float(x) for x in out)
            sums[1] += sum(max(n - 1, 0) for n in lengths)
            sums[2] += sum(float(x) for x in causal_out or ())
    total = sums.to(runtime.device)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    if not (ps.is_pipeline_last_stage(ignore_virtual=True) and runtime.tp_rank == 0 and runtime.dp_rank == 0):
        return None
    nll, count, causal_nll = total.tolist()
    loss = nll / count
    causal = causal_routing(cfg)
    return {
        "checkpoint": str(job.path),
        "step": job.step,
        "text": str(job.text),
        "tokenizer": job.tokenizer.path,
        "tokenizer_from": job.tokenizer_from,
        "tokens": int(count),
        "windows": len(job.windows),
        "seq_length": job.seq_length,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "loss_vocab": job.loss_vocab,
        "layout": {"tp": runtime.tp, "pp": runtime.pp, "vpp": runtime.vpp or 1, "dp": runtime.dp},
        # A family whose routing is not causal (expert choice) is evaluated with its training
        # routing: each window's tokens are routed knowing the later ones (optimistic for decoding);
        # with auxiliary routers, `loss` is that and `loss_causal` the causal routing's.
        "causal_routing": causal,
        **({"routing": "teacher-forced training routing (not causal)"} if not causal or both else {}),
        **({"loss_causal": causal_nll / count} if both else {}),
    }
