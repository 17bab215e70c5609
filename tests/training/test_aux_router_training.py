"""Auxiliary routers in training runs: the second stage (``train.trainable=aux_routers`` from a trained
MoMa checkpoint without them) and what the runs log.

- A MoMa run without auxiliary routers saves a checkpoint; a second run starts from it with
  ``moe.aux_router=true train.trainable=aux_routers`` (``checkpoint.init_from``: the missing
  auxiliary weights are initialised, not refused). Its first-step gradients exist for the
  auxiliary weights only (nothing else trains or holds optimizer state), and after its steps every
  other weight is bit-identical to the checkpoint's while the auxiliary ones moved. Control: the
  auxiliary weights did change, and a resume (not a warm start) from a checkpoint without them is
  refused.
- Metrics: ``aux/loss`` / ``aux/accuracy`` / ``aux/precision`` / ``aux/recall`` per step; evaluation
  reports the teacher-forced losses, the routers' statistics against expert choice (``val/aux/...``)
  and the causal-routing losses (``val_causal/loss``, per modality) beside them; the auxiliary
  BCE falls over the second stage's steps.
"""

from __future__ import annotations

import json

import torch

from megafusion.checkpoint.io import load_weights
from megafusion.inference.load import checkpoint_config
from megafusion.layers.aux_router import aux_routers_of
from megafusion.models.param_layout import global_param_names
from tests.helpers import run_train
from tests.models.test_mot import build

CONFIG = "tests/configs/mixed_small.yaml"
MOMA = ["model.arch=moma", "moe.experts={text: 2, image: 2}"]


def weights(path, runtime) -> dict[str, torch.Tensor]:
    source = checkpoint_config(path)
    model = build(source.cfg, runtime)
    load_weights(source.path, [model])
    return {n: p.detach().clone() for n, p in global_param_names(model).items()}


def test_second_stage_trains_only_the_aux_routers_and_logs_both_routings(tmp_path, runtime):
    first = tmp_path / "first"
    run_train(tmp_path, 1, CONFIG, [*MOMA, "train.steps=2", "checkpoint.save=true", f"checkpoint.dir={first}"], "one")
    # (train.recompute=full is refused in this mode: the frozen layers' recomputed regions would
    # carry no gradient; selective recomputation works)
    second = tmp_path / "second"
    stage2 = [
        *MOMA,
        "moe.aux_router=true",
        "train.trainable=aux_routers",
        "train.recompute=selective",
        "train.steps=4",
        "train.lr=1e-2",
        "eval.interval=4",
        f"checkpoint.init_from={first}",
        "checkpoint.save=true",
        f"checkpoint.dir={second}",
    ]
    _, grads, _ = run_train(tmp_path, 1, CONFIG, stage2, "two")
    assert grads and all(".aux_router." in n for n in grads), sorted(grads)[:5]
    assert len(grads) == 2 * 4  # fc1, fc2 of every layer
    before, after = weights(first, runtime), weights(second, runtime)
    main = [n for n in after if ".aux_router." not in n]
    assert set(main) == set(before)
    for name in main:
        assert torch.equal(before[name], after[name]), name
    # the auxiliary routers trained (control: the comparison above would see a change)
    fresh = build(checkpoint_config(second).cfg, runtime)
    init = {n: p for n, p in global_param_names(fresh).items() if ".aux_router." in n}
    assert all(not torch.equal(init[n], after[n]) for n in init) and len(init) == 8
    assert sum(p.numel() for p in aux_routers_of([fresh])[0].parameters()) == 32 * 16 + 16 * 4

    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "step" in r]
    assert len(steps) == 4
    for r in steps:
        assert {"aux/loss", "aux/accuracy", "aux/precision", "aux/recall"} <= set(r), sorted(r)
        assert 0 <= r["aux/accuracy"] <= 1
    assert steps[-1]["aux/loss"] < steps[0]["aux/loss"]
    val = [r for r in records if "val/loss" in r][-1]
    assert {"val/aux/accuracy", "val/aux/precision", "val/aux/recall", "val_causal/loss"} <= set(val), sorted(val)
    assert any(k.startswith("val_causal/loss/") for k in val)
    assert val["val_causal/loss"] != val["val/loss"]


def test_resume_refuses_a_checkpoint_without_aux_routers(tmp_path):
    ckpt = tmp_path / "ckpt"
    run_train(tmp_path, 1, CONFIG, [*MOMA, "train.steps=1", "checkpoint.save=true", f"checkpoint.dir={ckpt}"], "a")
    _, _, out = run_train(
        tmp_path,
        1,
        CONFIG,
        [*MOMA, "moe.aux_router=true", "train.steps=2", "checkpoint.save=true", f"checkpoint.dir={ckpt}"],
        "b",
        expect_rc=2,
    )
    assert "aux_routers" in out
