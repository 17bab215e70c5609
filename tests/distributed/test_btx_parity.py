"""Branch-Train-MiX's MoE computes the same thing with expert parallelism, in every layout, as in one process.

A btx model (modality groups, 3 text + 3 image experts, top-2 token choice, load-balancing loss
weight 0.05) trains 5 steps on the built-in mixed-modal shapes set; each layout's losses, its
logged load-balancing loss (``moe/aux_loss``, summed over ranks once per step) and every
parameter's first-step full gradient (each expert's gathered over the expert-parallel ranks, and
the routers', which carry the balancing loss's gradient) must match the single-process run
(relative 1e-5). Token choice routes each token from its own hidden state, so the routing is
layout-independent wherever the layouts compute a token's logits alike: exactly at step 1 (the
same weights), and later while no token's k-th and (k+1)-th scores are a near-tie
(``moe/min_margin``, as for MoMa: ``tests/distributed/test_moma_parity.py``): losses are compared up to
the first step whose margin falls below ``NEAR_TIE`` in either run, the first step always.

Layouts: EP=2 (with full recomputation: the layer routes and exchanges counts again), EP=2 x TP=2
with sequence parallelism (4 processes: each rank routes its own tokens, the counts of the
balancing loss summed over the TP pair; selective recomputation), EP=2 x PP=2 (all-gather
dispatcher), and CP=2 with the distributed optimizer (EP=1; each context rank routes its share of
the rows, the balancing loss's counts summed over the context pair and its ``n`` the whole
microbatch's, so the logged loss and shares are one process's; DP=2 trains in ep2). A run stopped
under EP=2 resumes under EP=1 exactly where the uninterrupted run is, from megatron's expert-sharded checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from megatron.core import dist_checkpointing

from tests.distributed.test_moma_parity import step_margins, steps_before_a_near_tie
from tests.helpers import assert_recompute_ran, assert_same_training, run_train

pytestmark = pytest.mark.torchrun

CONFIG = "tests/configs/mixed_small.yaml"
BTX = [
    "model.arch=btx",
    "train.steps=5",
    "btx.experts={text: 3, image: 3}",
    "btx.topk=2",
    "btx.aux_loss_coeff=0.05",
]
FULL, SELECTIVE = "train.recompute=full", "train.recompute=selective"
LAYOUTS = {
    "ep2": (2, ["parallel.ep=2", FULL]),
    "ep2_tp2_sp": (4, ["parallel.ep=2", "parallel.tp=2", "parallel.sp=true", SELECTIVE]),
    "ep2_pp2_allgather": (4, ["parallel.ep=2", "parallel.pp=2", "btx.dispatcher=allgather"]),
    "cp2_distopt": (2, ["parallel.cp=2", "parallel.distributed_optimizer=true"]),
}
REL_TOL = 1e-5


def step_values(run_dir: Path, key: str) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in lines if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("btx_ref")
    losses, grads, _ = run_train(tmp, 1, CONFIG, BTX, "single")
    assert len([n for n in grads if ".mlp.experts." in n]) == 4 * 6 * 2
    assert sum(".mlp.router." in n for n in grads) == 4
    margins = step_margins(tmp / "single")
    assert len(margins) == 5 and all(0 < m for m in margins), margins
    aux = step_values(tmp / "single", "moe/aux_loss")
    assert all(1.0 <= a < 2.0 for a in aux), aux  # 1 is perfect balance
    shares = step_values(tmp / "single", "moe/share/text.2")
    assert all(0 < s < 1 for s in shares), shares
    entropy = step_values(tmp / "single", "moe/share_entropy")
    assert all(0 < h < math.log(3) for h in entropy), entropy  # 3 experts per group
    return losses, grads, margins, aux, (shares, entropy)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_btx_layout_matches_single_process(layout, reference, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    losses, grads, out = run_train(tmp_path, nproc, CONFIG, BTX + overrides, layout)
    assert len(losses) == 5
    assert_recompute_ran(out, overrides)
    ref_losses, ref_grads, ref_margins, ref_aux, ref_shares = reference
    exact = steps_before_a_near_tie(ref_margins, step_margins(tmp_path / layout))
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(losses[:exact], ref_losses))
    grad_rel = max(((grads[n] - g).norm() / g.norm()).item() for n, g in ref_grads.items())
    print(f"{layout}: margins {ref_margins}; steps 1-{exact}: loss {loss_rel:.1e}, first-step gradients {grad_rel:.1e}")
    assert_same_training((ref_losses[:exact], ref_grads), (losses[:exact], grads), layout, REL_TOL)
    aux = step_values(tmp_path / layout, "moe/aux_loss")[:exact]
    assert all(abs(a - b) <= REL_TOL * abs(b) for a, b in zip(aux, ref_aux)), (layout, aux, ref_aux)
    # The routing itself: an expert's share of its group's slots and each layer's entropy of the
    # shares (layers by their global number, on any pipeline stage), counted over every rank.
    for key, want in zip(("moe/share/text.2", "moe/share_entropy"), ref_shares):
        got = step_values(tmp_path / layout, key)[:exact]
        assert got == pytest.approx(want[:exact], rel=1e-12, abs=0), (layout, key, got, want)


def test_btx_stopped_under_ep2_resumes_under_ep1(reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    save = ["checkpoint.save=true", f"checkpoint.dir={ckpt}", "logging.dump_grads=null"]
    stop = {"MEGAFUSION_FAULT": "after_save:3"}  # both ranks die right after the step-3 checkpoint
    _, _, out = run_train(tmp_path, 2, CONFIG, [*BTX, "parallel.ep=2", *save], "ep2", env=stop, expect_rc=1)
    assert out.count("dying at after_save of step 3") == 2
    keys = set(dist_checkpointing.load_tensors_metadata(str(ckpt / "step_0000003")))
    assert any(k.startswith("decoder.layers.mlp.experts.experts.linear_fc1.weight") for k in keys), sorted(keys)[:20]
    assert "decoder.layers.mlp.router.weight" in keys
    losses, _, out = run_train(tmp_path, 1, CONFIG, [*BTX, *save], "ep1")
    assert "resumed from" in out and "step_0000003" in out
    assert len(losses) == 2
    exact = steps_before_a_near_tie(reference[2], step_margins(tmp_path / "ep2")[:3] + step_margins(tmp_path / "ep1"))
    for a, b in list(zip(losses, reference[0][3:]))[: exact - 3]:
        assert abs(a - b) <= REL_TOL * abs(b), (losses, reference[0][3:])
