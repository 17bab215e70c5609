"""The planner's formulas on examples worked by hand, and against independent references
(the exact parameter counts of :mod:`megafusion.accounting.params`)."""

from __future__ import annotations

import math

import pytest

from megafusion.accounting.params import parameter_counts
from megafusion.config import load_config
from megafusion.core.errors import UsageError
from megafusion.planning import memory as mem
from megafusion.planning.hardware import GPUS, hardware
from megafusion.planning.search import layouts
from megafusion.planning.step_time import bubble_fraction, ring
from tests.helpers import ROOT

MIXED = str(ROOT / "tests/configs/mixed_small.yaml")


def test_bubble_fraction_by_hand():
    assert bubble_fraction(1, 1, 8) == 0  # no pipeline, no bubble
    assert bubble_fraction(4, 1, 8) == 3 / 8  # 1F1B: (P - 1) / M
    assert bubble_fraction(4, 2, 8) == 3 / 16  # interleaved: (P - 1) / (v M)
    assert ring(1) == 0 and ring(8) == 7 / 8


def test_buffer_padding_by_hand():
    # No distributed optimizer: no padding.
    assert mem.buffer_numel([100, 30], dp=2, distributed_optimizer=False) == 130
    # Distributed optimizer: 100 -> 128, 30 -> 64 (each tensor 64-aligned) = 192 -> lcm(2, 128) = 128: 256.
    assert mem.buffer_numel([100, 30], dp=2, distributed_optimizer=True) == 256
    # lcm(3, 128) = 384: 192 -> 384.
    assert mem.buffer_numel([100, 30], dp=3, distributed_optimizer=True) == 384
    # Reverse order: [30 at 0..30), [100 at 64..164); shards of 128: rank 0 owns 30 + 64, rank 1 owns 36.
    assert mem.shard_elements([100, 30], dp=2, dp_rank=0) == 30 + 64
    assert mem.shard_elements([100, 30], dp=2, dp_rank=1) == 36


def test_in_flight_microbatches_follow_megatron_warmup():
    one_f_one_b = [mem.in_flight(mem.Rank(tp=1, pp=4, vpp=1, dp=1, pp_rank=p), 8) for p in range(4)]
    assert [len(x) for x in one_f_one_b] == [4, 3, 2, 1]  # P - p
    assert len(mem.in_flight(mem.Rank(tp=1, pp=4, vpp=1, dp=1), 2)) == 2  # capped at M
    # Interleaved P=2, v=2, M=4: stage 0 warmup (2-0-1)*2 + (2-1)*2 = 4, + 1 in flight; order is
    # microbatches 0,1 on chunk 0, then 0,1 on chunk 1, then 2 on chunk 0.
    assert mem.in_flight(mem.Rank(tp=1, pp=2, vpp=2, dp=1, pp_rank=0), 4) == [0, 0, 1, 1, 0]
    assert mem.in_flight(mem.Rank(tp=1, pp=2, vpp=2, dp=1, pp_rank=1), 4) == [0, 0, 1]


@pytest.mark.parametrize("arch", ["dense", "mot"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_parameters_of_all_ranks_add_up_to_the_exact_count(arch, tp, pp):
    cfg = load_config(MIXED, [f"model.arch={arch}", "model.vocab_size=256", f"parallel.tp={tp}", f"parallel.pp={pp}"])
    h = cfg.model.hidden_size
    total = 0
    for pp_rank in range(pp):
        tensors = mem.chunk_parameters(cfg, mem.Rank(tp=tp, pp=pp, vpp=1, dp=1, pp_rank=pp_rank), 0)["dense"]
        # Norm weights (h, head dim) are whole on every TP rank: counted once; the rest is split over TP.
        replicated = sum(n for n in tensors if n in (h, h // cfg.model.num_attention_heads))
        total += replicated + (sum(tensors) - replicated) * tp
    assert total == parameter_counts(cfg)["total"]


def test_bf16_states_by_hand():
    cfg = load_config(MIXED, ["model.vocab_size=256"])
    rank = mem.Rank(tp=1, pp=1, vpp=1, dp=1)
    n = parameter_counts(cfg)["total"]
    state = mem.state_bytes(cfg, rank, "bf16")
    # bf16 params, fp32 grads, fp32 main params + Adam's two moments.
    assert state == {"params": 2 * n, "grads": 4 * n, "optimizer": 12 * n}


def test_full_recompute_keeps_one_input_per_layer():
    cfg = load_config(MIXED, ["model.vocab_size=256"])
    rank = mem.Rank(tp=1, pp=1, vpp=1, dp=1)
    kept = mem.chunk_activation_bytes(cfg, rank, 0, "fp32", recompute="full")
    tokens = cfg.model.seq_length * cfg.train.micro_batch_size
    assert kept["layers"] == cfg.model.num_layers * tokens * cfg.model.hidden_size * 4
    none = mem.chunk_activation_bytes(cfg, rank, 0, "fp32")
    assert kept["transient"] == none["layers"] / cfg.model.num_layers


def test_hardware_overrides_and_bad_names():
    assert hardware("h100").peak_tflops == 989.0
    assert hardware("H100", peak_tflops=500, hbm_gb=40).hbm_gb == 40
    assert hardware("a100", nodes_gbps=None) == GPUS["a100"]
    with pytest.raises(UsageError, match="unknown GPU"):
        hardware("v100")
    with pytest.raises(UsageError, match="must be > 0"):
        hardware("h100", hbm_gb=0)


def test_a_bad_hardware_number_names_the_flag_that_sets_it():
    from megafusion.commands.plan import parser
    from megafusion.planning.hardware import FLAGS

    flags = {flag for action in parser()._actions for flag in action.option_strings}
    assert set(FLAGS) == set(GPUS["h100"].as_dict()) - {"name"}  # every number of the table has its flag
    for field, flag in FLAGS.items():
        assert flag in flags, flag
        with pytest.raises(UsageError) as err:
            hardware("h100", **{field: -1})
        assert str(err.value) == f"{flag} -1: must be > 0 (the h100 table's value: {getattr(GPUS['h100'], field):g})"


def test_the_plan_takes_the_vocabulary_from_the_data_as_a_run_does(tmp_path):
    from megafusion.data.sources import build_data, data_vocabulary
    from tests.data.test_indexed import random_docs, write

    # Built-in data: the tokenizer a run trains (and caches); the run's own path is the reference.
    cfg = load_config(MIXED, [f"data.cache_dir={tmp_path / 'cache'}", "data.num_samples=60"])
    assert cfg.model.vocab_size is None
    vocab, where = data_vocabulary(cfg)
    data = build_data(cfg)
    data.set_model_vocabulary(cfg.model)
    assert vocab == cfg.model.vocab_size and vocab % 128 == 0
    assert where == f"data.source=builtin: {data.tokenizer.vocab_size} ids of its tokenizer"
    # An indexed dataset: the ids its meta records (1000 here), padded as a run pads them; nothing is indexed.
    import numpy as np

    write(tmp_path, random_docs(np.random.default_rng(0), 3, 1000), vocab_size=1000)
    cfg = load_config(MIXED, ["data.source=indexed", f"data.path={tmp_path / 'ds'}"])
    assert data_vocabulary(cfg) == (1024, f"data.path={tmp_path / 'ds'}: 1000 ids in its .meta.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ds.bin", "ds.idx", "ds.meta.json"]


def test_search_keeps_only_layouts_that_validate():
    cfg = load_config(MIXED, ["model.vocab_size=256"])
    found = layouts(cfg, 8, recompute=["none"])
    assert found and all(lay.tp * lay.pp * lay.dp == 8 for lay in found)
    assert all(
        cfg.model.num_attention_heads % lay.tp == 0 and cfg.model.num_layers % (lay.pp * lay.vpp) == 0 for lay in found
    )
    assert all(math.prod((lay.micro_batch_size, lay.dp)) <= cfg.train.global_batch_size for lay in found)
    assert {lay.tp for lay in found} == {1, 2}  # 4 heads, 2 kv groups: TP 4 and 8 do not validate
