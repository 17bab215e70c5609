"""A model family and an objective added from outside the package, in this file alone.

This module is the plugin: imported (``MEGAFUSION_PLUGINS=tests.distributed.test_new_family``)
by every process of a run, it registers

- ``toy_reglu``: the dense family with a ReGLU feed-forward network (``relu(gate) * up``
  instead of SwiGLU's ``silu(gate) * up``), one ``ModuleSpec`` swap;
- ``toy_double_lm``: the LM loss, doubled, reporting the undoubled sum as its own metric
  (``loss/toy_lm`` in ``metrics.jsonl``).

and the tests train them under TP = 2 and PP = 2: every loss and every first-step gradient equals
one process's, the doubled loss is exactly twice the reported LM loss, and the new FFN is really
used (the losses differ from the dense family's). Nothing else in the tree names them.
"""

from __future__ import annotations

import json

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megafusion.models.dense import transformer_layer_spec
from megafusion.models.registry import family_names, register_family
from megafusion.models.spec import ModelFamily
from megafusion.objectives.registry import objective_names, register_objective
from megafusion.objectives.spec import Objective
from tests.helpers import assert_same_training, run_train

pytestmark = pytest.mark.torchrun

CONFIG = "tests/configs/parity.yaml"
PLUGIN = {"MEGAFUSION_PLUGINS": __name__}
TOY = ["model.arch=toy_reglu", "objective.name=toy_double_lm"]


class ReGLUMLP(MLP):
    """megatron's MLP modules (fc1 = [gate; up], column-parallel; fc2 row-parallel), ReGLU between."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        hidden, _ = self.linear_fc1(hidden_states)
        gate, up = torch.chunk(hidden, 2, dim=-1)  # this TP rank's halves (fc1 is sharded with stride 2)
        return self.linear_fc2(torch.relu(gate) * up)


def reglu_layer_spec(cfg) -> ModuleSpec:
    mlp = ModuleSpec(
        module=ReGLUMLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    )
    return transformer_layer_spec(cfg, mlp=mlp)


class DoubleLM(Objective):
    name = "toy_double_lm"
    report_fields = ("toy_lm",)

    def loss(self, lm_total, extra_output, context):
        return 2 * lm_total, lm_total.detach().reshape(1)

    def metrics(self, sums, prefix):
        return {f"{prefix}/toy_lm": sums["toy_lm"] / sums["tokens"]}


if "toy_reglu" not in family_names():
    register_family(ModelFamily(name="toy_reglu", layer_spec=reglu_layer_spec, description="dense with ReGLU"))
if "toy_double_lm" not in objective_names():
    register_objective(DoubleLM())


def _metrics(tmp_path, tag: str) -> list[dict]:
    lines = (tmp_path / tag / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    losses, grads, _ = run_train(tmp, 1, CONFIG, [*TOY, "logging.log_interval=1"], "single", env=PLUGIN)
    return tmp, losses, grads


def test_registered_family_and_objective_train_like_one_process(single, tmp_path):
    tmp, losses, grads = single
    assert len(losses) == 5
    for step in _metrics(tmp, "single"):
        assert step["loss"] == pytest.approx(2 * step["loss/toy_lm"], rel=1e-9)
        assert step["loss/toy_lm"] == pytest.approx(step["loss/lm"] + 1e-3 * step["z_loss"], rel=1e-6)
    for layout, nproc, overrides in (("tp2", 2, ["parallel.tp=2", "parallel.sp=true"]), ("pp2", 2, ["parallel.pp=2"])):
        run = run_train(tmp_path, nproc, CONFIG, [*TOY, *overrides], layout, env=PLUGIN)
        assert_same_training((losses, grads), run[:2], layout, 1e-5)


def test_the_new_ffn_is_the_one_that_runs(single, tmp_path):
    _, toy_losses, toy_grads = single
    dense, dense_grads, _ = run_train(tmp_path, 1, CONFIG, ["objective.name=toy_double_lm"], "dense", env=PLUGIN)
    name = "decoder.layers.0.mlp.linear_fc1.weight"  # same init, another activation: another gradient
    assert ((dense_grads[name] - toy_grads[name]).norm() / dense_grads[name].norm()).item() > 1e-2
    assert dense != toy_losses


def test_unregistered_names_are_refused_naming_the_choices(tmp_path):
    _, _, out = run_train(tmp_path, 1, CONFIG, TOY, "unknown", expect_rc=2)
    assert "model.arch='toy_reglu'" in out and "dense" in out and "objective.name" in out
