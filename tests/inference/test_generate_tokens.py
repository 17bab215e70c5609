"""``megafusion generate`` on an LM checkpoint with discrete image tokens, as a user runs it: the
generator is picked by the checkpoint's objective, PNGs of the trained size come out, the KV cache
changes nothing, and a checkpoint whose images cannot be sampled is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, token_image_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return token_image_checkpoint(tmp_path_factory.mktemp("token_generate"))


def generate(*args):
    cmd = [sys.executable, "-m", "megafusion", "generate", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_images_from_an_lm_checkpoint_are_pngs_and_the_kv_cache_changes_nothing(checkpoint, tmp_path):
    runs = []
    for tag, cache in (("a", []), ("b", ["--no-kv-cache"])):
        proc = generate(
            "--ckpt", checkpoint, "--prompt", "a red circle at the top left.", "--prompt", "a blue square.",
            "--image", "--cfg", 3, "--temperature", 1, "--top-p", 0.9, "--max-new-tokens", 3,
            "--output", tmp_path / tag, *cache,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert [line["prompt"] for line in lines] == ["a red circle at the top left.", "a blue square."]
        runs.append(([line["text"] for line in lines], [np.asarray(Image.open(f)) for x in lines for f in x["images"]]))
    (text, images), (text_ref, images_ref) = runs
    assert len(images) >= 2 and all(image.shape == (12, 12, 3) for image in images)
    assert text == text_ref and all(np.array_equal(a, b) for a, b in zip(images, images_ref, strict=True))


def test_generate_refuses_a_checkpoint_without_images_and_bad_options(checkpoint, tmp_path):
    proc = generate("--ckpt", checkpoint, "--prompt", "x", "--output", tmp_path, "--temperature", -1)
    assert proc.returncode == 2 and "--temperature -1.0 must be >= 0" in proc.stderr
    # Earlier documents mean nothing to a checkpoint whose documents never see each other: refused.
    proc = generate("--ckpt", checkpoint, "--prompt", "x", "--context", "y", "--output", tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--context" in proc.stderr and "data.attention=isolated" in proc.stderr and "Traceback" not in proc.stderr
