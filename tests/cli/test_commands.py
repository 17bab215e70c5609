"""The command layer: every command reports a user's error the same way, through one dispatcher.

``megafusion.commands.main.run`` turns a ``MegafusionError`` into ``<prog>: <message>`` on stderr
and exit status 2 (a traceback only with ``MEGAFUSION_DEBUG=1``), argparse's errors keep their
status 2, and a command that may start the runtime has it shut down afterwards. The commands
are called in process through the ``megafusion`` dispatcher (no model is built: each error is
found before); only ``python -m megafusion`` and ``python -m megafusion.train`` need a process of
their own.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

from megafusion.commands.main import COMMANDS, main, run
from megafusion.core.errors import CheckpointError, ConfigError, DataError, UsageError
from tests.helpers import ROOT

CONFIG = str(ROOT / "examples/configs/tiny_dense.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ENV.pop("MEGAFUSION_DEBUG", None)


def _raise(error: Exception):
    def command(argv):
        raise error

    return command


# ------------------------------------------------------------------ run()


def test_run_gives_the_status_and_reports_a_user_error_as_one_line(capsys, monkeypatch):
    monkeypatch.delenv("MEGAFUSION_DEBUG", raising=False)
    assert run(lambda argv: None, []) == 0
    assert run(lambda argv: 3, []) == 3
    seen = []
    assert run(lambda argv: seen.append(argv), ["a", "b"]) == 0 and seen == [["a", "b"]]
    capsys.readouterr()
    for error in (
        ConfigError("model.x=1 is wrong: set 2"),
        DataError("f.jsonl:3: bad"),
        UsageError("--n must be > 0"),
        CheckpointError("ckpt: damaged"),
    ):
        assert run(_raise(error), [], "megafusion thing") == 2
        assert capsys.readouterr().err == f"megafusion thing: {error}\n"


def test_run_keeps_argparse_statuses_and_lets_bugs_through(capsys):
    def parse(argv):
        import argparse

        parser = argparse.ArgumentParser(prog="megafusion thing")
        parser.add_argument("--n", type=int, required=True)
        parser.parse_args(argv)

    assert run(parse, []) == 2
    assert "megafusion thing: error: the following arguments are required: --n" in capsys.readouterr().err
    assert run(parse, ["--help"]) == 0
    assert run(_raise(SystemExit("gave up")), []) == 1 and capsys.readouterr().err.endswith("gave up\n")
    with pytest.raises(ZeroDivisionError):  # not a user's error: the traceback is the report
        run(lambda argv: 1 / 0, [])


def test_debug_variable_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv("MEGAFUSION_DEBUG", "1")
    assert run(_raise(DataError("f.jsonl:3: bad")), [], "megafusion thing") == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "DataError: f.jsonl:3: bad" in err
    assert err.endswith("megafusion thing: f.jsonl:3: bad\n")
    assert main(["train", "--config", "no/such/file.yaml"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("megafusion train: ")


def test_runtime_is_shut_down_only_by_commands_that_may_start_one(monkeypatch):
    calls = []
    fake = types.ModuleType("megafusion.runtime")
    fake.shutdown = lambda: calls.append(1)
    monkeypatch.setitem(sys.modules, "megafusion.runtime", fake)
    run(lambda argv: 0, [])
    assert calls == []
    run(lambda argv: 0, [], runtime=True)
    run(_raise(CheckpointError("x")), [], runtime=True)
    with pytest.raises(KeyError):
        run(_raise(KeyError("bug")), [], runtime=True)
    assert calls == [1, 1, 1]
    # A command that never imported the runtime started none: nothing is imported to shut it down.
    monkeypatch.delitem(sys.modules, "megafusion.runtime")
    run(lambda argv: 0, [], runtime=True)
    assert "megafusion.runtime" not in sys.modules


# ------------------------------------------------------------------ every command's error path


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("commands")
    torch.save(torch.zeros(2, 3), tmp / "floats.pt")  # not token ids
    return tmp


# (arguments of `megafusion`, the prefix, a fragment of the message); {tmp} is a fresh directory.
ERRORS = [
    (["train", "--config", "no/such/file.yaml"], "megafusion train", "no/such/file.yaml"),
    (
        ["train", "--dry-run", "--config", CONFIG, "--world-size", "x"],
        "megafusion train --dry-run",
        "--world-size: expected a positive integer",
    ),
    (
        ["data", "prepare", "--input", "{tmp}/none", "--tokenizer", "{tmp}/t.model", "--output", "{tmp}/ds"],
        "megafusion data prepare",
        "--input {tmp}/none: no such file or directory",
    ),
    (
        ["tokenizer", "train", "--input", "{tmp}/none", "--vocab-size", "50", "--output", "{tmp}/tok"],
        "megafusion tokenizer train",
        "--input {tmp}/none: no such file or directory",
    ),
    (
        ["convert", "hf-to-mf", "--hf", "{tmp}/none", "--output", "{tmp}/mf"],
        "megafusion convert hf-to-mf",
        "--hf {tmp}/none: no such file or directory",
    ),
    (
        ["convert", "dense-to-mot", "--input", "{tmp}/none", "--output", "{tmp}/mot"],
        "megafusion convert dense-to-mot",
        "--ckpt {tmp}/none: no such file or directory",
    ),
    (
        ["generate", "--ckpt", "{tmp}/none", "--prompt", "x", "--out", "{tmp}/png"],
        "megafusion generate",
        "--ckpt {tmp}/none: no such file or directory",
    ),
    (
        ["generate", "--ckpt", "{tmp}/none", "--prompt", "x", "--out", "{tmp}/png", "--steps", "0"],
        "megafusion generate",
        "--steps must be >= 1",
    ),
    (["eval", "--ckpt", "{tmp}/none"], "megafusion eval", "--ckpt {tmp}/none: no such file or directory"),
    (["eval", "--ckpt", "{tmp}"], "megafusion eval", "neither a megafusion checkpoint"),  # there, but not one
    (["eval", "--ckpt", "{tmp}/none", "--samples", "0"], "megafusion eval", "--samples and --steps must be >= 1"),
    (["eval", "--ckpt", "{tmp}/none", "--text", "{tmp}/t.txt"], "megafusion eval", "--ckpt {tmp}/none: no such file"),
    (
        ["eval", "--ckpt", "{tmp}/none", "--text", "{tmp}/t.txt", "--bogus"],
        "megafusion eval",
        "unknown option(s) --bogus",
    ),
]
ERROR_IDS = [f"{i}-{prefix[11:] or argv[0]}" for i, (argv, prefix, _) in enumerate(ERRORS)]


@pytest.mark.parametrize("argv,prefix,fragment", ERRORS, ids=ERROR_IDS)
def test_each_command_reports_a_bad_input_as_one_prefixed_line(argv, prefix, fragment, paths, capsys, monkeypatch):
    monkeypatch.delenv("MEGAFUSION_DEBUG", raising=False)
    assert main([a.format(tmp=paths) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"{prefix}: "), captured.err
    assert fragment.format(tmp=paths) in captured.err and "Traceback" not in captured.err
    assert not (paths / "png").exists() and not (paths / "mot").exists()  # refused before any work


def test_the_logits_command_reports_the_same_way(paths, capsys, monkeypatch):
    from megafusion.commands.logits import main as logits_main

    monkeypatch.delenv("MEGAFUSION_DEBUG", raising=False)
    assert logits_main(["--ckpt", str(paths), "--tokens", str(paths / "floats.pt"), "--out", "x.pt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megafusion logits: {paths / 'floats.pt'} must hold an int64 tensor")
    assert err.count("\n") == 1


def test_argparse_errors_keep_status_2_and_unknown_commands_are_named(capsys):
    assert main(["generate"]) == 2
    assert "megafusion generate: error: the following arguments are required: --ckpt" in capsys.readouterr().err
    assert main(["convert", "dense-to-mot"]) == 2
    assert main(["eval", "--help"]) == 0
    assert main(["trian"]) == 2 and "megafusion: unknown command 'trian'" in capsys.readouterr().err


# ------------------------------------------------------------------ entry points


RETIRED = ("cli", "evaluate", "generate", "logits", "launch_plan")  # python -m megafusion <command> instead


def test_every_entry_point_is_the_dispatcher_or_a_commands_main():
    """``megafusion <name>`` runs ``megafusion.commands.<name>.main``; the console script and
    ``python -m megafusion`` are the dispatcher; ``python -m megafusion.train`` (torchrun's habit)
    is train's main; the retired ``python -m megafusion.<name>`` shims are gone."""

    for name in COMMANDS:
        assert callable(importlib.import_module(f"megafusion.commands.{name}").main), name
    scripts = re.search(r'"console_scripts": \[(.*?)\]', (ROOT / "setup.py").read_text()).group(1)
    assert scripts == '"megafusion=megafusion.commands.main:main"'
    assert importlib.import_module("megafusion.__main__").main is main
    assert importlib.import_module("megafusion.train").main is importlib.import_module("megafusion.commands.train").main
    for name in RETIRED:
        assert not (ROOT / "megafusion" / f"{name}.py").exists(), f"megafusion/{name}.py is back"


def test_python_m_megafusion_answers_help_and_names_an_unknown_command_in_one_line():
    from megafusion.commands.main import usage

    def megafusion(*args):
        cmd = [sys.executable, "-m", "megafusion", *args]
        return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)

    proc = megafusion("--help")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, usage() + "\n", "")
    proc = megafusion()
    assert (proc.returncode, proc.stdout) == (2, usage() + "\n")
    proc = megafusion("trian", "--config", CONFIG)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("megafusion: unknown command 'trian', did you mean 'train'? (the commands: train,")
    proc = megafusion("logits", "--version")
    assert proc.returncode == 0 and proc.stdout.startswith("megafusion "), proc.stderr


def test_module_entry_point_and_console_command_behave_the_same():
    console = shutil.which("megafusion")
    launchers = [[sys.executable, "-m", "megafusion", "train"], [sys.executable, "-m", "megafusion.train"]]
    launchers += [[console, "train"]] if console else []

    def both(*args):
        procs = [
            subprocess.run([*launcher, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
            for launcher in launchers
        ]
        seen = [(proc.returncode, proc.stdout, proc.stderr) for proc in procs]
        assert seen == seen[:1] * len(seen), seen
        return procs[0]

    proc = both("--config", CONFIG, "parallel.tpp=2")
    assert proc.returncode == 2 and proc.stderr.startswith("megafusion train: ") and "parallel.tpp" in proc.stderr
    proc = both("--dry-run", "--config", CONFIG, "parallel.tp=2", "--world-size", "4", "--nproc-per-node", "4")
    assert proc.returncode == 0 and "world 4 = tp 2 x pp 1 x dp 2" in proc.stdout, proc.stdout
