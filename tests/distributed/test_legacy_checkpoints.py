"""Checkpoints written before the tree was reorganised still load, resume and warm-start.

``tests/fixtures/legacy_checkpoints`` holds tiny runs saved after 2 steps by the code of commit
d57b771 (``make.py`` there regenerates them from a checkout of that commit), with what that code
computed from them: the losses of steps 3 and 4 resumed from the checkpoint and, for the
language models, the logits of ``tokens.pt``. Through the stable entry points
(``python -m megafusion.train`` / ``megafusion.logits``) today's code must give the same numbers,
and the weights-only ``dense_to_mot`` conversion must start a MoT whose logits are the dense
model's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, run_train

FIXTURES = ROOT / "tests" / "fixtures" / "legacy_checkpoints"


def logits(ckpt, out) -> torch.Tensor:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "megafusion.logits",
        "--ckpt",
        str(ckpt),
        "--tokens",
        str(FIXTURES / "tokens.pt"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("name", ["dense", "mot", "transfusion"])
def test_a_checkpoint_from_before_resumes_to_the_same_losses(name, tmp_path):
    expected = json.loads((FIXTURES / name / "expected.json").read_text())
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(FIXTURES / name / "checkpoints", ckpt)  # never train into the fixture
    overrides = [*expected["overrides"], "train.steps=4", f"checkpoint.dir={ckpt}", f"data.cache_dir={tmp_path}"]
    losses, _, out = run_train(tmp_path, 1, expected["config"], overrides, name)
    assert f"resumed from {ckpt / 'step_0000002'}" in out
    assert losses == pytest.approx(expected["resumed_losses"], rel=1e-6)
    if name != "transfusion":
        got = logits(ckpt, tmp_path / "logits.pt")
        torch.testing.assert_close(got, torch.load(FIXTURES / name / "logits.pt"), rtol=0, atol=1e-6)


def test_a_weights_only_conversion_from_before_starts_a_run(tmp_path):
    converted = FIXTURES / "dense_to_mot"
    # The MoT copies are the dense weights: the logits are the dense model's.
    got = logits(converted, tmp_path / "logits.pt")
    torch.testing.assert_close(got, torch.load(FIXTURES / "dense" / "logits.pt"), rtol=0, atol=1e-5)
    expected = json.loads((FIXTURES / "dense" / "expected.json").read_text())
    overrides = [*expected["overrides"], "model.arch=mot", "train.steps=1", f"checkpoint.init_from={converted}"]
    losses, _, out = run_train(tmp_path, 1, expected["config"], overrides, "warm")
    assert f"initialised from {converted}" in out and len(losses) == 1
