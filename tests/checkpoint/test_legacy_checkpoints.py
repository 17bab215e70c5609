"""Checkpoints written before the tree was reorganised still load, resume and warm-start.

``tests/fixtures/legacy_checkpoints`` holds tiny runs saved after 2 steps by the code of commit
d57b771 (``make.py`` there regenerates them from a checkout of that commit; they come out
bit-identical but for the paths recorded in the manifests), with what that code computed from
them: the losses of steps 3 and 4 resumed from the checkpoint and, for the language models, the
logits of ``tokens.pt`` (that commit's ``megafusion.logits`` refuses Transfusion checkpoints, so
the Transfusion run is checked by its resumed losses alone). Through the entry points
(``python -m megafusion.train`` / ``python -m megafusion logits``) today's code must give the same numbers.

Recorded numbers come from another machine: a CPU with other vector units (AVX2 here, AVX-512
there) sums a matmul in another order, so the recorded logits are compared at
``RECORDED_ATOL`` (measured: up to 1.2e-7 apart on an AVX2-only EPYC; a wrong weight moves them by
1e-2 and more) and the recorded losses at 1e-6 relative. What is computed in the same run on the
same machine is compared bit for bit: the weights-only ``dense_to_mot`` conversion must give
exactly the logits the dense checkpoint gives here, and start a new MoT run
(``checkpoint.init_from``) with the losses that commit recorded.

Each test copies its fixture to ``tmp_path`` first and runs its processes two at a time (two
cores: the start-ups overlap).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from megafusion.config import load_config
from tests.helpers import ROOT, run_train

FIXTURES = ROOT / "tests" / "fixtures" / "legacy_checkpoints"
RECORDED_ATOL = 1e-5  # recorded on another CPU: see the module docstring
# The dense fixture's logits computed on this machine (by whichever test needs them first): the
# weights-only conversion's MoT logits must equal them bit for bit.
_DENSE_LOGITS_HERE: dict[str, torch.Tensor] = {}


def logits(ckpt, out) -> torch.Tensor:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "megafusion", "logits", "--ckpt", str(ckpt), "--tokens", str(FIXTURES / "tokens.pt")]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return torch.load(out)


def side_by_side(*calls):
    """Run the no-argument callables ``calls`` two at a time; their results (the first error raised)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


def copy(src, dst):
    shutil.copytree(src, dst)  # never train from (or into) the fixture itself
    return dst


@pytest.mark.parametrize("name", ["dense", "mot", "transfusion"])
def test_a_checkpoint_from_before_resumes_to_the_same_losses_and_logits(name, tmp_path):
    expected = json.loads((FIXTURES / name / "expected.json").read_text())
    ckpt = copy(FIXTURES / name / "checkpoints", tmp_path / "checkpoints")
    # A fresh data.cache_dir: the Transfusion run's tokenizer is trained again (the manifest's sha256 checks it).
    # The fixtures trained 2 of train.steps=2; the resume runs to 4. megatron-core's scheduler then kept the
    # checkpoint's schedule (decay over 2 steps: steps 3-4 at min_lr), which is what the recorded step-4 loss
    # shows; a resume now follows its own config, so it asks for that LR: train.lr = min_lr.
    min_lr = load_config(str(ROOT / expected["config"]), expected["overrides"]).train.min_lr
    overrides = [
        *expected["overrides"],
        "train.steps=4",
        f"train.lr={min_lr}",
        f"checkpoint.dir={ckpt}",
        f"data.cache_dir={tmp_path}",
    ]
    want = expected["resumed_losses"]
    if name == "transfusion":
        # Caption dropout now hides the caption from a dropped image's <boi> too (the leak that commit
        # had), so steps 3-4 train on other masks where an image is dropped: compare without it.
        overrides.append("objective.caption_dropout=0.0")
        want = expected["resumed_losses_without_caption_dropout"]
    calls = [lambda: run_train(tmp_path, 1, expected["config"], overrides, name)]
    if name != "transfusion":
        read = copy(ckpt, tmp_path / "read")  # the logits read a copy of their own
        calls.append(lambda: logits(read, tmp_path / "logits.pt"))
    (losses, _, out), *got = side_by_side(*calls)
    assert f"resumed from {ckpt / 'step_0000002'}" in out
    assert losses == pytest.approx(want, rel=1e-6)
    if got:
        torch.testing.assert_close(got[0], torch.load(FIXTURES / name / "logits.pt"), rtol=0, atol=RECORDED_ATOL)
        if name == "dense":
            _DENSE_LOGITS_HERE["dense"] = got[0]


def test_a_weights_only_conversion_from_before_starts_a_run(tmp_path):
    expected = json.loads((FIXTURES / "dense_to_mot.json").read_text())
    converted = copy(FIXTURES / "dense_to_mot", tmp_path / "dense_to_mot")
    read = copy(converted, tmp_path / "read")
    overrides = [*expected["overrides"], f"checkpoint.init_from={converted}"]
    calls = [
        lambda: run_train(tmp_path, 1, expected["config"], overrides, "warm"),
        lambda: logits(read, tmp_path / "logits.pt"),
    ]
    if "dense" not in _DENSE_LOGITS_HERE:  # run alone: the dense checkpoint's logits on this machine
        dense = copy(FIXTURES / "dense" / "checkpoints", tmp_path / "dense")
        calls.append(lambda: logits(dense, tmp_path / "dense_logits.pt"))
    (losses, _, out), got, *dense_here = side_by_side(*calls)
    dense_here = dense_here[0] if dense_here else _DENSE_LOGITS_HERE["dense"]
    assert f"initialised from {converted}" in out and "resumed from" not in out
    assert losses == pytest.approx(expected["losses"], rel=1e-6)
    # The MoT's text copies are the dense weights: the logits are the dense model's, bit for bit
    # (both computed here), and the recorded ones within the other machine's rounding.
    assert expected["logits_equal_dense"]
    torch.testing.assert_close(got, dense_here, rtol=0, atol=0)
    torch.testing.assert_close(got, torch.load(FIXTURES / "dense" / "logits.pt"), rtol=0, atol=RECORDED_ATOL)
