"""A model family and an objective added from outside the package, in this file alone.

This module is the plugin: imported (``MEGAFUSION_PLUGINS=tests.distributed.test_new_family``)
by every process of a run, it registers

- ``toy_twin``: a heterogeneous stack with options of its own. Its layers are the dense layer with
  a ReGLU feed-forward network (``relu(gate) * up`` instead of SwiGLU's ``silu(gate) * up``), but
  every ``twin.every``-th layer (global layer number) runs two SwiGLU FFNs and adds them, the
  second scaled by ``twin.scale``. Its config section ``twin`` and its checks (``twin_problems``)
  are its own (:class:`~megafusion.core.options.Options`), and so is its accounting answer: a twin
  layer holds two FFN copies and a token runs both (``LayerCost``);
- ``toy_double_lm``: the LM loss, doubled, reporting the undoubled sum as its own metric
  (``loss/toy_lm`` in ``metrics.jsonl``).

The tests train them under TP = 2 + SP and PP = 2 with VPP = 2 (every loss and every first-step
gradient equals one process's), check that each layer is the kind its number says, that the
options are read and checked from the config alone, that parameters and FLOPs counted from the
family's answer equal the built model and ``FlopCounterMode``, and that ``megafusion plan`` plans
it (its memory against a real run: ``tests/planning/test_plan_memory_measured.py``). Nothing else
in the tree names them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from megafusion.core.options import Options
from megafusion.models.dense import transformer_layer_spec
from megafusion.models.registry import family_names, register_family
from megafusion.models.spec import LayerCost, ModelFamily
from megafusion.objectives.registry import objective_names, register_objective
from megafusion.objectives.spec import Objective
from tests.helpers import ROOT, assert_same_training, run_train

CONFIG = "tests/configs/parity.yaml"  # 4 layers: with twin.every=2, layers 2 and 4 are twins
PLUGIN = {"MEGAFUSION_PLUGINS": __name__}
TOY = ["model.arch=toy_twin", "objective.name=toy_double_lm"]
FC1 = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


@dataclass
class TwinConfig:
    """The ``twin`` section: which layers are twins and how much the second FFN counts."""

    every: int = 2  # every every-th layer (global number) runs two FFNs
    scale: float = 0.5  # the second FFN's output is multiplied by this


def twin_problems(cfg) -> list[str]:
    t, problems = cfg.twin, []
    if not 1 <= t.every <= cfg.model.num_layers:
        problems.append(
            f"twin.every={t.every} must be in [1, model.num_layers={cfg.model.num_layers}]: e.g. twin.every=2"
        )
    if not 0 < t.scale <= 1:
        problems.append(f"twin.scale={t.scale} must be in (0, 1]: e.g. twin.scale=0.5")
    return problems


class ReGLUMLP(MLP):
    """megatron's MLP modules (fc1 = [gate; up], column-parallel; fc2 row-parallel), ReGLU between."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        hidden, _ = self.linear_fc1(hidden_states)
        gate, up = torch.chunk(hidden, 2, dim=-1)  # this TP rank's halves (fc1 is sharded with stride 2)
        return self.linear_fc2(torch.relu(gate) * up)


def twin_mlp(scale: float) -> type:
    """Two megatron SwiGLU MLPs on the same input, ``first + scale * second``, as a class with
    ``scale`` bound (a spec's module is built with megatron's arguments only)."""

    class TwinMLP(MegatronModule):
        def __init__(self, config, submodules, **kwargs):
            super().__init__(config=config)
            kwargs.setdefault("ffn_hidden_size", config.ffn_hidden_size)
            self.first = MLP(config, submodules, **kwargs)
            self.second = MLP(config, submodules, **kwargs)

        def forward(self, hidden_states, **kwargs):
            first, _ = self.first(hidden_states)
            second, _ = self.second(hidden_states)
            return first + scale * second, None

    return TwinMLP


def is_twin(cfg, layer: int) -> bool:
    return layer % cfg.twin.every == 0


def twin_layer_spec(cfg, layer: int) -> ModuleSpec:
    mlp = twin_mlp(cfg.twin.scale) if is_twin(cfg, layer) else ReGLUMLP
    return transformer_layer_spec(cfg, mlp=ModuleSpec(module=mlp, submodules=FC1))


def twin_layer_cost(cfg, layer: int) -> LayerCost:
    if not is_twin(cfg, layer):
        return LayerCost()  # ReGLU has SwiGLU's matmuls
    return LayerCost(copies={"ffn": 2}, ffn_per_token=lambda modality: 2, describe="two SwiGLU FFNs, summed")


class DoubleLM(Objective):
    name = "toy_double_lm"
    report_fields = ("toy_lm",)

    def loss(self, lm_total, extra_output, context):
        return 2 * lm_total, lm_total.detach().reshape(1)

    def metrics(self, sums, prefix):
        return {f"{prefix}/toy_lm": sums["toy_lm"] / sums["tokens"]}


if "toy_twin" not in family_names():
    register_family(
        ModelFamily(
            name="toy_twin",
            layer_spec=twin_layer_spec,
            layer_cost=twin_layer_cost,
            options=Options(sections={"twin": TwinConfig}, problems=twin_problems),
            description="ReGLU layers, every twin.every-th layer two SwiGLU FFNs",
        )
    )
if "toy_double_lm" not in objective_names():
    register_objective(DoubleLM())


def _metrics(tmp_path, tag: str) -> list[dict]:
    lines = (tmp_path / tag / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


def _cfg(*overrides):
    from megafusion.config import load_config

    cfg = load_config(str(ROOT / CONFIG), [*TOY, *overrides])
    cfg.model.vocab_size = cfg.model.vocab_size or 256  # synthetic data's, as a run sets it
    return cfg


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    losses, grads, out = run_train(tmp, 1, CONFIG, [*TOY, "logging.log_interval=1"], "single", env=PLUGIN)
    return tmp, losses, grads, out


@pytest.mark.torchrun
def test_registered_family_and_objective_train_like_one_process(single, tmp_path):
    tmp, losses, grads, out = single
    assert len(losses) == 5
    assert "layer 2: two SwiGLU FFNs, summed; layer 3: plain" in out, out[-3000:]
    for step in _metrics(tmp, "single"):
        assert step["loss"] == pytest.approx(2 * step["loss/toy_lm"], rel=1e-9)
        assert step["loss/toy_lm"] == pytest.approx(step["loss/lm"] + 1e-3 * step["z_loss"], rel=1e-6)
    twin_keys = [k for k in grads if ".mlp.second." in k]
    assert sorted({k.split(".")[2] for k in twin_keys}) == ["1", "3"], twin_keys  # layers 2 and 4 (0-based 1, 3)
    for layout, nproc, overrides in (
        ("tp2_sp", 2, ["parallel.tp=2", "parallel.sp=true"]),
        ("pp2_vpp2", 2, ["parallel.pp=2", "parallel.vpp=2"]),
    ):
        run = run_train(tmp_path, nproc, CONFIG, [*TOY, *overrides], layout, env=PLUGIN)
        assert set(run[1]) == set(grads), layout  # the same layers, under the same global names
        assert_same_training((losses, grads), run[:2], layout, 1e-5)


@pytest.mark.torchrun
def test_the_options_change_the_stack(single, tmp_path):
    _, toy_losses, toy_grads, _ = single
    losses, grads, _ = run_train(tmp_path, 1, CONFIG, [*TOY, "twin.every=3", "twin.scale=1.0"], "every3", env=PLUGIN)
    assert sorted({k.split(".")[2] for k in grads if ".mlp.second." in k}) == ["2"]
    assert losses != toy_losses
    # Layer 1 is ReGLU in both; the dense family's SwiGLU gives it another gradient from the same init.
    dense, dense_grads, _ = run_train(tmp_path, 1, CONFIG, ["objective.name=toy_double_lm"], "dense", env=PLUGIN)
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    assert ((dense_grads[name] - toy_grads[name]).norm() / dense_grads[name].norm()).item() > 1e-2
    assert dense != toy_losses


def test_its_options_are_read_and_checked_from_the_config_alone(monkeypatch):
    from megafusion.config import ConfigError, validate

    monkeypatch.setenv("MEGAFUSION_PLUGINS", __name__)
    cfg = _cfg("twin.every=3", "twin.scale=0.25")
    assert (cfg.twin.every, cfg.twin.scale) == (3, 0.25)
    validate(cfg, 1)
    with pytest.raises(ConfigError) as info:
        validate(_cfg("twin.every=0", "twin.scale=2"), 1)
    assert info.value.problems == [
        "twin.every=0 must be in [1, model.num_layers=4]: e.g. twin.every=2",
        "twin.scale=2.0 must be in (0, 1]: e.g. twin.scale=0.5",
    ]
    # Its section is ignored under another family: set away from its defaults, it is refused.
    with pytest.raises(ConfigError) as info:
        validate(_cfg("model.arch=dense", "twin.every=3"), 1)
    assert "twin.every=3 is set, but model.arch=dense ignores the twin section" in str(info.value)


@pytest.mark.torchrun
def test_bad_options_stop_a_run_before_it_builds_anything(tmp_path):
    _, _, out = run_train(tmp_path, 1, CONFIG, [*TOY, "twin.scale=0"], "bad", expect_rc=2, env=PLUGIN)
    assert "twin.scale=0.0 must be in (0, 1]" in out
    assert "[megafusion] toy_twin:" not in out  # refused before the model or a process group


def test_unregistered_names_are_refused_naming_the_choices(monkeypatch):
    from megafusion.config import ConfigError, load_config, validate

    monkeypatch.delenv("MEGAFUSION_PLUGINS", raising=False)
    from megafusion.core.registries import FAMILIES

    saved = FAMILIES._registered.pop("toy_twin")
    try:
        with pytest.raises(ConfigError) as info:
            validate(load_config(str(ROOT / CONFIG), ["model.arch=toy_twin"]), 1)
        assert "model.arch='toy_twin' is not one of dense, mot, moma" in str(info.value)
    finally:
        FAMILIES._registered["toy_twin"] = saved


def test_counted_from_its_answer_equal_the_model_and_flop_counter(runtime):
    """Parameters from ``LayerCost`` equal the built model's; FLOPs equal ``FlopCounterMode``
    around a forward + backward (CPU SDPA: attention is not counted, ``kernel="cpu"``)."""
    import torch.nn.functional as F
    import torch.utils.flop_counter
    from torch.utils.flop_counter import FlopCounterMode

    from megafusion.accounting import flops, params
    from megafusion.data.builtin.synthetic import synthetic_microbatch
    from megafusion.models.transformer_config import build_transformer_config
    from megafusion.objectives.build import build_model_chunks

    cfg = _cfg()
    model = build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime)[0]
    counts = params.parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    dense = params.parameter_counts(_cfg("model.arch=dense"))
    mlp = params._matmul_parts(cfg)["mlp"]
    assert counts["total"] - dense["total"] == 2 * mlp  # two twin layers, one extra FFN each
    assert counts["active"] == counts["total"]  # a token runs both FFNs of a twin layer
    b, s = 2, cfg.model.seq_length
    batch = synthetic_microbatch(0, b, 7, s, cfg.model.vocab_size, 1)
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(batch["tokens"], batch["position_ids"], None, labels=None)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)).backward()
    # torch 2.13 has no FLOP formula for the CPU SDPA kernel; a newer one would count it as fused.
    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    kernel = "fused" if cpu_sdpa in torch.utils.flop_counter.flop_registry else "cpu"
    assert counter.get_total_flops() == flops.flop_counter_flops(cfg, b, s, kernel)
    assert flops.dense_flops_per_token(cfg) - flops.dense_flops_per_token(_cfg("model.arch=dense")) == 2 * 3 * 2 * mlp
    assert params.describe_layers(cfg).startswith("layer 1: plain (one FFN per token); layer 2: two SwiGLU FFNs")


def test_megafusion_plan_plans_it(monkeypatch, capsys):
    from megafusion.commands.main import main

    monkeypatch.setenv("MEGAFUSION_PLUGINS", __name__)
    overrides = ["train.global_batch_size=16"]
    assert main(["plan", "--config", str(ROOT / CONFIG), "--gpus", "4", "--gpu", "h100", *TOY, *overrides]) == 0
    twin = capsys.readouterr().out
    assert main(["plan", "--config", str(ROOT / CONFIG), "--gpus", "4", "--gpu", "h100", *overrides]) == 0
    dense = capsys.readouterr().out
    assert "toy_twin" in twin and "pp2" in twin and twin != dense
