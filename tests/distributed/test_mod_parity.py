"""Mixture-of-Depths computes the same thing in every layout as in one process.

Dense + MoD and MoMa + MoD (``mod.capacity=0.25``, every other layer from the first; MoMa + MoD
with ``split=per_modality``, whose counts are host ints, and dense with the paper's ``global``
selection) train 3 steps on the built-in mixed-modal shapes set; each layout's losses and every
parameter's first-step full gradient (the MoD routers' included) must match the single-process run
(1e-5). The selection is made on each microbatch's whole rows on every tensor-parallel rank
(sequence parallelism gathers first; the picked tokens are split again, with fillers to a
multiple of TP), so it does not depend on the layout. Layouts: TP=2 + SP, PP=2 x VPP=2 (dense),
CP=2 x EP=2, TP=2 + SP and PP=2 x VPP=2 (MoMa + MoD per modality), EP=2 x TP=2 + SP (MoMa + MoD with
the paper's global selection, whose per-modality counts are read from the device). The MoMa + MoD
models train both auxiliary routers jointly, whose gradients are compared too.

Under context parallelism (moma_cp2_ep2: EP over the context pair) the MoD layer gathers the whole
microbatch in row order and selects as one process; the block runs on each rank's head-tail share
of the picked slots (its attention gathers the other rank's picked keys; the mask and rotary angles
are the whole microbatch's at the picked positions), and MoMa's experts inside select over every
picked slot (gathered again under the picked tokens' whole routing).
"""

from __future__ import annotations

import pytest

from tests.helpers import assert_same_training, run_train

pytestmark = pytest.mark.torchrun

CONFIG = "tests/configs/mixed_small.yaml"
COMMON = ["train.steps=3", "mod.capacity=0.25", "mod.every=2"]
MOMA = ["model.arch=moma", "moe.experts={text: 2, image: 2}", "moe.aux_router=true", "mod.aux_router=true"]
MODELS = {
    "dense": ["model.arch=dense", "mod.split=global"],
    "moma": [*MOMA, "mod.split=per_modality"],
    "moma_global": [*MOMA, "mod.split=global"],
}
LAYOUTS = {
    "dense_tp2_sp": ("dense", 2, ["parallel.tp=2", "parallel.sp=true"]),
    "dense_pp2_vpp2": ("dense", 2, ["parallel.pp=2", "parallel.vpp=2"]),
    "moma_cp2_ep2": ("moma", 2, ["parallel.cp=2", "parallel.ep=2"]),
    "moma_tp2_sp": ("moma", 2, ["parallel.tp=2", "parallel.sp=true"]),
    "moma_pp2_vpp2": ("moma", 2, ["parallel.pp=2", "parallel.vpp=2"]),
    "moma_global_ep2_tp2_sp": ("moma_global", 4, ["parallel.ep=2", "parallel.tp=2", "parallel.sp=true"]),
}
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mod_single")
    return {name: run_train(tmp, 1, CONFIG, COMMON + args, f"single_{name}")[:2] for name, args in MODELS.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mod_layout_matches_single_process(layout, references, tmp_path):
    model, nproc, overrides = LAYOUTS[layout]
    losses, grads, _ = run_train(tmp_path, nproc, CONFIG, COMMON + MODELS[model] + overrides, layout)
    assert any("mod_router" in name for name in grads)
    if "aux_router=true" in " ".join(MODELS[model]):  # the auxiliary routers' gradients are compared too
        assert any("mod_aux_router" in name for name in grads) and any("mlp.aux_router" in name for name in grads)
    assert_same_training(references[model], (losses, grads), layout, REL_TOL)
