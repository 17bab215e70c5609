"""Caption dropout hides the caption at every layer: the unconditional branch of guidance is caption-free.

Two batches differ only in their caption tokens (every ordinary text token replaced by another,
so lengths, documents and images are the same); the images that caption dropout drops must get
bit-identical predictions from both, through every layer of the model, while the images that keep
their caption must not (so the comparison can fail). A leak through ``<boi>`` (a text token that
reads the caption) shows from the second layer on, so models of 1, 2 and 4 layers are checked,
dense and MoT, whole on each rank (TP = PP = 1), under TP=2 with sequence parallelism and under
PP=2 (the stages receive the mask's metadata on their own). One torchrun launch of 2 ranks runs every case; each
rank writes what it measured and the test reads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT

CONFIG = "tests/configs/transfusion_small.yaml"
LAYOUTS = {"tp1_pp1": (1, 1), "tp2_sp": (2, 1), "pp2": (1, 2)}  # name: (tp, pp); world 2 (the first: DP=2)
CASES = [(arch, layers) for arch in ("dense", "mot") for layers in (1, 2, 4)]


def other_captions(batch: dict, tokenizer) -> dict:
    """``batch`` with every ordinary text token replaced by a different one (specials, image
    tokens and everything but ``tokens`` kept)."""
    special = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, 1, tokenizer.boi_id, tokenizer.eoi_id}  # 1: <unk>
    ordinary = torch.tensor([i for i in range(tokenizer.text_vocab_size) if i not in special])
    shift = torch.full((int(ordinary.max()) + 1,), -1, dtype=torch.int64)
    shift[ordinary] = ordinary.roll(-1)  # each ordinary id -> the next one: always another id
    tokens = batch["tokens"].clone()
    text = torch.isin(tokens, ordinary)
    tokens[text] = shift[tokens[text]]
    return {**batch, "tokens": tokens}


def image_predictions(trainer, batches: list[dict]) -> list[torch.Tensor] | None:
    """The image head's output for each microbatch (None on ranks without the last stage)."""
    heads = [m.module.image_patch_head for m in trainer.model if hasattr(m.module, "image_patch_head")]
    if not heads:
        trainer._run(batches, forward_only=True)
        return None
    out: list[torch.Tensor] = []
    hook = heads[-1].register_forward_hook(lambda module, args, output: out.append(output.detach().clone()))
    try:
        trainer._run(batches, forward_only=True)
    finally:
        hook.remove()
    return out


def image_views(batch: dict) -> list[str]:
    """For each image of the microbatch, in prediction order: dropped, captioned (kept) or uncaptioned."""
    from megafusion.objectives.transfusion import captioned

    views = []
    for row, count in enumerate((batch["image_ids"].max(dim=1).values + 1).tolist()):
        for k in range(count):
            patches = batch["image_ids"][row] == k
            if bool((batch["first_key"][row][patches] > 0).all()):
                views.append("dropped")
            else:
                views.append("captioned" if captioned(batch, row, k) else "uncaptioned")
    return views


def measure(out_dir: Path) -> None:
    """Every layout x case on this rank: the largest |A - B| of the dropped and of the kept images."""
    import torch.distributed as dist

    from megafusion.config import load_config, validate
    from megafusion.runtime import initialize, seed_everything, shutdown
    from megafusion.training.trainer import Trainer

    results = []
    for name, (tp, pp) in LAYOUTS.items():
        for arch, layers in CASES:
            if layers % pp:
                continue  # one layer cannot be split over two stages
            overrides = [
                f"model.arch={arch}",
                f"model.num_layers={layers}",
                f"parallel.tp={tp}",
                f"parallel.sp={str(tp > 1).lower()}",
                f"parallel.pp={pp}",
                "objective.caption_dropout=0.5",
                f"data.cache_dir={out_dir / 'cache'}",
            ]
            cfg = load_config(str(ROOT / CONFIG), overrides)
            validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
            rt = initialize(cfg)
            seed_everything(cfg.train.seed)
            trainer = Trainer(cfg, rt)
            first = trainer._microbatches(trainer.data.train, 0, training=True)
            second = [other_captions(b, trainer.data.tokenizer) for b in first]
            a, b = image_predictions(trainer, first), image_predictions(trainer, second)
            if a is None:
                continue
            diffs: dict[str, list[float]] = {"dropped": [], "captioned": [], "uncaptioned": []}
            for batch, pa, pb in zip(first, a, b):
                for view, one, two in zip(image_views(batch), pa, pb, strict=True):
                    diffs[view].append(float((one - two).abs().max()))
            results.append({"layout": name, "arch": arch, "layers": layers, **diffs})
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    shutdown()


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("guidance_leak")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", __name__, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [r for rank in sorted(out.glob("rank*.json")) for r in json.loads(rank.read_text())]


@pytest.mark.torchrun
def test_dropped_images_do_not_see_the_caption_at_any_depth_in_any_layout(measured):
    seen = {(r["layout"], r["arch"], r["layers"]) for r in measured}
    want = {(name, arch, layers) for name, (_, pp) in LAYOUTS.items() for arch, layers in CASES if layers % pp == 0}
    assert seen == want
    for r in measured:
        case = f"{r['layout']}, {r['arch']}, {r['layers']} layer(s)"
        assert r["dropped"] and r["captioned"], f"{case}: the batch needs dropped and kept captioned images"
        assert max(r["dropped"]) == 0.0, f"{case}: a dropped image's prediction depends on the caption"
        # Each kept image reads its caption (so the comparison above could fail).
        assert min(r["captioned"]) > 0.0, f"{case}: a captioned image ignores its caption"


if __name__ == "__main__":
    measure(Path(sys.argv[1]))
