"""LMFusion (``model.freeze_text``): a frozen text half, the image half and new tokens trained.

- the frozen set, parameter counts and zero-initialised new-row deltas on the built model;
- FLOPs: frozen weights skip their weight gradients, and ``batch_flops`` equals FlopCounterMode;
- optimizer state (plain and distributed optimizer) exists for the trainable parameters only;
- a dense Transfusion checkpoint warm-starts LMFusion (image copies = the dense modules); a few
  steps leave every text tensor bit-identical and the text logits exactly as they were, and
  DP=2 with the distributed optimizer, PP=2, TP=2+SP and CP=2 train exactly like one process;
- from a tiny random Hugging Face Llama (imported with a smaller vocabulary, grown at load),
  the trained LMFusion model's text logits equal transformers' to 1e-5, and ``mf-to-hf`` exports its
  text path as that Llama, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from megafusion import checkpoint as ck
from megafusion.accounting import flops
from megafusion.accounting import params as acc_params
from megafusion.config import Config, load_config
from megafusion.core.modality import Modality
from megafusion.data.builtin.synthetic import synthetic_microbatch
from megafusion.layers.masks import attention_mask_for
from megafusion.layers.routing import routing_for
from megafusion.models import transfusion as transfusion_model
from megafusion.models.lmfusion import INPUT_ROWS, OUTPUT_ROWS, is_frozen
from megafusion.models.registry import get_family
from megafusion.models.transformer_config import build_transformer_config
from megafusion.objectives.build import build_model_chunks
from tests.helpers import ROOT, assert_same_training, run_train

CONFIG = "tests/configs/transfusion_small.yaml"
LMFUSION = ["model.arch=mot", "model.freeze_text=true"]


def synthetic_cfg() -> Config:
    cfg = load_config(
        None,
        [
            *LMFUSION,
            "model.num_layers=2",
            "model.hidden_size=32",
            "model.num_attention_heads=4",
            "model.num_query_groups=2",
            "model.ffn_hidden_size=64",
            "model.vocab_size=128",
            "model.seq_length=32",
            "model.frozen_vocab_rows=100",
            "train.micro_batch_size=2",
            "train.global_batch_size=2",
        ],
    )
    return cfg


def build(cfg, runtime):
    return build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime)[0]


def test_frozen_set_counts_and_zero_deltas(runtime):
    cfg = synthetic_cfg()
    model = build(cfg, runtime)
    named = dict(model.named_parameters())
    counts = acc_params.parameter_counts(cfg)
    frozen = {n for n, p in named.items() if not p.requires_grad}
    # Exactly the text copies, the embedding and the output layer; every image copy trains.
    assert frozen == {
        n for n in named if ".text." in n or n in ("embedding.word_embeddings.weight", "output_layer.weight")
    }
    assert any(".image." in n for n in named) and not any(".image." in n for n in frozen)
    assert counts["total"] == sum(p.numel() for p in named.values())
    assert counts["trainable"] == sum(p.numel() for p in named.values() if p.requires_grad) < counts["total"]
    assert counts["new_token_rows"] == 2 * 28 * 32 == named[f"{INPUT_ROWS}.weight"].numel() * 2
    assert not named[f"{INPUT_ROWS}.weight"].any() and not named[f"{OUTPUT_ROWS}.weight"].any()
    assert all(is_frozen(n) == (n in frozen) for n in named)


def _mixed_batch(cfg):
    b, s, v = 2, cfg.model.seq_length, cfg.model.vocab_size
    batch = synthetic_microbatch(0, b, 7, s, v, 1)
    modality = torch.zeros(b, s, dtype=torch.int64)
    modality[:, s // 2 :] = int(Modality.IMAGE)
    batch["modality_ids"] = modality
    batch["tokens"][:, :3] = torch.tensor([100, 101, 127])  # new tokens too
    return batch


def _fwd_bwd_flops(cfg, runtime) -> tuple[int, torch.nn.Module]:
    model = build(cfg, runtime)
    batch = _mixed_batch(cfg)
    counter = FlopCounterMode(display=False)
    with counter, routing_for(batch, runtime.device):
        logits = model(batch["tokens"], batch["position_ids"], None, labels=None)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)).backward()
    by_op = {str(k): val for k, val in counter.get_flop_counts()["Global"].items()}
    # megatron's linear_with_frozen_weight multiplies 3-D tensors: its matmuls show up as aten.bmm.
    assert set(by_op) <= {"aten.mm", "aten.bmm"}, by_op
    return sum(by_op.values()), model, batch


def test_frozen_weights_skip_weight_gradients_and_flops_count_it(runtime):
    cfg = synthetic_cfg()
    measured, model, batch = _fwd_bwd_flops(cfg, runtime)
    # On CPU FlopCounterMode counts no SDPA FLOPs: what it counts is every weight matmul, exactly
    # the analytic count with 2 x forward for frozen weights (text tokens' layers, output layer).
    predicted = flops.batch_flops(cfg, batch["document_ids"], batch["modality_ids"])
    assert measured == predicted["dense"]
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert model.get_parameter(f"{OUTPUT_ROWS}.weight").grad.abs().sum() > 0
    assert model.get_parameter(f"{INPUT_ROWS}.weight").grad[[0, 1, 27]].abs().sum(-1).gt(0).all()
    unfrozen = synthetic_cfg()
    unfrozen.model.freeze_text = False
    full, _, _ = _fwd_bwd_flops(unfrozen, runtime)
    assert full == flops.batch_flops(unfrozen, batch["document_ids"], batch["modality_ids"])["dense"] > measured


@pytest.mark.parametrize("distributed", [False, True], ids=["adam", "distributed-optimizer"])
def test_optimizer_state_only_for_trainable_parameters(runtime, distributed):
    from megafusion.training.trainer import build as build_training

    cfg = synthetic_cfg()
    cfg.parallel.distributed_optimizer = distributed
    model, optimizer, _, _ = build_training(cfg, runtime)
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()  # creates the Adam state
    module = model[0].module
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert trainable == acc_params.parameter_counts(cfg)["trainable"]
    assert not any(hasattr(p, "main_grad") for p in module.parameters() if not p.requires_grad)
    in_buffers = [p for buffer in model[0].buffers for p in buffer.params]  # DDP's gradient buffers
    assert {id(p) for p in in_buffers} == {id(p) for p in module.parameters() if p.requires_grad}
    inner = optimizer.optimizer
    states = [inner.state[p] for group in inner.param_groups for p in group["params"]]
    assert sum(s["exp_avg"].numel() for s in states) == trainable
    assert sum(s["exp_avg_sq"].numel() for s in states) == trainable


# ------------------------------------------------------------------ training from a dense checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-step dense Transfusion checkpoint, and 3 LMFusion steps from it in one process (saved)."""
    tmp = tmp_path_factory.mktemp("lmfusion")
    run_train(tmp, 1, CONFIG, ["train.steps=1", "checkpoint.save=true", f"checkpoint.dir={tmp / 'dense'}"], "dense")
    init = ["train.steps=3", f"checkpoint.init_from={tmp / 'dense'}", *LMFUSION]
    losses, grads, out = run_train(
        tmp, 1, CONFIG, [*init, "checkpoint.save=true", f"checkpoint.dir={tmp / 'lmf'}"], "one"
    )
    assert "dense -> MoT: each modality copy starts as the dense module" in out
    return tmp, init, (losses, grads)


LAYOUTS = {
    "dp2_distopt": (2, ["parallel.distributed_optimizer=true"]),
    "pp2": (2, ["parallel.pp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "cp2": (2, ["parallel.cp=2"]),
}


@pytest.mark.torchrun
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_train_lmfusion_like_one_process(runs, layout):
    tmp, init, reference = runs
    nproc, extra = LAYOUTS[layout]
    losses, grads, _ = run_train(tmp, nproc, CONFIG, [*init, *extra], layout)
    assert not any(is_frozen(name) for name in reference[1])  # frozen weights have no gradient
    assert any(".image." in name for name in reference[1]) and f"{OUTPUT_ROWS}.weight" in reference[1]
    assert_same_training(reference, (losses, grads), layout, rel_tol=1e-5)


def _checkpoint(path):
    path = ck.resolve_checkpoint(path)
    return path, ck.run_config(path)


def text_logits(runtime, cfg, path, tokens, warm=None) -> torch.Tensor:
    """Logits of one text-only row from checkpoint ``path`` (built and loaded in this process)."""
    model = build(cfg, runtime)
    ck.load_weights(path, [model], warm)
    row = {
        "tokens": tokens,
        "document_ids": torch.zeros_like(tokens),
        "modality_ids": torch.full_like(tokens, int(Modality.TEXT)),
    }
    mask = attention_mask_for(row, cfg.model.attention_backend, cfg.data.packs_documents(), runtime.device)
    with torch.no_grad(), routing_for(row, runtime.device):
        out = model.eval()(tokens, torch.arange(tokens.shape[1])[None], mask, labels=None)
    return out[0] if isinstance(out, tuple) else out


def test_text_half_is_bit_identical_after_training(runs, runtime):
    from tests.interop.test_hf_llama import checkpoint_tensors

    tmp, _, _ = runs
    (dense_path, dense_cfg), (lmf_path, cfg) = _checkpoint(tmp / "dense"), _checkpoint(tmp / "lmf")
    dense, trained = checkpoint_tensors(dense_path), checkpoint_tensors(lmf_path)
    text = [k for k in trained if ".text." in k]
    assert len(text) >= 8  # layers are stacked in the checkpoint: one tensor per kind
    for key in [*text, "embedding.word_embeddings.weight", "output_layer.weight"]:
        assert torch.equal(trained[key], dense[key.replace(".text.", ".")]), key
    images = [k for k in trained if ".image." in k and "layernorm" not in k]
    assert images and all(not torch.equal(trained[k], dense[k.replace(".image.", ".")]) for k in images)
    assert trained[f"{OUTPUT_ROWS}.weight"].abs().sum() > 0

    # Text logits: exactly the warm start's (the same model before training), and the dense model's.
    n = cfg.model.frozen_vocab_rows
    tokens = torch.randint(0, n, (1, 40), generator=torch.Generator().manual_seed(1))
    warm = ck.WarmStart(rule=get_family("mot").warm_starts["dense"], new_modules=(INPUT_ROWS, OUTPUT_ROWS))
    before = text_logits(runtime, cfg, dense_path, tokens, warm)
    after = text_logits(runtime, cfg, lmf_path, tokens)
    original = text_logits(runtime, dense_cfg, dense_path, tokens)
    assert torch.equal(after[..., :n], before[..., :n])
    torch.testing.assert_close(after[..., :n], original[..., :n], rtol=0, atol=1e-5)
    assert not torch.equal(after[..., n:], before[..., n:])  # the new tokens' rows did train


# ------------------------------------------------------------------ from a Hugging Face Llama


@pytest.mark.slow
@pytest.mark.torchrun
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_pp2"])
def test_lmfusion_from_a_hugging_face_llama(tmp_path, runtime, tied):
    """Untied in one process; tied (Llama-3.2 1B/3B) under PP=2, where the last stage holds a copy
    of the frozen embedding as its output layer: both must still be the Llama's after training."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from tests.data.test_hf_tokenizer import raw, shapes_hf
    from tests.interop.test_hf_llama import convert, ok, tiny_llama_config

    tok_path = shapes_hf(tmp_path)
    n = raw(tok_path).get_vocab_size(with_added_tokens=True)
    torch.manual_seed(5)
    llama = LlamaForCausalLM(tiny_llama_config(tied, vocab_size=n, num_hidden_layers=2)).float().eval()
    llama.save_pretrained(tmp_path / "llama")
    # The import has exactly the Llama's rows: <boi>, <eoi> and the image placeholder grow it at load.
    ok(
        convert(
            "hf-to-mf",
            "--hf",
            tmp_path / "llama",
            "--output",
            tmp_path / "import",
            "--vocab-multiple",
            "1",
            "--config-out",
            tmp_path / "model.yaml",
        )
    )
    _, _, out = run_train(
        tmp_path,
        2 if tied else 1,
        CONFIG,
        [
            *[f"model.{k}={v}" for k, v in _model_section(tmp_path / "model.yaml").items()],
            *LMFUSION,
            "model.seq_length=128",
            f"data.tokenizer={tok_path.parent}",
            "train.steps=2",
            f"checkpoint.init_from={tmp_path / 'import'}",
            "checkpoint.save=true",
            f"checkpoint.dir={tmp_path / 'lmf'}",
            f"parallel.pp={2 if tied else 1}",
        ],
        "lmf",
    )
    assert f"vocabulary grown from {n} to" in out
    path, cfg = _checkpoint(tmp_path / "lmf")
    assert cfg.model.frozen_vocab_rows == n and cfg.model.vocab_size > n
    tokens = torch.randint(0, n, (1, 24), generator=torch.Generator().manual_seed(2))
    got = text_logits(runtime, cfg, path, tokens)
    with torch.no_grad():
        want = llama(tokens).logits
    torch.testing.assert_close(got[..., :n], want, rtol=0, atol=1e-5)
    # Exported, the text path is the original Llama, bit for bit.
    line = ok(convert("mf-to-hf", "--input", tmp_path / "lmf", "--output", tmp_path / "export"))
    assert "text path" in line
    original, exported = (load_file(tmp_path / d / "model.safetensors") for d in ("llama", "export"))
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)


def _model_section(path) -> dict:
    import yaml

    section = yaml.safe_load(path.read_text())["model"]
    return {
        k: (
            "{" + ", ".join(f"{a}: {b}" for a, b in v.items()) + "}"
            if isinstance(v, dict)
            else "null"
            if v is None
            else str(v).lower()
            if isinstance(v, bool)
            else v
        )
        for k, v in section.items()
        if k != "vocab_size"
    }  # the data's vocabulary: grown at load


# ------------------------------------------------------------------ what a warm start bridges, and what not


def _manifest(cfg) -> dict:
    return {"model": ck.model_keys(cfg), "config": cfg.to_dict(), "data": None}


def test_warm_start_bridges_only_what_it_can(tmp_path):
    run = load_config(str(ROOT / CONFIG), [*LMFUSION, "model.vocab_size=384", "model.frozen_vocab_rows=300"])
    dense = load_config(str(ROOT / CONFIG), ["objective.name=lm", "model.vocab_size=320"])
    warm = ck.check_compatible(tmp_path, _manifest(dense), run, None, weights_only=True)
    assert warm.rule is get_family("mot").warm_starts["dense"] and warm.vocab == (320, 384)
    assert set(warm.new_modules) == {*transfusion_model.IMAGE_MODULES, INPUT_ROWS, OUTPUT_ROWS}
    with pytest.raises(ck.CheckpointError, match="model.arch: checkpoint 'dense', this run 'mot'"):
        ck.check_compatible(tmp_path, _manifest(dense), run, None)  # a resume bridges nothing
    for change, words in [
        ("model.vocab_size=512", "vocab_size: checkpoint 512"),  # never shrinks
        ("model.hidden_size=64", "hidden_size"),
        ("model.tie_embeddings=true", "tie_embeddings"),
    ]:
        other = load_config(str(ROOT / CONFIG), ["objective.name=lm", "model.vocab_size=320", change])
        with pytest.raises(ck.CheckpointError, match=words):
            ck.check_compatible(tmp_path, _manifest(other), run, None, weights_only=True)
    lmfusion = load_config(str(ROOT / CONFIG), [*LMFUSION, "model.vocab_size=384", "model.frozen_vocab_rows=200"])
    with pytest.raises(ck.CheckpointError, match="frozen_vocab_rows: checkpoint 200, this run 300"):
        ck.check_compatible(tmp_path, _manifest(lmfusion), run, None, weights_only=True)


def test_lmfusion_needs_a_pretrained_model_and_a_fitting_config(tmp_path):
    from megafusion.config import ConfigError, validate

    for overrides, words in [
        (["model.freeze_text=true"], "image copy \\(model.arch=mot with model.untie=all"),
        ([*LMFUSION, "model.untie=ffn"], "image copy \\(model.arch=mot with model.untie=all"),
        ([*LMFUSION, "data.source=synthetic", "objective.name=lm"], "frozen_vocab_rows"),
    ]:
        with pytest.raises(ConfigError, match=words):
            validate(load_config(str(ROOT / CONFIG), overrides), 1)
    _, _, out = run_train(tmp_path, 1, CONFIG, [*LMFUSION, "train.steps=1"], "no_init", expect_rc=2)
    assert "give it with checkpoint.init_from" in out
