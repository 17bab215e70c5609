"""Mixture-of-Depths' auxiliary routers in training runs: the second stage and what the runs log.

A MoMa + MoD run with MoMa's auxiliary routers but not MoD's saves a checkpoint; a second run
starts from it with ``mod.aux_router=true train.trainable=aux_routers`` (``checkpoint.init_from``:
MoD's routers, ``mod_aux_router``, are new and initialised; MoMa's load). Its first-step gradients
exist for auxiliary weights only (MoD's and MoMa's), every other weight is bit-identical to the
checkpoint's after its steps, MoD's routers moved from their initialisation (control for the
comparison), and every step logs ``aux/...`` (MoD's decisions counted with MoMa's).
"""

from __future__ import annotations

import json

import torch

from megafusion.inference.load import checkpoint_config
from megafusion.models.param_layout import global_param_names
from tests.helpers import run_train
from tests.models.test_mot import build
from tests.training.test_aux_router_training import weights

CONFIG = "tests/configs/mixed_small.yaml"
MOMA_MOD = ["model.arch=moma", "moe.experts={text: 2, image: 2}", "moe.aux_router=true", "mod.capacity=0.5"]


def test_second_stage_adds_and_trains_only_mod_aux_routers(tmp_path, runtime):
    first = tmp_path / "first"
    run_train(
        tmp_path, 1, CONFIG, [*MOMA_MOD, "train.steps=2", "checkpoint.save=true", f"checkpoint.dir={first}"], "one"
    )
    second = tmp_path / "second"
    stage2 = [
        *MOMA_MOD,
        "mod.aux_router=true",
        "train.trainable=aux_routers",
        "train.steps=3",
        "train.lr=1e-2",
        f"checkpoint.init_from={first}",
        "checkpoint.save=true",
        f"checkpoint.dir={second}",
    ]
    _, grads, out = run_train(tmp_path, 1, CONFIG, stage2, "two")
    assert "new (initialised, not loaded): mod_aux_router" in out, out[-2000:]
    assert grads and all("aux_router." in n for n in grads), sorted(grads)[:5]
    assert {n for n in grads if ".mod_aux_router." in n}, sorted(grads)
    before, after = weights(first, runtime), weights(second, runtime)
    main = [n for n in after if "aux_router." not in n]
    assert set(main) == {n for n in before if "aux_router." not in n}
    for name in main:
        assert torch.equal(before[name], after[name]), name
    fresh = build(checkpoint_config(second).cfg, runtime)
    init = {n: p for n, p in global_param_names(fresh).items() if ".mod_aux_router." in n}
    assert init and all(not torch.equal(init[n], after[n]) for n in init)
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "step" in r]
    assert len(steps) == 3 and all({"aux/loss", "aux/accuracy", "aux/recall"} <= set(r) for r in steps)
