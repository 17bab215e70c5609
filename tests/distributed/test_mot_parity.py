"""Mixture-of-Transformers computes the same thing in every parallel layout as in one process.

The MoT model (every part untied) trains 5 steps on the built-in mixed-modal shapes set, so
that text and image weights both get real gradients; each layout's losses and every
parameter's first-step full gradient (``mlp.image.linear_fc1.weight`` and so on) must match
the single-process run.

Activation recomputation rides on the same launches, against the same reference: tp2_sp and
cp2_distopt run ``train.recompute=full`` (each layer's forward again in the backward pass, which
must re-enter the microbatch's modality routing), pp2_vpp2 ``selective``; tp2, the post-norm and
the Triton runs none.

cp2_distopt is context parallelism (each rank routes its head-tail share of the rows, packed with
two documents and their images each) with the distributed optimizer sharded over the data x
context ranks; MoT under DP=2 trains in LMFusion's dp2_distopt (``tests/models/test_lmfusion.py``).
"""

from __future__ import annotations

import pytest

from tests.helpers import assert_recompute_ran, assert_same_training, run_train

pytestmark = pytest.mark.torchrun

CONFIG = "tests/configs/mixed_small.yaml"
MOT = ["model.arch=mot", "train.steps=5"]
FULL, SELECTIVE = "train.recompute=full", "train.recompute=selective"
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true", FULL]),
    "pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2", SELECTIVE]),
    "cp2_distopt": (2, ["parallel.cp=2", "parallel.distributed_optimizer=true", FULL]),
}
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    losses, grads, _ = run_train(tmp_path_factory.mktemp("mot_ref"), 1, CONFIG, MOT, "single")
    assert any(".image." in name for name in grads) and any(".text." in name for name in grads)
    return losses, grads


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mot_layout_matches_single_process(layout, reference, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    losses, grads, out = run_train(tmp_path, nproc, CONFIG, MOT + overrides, layout)
    assert len(losses) == 5
    assert_recompute_ran(out, overrides)
    assert_same_training(reference, (losses, grads), layout, REL_TOL)


def test_post_norm_mot_with_tp2_and_sequence_parallel_matches_single_process(tmp_path):
    """Norms on the sublayer outputs (``model.norm_placement=post``) act on sequence-parallel slices."""
    post = [*MOT, "model.norm_placement=post"]
    reference = run_train(tmp_path, 1, CONFIG, post, "post_single")[:2]
    assert any("post_mlp_layernorm.image" in name for name in reference[1])
    run = run_train(tmp_path, 2, CONFIG, [*post, "parallel.tp=2", "parallel.sp=true"], "post_tp2_sp")[:2]
    assert_same_training(reference, run, "post-norm tp2_sp", REL_TOL)


def test_mot_on_triton_kernels_with_tp2_and_sequence_parallel_matches_single_process(reference, tmp_path):
    """megafusion's Triton kernels (interpreted on a CPU) under TP=2 + SP against the torch-backend
    reference: the first step's loss and every gradient (taken before any update, so one step
    of the run is compared with the first of the reference's five)."""
    overrides = [*MOT, "parallel.tp=2", "parallel.sp=true", "ops.backend=triton", "train.steps=1"]
    losses, grads, _ = run_train(tmp_path, 2, CONFIG, overrides, "tp2_sp_triton")
    assert_same_training((reference[0][:1], reference[1]), (losses, grads), "tp2_sp triton", REL_TOL)
