"""``megafusion generate`` on a tiny Transfusion checkpoint: PNGs of the right size, reproducible, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, run_train

CONFIG = "tests/configs/transfusion_small.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    run_train(tmp, 1, CONFIG, ["train.steps=2", "checkpoint.save=true", f"checkpoint.dir={tmp / 'ckpt'}",
                               "logging.dump_grads=null"], "train")
    return tmp


def generate(*args):
    cmd = [sys.executable, "-m", "megafusion.cli", "generate", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_generated_images_are_pngs_of_the_trained_size_and_reproducible(checkpoint):
    runs = []
    for tag in ("a", "b"):
        proc = generate("--ckpt", checkpoint / "ckpt", "--prompt", "a red circle.", "--prompt", "a blue square.",
                        "--out", checkpoint / tag, "--image", "--steps", 3, "--max-new-tokens", 2, "--cfg", 2.0)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert [line["prompt"] for line in lines] == ["a red circle.", "a blue square."]
        runs.append([np.asarray(Image.open(f)) for line in lines for f in line["images"]])
    assert len(runs[0]) == 2 and all(image.shape == (12, 12, 3) for image in runs[0])
    assert all(np.array_equal(a, b) for a, b in zip(*runs))


def test_generate_names_what_is_wrong(checkpoint, tmp_path):
    proc = generate("--ckpt", tmp_path / "missing", "--prompt", "x", "--out", tmp_path)
    assert proc.returncode == 2 and "neither a megafusion checkpoint" in proc.stderr
    proc = generate("--ckpt", checkpoint / "ckpt", "--prompt", "x", "--out", tmp_path, "--steps", 0)
    assert proc.returncode == 2 and "--steps" in proc.stderr
