"""Transfusion training: every layout computes the combined loss of one process; no images = the LM model.

Activation recomputation rides on the same launches, against the same references: tp2_sp and
unet_pp2_vpp2 run ``train.recompute=selective``, cp2_distopt, the MoT-layer tp2 run (whose
recomputed layers re-enter the routing) and unet_pp2 ``full``; pp2_vpp2, unet_cp2 and
unet_tp2_sp_pp2 none. The noise and timesteps are drawn by the objective before the model call,
outside the recomputed layers.

Context parallelism (cp2_distopt, unet_cp2): the rows hold four documents each and images that
straddle the two ranks' head-tail chunks (:func:`test_cp_rows_hold_documents_and_straddling_images`
checks the data), the patch head reads whole images on both ranks and the diffusion loss counts
1 / cp on each, so losses, gradients and the logged diffusion loss are one process's. The
Transfusion objective under DP=2 trains in LMFusion's dp2_distopt (``tests/models/test_lmfusion.py``).
"""

from __future__ import annotations

import json

import pytest
import torch

from megafusion.config import Config
from megafusion.data.builtin.synthetic import synthetic_microbatch
from megafusion.layers.masks import dense_mask
from megafusion.models.transformer_config import build_transformer_config
from megafusion.models.transfusion import ImageInputs
from megafusion.objectives.build import build_model_chunks
from megafusion.objectives.lm import lm_loss_sums
from tests.helpers import ROOT, assert_recompute_ran, assert_same_training, run_train

CONFIG = "tests/configs/transfusion_small.yaml"
FULL, SELECTIVE = "train.recompute=full", "train.recompute=selective"
LAYOUTS = {
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true", SELECTIVE]),
    "pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2"]),
    "cp2_distopt": (2, ["parallel.cp=2", "parallel.distributed_optimizer=true", FULL]),
}
REL_TOL = 1e-5


def _diffusion_losses(out_dir) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/diffusion"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tf_ref")
    losses, grads, out = run_train(tmp, 1, CONFIG, [], "single")
    assert "diffusion" in out and any(name.startswith("image_patch_head") for name in grads)
    return losses, grads, _diffusion_losses(tmp / "single")


@pytest.mark.torchrun
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_transfusion_layout_matches_single_process(layout, reference, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    losses, grads, out = run_train(tmp_path, nproc, CONFIG, overrides, layout)
    assert_recompute_ran(out, overrides)
    assert_same_training(reference[:2], (losses, grads), layout, REL_TOL)
    # The logged diffusion loss: summed over the ranks once (not once per context rank).
    for got, want in zip(_diffusion_losses(tmp_path / layout), reference[2], strict=True):
        assert abs(got - want) <= REL_TOL * abs(want), (layout, got, want)


def test_cp_rows_hold_documents_and_straddling_images():
    """The data the CP layouts train on: every row of the first step packs several documents, and
    images span both CP=2 ranks' shares, as the forward step balances them (each microbatch's
    chunks dealt by attended keys, caption dropout included)."""
    from megafusion.config import load_config
    from megafusion.data.sources import build_data
    from megafusion.objectives.registry import get_objective
    from megafusion.runtime.context_parallel import ContextShard
    from megafusion.training.forward_step import keys_per_query

    cfg = load_config(str(ROOT / CONFIG), [])
    source, objective = build_data(cfg).train, get_objective(cfg.objective.name)
    mbs, s = cfg.train.micro_batch_size, cfg.model.seq_length
    batches = [source.microbatch(i, mbs) for i in range(0, cfg.train.global_batch_size, mbs)]
    objective.prepare_step(cfg, source, 0, batches, training=True)
    straddling = []
    for n, batch in enumerate(batches):
        assert all(int(row.max()) >= 1 for row in batch["document_ids"])  # >= 2 documents per row
        owner = torch.zeros(s, dtype=torch.int64)
        owner[ContextShard(0, 2, s, keys_per_query(objective, batch).sum(0)).by_rank[1]] = 1
        for row, ids in enumerate(batch["image_ids"]):
            straddling += [(n, row, k) for k in range(int(ids.max()) + 1) if owner[ids == k].unique().numel() == 2]
    assert len(straddling) >= 4, straddling


@pytest.mark.torchrun
def test_transfusion_with_mot_layers_matches_single_process_under_tp2(tmp_path):
    mot = ["model.arch=mot"]
    reference = run_train(tmp_path, 1, CONFIG, mot, "mot_single")[:2]
    run = run_train(tmp_path, 2, CONFIG, [*mot, "parallel.tp=2", FULL], "mot_tp2")[:2]
    assert_same_training(reference, run, "transfusion + MoT tp2", REL_TOL)


# The U-Net needs a patch size that is a multiple of its downsampling factor 2: 16x16 images in
# 4x4 patches (still 16 positions per image). Evaluating after step 2 as well runs forward-only
# schedules between training steps.
UNET = ["objective.patchify=unet", "data.image_size=16", "objective.latent_patch_size=4", "eval.interval=2"]
UNET_LAYOUTS = {
    # the skips and temb cross from the first to the last stage, their gradients back
    "unet_pp2": (2, ["parallel.pp=2", FULL]),
    "unet_pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2", SELECTIVE]),
    "unet_tp2_sp_pp2": (4, ["parallel.tp=2", "parallel.sp=true", "parallel.pp=2"]),
    # context parallelism: the U-Net head on whole images (skips and temb on the same stage)
    "unet_cp2": (2, ["parallel.cp=2"]),
}


def _evaluations(out_dir) -> list[dict]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val/loss" in r]


@pytest.fixture(scope="module")
def unet_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tf_unet_ref")
    losses, grads, _ = run_train(tmp, 1, CONFIG, UNET, "single")
    assert any(name.startswith("image_patch_embed.down_blocks") for name in grads)
    return losses, grads, _evaluations(tmp / "single")


@pytest.mark.torchrun
@pytest.mark.parametrize("layout", list(UNET_LAYOUTS))
def test_unet_transfusion_layout_matches_single_process(layout, unet_reference, tmp_path):
    nproc, overrides = UNET_LAYOUTS[layout]
    losses, grads, out = run_train(tmp_path, nproc, CONFIG, [*UNET, *overrides], layout)
    assert_recompute_ran(out, overrides)
    ref_losses, ref_grads, ref_evals = unet_reference
    assert_same_training((ref_losses, ref_grads), (losses, grads), layout, REL_TOL)
    evals = _evaluations(tmp_path / layout)
    assert [e["step"] for e in evals] == [e["step"] for e in ref_evals] == [2, 4]
    for got, want in zip(evals, ref_evals):
        for key in ("val/loss", "val/loss/diffusion"):
            assert abs(got[key] - want[key]) <= REL_TOL * abs(want[key]), f"{layout} step {got['step']}: {key}"


def test_a_sequence_without_images_gives_the_lm_models_loss(runtime):
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.vocab_size, m.seq_length = 2, 32, 4, 64, 16
    cfg.data.docs_per_sequence, cfg.data.image_size = 2, 12
    batch = synthetic_microbatch(0, 2, 5, m.seq_length, m.vocab_size, 2)
    mask = dense_mask(batch["document_ids"])

    def loss(logits):
        text = torch.zeros_like(batch["labels"])
        return lm_loss_sums(logits, batch["labels"], batch["loss_mask"], 0.0, text, 2)["total"]

    lm_model = build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime)[0]
    want = loss(lm_model(batch["tokens"], batch["position_ids"], mask, labels=None))
    cfg.objective.name = "transfusion"
    tf_model = build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime)[0]
    no_images = ImageInputs(
        image_ids=torch.full_like(batch["tokens"], -1),
        noised=torch.zeros(0, 3, 12, 12),
        timesteps=torch.zeros(0),
        count=0,
        positions=torch.zeros(0, dtype=torch.int64),
    )
    logits, prediction = tf_model(batch["tokens"], batch["position_ids"], mask, labels=None, images=no_images)
    assert prediction is None
    assert torch.equal(loss(logits), want)


def test_image_modules_start_with_zero_biases_and_unit_norms(runtime):
    from megafusion.models.param_layout import global_param_names

    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 2, 32, 4
    cfg.objective.name, cfg.objective.patchify, cfg.objective.latent_patch_size = "transfusion", "unet", 4
    cfg.data.image_size, cfg.model.vocab_size = 16, 64
    params = global_param_names(build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime)[0])
    biases = [n for n in params if n.endswith(".bias")]
    assert biases and all(torch.equal(params[n], torch.zeros_like(params[n])) for n in biases)
    norms = ["image_patch_embed.down_blocks.0.resnets.0.norm1.weight", "image_patch_head.norm_out.weight"]
    assert all(torch.equal(params[n], torch.ones_like(params[n])) for n in norms)
    assert params["image_patch_embed.proj.weight"].std() > 0
