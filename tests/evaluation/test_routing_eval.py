"""``megafusion eval --text`` on a MoMa checkpoint with auxiliary routers reports both routings.

The mean next-token loss under teacher-forced expert choice (``loss``, what training computes)
and under causal routing (``loss_causal``: each token routed by the auxiliary routers from its own
state, as generation routes it); control: without auxiliary routers only the teacher-forced loss,
marked as such. The validation side (per-modality losses and the routers' precision / recall /
accuracy) is checked in ``tests/training/test_aux_router_training.py``.
"""

from __future__ import annotations

import json
import math

from tests.helpers import run_module, run_train

CONFIG = "tests/configs/mixed_small.yaml"


def eval_text(tmp_path, aux: bool) -> dict:
    tag = "aux" if aux else "plain"
    ckpt = tmp_path / f"{tag}_ckpt"
    extra = ["moe.aux_router=true"] if aux else []
    overrides = ["model.arch=moma", "moe.experts={text: 2, image: 2}", *extra, "train.steps=2"]
    run_train(tmp_path, 1, CONFIG, [*overrides, "checkpoint.save=true", f"checkpoint.dir={ckpt}"], tag)
    text = tmp_path / "held_out.txt"
    text.write_text("a red circle at the top left. a blue square in the middle. " * 6)
    proc = run_module("megafusion", "eval", "--ckpt", str(ckpt), "--text", str(text), "--seq-length", "32", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eval_reports_teacher_forced_and_causal_routing(tmp_path):
    out = eval_text(tmp_path, aux=True)
    assert out["causal_routing"] is True and "teacher-forced" in out["routing"]
    assert math.isfinite(out["loss"]) and math.isfinite(out["loss_causal"])
    assert out["loss_causal"] != out["loss"]  # the routings differ on these windows
    plain = eval_text(tmp_path, aux=False)
    assert plain["causal_routing"] is False and "loss_causal" not in plain and "teacher-forced" in plain["routing"]
