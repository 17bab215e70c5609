"""``megafusion eval`` on an LM checkpoint with discrete image tokens (the Chameleon setting): the
held-out loss per modality, caption consistency of images sampled token by token from held-out
captions (with chance levels), and the token caption gap, on a tiny checkpoint trained for two steps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, token_image_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return token_image_checkpoint(tmp_path_factory.mktemp("token_eval"))


def megafusion(*args):
    cmd = [sys.executable, "-m", "megafusion", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_eval_of_an_lm_checkpoint_reports_loss_per_modality_consistency_and_gap(checkpoint):
    proc = megafusion("eval", "--ckpt", checkpoint, "--samples", 3, "--cfg", 2, "--temperature", 1, "--top-k", 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["validation"]["val/loss/text"] > 0 and report["validation"]["val/loss/image"] > 0
    # Every domain's held-out loss, for a checkpoint trained without data.domains too.
    domains = report["domains"]
    assert list(domains) == ["shapes"] and domains["shapes"]["loss"] > 0 and domains["shapes"]["tokens"] > 0
    assert set(domains["shapes"]) == {"loss", "loss/text", "loss/image", "tokens"}
    consistency = report["caption_consistency"]
    assert consistency["samples"] == 3 and set(consistency["accuracy"]) == {"colour", "shape", "position", "all"}
    assert consistency["chance"] == pytest.approx({"colour": 1 / 6, "shape": 1 / 3, "position": 1 / 9, "all": 1 / 162})
    gap = report["caption_gap"]
    assert set(gap) == {"matching", "mismatched", "unconditional"} and all(v > 0 for v in gap.values())
    assert report["sampling"] == {"cfg": 2.0, "temperature": 1.0, "top_k": 4, "top_p": 1.0, "seed": 0}


def test_eval_names_bad_sampling_options(checkpoint):
    proc = megafusion("eval", "--ckpt", checkpoint, "--top-p", 0, "--top-k", -1)
    assert proc.returncode == 2
    assert "--top-k -1 must be >= 0" in proc.stderr and "--top-p 0.0 must be in (0, 1]" in proc.stderr
