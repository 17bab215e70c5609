"""One command line: every command reads and answers the same way.

``--help`` everywhere, with a description and ``examples:`` that parse; ``--ckpt`` for what is
read and ``--output`` for what is written (the old spellings still accepted); ``--version``;
``train`` / ``flops`` refuse to run without ``--config``; argument errors and ``--help`` come back
without importing torch; an output that cannot be written is refused before any work; ``data
prepare`` warns once about documents a run at ``--seq-length`` could not pack. Commands run in
process (``main([...])`` with capsys); only the torch-import check needs a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from megafusion.commands import convert, data, flops, generate, logits, plan, tokenizer, train
from megafusion.commands import eval as eval_cmd
from megafusion.commands.main import main, version
from megafusion.core.errors import UsageError
from megafusion.core.io import ensure_writable_dir, ensure_writable_file_parent
from tests.helpers import ROOT

CONFIG = str(ROOT / "examples/configs/tiny_dense.yaml")


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("MEGAFUSION_DEBUG", raising=False)


# ------------------------------------------------------------------ --help and its examples

# (how to call it, argv before --help); None: the `megafusion` dispatcher.
HELPS = [
    (None, ["train"]),
    (None, ["flops"]),
    (None, ["plan"]),
    (None, ["data"]),
    (None, ["data", "prepare"]),
    (None, ["data", "export-builtin"]),
    (None, ["data", "index"]),
    (None, ["tokenizer"]),
    (None, ["tokenizer", "train"]),
    (None, ["tokenizer", "fit-vq"]),
    (None, ["convert"]),
    (None, ["convert", "dense-to-mot"]),
    (None, ["convert", "hf-to-mf"]),
    (None, ["convert", "mf-to-hf"]),
    (None, ["generate"]),
    (None, ["eval"]),
    (None, ["eval", "--text", "FILE"]),
    (None, ["logits"]),
]


def _help(call, argv, flag, capsys) -> str:
    rc = (call or main)([*argv, flag])
    out = capsys.readouterr()
    assert rc == 0 and out.err == "", out.err
    return out.out


def _parse_example(line: str):
    """Parse an example command line with its command's own parser; returns the unknown flags."""
    words = shlex.split(line)
    if words[0] == "torchrun":
        words = ["python", *words[words.index("-m") :]]
    if words[:3] == ["python", "-m", "megafusion.train"]:  # torchrun's habit, kept
        words = ["megafusion", "train", *words[3:]]
    elif words[:3] == ["python", "-m", "megafusion"]:
        words = words[2:]
    assert words[0] == "megafusion", f"{line}: not megafusion <command> (python -m megafusion <command>)"
    command, args = words[1], words[2:]
    if command in ("train", "flops", "plan"):
        parsed = {"train": train, "flops": flops, "plan": plan}[command].parser().parse_intermixed_args(args)
        assert parsed.config, line
        return []
    parser = {
        "data": data._parser,
        "tokenizer": tokenizer._parser,
        "convert": convert._parser,
        "generate": generate._parser,
        "eval": eval_cmd._text_parser if "--text" in args else eval_cmd._parser,
        "logits": logits._parser,
    }[command]()
    _, rest = parser.parse_known_args(args)
    return [word for word in rest if "=" not in word or word.startswith("-")]


@pytest.mark.parametrize("call,argv", HELPS, ids=[" ".join(argv) for _, argv in HELPS])
def test_every_command_has_help_with_a_description_and_examples_that_parse(call, argv, capsys):
    text = _help(call, argv, "--help", capsys)
    assert text == _help(call, argv, "-h", capsys)
    assert text.startswith("usage: ") and "\nexamples:\n" in text
    description = text.split("\n\n")[1]
    assert len(description) > 40 and not description.startswith(("options:", "positional")), description
    examples = [line.strip() for line in text.split("\nexamples:\n", 1)[1].splitlines() if line.strip()]
    assert examples
    for line in examples:
        assert _parse_example(line) == [], line


# `python -m` lines that are megafusion commands: the entry points and the retired shims (named to
# be refused by _parse_example).
ENTRY_MODULES = [
    ["python", "-m", name]
    for name in (
        "megafusion",
        "megafusion.train",
        *(f"megafusion.{old}" for old in ("cli", "evaluate", "logits", "generate", "launch_plan")),
    )
]


def _readme_commands() -> list[str]:
    """Every megafusion command of the ``bash`` blocks of the README and the docs/ pages, continuation
    lines joined, comments dropped."""
    commands = []
    docs = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    for block in re.findall(r"```bash\n(.*?)```", docs, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                one, words = (
                    (words[: words.index("&&")], words[words.index("&&") + 1 :]) if "&&" in words else (words, [])
                )
                if one[:1] in (["megafusion"], ["torchrun"]) or one[:3] in ENTRY_MODULES:
                    commands.append(shlex.join(one))
    return commands


def _help_examples(capsys) -> list[str]:
    texts = [_help(call, argv, "--help", capsys) for call, argv in HELPS]
    return [line.strip() for text in texts for line in text.split("\nexamples:\n", 1)[1].splitlines() if line.strip()]


def _runs_without_training(words: list[str]) -> bool:
    return words[1] in ("plan", "flops") or words[1:2] == ["train"] and "--dry-run" in words


def test_the_readme_commands_parse(capsys):
    commands = _readme_commands()
    assert len(commands) > 30 and any("--dry-run" in c for c in commands)
    for line in commands:
        assert _parse_example(line) == [], line


def test_every_dry_run_plan_and_flops_example_of_the_readme_and_the_help_runs(tmp_path, monkeypatch, capsys):
    """As written, from a fresh directory holding examples/ (what they write, plan.json and the
    tokenizer cache, lands there), all in this process. Cheaper, not different: the built-in data
    is built once per data setting, and the plan searches one micro-batch size and recompute mode
    unless the example names them (the planner's own tests cover the search)."""
    from megafusion.data import sources
    from megafusion.planning import search

    examples = sorted({*_readme_commands(), *_help_examples(capsys)})
    runs = [shlex.split(line) for line in examples if _runs_without_training(shlex.split(line))]
    assert {words[1] for words in runs} == {"train", "plan", "flops"} and len(runs) >= 10
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    built = {}

    def build_data(cfg, *args, **kwargs):
        key = repr((cfg.data, cfg.objective, cfg.model.seq_length, cfg.model.vocab_size, cfg.train.seed, args, kwargs))
        if key not in built:
            built[key] = real_build_data(cfg, *args, **kwargs)
        return built[key]

    real_build_data = sources.build_data
    monkeypatch.setattr(sources, "build_data", build_data)
    monkeypatch.setattr(search, "MICRO_BATCH_SIZES", (1,))
    monkeypatch.setattr(search, "RECOMPUTE_MODES", ("none",))
    for words in runs:
        assert main(words[1:]) == 0, (shlex.join(words), capsys.readouterr().err)
        out = capsys.readouterr()
        assert out.err == "" and out.out, shlex.join(words)


def test_the_usage_lists_the_new_flag_names(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "--input CKPT" not in usage and "--out " not in usage
    assert (
        "convert mf-to-hf --ckpt CKPT --output DIR" in usage
        and "generate --ckpt CKPT --prompt TEXT --output DIR" in usage
    )
    assert main([]) == 2 and capsys.readouterr().out == usage


# ------------------------------------------------------------------ one spelling per flag, old ones kept


ALIASES = [
    (convert._parser, ["dense-to-mot", "--output", "o"], "--ckpt", "--input", "ckpt"),
    (convert._parser, ["mf-to-hf", "--output", "o"], "--ckpt", "--input", "ckpt"),
    (generate._parser, ["--ckpt", "c", "--prompt", "p"], "--output", "--out", "output"),
    (logits._parser, ["--ckpt", "c", "--tokens", "t"], "--output", "--out", "output"),
    (tokenizer._parser, ["fit-vq", "--builtin", "shapes"], "--output", "--out", "output"),
    (eval_cmd._parser, ["--ckpt", "c"], "--output", "--out", "out"),
]


ALIAS_IDS = ["dense-to-mot", "mf-to-hf", "generate", "logits", "fit-vq", "eval"]


@pytest.mark.parametrize("parser,base,new,old,dest", ALIASES, ids=ALIAS_IDS)
def test_old_and_new_flag_spellings_parse_to_the_same_value(parser, base, new, old, dest):
    assert getattr(parser().parse_args([*base, new, "X"]), dest) == "X"
    assert getattr(parser().parse_args([*base, old, "X"]), dest) == "X"


def test_version_is_printed_without_a_command(capsys):
    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        assert capsys.readouterr().out == f"megafusion {version()}\n"
    assert re.fullmatch(r"\d+\.\d+.*", version())


def _command_lines() -> list[list[str]]:
    """Every command and subcommand, read from the parsers themselves (``["data", "index"]``, ...)."""
    import argparse
    import importlib

    from megafusion.commands.main import COMMANDS

    lines = []
    for name in COMMANDS:
        module = importlib.import_module(f"megafusion.commands.{name}")
        parser = (getattr(module, "parser", None) or module._parser)()
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        lines += [[name, sub] for action in subs for sub in action.choices] or [[name]]
    return lines


def test_the_usage_lists_exactly_the_commands_of_the_table_and_their_subcommands(capsys, monkeypatch):
    """The usage is made from ``COMMANDS``: the commands in its order, no other; every subcommand of
    a command's parser, and no subcommand its parser does not have."""
    from megafusion.commands.main import COMMANDS, Command

    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    listed = [line.split()[:2] for line in usage.split("\ncommands:\n", 1)[1].splitlines() if line.strip()]
    assert list(dict.fromkeys(name for name, _ in listed)) == list(COMMANDS)
    commands = _command_lines()
    with_subcommands = {words[0] for words in commands if len(words) == 2}
    assert {"data", "convert", "tokenizer"} <= with_subcommands
    for name, word in listed:
        assert name not in with_subcommands or [name, word] in commands, f"{name} {word}: no such subcommand"
    # A command added to the table is in the usage at once (nothing else lists them).
    monkeypatch.setitem(COMMANDS, "frobnicate", Command((("--gently", "a command added in this test"),)))
    assert main(["--help"]) == 0
    assert "\n  frobnicate --gently " in capsys.readouterr().out


def test_every_command_and_subcommand_is_in_the_usage_and_answers_version(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    listed = [line.split()[:2] for line in usage.split("\ncommands:\n", 1)[1].splitlines() if line.strip()]
    commands = _command_lines()
    assert ["data", "index"] in commands and ["convert", "upcycle"] in commands and ["logits"] in commands
    for words in commands:
        assert any(line[: len(words)] == words for line in listed), f"{' '.join(words)} is missing from the usage"
        assert main([*words, "--version"]) == 0, words
        assert capsys.readouterr().out == f"megafusion {version()}\n", words
    for extra in (["train", "--dry-run"], ["eval", "--text", "FILE"]):
        assert main([*extra, "--version"]) == 0 and capsys.readouterr().out == f"megafusion {version()}\n"


# ------------------------------------------------------------------ train / flops need --config


@pytest.mark.parametrize("argv", [["train"], ["train", "train.steps=1"], ["train", "--dry-run"], ["flops"]])
def test_train_and_flops_without_config_print_help_and_run_nothing(argv, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("nothing may be loaded without --config")

    monkeypatch.setattr(train, "load_and_validate", never)
    monkeypatch.setattr(flops, "representative_batch", never)
    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith(f"usage: megafusion {argv[0]}") and "examples:" in out.err
    assert out.err.endswith(f"megafusion {argv[0]}: error: --config FILE is required (examples/configs/ has some)\n")


def test_train_passes_configs_overrides_and_overwrite_on(capsys, monkeypatch):
    seen = []

    def load_config(path, overrides):
        seen.append((path, overrides))
        raise UsageError("stop here")

    monkeypatch.setattr("megafusion.config.load_config", load_config)
    argv = ["train", "a.b=1", "--config", "x.yaml", "c.d=2", "--overwrite", "--config", "y.yaml", "e.f=3"]
    assert main(argv) == 2
    assert capsys.readouterr().err == "megafusion train: stop here\n"
    assert seen == [(["x.yaml", "y.yaml"], ["a.b=1", "c.d=2", "e.f=3", "checkpoint.overwrite=true"])]
    assert main(["train", "--config=x.yaml", "checkpoint.overwrite=false", "--overwrite"]) == 2
    # --overwrite wins over an explicit checkpoint.overwrite=false: it is the last override.
    assert seen[-1] == ("x.yaml", ["checkpoint.overwrite=false", "checkpoint.overwrite=true"])


def test_train_keeps_the_dry_run_flags_for_the_dry_run(capsys):
    assert main(["train", "--config", CONFIG, "--world-size", "2"]) == 2
    assert "megafusion train: error: --world-size only goes with --dry-run" in capsys.readouterr().err
    assert main(["train", "--conf", CONFIG]) == 2  # no abbreviations: exactly the documented flags
    capsys.readouterr()
    argv = ["train", "--dry-run", "--config", CONFIG, "parallel.tp=2", "--world_size=4", "--grouped", "--overwrite"]
    assert main(argv) == 0
    assert "world 4 = tp 2 x pp 1 x dp 2" in capsys.readouterr().out


# ------------------------------------------------------------------ argument errors import nothing heavy


# (argv with {tmp}: a fresh directory, the flag and path the one-line error names)
MISSING = [
    (["generate", "--ckpt", "{tmp}/none", "--prompt", "p", "--output", "{tmp}/o"], "--ckpt {tmp}/none"),
    (["eval", "--ckpt", "{tmp}/none"], "--ckpt {tmp}/none"),
    (["eval", "--ckpt", "{tmp}", "--text", "{tmp}/none.txt"], "--text {tmp}/none.txt"),
    (["convert", "dense-to-mot", "--ckpt", "{tmp}/none", "--output", "{tmp}/o"], "--ckpt {tmp}/none"),
    (["convert", "upcycle", "--ckpt", "{tmp}/none", "--output", "{tmp}/o"], "--ckpt {tmp}/none"),
    (["convert", "btx-merge", "--seed", "{tmp}/none", "--branch", "{tmp}", "--output", "{tmp}/o"], "--seed {tmp}/none"),
    (
        [
            "convert",
            "btx-merge",
            "--seed",
            "{tmp}",
            "--branch",
            "{tmp}",
            "--branch",
            "{tmp}/none",
            "--output",
            "{tmp}/o",
        ],
        "--branch {tmp}/none",
    ),
    (["convert", "mf-to-hf", "--ckpt", "{tmp}/none", "--output", "{tmp}/o"], "--ckpt {tmp}/none"),
    (["convert", "hf-to-mf", "--hf", "{tmp}/none", "--output", "{tmp}/o"], "--hf {tmp}/none"),
    (["logits", "--ckpt", "{tmp}/none", "--tokens", "t.pt", "--output", "{tmp}/o.pt"], "--ckpt {tmp}/none"),
    (["logits", "--ckpt", "{tmp}", "--tokens", "{tmp}/none.pt", "--output", "{tmp}/o.pt"], "--tokens {tmp}/none.pt"),
    (["data", "prepare", "--input", "{tmp}/none", "--tokenizer", "t", "--output", "{tmp}/o"], "--input {tmp}/none"),
    (
        ["tokenizer", "train", "--input", "{tmp}/none", "--vocab-size", "50", "--output", "{tmp}/t"],
        "--input {tmp}/none",
    ),
    (["flops", "--config", CONFIG, "data.source=indexed", "data.path={tmp}/none"], "data.path={tmp}/none"),
    (["train", "--config", CONFIG, "data.source=indexed", "data.path={tmp}/none"], "data.path={tmp}/none"),
    (["data", "index", "--config", CONFIG, "data.source=indexed", "data.path={tmp}/none"], "data.path={tmp}/none"),
]


@pytest.mark.parametrize("argv,named", MISSING, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(MISSING)])
def test_a_missing_input_is_one_line_naming_the_flag_and_the_path(argv, named, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err
    command = " ".join(argv[:2] if argv[0] in ("data", "convert", "tokenizer") else argv[:1])
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"megafusion {command}: {named.format(tmp=tmp_path)}: no "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


# (argv of `megafusion`, and the exit status)
LIGHT = [
    (["--version"], 0),
    # A dry-run that works: the layout is computed without torch or megatron.
    (["train", "--dry-run", "--config", CONFIG, "parallel.tp=2", "parallel.pp=2", "--world-size", "8", "--json"], 0),
    (["train", "--dry-run", "--version"], 0),
    (["data", "index", "--version"], 0),
    (["convert", "upcycle", "--version"], 0),
    (["--help"], 0),
    (["train"], 2),
    (["flops"], 2),
    (["train", "--help"], 0),
    (["train", "--bogus"], 2),
    (["train", "--config", "x.yaml", "--nnodes", "2"], 2),
    (["flops", "--help"], 0),
    (["flops", "--config", "x.yaml", "--bogus"], 2),
    (["data", "--help"], 0),
    (["data", "prepare", "--help"], 0),
    (["data", "prepare", "--bogus"], 2),
    (["data", "export-builtin", "--set", "cats", "--output", "o.jsonl"], 2),
    (["data", "index"], 2),
    (["data", "export-builtin", "--set", "shapes", "--num-samples", "0", "--output", "o.jsonl"], 2),
    (["data", "prepare", "--input", "s", "--tokenizer", "t", "--output", "o", "--image-codec", "jpeg"], 2),
    (["data", "prepare", "--input", "s", "--tokenizer", "t", "--output", "o", "--seq-length", "0"], 2),
    (["data", "prepare", "--input", "s", "--tokenizer", "t", "--output", "o", "--order", "random"], 2),
    (["data", "prepare", "--input", "s", "--tokenizer", "t", "--output", "o", "--icp-neighbors", "3"], 2),
    (
        [
            "data",
            "prepare",
            "--input",
            "s",
            "--tokenizer",
            "t",
            "--output",
            "o",
            "--order",
            "icp",
            "--icp-neighbors",
            "0",
        ],
        2,
    ),
    (["tokenizer", "train", "--help"], 0),
    (["tokenizer", "train", "--bogus"], 2),
    (["tokenizer", "fit-vq", "--help"], 0),
    (["tokenizer", "fit-vq", "--builtin", "shapes"], 2),
    (["convert", "--help"], 0),
    (["convert", "dense-to-mot", "--help"], 0),
    (["convert", "dense-to-mot", "--ckpt", "c", "--output", "o", "--bogus"], 2),
    (["convert", "hf-to-mf", "--help"], 0),
    (["convert", "hf-to-mf", "--output", "o"], 2),
    (["convert", "mf-to-hf", "--help"], 0),
    (["convert", "mf-to-hf", "--input", "c"], 2),
    (["convert", "to-onnx"], 2),
    (["generate", "--help"], 0),
    (["generate", "--ckpt", "c", "--prompt", "p", "--output", "o", "--sampler", "plms"], 2),
    (["generate", "--ckpt", "c", "--prompt", "p", "--output", "o", "--steps", "0"], 2),
    (["generate", "--ckpt", "c", "--prompt", "p", "--output", "{file}/o"], 2),
    (["eval", "--help"], 0),
    (["eval", "--ckpt", "c", "--bogus"], 2),
    (["eval", "--ckpt", "c", "--text", "t", "--help"], 0),
    (["eval", "--ckpt", "c", "--text", "t", "--bogus"], 2),
    (["logits", "--help"], 0),
    (["logits", "--ckpt", "c", "--tokens", "t"], 2),
    (["logits", "--ckpt", "c", "--tokens", "t", "--output", "o.pt", "--bogus"], 2),
    (["logits", "--ckpt", "c", "--tokens", "t", "--output", "{file}/o.pt"], 2),
    # Inputs that are not there: told before torch is imported (MISSING below checks the messages).
    *((argv, 2) for argv, _ in MISSING),
]

PROBE = """
import contextlib, io, json, sys
from megafusion.commands.main import main
results = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(argv)
    results.append([rc, sorted(m for m in ("torch", "megatron", "transformers") if m in sys.modules)])
print(json.dumps(results))
"""


def test_argument_errors_and_help_import_no_torch(tmp_path):
    """One fresh interpreter runs every case in turn: the first one that imports torch shows."""
    (tmp_path / "file").write_text("")
    cases = [[a.format(file=tmp_path / "file", tmp=tmp_path) for a in argv] for argv, _ in LIGHT]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MEGAFUSION_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(cases)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    for (argv, status), (rc, heavy) in zip(LIGHT, results):
        assert (rc, heavy) == (status, []), argv


# ------------------------------------------------------------------ outputs checked before any work


def test_writable_checks_name_the_flag_the_path_and_the_cause(tmp_path):
    (tmp_path / "file").write_text("")
    blocked = tmp_path / "file" / "out"
    for check in (ensure_writable_dir, ensure_writable_file_parent):
        with pytest.raises(UsageError) as err:
            check(blocked, "--output")
        assert str(err.value) == (
            f"--output {blocked}: cannot write there ('{tmp_path / 'file'}' is a file, not a directory): "
            "choose another --output"
        )
    with pytest.raises(UsageError, match="is a file, not a directory"):
        ensure_writable_dir(tmp_path / "file", "--output")
    with pytest.raises(UsageError, match="is a directory"):
        ensure_writable_file_parent(tmp_path, "--output")
    # A location that can be written: checked through its nearest existing ancestor, nothing is created
    # (a command refused later leaves no trace) unless asked.
    ensure_writable_dir(tmp_path / "a" / "b", "--output")
    ensure_writable_file_parent(tmp_path / "c" / "f.pt", "--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert ensure_writable_dir(tmp_path / "a" / "b", "--output", create=True).is_dir()


# (argv with {bad}: a regular file, {tmp}: a fresh directory; the command in the error's prefix)
UNWRITABLE = [
    (
        ["data", "prepare", "--input", "{tmp}/none", "--tokenizer", "{tmp}/t.model", "--output", "{bad}/ds"],
        "data prepare",
    ),
    (["tokenizer", "train", "--input", "{tmp}/none", "--vocab-size", "50", "--output", "{bad}/tok"], "tokenizer train"),
    (["tokenizer", "fit-vq", "--builtin", "shapes", "--out", "{bad}/c.safetensors"], "tokenizer fit-vq"),
    (["convert", "dense-to-mot", "--input", "{tmp}/none", "--output", "{bad}/mot"], "convert dense-to-mot"),
    (["convert", "mf-to-hf", "--ckpt", "{tmp}/none", "--output", "{bad}/hf"], "convert mf-to-hf"),
    (["convert", "hf-to-mf", "--hf", "{tmp}/none", "--output", "{bad}/mf"], "convert hf-to-mf"),
    (
        ["convert", "hf-to-mf", "--hf", "{tmp}/none", "--output", "{tmp}/mf", "--config-out", "{bad}/m.yaml"],
        "convert hf-to-mf",
    ),
    (["generate", "--ckpt", "{tmp}/none", "--prompt", "x", "--out", "{bad}/png"], "generate"),
    (["eval", "--ckpt", "{tmp}/none", "--output", "{bad}/png"], "eval"),
    (["logits", "--ckpt", "{tmp}/none", "--tokens", "{tmp}/none.pt", "--output", "{bad}/l.pt"], "logits"),
    (["plan", "--config", "{tmp}/none.yaml", "--gpus", "8", "--json", "{bad}/plan.json"], "plan"),
]


@pytest.mark.parametrize("argv,command", UNWRITABLE, ids=[f"{i}-{c}" for i, (_, c) in enumerate(UNWRITABLE)])
def test_an_unwritable_output_is_refused_before_any_work(argv, command, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file"
    argv = [a.format(tmp=tmp_path, bad=bad) for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err
    flag = next((f for f in ("--config-out", "--json", "--output") if f in argv), "--output")
    path = argv[argv.index(flag) + 1] if flag in argv else argv[argv.index("--out") + 1]
    assert rc == 2 and err.count("\n") == 1, err
    # The missing inputs (checkpoint, shards, HF directory) would be reported next: the output came first.
    assert err == (
        f"megafusion {command}: {flag} {path}: cannot write there ('{bad}' is a file, not a directory): "
        f"choose another {flag}\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_an_output_that_is_a_file_is_refused_as_a_directory(tmp_path, capsys):
    (tmp_path / "png").write_text("")
    argv = ["generate", "--ckpt", str(tmp_path / "none"), "--prompt", "x", "--output", str(tmp_path / "png")]
    assert main(argv) == 2
    assert "is a file, not a directory): choose another --output" in capsys.readouterr().err


# ------------------------------------------------------------------ data prepare: documents longer than a row


def test_data_prepare_warns_once_about_documents_longer_than_a_row(tmp_path, capsys):
    from megafusion.config import Config
    from megafusion.core.errors import DataError
    from megafusion.data.formats.indexed import read_indexed
    from megafusion.data.packing import pack_documents
    from megafusion.data.tokenizers.joint import train_sentencepiece

    assert data.DEFAULT_SEQ_LENGTH == Config().model.seq_length
    words = "red blue green circle square triangle at the top left of a white field".split()
    texts = [" ".join(words[: 2 + (3 * i) % len(words)]) for i in range(12)]
    shard = tmp_path / "shard.jsonl"
    shard.write_text("".join(json.dumps({"segments": [{"text": t}]}) + "\n" for t in texts))
    sp_model = train_sentencepiece(texts * 4, 60, str(tmp_path / "sp"))
    out = str(tmp_path / "ds")
    base = ["data", "prepare", "--input", str(shard), "--tokenizer", sp_model, "--output", out]

    assert main([*base, "--seq-length", "1000"]) == 0
    assert capsys.readouterr().err == ""
    docs, meta = read_indexed(out)
    lengths = sorted(len(doc.tokens) for doc in docs)
    seq_length = lengths[len(lengths) // 2]  # about half the documents do not fit in a row of seq_length + 1
    long = [n for n in lengths if n > seq_length + 1]
    assert 0 < len(long) < len(docs)

    assert main([*base, "--seq-length", str(seq_length)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"megafusion data prepare: warning: {len(long)} of {len(docs)} documents are longer than --seq-length "
        f"{seq_length} allows ({seq_length + 1} tokens per packed row; longest {max(long)}): "
    ), err
    assert (
        f"train with model.seq_length={max(long) - 1} or more, split the documents in the shards, or drop them" in err
    )
    # The warning's criterion is packing's: at that length packing refuses the data, one shorter fits it all.
    with pytest.raises(DataError, match="documents are never cut"):
        pack_documents(docs, seq_length, meta["pad_id"])
    assert pack_documents(docs, max(long) - 1, meta["pad_id"]).num_rows > 0
    assert len(read_indexed(out)[0]) == len(docs)  # the data is written all the same
