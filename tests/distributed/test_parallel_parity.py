"""Every parallel layout computes what one process computes.

For a fixed seed and sample stream, each layout's per-step loss over 5 optimizer steps, and
every parameter's first-step gradient gathered to full shape, must match the single-process
run (fp32, relative difference <= 1e-5). Layouts run as real ``torchrun`` jobs on gloo.

Activation recomputation (``train.recompute``) rides on the same launches, against the same
reference: tp2, pp2_vpp2 and tp2_pp2 run ``full`` (each layer recomputed), tp2_sp, pp2_1f1b and
cp2_tp2_sp ``selective`` (core attention), dp2_distopt and cp2_pp2_distopt none. Context parallelism
(``parallel.cp``) shards each row's positions over ranks (chunks balanced by attended keys) and
all-gathers keys and values; its gradients are reduced over data x context ranks (CP=2 alone with
full recomputation trains in ``test_mot_parity.py``'s cp2_distopt). Without
recomputation every layout is also trained by a sibling test (MoT, Transfusion, MoMa, LMFusion);
``tests/training/test_recompute.py`` shows all three modes bit-identical in one process.
"""

from __future__ import annotations

import pytest

from tests.helpers import assert_recompute_ran, assert_same_training, run_train

pytestmark = pytest.mark.torchrun

CONFIG = "tests/configs/parity.yaml"
FULL, SELECTIVE = "train.recompute=full", "train.recompute=selective"
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2", FULL]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true", SELECTIVE]),
    "pp2_1f1b": (2, ["parallel.pp=2", SELECTIVE]),
    "pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2", FULL]),
    "dp2_distopt": (2, ["parallel.distributed_optimizer=true"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2", FULL]),
    "cp2_tp2_sp": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true", SELECTIVE]),
    "cp2_pp2_distopt": (4, ["parallel.cp=2", "parallel.pp=2", "parallel.distributed_optimizer=true"]),
}
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    losses, grads, _ = run_train(tmp_path_factory.mktemp("ref"), 1, CONFIG, [], "single")
    return losses, grads


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    losses, grads, out = run_train(tmp_path, nproc, CONFIG, overrides, layout)
    assert len(losses) == 5
    assert_recompute_ran(out, overrides)
    assert_same_training(reference, (losses, grads), layout, REL_TOL)


def test_layouts_are_not_trivially_equal(reference, tmp_path):
    """The comparison can fail: another seed gives other losses and gradients."""
    ref_losses, ref_grads = reference
    losses, grads, _ = run_train(tmp_path, 1, CONFIG, ["train.seed=8"], "other_seed")
    assert abs(losses[0] - ref_losses[0]) > REL_TOL * abs(ref_losses[0])
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    assert ((grads[name] - ref_grads[name]).norm() / ref_grads[name].norm()).item() > 1e-2


def test_cross_document_attention_at_document_positions_trains_and_pipelines(tmp_path):
    """``data.attention=causal`` + ``data.positions=document`` (packed synthetic documents; padding and
    images are the in-process tests'): the loss falls step by step, and PP=2 x CP=2 (each stage makes
    its own rotary table at the document positions of its context shard, and the cross-document mask's
    rows are cut for the shard) matches one process."""
    overrides = ["train.steps=3", "train.global_batch_size=4", "model.num_layers=2", "data.attention=causal"]
    overrides += ["data.positions=document"]
    losses, grads, _ = run_train(tmp_path, 1, CONFIG, overrides, "causal_single")
    assert losses[0] > losses[1] > losses[2], losses
    pp = run_train(tmp_path, 4, CONFIG, [*overrides, "parallel.pp=2", "parallel.cp=2"], "causal_pp2_cp2")[:2]
    assert_same_training((losses, grads), pp, "pp2 x cp2 causal document", REL_TOL)
