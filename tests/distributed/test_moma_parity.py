"""MoMa computes the same thing with expert parallelism, in every layout, as in one process.

A 4t4i MoMa model with Gumbel router noise (``moe.router_noise=1.0``, keyed by each row's sample
number) trains 5 steps on the built-in mixed-modal shapes set; each layout's losses and every
parameter's first-step full gradient (each expert's, gathered over the expert-parallel ranks, and
the routers') must match the single-process run. Expert choice is taken over each rank's whole
microbatch with each sample's own noise, so the routing, and with it everything else, is
layout-independent: exactly so at step 1 (the same weights), and at every later step while no
expert's choice is a near-tie. Layouts round differently (another reduction order), so their
weights drift apart at rounding level, and a selection whose margin (``moe/min_margin``: the
k-th chosen minus the best unchosen score) is at that level can flip, after which the two runs
are slightly different trainings. So the losses are compared up to the first step whose margin,
in either run, falls below ``NEAR_TIE``; the first step always.
ep2_tp2_sp is EP=2 x DP=2 (4 processes, EP over the TP x DP ranks: two expert-data-parallel
replicas, each data-parallel rank with its own microbatches); ep2 and ep2_pp2 have DP=2 too.
cp2_ep2_allgather_distopt is context parallelism (CP=2, EP=2 over the context pair, the all-gather
dispatcher, the distributed optimizer sharded over the data x context ranks): each rank gathers the
whole microbatch in row order and selects under its whole routing, exactly one process's choice
(a different choice at step 1 would move the routers' first-step gradients far beyond 1e-5).
A run stopped under EP=2 resumes under TP=2 with sequence parallelism (EP=1) exactly where the
uninterrupted run is, from megatron's expert-sharded checkpoint, with the same noise.

Activation recomputation rides on the same launches, against the same reference: ep2 and tp2_sp
run ``train.recompute=full`` (the recomputed forward routes and dispatches again, from the
counts cached on the microbatch's routing, and draws the same noise), ep2_tp2_sp ``selective``;
the others none.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from megatron.core import dist_checkpointing

from tests.helpers import assert_recompute_ran, assert_same_training, run_train

pytestmark = pytest.mark.torchrun

CONFIG = "tests/configs/mixed_small.yaml"
MOMA = [
    "model.arch=moma",
    "train.steps=5",
    "moe.experts={text: 4, image: 4}",
    "moe.router_noise=1.0",
    "moe.aux_router=true",  # trained jointly: its gradients and its loss must match too
]
FULL, SELECTIVE = "train.recompute=full", "train.recompute=selective"
LAYOUTS = {
    "ep2": (2, ["parallel.ep=2", FULL]),
    "cp2_ep2_allgather_distopt": (
        2,
        ["parallel.cp=2", "parallel.ep=2", "moe.dispatcher=allgather", "parallel.distributed_optimizer=true"],
    ),
    # EP=2 x DP=2: 4 processes, EP over the TP x DP ranks
    "ep2_tp2_sp": (4, ["parallel.ep=2", "parallel.tp=2", "parallel.sp=true", SELECTIVE]),
    # EP = 1: the experts' gradients must still be summed over the sequence-parallel ranks.
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true", FULL]),
    "ep2_pp2": (4, ["parallel.ep=2", "parallel.pp=2"]),
}
REL_TOL = 1e-5
# A selection margin (fp32 router scores, O(1)) this small can flip between layouts: the layouts'
# scores differ at fp32 rounding, by up to 1.2e-7 here within 8 steps (their margins' differences).
NEAR_TIE = 1e-6


def step_margins(run_dir: Path) -> list[float]:
    """Each training step's moe/min_margin (inf where every expert took every token)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r.get("moe/min_margin", math.inf) for r in lines if "loss" in r]


def step_aux_losses(run_dir: Path) -> list[float]:
    """Each training step's aux/loss (the auxiliary routers' BCE, summed over every rank)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["aux/loss"] for r in lines if "loss" in r]


def steps_before_a_near_tie(*margins: list[float]) -> int:
    """How many leading steps every run chose with all margins above NEAR_TIE; at least 1 (the
    first step starts from the same weights in every layout)."""
    clear = 0
    for step in zip(*margins):
        if min(step) < NEAR_TIE:
            break
        clear += 1
    return max(clear, 1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moma_ref")
    losses, grads, _ = run_train(tmp, 1, CONFIG, MOMA, "single")
    experts = [n for n in grads if ".mlp.experts." in n]
    assert len(experts) == 4 * 8 * 2 and any(".mlp.router." in n for n in grads)
    assert sum(".mlp.aux_router." in n for n in grads) == 4 * 2
    margins = step_margins(tmp / "single")
    assert len(margins) == 5 and all(0 <= m < math.inf for m in margins), margins
    return losses, grads, margins, step_aux_losses(tmp / "single")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moma_layout_matches_single_process(layout, reference, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    losses, grads, out = run_train(tmp_path, nproc, CONFIG, MOMA + overrides, layout)
    assert len(losses) == 5
    assert_recompute_ran(out, overrides)
    ref_losses, ref_grads, ref_margins, _ = reference
    exact = steps_before_a_near_tie(ref_margins, step_margins(tmp_path / layout))
    print(f"{layout}: margins {ref_margins}; losses compared on steps 1-{exact}")
    assert_same_training((ref_losses[:exact], ref_grads), (losses[:exact], grads), layout, REL_TOL)
    aux, want = step_aux_losses(tmp_path / layout)[:exact], reference[3][:exact]
    assert all(abs(a - b) <= REL_TOL * abs(b) for a, b in zip(aux, want)), (layout, aux, want)


def test_moma_stopped_under_ep2_resumes_under_tp2_sp(reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    save = ["checkpoint.save=true", f"checkpoint.dir={ckpt}", "logging.dump_grads=null"]
    stop = {"MEGAFUSION_FAULT": "after_save:3"}  # both ranks die right after the step-3 checkpoint
    _, _, out = run_train(tmp_path, 2, CONFIG, [*MOMA, "parallel.ep=2", *save], "ep2", env=stop, expect_rc=1)
    assert out.count("dying at after_save of step 3") == 2  # torchrun's exit code is 1
    keys = set(dist_checkpointing.load_tensors_metadata(str(ckpt / "step_0000003")))
    assert any(k.startswith("decoder.layers.mlp.experts.experts.linear_fc1.weight") for k in keys), sorted(keys)[:20]
    assert "decoder.layers.mlp.router.weight" in keys
    losses, _, out = run_train(tmp_path, 2, CONFIG, [*MOMA, "parallel.tp=2", "parallel.sp=true", *save], "tp2_sp")
    assert "resumed from" in out and "step_0000003" in out
    assert len(losses) == 2
    exact = steps_before_a_near_tie(
        reference[2], step_margins(tmp_path / "ep2")[:3] + step_margins(tmp_path / "tp2_sp")
    )
    for a, b in list(zip(losses, reference[0][3:]))[: exact - 3]:
        assert abs(a - b) <= REL_TOL * abs(b), (losses, reference[0][3:])


def test_moma_on_triton_kernels_matches_single_process_on_them(tmp_path):
    """EP=2 with megafusion's Triton kernels (interpreted on a CPU) against one process on them.

    Not against the torch-backend reference: the kernels' fp32 GEMMs round differently from
    megatron's (which the torch backend reproduces bit for bit), and expert choice turns a
    last-bit difference between two scores into a different choice. Within one backend the
    layouts agree: a row's result does not depend on which other rows share its GEMM.
    """
    # The first step (loss and every gradient) of 2 layers on one microbatch per rank: the interpreter
    # runs every kernel program in Python, so its time grows with the tokens and layers it is given.
    triton = [*MOMA, "ops.backend=triton", "train.steps=1", "model.num_layers=2", "train.global_batch_size=4"]
    reference = run_train(tmp_path, 1, CONFIG, triton, "triton_single")[:2]
    run = run_train(tmp_path, 2, CONFIG, [*triton, "parallel.ep=2"], "triton_ep2")[:2]
    assert_same_training(reference, run, "ep2 triton", REL_TOL)
