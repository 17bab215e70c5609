"""``megafusion eval --text``: a Hugging Face import's loss on a text file is transformers' own.

A tiny byte-level BPE ``tokenizer.json`` and a tiny random ``LlamaForCausalLM`` whose vocabulary
(tokenizer + 3 rows) the import pads to 384 are saved in one directory and imported with
``megafusion convert hf-to-mf``. The mean next-token loss ``megafusion eval --ckpt IMPORT --text
FILE`` prints equals the one computed here with transformers on the same windows
(``model(window, labels=window)``, weighted by predictions) to 1e-5: alone, and under torchrun with
TP = 2 with the tokenizer found through the import's origin; and for a Transfusion run started
from the import at learning rate 0 (its text path, its data's tokenizer). Bad inputs (a missing,
empty or non-UTF-8 text file, a tokenizer with ids outside the model's vocabulary, one other
than the checkpoint's data recorded, none to be found) are refused before any model is built
(in process: exit code 2 and the message).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from megafusion.checkpoint.manifest import write_manifest
from tests.data.test_hf_tokenizer import HARD, LLAMA3, TEXTS, train_hf
from tests.helpers import run_train
from tests.interop.test_hf_llama import convert, ok, run, tiny_llama_config

SEQ = 32  # tokens per window: the text below makes 15 full windows and a shorter last one


def hf_windows_loss(hf_dir: Path, ids: list[int], seq: int) -> tuple[float, int]:
    """(transformers' mean loss over the predictions of every window, predictions counted)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(hf_dir)).float().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), seq):
            window = torch.tensor([ids[start : start + seq]])
            if window.shape[1] < 2:
                continue
            n = window.shape[1] - 1
            total += float(model(window, labels=window).loss) * n
            count += n
    return total / count, count


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(HF dir with the model and its tokenizer.json, imported checkpoint, text file, reference loss, predictions)."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("text_eval")
    hf_dir = tmp / "hf"
    tok_file = train_hf(hf_dir / "tokenizer.json")
    tok = Tokenizer.from_file(str(tok_file))
    n = tok.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(5)
    model = LlamaForCausalLM(tiny_llama_config(False, vocab_size=n + 3)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
    model.save_pretrained(hf_dir)
    text = tmp / "text.txt"
    text.write_text("\n".join(TEXTS * 3) + "\n" + HARD + "\n", encoding="utf-8")
    ids = [tok.token_to_id(LLAMA3[0]), *tok.encode(text.read_text(encoding="utf-8"), add_special_tokens=False).ids]
    assert len(ids) % SEQ > 1 and len(ids) > 10 * SEQ  # a shorter last window, many windows
    want, count = hf_windows_loss(hf_dir, ids, SEQ)
    ckpt, yaml = tmp / "mf", tmp / "model.yaml"
    ok(convert("hf-to-mf", "--hf", hf_dir, "--output", ckpt, "--config-out", yaml))
    return {
        "tmp": tmp,
        "hf": hf_dir,
        "ckpt": ckpt,
        "yaml": yaml,
        "text": text,
        "loss": want,
        "count": count,
        "ids": ids,
        "hf_vocab": n + 3,
    }


def result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, stdout  # one JSON object, printed once
    return json.loads(lines[0])


def test_loss_equals_transformers(imported):
    out = result(
        ok(
            run(
                [
                    "megafusion",
                    "eval",
                    "--ckpt",
                    str(imported["ckpt"]),
                    "--text",
                    str(imported["text"]),
                    "--tokenizer",
                    str(imported["hf"]),
                    "--seq-length",
                    str(SEQ),
                    "--batch",
                    "3",
                ]
            )
        )
    )
    assert abs(out["loss"] - imported["loss"]) <= 1e-5, (out["loss"], imported["loss"])
    assert out["tokens"] == imported["count"] == len(imported["ids"]) - math.ceil(len(imported["ids"]) / SEQ)
    assert out["windows"] == math.ceil(len(imported["ids"]) / SEQ) and out["seq_length"] == SEQ
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]), rel=1e-12)
    # Softmax over the HF model's vocabulary, not the 384 rows the import padded it to.
    assert out["loss_vocab"] == imported["hf_vocab"]
    assert out["layout"] == {"tp": 1, "pp": 1, "vpp": 1, "dp": 1} and out["step"] == 0
    assert out["causal_routing"] is True and "routing" not in out  # a dense model routes nothing
    assert out["tokenizer"] == str(imported["hf"] / "tokenizer.json") and out["checkpoint"] == str(imported["ckpt"])
    imported["single"] = out["loss"]


@pytest.mark.torchrun
def test_tensor_parallel_with_the_tokenizer_of_the_origin(imported):
    """torchrun, TP = 2 (gloo), no --tokenizer: the import's HF directory holds tokenizer.json."""
    out = result(
        ok(
            run(
                [
                    "megafusion",
                    "eval",
                    "--ckpt",
                    str(imported["ckpt"]),
                    "--text",
                    str(imported["text"]),
                    "--seq-length",
                    str(SEQ),
                    "--batch",
                    "2",
                    "parallel.tp=2",
                ],
                nproc=2,
            )
        )
    )
    assert out["layout"] == {"tp": 2, "pp": 1, "vpp": 1, "dp": 1}
    assert out["tokenizer_from"] == "hf-to-mf origin" and out["tokenizer"] == str(imported["hf"] / "tokenizer.json")
    assert abs(out["loss"] - imported["loss"]) <= 1e-5, (out["loss"], imported["loss"])
    assert out["tokens"] == imported["count"]
    if "single" in imported:
        assert abs(out["loss"] - imported["single"]) <= 1e-6


# ------------------------------------------------------------------ refusals (in process: no model is built)


def eval_main(args: list[str], capsys) -> tuple[int, str]:
    from megafusion.commands.eval import main

    code = main([str(a) for a in args])  # `megafusion eval` routes --text to megafusion.evaluation.text
    return code, capsys.readouterr().err


def with_manifest(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` whose manifest ``edit(manifest)`` changed (the weights are not read here)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "megafusion.json").read_text())
    edit(manifest)
    write_manifest(dst, manifest)  # sealed again: an edited manifest is otherwise refused as damaged
    return dst


def test_bad_text_files_are_refused(imported, tmp_path, capsys):
    ckpt, tok = imported["ckpt"], imported["hf"]
    code, err = eval_main(["--ckpt", ckpt, "--text", tmp_path / "missing.txt", "--tokenizer", tok], capsys)
    assert code == 2 and f"--text {tmp_path / 'missing.txt'}: no such file" in err
    (tmp_path / "empty.txt").write_text("")
    code, err = eval_main(["--ckpt", ckpt, "--text", tmp_path / "empty.txt", "--tokenizer", tok], capsys)
    assert code == 2 and "empty.txt is empty (no tokens)" in err
    (tmp_path / "latin1.txt").write_bytes("Zürich".encode("latin-1"))
    code, err = eval_main(["--ckpt", ckpt, "--text", tmp_path / "latin1.txt", "--tokenizer", tok], capsys)
    assert code == 2 and "not UTF-8 text" in err
    code, err = eval_main(["--ckpt", tmp_path / "nowhere", "--text", imported["text"]], capsys)
    assert code == 2 and f"--ckpt {tmp_path / 'nowhere'}: no such file or directory" in err
    code, err = eval_main(["--ckpt", tmp_path, "--text", imported["text"]], capsys)  # there, but not a checkpoint
    assert code == 2 and "neither a megafusion checkpoint" in err


def test_a_tokenizer_with_other_ids_is_refused(imported, tmp_path, capsys):
    """A larger tokenizer (bos beyond the HF vocabulary); --loss-vocab below the ids in the text."""
    from megafusion.data.tokenizers.text import load_text_tokenizer

    big = train_hf(
        tmp_path / "big" / "tokenizer.json", texts=TEXTS + [HARD] * 2 + [t.upper() for t in TEXTS], vocab_size=400
    )
    assert load_text_tokenizer(big).bos_id >= imported["hf_vocab"]
    code, err = eval_main(["--ckpt", imported["ckpt"], "--text", imported["text"], "--tokenizer", big.parent], capsys)
    assert code == 2 and f"the tokenizer {big} gives id" in err
    assert f"outside the model's vocabulary [0, {imported['hf_vocab']}) (the Hugging Face model's" in err
    code, err = eval_main(["--ckpt", imported["ckpt"], "--text", imported["text"], "--loss-vocab", 50], capsys)
    assert code == 2 and "outside the loss columns [0, 50) (--loss-vocab)" in err
    code, err = eval_main(["--ckpt", imported["ckpt"], "--text", imported["text"], "--loss-vocab", 1000], capsys)
    assert code == 2 and "--loss-vocab 1000 must be in [2, 384]" in err


def test_no_tokenizer_found_asks_for_one(imported, tmp_path, capsys):
    no_tokenizer = tmp_path / "hf_without_tokenizer"
    no_tokenizer.mkdir()
    bare = with_manifest(
        imported["ckpt"],
        tmp_path / "bare",
        lambda manifest: manifest["origin"].update(converted_from=str(no_tokenizer)),
    )
    code, err = eval_main(["--ckpt", bare, "--text", imported["text"]], capsys)
    assert code == 2 and f"{bare}: no tokenizer found" in err and "holds no tokenizer.json" in err
    assert "pass --tokenizer" in err


@pytest.mark.torchrun
def test_transfusion_run_from_the_import_keeps_its_text_loss(imported, tmp_path, capsys):
    """A Transfusion run (image modules new) started from the import, one step at learning rate 0,
    under PP=2: evaluated in one process on text alone (no layout given: any saved layout loads; no
    --tokenizer: its data.tokenizer; windows of its model.seq_length), it gives transformers' loss;
    it refuses a tokenizer other than the one its data recorded."""
    seq = 3 * SEQ
    run_train(
        tmp_path,
        2,
        str(imported["yaml"]),
        [
            "parallel.pp=2",
            "objective.name=transfusion",
            "objective.latent_patch_size=3",
            "data.source=builtin",
            "data.builtin=shapes",
            "data.num_samples=24",
            "data.image_size=12",
            f"data.tokenizer={imported['hf']}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"model.seq_length={seq}",
            "train.steps=1",
            "train.global_batch_size=2",
            "train.micro_batch_size=2",
            "train.lr=1e-9",
            "train.min_lr=0",
            "train.warmup_steps=0",
            "eval.interval=0",
            f"checkpoint.init_from={imported['ckpt']}",
            "checkpoint.save=true",
            f"checkpoint.dir={tmp_path / 'run'}",
        ],
        "transfusion",
    )
    out = result(ok(run(["megafusion", "eval", "--ckpt", str(tmp_path / "run"), "--text", str(imported["text"])])))
    want, count = hf_windows_loss(imported["hf"], imported["ids"], seq)
    assert abs(out["loss"] - want) <= 1e-5, (out["loss"], want)
    assert (out["tokens"], out["seq_length"], out["step"]) == (count, seq, 1)
    assert out["tokenizer_from"] == "data.tokenizer" and out["loss_vocab"] == imported["hf_vocab"]

    other = train_hf(tmp_path / "other" / "tokenizer.json", texts=[t.upper() for t in TEXTS], vocab_size=280)
    code, err = eval_main(["--ckpt", tmp_path / "run", "--text", imported["text"], "--tokenizer", other], capsys)
    assert code == 2 and f"was trained with a different tokenizer ({imported['hf']}) than --tokenizer {other}" in err
    assert "hf_tokenizer_sha256" in err


def test_windows_and_float64_row_loss():
    from megafusion.evaluation.text import make_windows, row_nll

    ids = list(range(65))
    assert [len(w) for w in make_windows(ids, 32)] == [32, 32]  # a last window of one id predicts nothing
    assert [len(w) for w in make_windows(ids[:40], 32)] == [32, 8]
    gen = torch.Generator().manual_seed(0)
    logits, row = torch.randn(1, 10, 7, generator=gen) * 3, torch.randint(0, 5, (10,), generator=gen)
    want = torch.nn.functional.cross_entropy(logits[0, :5, :5].double(), row[1:6], reduction="sum")
    for chunk in (1, 10, 1000):  # slices of 1 and 2 positions, and one slice
        assert torch.allclose(row_nll(logits, row, 6, 5, chunk_elements=chunk), want, rtol=1e-12)
