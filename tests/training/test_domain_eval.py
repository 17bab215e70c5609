"""The trainer's evaluation per data domain (data.domains): every domain of the run reported, each
equal to evaluating that domain's held-out documents alone, val/loss their token-weighted mean; the
realised training shares logged per domain."""

from __future__ import annotations

import math

from megafusion.config.loader import load_config
from megafusion.config.validate import validate

TINY = [
    "data.source=builtin",
    "data.builtin=shapes,digits,arithmetic",
    "data.num_samples=60",
    "data.patch_size=4",
    "data.val_fraction=0.1",
    "model.seq_length=64",
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "eval.batches=1",
]


def _trainer(runtime, tmp_path, *extra):
    from megafusion.runtime import seed_everything
    from megafusion.training.trainer import Trainer

    cfg = load_config(None, [*TINY, f"data.cache_dir={tmp_path / 'cache'}", *extra])
    validate(cfg, 1)
    seed_everything(cfg.train.seed)
    return Trainer(cfg, runtime)


def test_every_domain_is_evaluated_alone_and_val_loss_is_their_token_mean(runtime, tmp_path):
    trainer = _trainer(runtime, tmp_path, "data.domains=shapes")
    record = trainer.train_step(0, 0, None)
    assert record["data/domain/shapes/share"] == 1.0 and record["data/domain/shapes/tokens"] > 0
    assert not any(k.startswith("data/blend/") for k in record)

    val = trainer.evaluate(1)
    names = ("shapes", "digits", "arithmetic")  # the untrained domains too
    assert {k.split("/")[2] for k in val if k.startswith("val/domain/")} == set(names)
    assert "val/domain/arithmetic/loss/text" in val and "val/domain/arithmetic/loss/image" not in val
    assert "val/domain/digits/loss/image" in val and "val/domain/shapes/loss/image" in val
    losses = [val[f"val/domain/{n}/loss"] for n in names]
    assert len(set(losses)) == 3 and all(math.isfinite(x) for x in losses)
    # Each domain evaluated alone (the evaluation of a run without domains, on that source only).
    for name in names:
        trainer.data.val = trainer.data.val_domains[name]
        alone = trainer.evaluate(1, per_domain=False)
        assert alone["val/loss"] == val[f"val/domain/{name}/loss"]
        assert alone["val/tokens"] == val[f"val/domain/{name}/tokens"]
        assert alone["val/loss/text"] == val[f"val/domain/{name}/loss/text"]
    tokens = [val[f"val/domain/{n}/tokens"] for n in names]
    assert val["val/tokens"] == sum(tokens)
    assert math.isclose(val["val/loss"], sum(x * t for x, t in zip(losses, tokens)) / sum(tokens), rel_tol=1e-12)


def test_a_run_without_domains_keeps_its_validation(runtime, tmp_path):
    trainer = _trainer(runtime, tmp_path)
    val = trainer.evaluate(0)
    assert not any("/domain/" in k for k in val) and set(val) >= {"val/loss", "val/tokens", "val/loss/image"}
    # What `megafusion eval` adds for it: the per-domain losses, on request.
    per_domain = trainer.evaluate(0, per_domain=True)
    assert {k.split("/")[2] for k in per_domain if k.startswith("val/domain/")} == {"shapes", "digits", "arithmetic"}
    assert per_domain["val/loss"] != val["val/loss"]  # the domains are packed apart: other rows
