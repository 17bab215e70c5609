"""``megafusion generate`` on a tiny Transfusion checkpoint: PNGs of the right size, reproducible, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import ROOT, run_train

CONFIG = "tests/configs/transfusion_small.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    run_train(
        tmp,
        1,
        CONFIG,
        ["train.steps=2", "checkpoint.save=true", f"checkpoint.dir={tmp / 'ckpt'}", "logging.dump_grads=null"],
        "train",
    )
    return tmp


def generate(*args):
    cmd = [sys.executable, "-m", "megafusion", "generate", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_generated_images_are_pngs_of_the_trained_size_and_reproducible(checkpoint):
    runs, texts = [], []
    for tag, cache in (("a", []), ("b", ["--no-kv-cache"])):  # the KV cache changes nothing
        proc = generate(
            "--ckpt",
            checkpoint / "ckpt",
            "--prompt",
            "a red circle.",
            "--prompt",
            "a blue square.",
            "--out",
            checkpoint / tag,
            "--image",
            "--steps",
            3,
            "--max-new-tokens",
            2,
            "--cfg",
            2.0,
            "--temperature",
            1.0,
            *cache,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert [line["prompt"] for line in lines] == ["a red circle.", "a blue square."]
        runs.append([np.asarray(Image.open(f)) for line in lines for f in line["images"]])
        texts.append([line["text"] for line in lines])
    assert len(runs[0]) == 2 and all(image.shape == (12, 12, 3) for image in runs[0])
    assert [line["text"] for line in lines] == texts[0]
    # Float rounding of the two computations may move a pixel across a quantisation step.
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(*runs))


def test_generate_names_what_is_wrong(checkpoint, tmp_path):
    proc = generate("--ckpt", tmp_path / "missing", "--prompt", "x", "--out", tmp_path)
    assert proc.returncode == 2 and f"--ckpt {tmp_path / 'missing'}: no such file or directory" in proc.stderr
    proc = generate("--ckpt", checkpoint / "ckpt", "--prompt", "x", "--out", tmp_path, "--steps", 0)
    assert proc.returncode == 2 and "--steps" in proc.stderr


def test_caption_consistency_scores_an_oracle_perfectly_and_a_wrong_painter_at_zero():
    from megafusion.data.builtin.shapes import ShapeSpec, render_shape
    from megafusion.evaluation.captions import consistency, held_out_captions

    pairs = held_out_captions(12, train_seed=3)
    assert len({text for text, _ in pairs}) > 1

    def oracle(i, text):
        spec = ShapeSpec(**pairs[i][1], background="black", scale=0.9, dx=0.0, dy=0.0)
        return render_shape(spec, 24)

    def wrong(i, text):
        want = pairs[i][1]
        colour = "red" if want["colour"] != "red" else "blue"
        shape = "circle" if want["shape"] != "circle" else "square"
        position = "center" if want["position"] != "center" else "top left"
        return render_shape(ShapeSpec(colour, shape, position, "black", 0.9, 0.0, 0.0), 24)

    assert consistency(pairs, oracle)["accuracy"] == {"colour": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0}
    assert consistency(pairs, wrong)["accuracy"] == {"colour": 0.0, "shape": 0.0, "position": 0.0, "all": 0.0}


def test_eval_reports_validation_loss_and_consistency(checkpoint):
    cmd = [
        sys.executable,
        "-m",
        "megafusion",
        "eval",
        "--ckpt",
        str(checkpoint / "ckpt"),
        "--samples",
        "3",
        "--steps",
        "2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["validation"]["val/loss/diffusion"] > 0 and report["validation"]["val/loss/text"] > 0
    assert report["caption_consistency"]["samples"] == 3
    assert set(report["caption_consistency"]["accuracy"]) == {"colour", "shape", "position", "all"}
    gap = report["caption_gap"]
    assert len(gap["matching"]) == len(gap["mismatched"]) == len(gap["noise_level"]) == 3
    assert all(loss > 0 for loss in gap["matching"] + gap["mismatched"])


def test_caption_gap_is_zero_for_an_oracle_and_none_for_a_caption_blind_model():
    from megafusion.data.builtin.shapes import render_shape
    from megafusion.data.codecs.latent import PixelLatentCodec
    from megafusion.evaluation.captions import caption_gap, held_out_samples
    from megafusion.objectives.diffusion import NoiseSchedule

    samples = held_out_samples(6, train_seed=3)
    codec = PixelLatentCodec(12)

    def encode(spec):
        return codec.encode(render_shape(spec, 12))

    x0_of = {text: torch.as_tensor(encode(spec)).float()[None] for spec, text in samples}
    assert len(x0_of) == len(samples)
    schedule = NoiseSchedule("cosine", prediction="sample")
    gap = caption_gap(lambda caption, x_t, t: x0_of[caption], encode, samples, schedule)  # knows each caption's x0
    assert gap["noise_level"] == [0.3, 0.6, 0.9]
    assert gap["matching"] == [0.0, 0.0, 0.0] and min(gap["mismatched"]) > 0.01
    blind = caption_gap(lambda caption, x_t, t: x_t, encode, samples, schedule)  # ignores the caption
    assert blind["matching"] == blind["mismatched"] and min(blind["matching"]) > 0


@pytest.mark.torchrun
def test_generation_from_a_pipeline_and_tensor_parallel_checkpoint_matches_one_process(checkpoint, tmp_path):
    """The same 2 training steps under TP=2 and under PP=2 x VPP=2 (the parity tests show the
    weights agree): images generated from either checkpoint, resharded into one process, are
    the one-process checkpoint's."""
    images = {}
    for layout, overrides in (("one", None), ("tp2", ["parallel.tp=2"]), ("pp2", ["parallel.pp=2", "parallel.vpp=2"])):
        ckpt = checkpoint / "ckpt"
        if overrides is not None:
            ckpt = tmp_path / layout
            run_train(
                tmp_path,
                2,
                CONFIG,
                [
                    "train.steps=2",
                    "checkpoint.save=true",
                    f"checkpoint.dir={ckpt}",
                    "logging.dump_grads=null",
                    *overrides,
                ],
                layout,
            )
        proc = generate(
            "--ckpt",
            ckpt,
            "--prompt",
            "a green square at the top.",
            "--out",
            tmp_path / f"{layout}_png",
            "--image",
            "--steps",
            3,
            "--max-new-tokens",
            0,
            "--cfg",
            2.0,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        images[layout] = np.asarray(Image.open(tmp_path / f"{layout}_png" / "0_0.png")).astype(int)
    assert images["one"].std() > 0
    for layout in ("tp2", "pp2"):
        assert np.abs(images[layout] - images["one"]).max() <= 1, layout
