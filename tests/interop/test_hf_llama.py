"""Hugging Face Llama import / export: exact logits in every layout, bit-exact round trips, clear refusals.

A tiny random ``LlamaForCausalLM`` (4 layers, hidden 64, 4 heads over 2 kv heads, SwiGLU 160,
vocab 200, rope_theta 500000 with Llama-3 scaling whose three wavelength bands all hold
frequencies at head_dim 16, random RMSNorm weights, fp32), untied and tied, is saved with
transformers, imported with ``megafusion convert hf-to-mf``, and run by ``megafusion
logits`` alone and under torchrun (TP = 2, PP = 2): its logits equal transformers'
on HF's vocabulary rows (the padding rows are zero). ``mf-to-hf`` gives back the original
safetensors bit for bit, also from a checkpoint trained in a TP = 2 layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from megafusion.config import ConfigError, load_config, validate
from megafusion.interop import hf_llama
from megafusion.models.rope import llama3_inv_freq
from tests.helpers import ROOT, assert_same_training, run_train

VOCAB, SEQ = 200, 24
# The untied import pads to a multiple of 128 (the default), the tied one to --vocab-size 300.
ROWS = {"untied": 256, "tied": 300}
ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def tiny_llama_config(tied: bool, **changes):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_parameters=dict(ROPE),
        tie_word_embeddings=tied,
        initializer_range=0.05,
    )
    return LlamaConfig(**{**kwargs, **changes})


def save_tiny_llama(path, tied: bool, tokens: torch.Tensor) -> torch.Tensor:
    """Save the tiny model at ``path``; returns transformers' logits of ``tokens``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(3 + tied)
    model = LlamaForCausalLM(tiny_llama_config(tied)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # ones would hide a norm mapped to the wrong place
                param.normal_(1.0, 0.2)
        model.save_pretrained(path)
        return model(tokens).logits


def run(args: list[str], nproc: int = 1, timeout: int = 300):
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*launcher, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def convert(*args: str):
    return run(["megafusion", "convert", *map(str, args)])


def ok(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    """Every model tensor of a megafusion (dist_checkpointing) directory, read without process groups."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(flat))
    return {k: v for k, v in torch.load(flat).items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{'untied' | 'tied': (HF dir, imported checkpoint, YAML of its model section, HF logits)}."""
    tmp = tmp_path_factory.mktemp("hf")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp / "tokens.pt")
    out = {}
    for name, tied in (("untied", False), ("tied", True)):
        hf_dir, ckpt, yml = tmp / f"hf_{name}", tmp / f"mf_{name}", tmp / f"{name}.yaml"
        logits = save_tiny_llama(hf_dir, tied, tokens)
        size = ["--vocab-size", str(ROWS[name])] if tied else []
        line = ok(convert("hf-to-mf", "--hf", hf_dir, "--output", ckpt, "--config-out", yml, *size))
        assert f"checkpoint.init_from={ckpt}" in line
        out[name] = (hf_dir, ckpt, yml, logits)
    return tmp, out


def test_imported_model_section_matches_the_hf_config(models):
    _, found = models
    for name, (_, ckpt, yml, _) in found.items():
        section = yaml.safe_load(yml.read_text())["model"]
        assert section == {
            "arch": "dense",
            "num_layers": 4,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_query_groups": 2,
            "ffn_hidden_size": 160,
            "rope_theta": 500000.0,
            "rope_scaling": {
                k: ROPE[k]
                for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            },
            "norm_eps": 1e-5,
            "qk_norm": False,
            "norm_placement": "pre",
            "tie_embeddings": name == "tied",
            "vocab_size": ROWS[name],  # 200 rows padded
        }
        manifest = json.loads((ckpt / "megafusion.json").read_text())
        assert manifest["weights_only"] and manifest["origin"]["hf_vocab_size"] == VOCAB
        assert manifest["model"].get("tie_embeddings", False) == (name == "tied")
        validate(load_config(str(yml)), 1)


LAYOUTS = {
    "untied-single": ("untied", 1, []),
    "untied-tp2": ("untied", 2, ["parallel.tp=2"]),
    "untied-pp2": ("untied", 2, ["parallel.pp=2"]),
    "tied-single": ("tied", 1, []),
    "tied-pp2": ("tied", 2, ["parallel.pp=2"]),
}


# torchrun marks the layouts of several processes only: the single-process ones are quick tests.
@pytest.mark.parametrize(
    "layout", [pytest.param(k, marks=pytest.mark.torchrun if n > 1 else ()) for k, (_, n, _) in LAYOUTS.items()]
)
def test_logits_equal_transformers(models, layout, tmp_path):
    tmp, found = models
    name, nproc, overrides = LAYOUTS[layout]
    _, ckpt, _, want = found[name]
    out = tmp_path / "logits.pt"
    ok(
        run(
            [
                "megafusion",
                "logits",
                "--ckpt",
                str(ckpt),
                "--tokens",
                str(tmp / "tokens.pt"),
                "--out",
                str(out),
                "model.params_dtype=fp32",
                *overrides,
            ],
            nproc=nproc,
        )
    )
    got = torch.load(out)
    assert got.shape == (2, SEQ, ROWS[name])
    assert want.abs().max() > 0.3  # logits of a size where a wrong mapping shows
    err = (got[..., :VOCAB] - want).abs().max().item()
    assert err <= 1e-5, f"{layout}: logits differ from transformers' by {err:.2e}"
    assert torch.count_nonzero(got[..., VOCAB:]) == 0  # zero padding rows


@pytest.mark.slow
def test_export_gives_back_the_hf_tensors_bit_exactly(models, tmp_path):
    """HF -> mf -> HF equals the original; mf -> HF -> mf equals the first import."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    _, found = models
    for name, (hf_dir, ckpt, _, _) in found.items():
        exported = tmp_path / f"hf_{name}"
        ok(convert("mf-to-hf", "--input", ckpt, "--output", exported))
        want, got = load_file(hf_dir / "model.safetensors"), load_file(exported / "model.safetensors")
        assert sorted(got) == sorted(want) and (hf_llama.LM_HEAD in got) == (name == "untied")
        for key, tensor in want.items():
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
        original, back = LlamaConfig.from_pretrained(hf_dir), LlamaConfig.from_pretrained(exported)
        for field in (
            "vocab_size",
            "rope_parameters",
            "tie_word_embeddings",
            "rms_norm_eps",
            "num_key_value_heads",
            "bos_token_id",
            "eos_token_id",
            "max_position_embeddings",
        ):
            assert getattr(back, field) == getattr(original, field), field
        again = tmp_path / f"mf_{name}"
        ok(convert("hf-to-mf", "--hf", exported, "--output", again, "--vocab-size", ROWS[name]))
        first, second = checkpoint_tensors(ckpt), checkpoint_tensors(again)
        assert sorted(first) == sorted(second)
        assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
@pytest.mark.torchrun
def test_export_from_a_tensor_parallel_training_checkpoint(models, tmp_path):
    """A checkpoint trained (one step, TP = 2) from the import exports to HF and back bit-exactly
    (the padding rows, which training moved, excepted: they are not part of the HF model)."""
    _, found = models
    _, ckpt, yml, _ = found["untied"]
    trained = tmp_path / "trained"
    run_train(
        tmp_path,
        2,
        str(yml),
        [
            "parallel.tp=2",
            "train.steps=1",
            "train.micro_batch_size=1",
            "train.global_batch_size=2",
            "model.seq_length=16",
            "train.lr=0.01",
            f"checkpoint.init_from={ckpt}",
            "checkpoint.save=true",
            f"checkpoint.dir={trained}",
        ],
        "tp2",
    )
    exported, again = tmp_path / "hf", tmp_path / "again"
    ok(convert("mf-to-hf", "--input", trained, "--output", exported))
    # The HF vocabulary is found through the run's checkpoint.init_from: padding rows dropped.
    assert json.loads((exported / "config.json").read_text())["vocab_size"] == VOCAB
    ok(convert("hf-to-mf", "--hf", exported, "--output", again))
    step = trained / (trained / "latest").read_text().strip()
    moved, imported, back = checkpoint_tensors(step), checkpoint_tensors(ckpt), checkpoint_tensors(again)
    assert not torch.equal(moved[hf_llama.MF_EMBED], imported[hf_llama.MF_EMBED])  # training changed it
    for key, tensor in back.items():
        if key == hf_llama.MF_EMBED or key == hf_llama.MF_OUTPUT:  # the padding rows are not exported
            assert torch.equal(tensor[:VOCAB], moved[key][:VOCAB]) and not tensor[VOCAB:].any(), key
        else:
            assert torch.equal(tensor, moved[key]), key


def test_sharded_safetensors_import_the_same(models, tmp_path):
    """model-0000k-of-0000n.safetensors + model.safetensors.index.json, as large models come."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, found = models
    hf_dir, ckpt, _, _ = found["untied"]
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(hf_dir / "config.json", sharded / "config.json")
    tensors = load_file(hf_dir / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, sharded / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ok(convert("hf-to-mf", "--hf", sharded, "--output", tmp_path / "mf"))
    want, got = checkpoint_tensors(ckpt), checkpoint_tensors(tmp_path / "mf")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.torchrun
def test_tied_embeddings_train_alike_with_a_pipeline(tmp_path):
    """With PP = 2 the last stage's copy of a tied embedding starts equal and stays synced."""
    config, tied = "tests/configs/parity.yaml", ["model.tie_embeddings=true", "train.steps=2"]
    one = run_train(tmp_path, 1, config, tied, "one")
    pp2 = run_train(tmp_path, 2, config, [*tied, "parallel.pp=2"], "pp2")
    assert "output_layer.weight" not in one[1]
    assert_same_training(one[:2], pp2[:2], "tied pp2", 1e-5)


# ------------------------------------------------------------------ in-process pieces


def test_llama3_frequencies_are_transformers_and_use_all_four_values(runtime):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from megafusion.models.transformer_config import build_transformer_config
    from megafusion.objectives.build import build_model_chunks

    want, _ = ROPE_INIT_FUNCTIONS["llama3"](tiny_llama_config(False), "cpu")
    cfg = load_config(
        None,
        [
            "model.hidden_size=64",
            "model.num_attention_heads=4",
            "model.rope_theta=500000",
            "model.qk_norm=false",
            "model.vocab_size=256",
            "model.rope_scaling={factor: 8, low_freq_factor: 1, high_freq_factor: 4, "
            "original_max_position_embeddings: 64}",
        ],
    )
    tconfig = build_transformer_config(cfg, runtime.device)
    assert torch.equal(build_model_chunks(cfg, tconfig, runtime)[0].rotary_pos_emb.inv_freq, want)
    cfg.model.rope_scaling = None
    plain = build_model_chunks(cfg, tconfig, runtime)[0].rotary_pos_emb.inv_freq
    plain_hf = tiny_llama_config(False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert torch.equal(plain, LlamaRotaryEmbedding.compute_default_rope_parameters(plain_hf)[0])
    values = (8.0, 1.0, 4.0, 64)
    assert torch.equal(llama3_inv_freq(plain, *values), want)
    for i in range(4):  # each value moves some frequency (all three wavelength bands are populated)
        changed = list(values)
        changed[i] = changed[i] * 2 if i != 1 else 0.5
        assert not torch.equal(llama3_inv_freq(plain, *changed), want), i


def test_tied_parameter_counts_match_the_built_model(runtime):
    from megafusion.accounting import params as acc_params
    from megafusion.models.transformer_config import build_transformer_config
    from megafusion.objectives.build import build_model_chunks

    cfg = load_config(None, ["model.tie_embeddings=true", "model.vocab_size=256"])
    named = dict(build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime)[0].named_parameters())
    counts = acc_params.parameter_counts(cfg)
    assert "output_layer.weight" not in named and counts["output_layer"] == 0
    assert counts["total"] == counts["active"] == sum(p.numel() for p in named.values())
    untied = load_config(None, ["model.vocab_size=256"])
    assert counts["matmul"] == acc_params.parameter_counts(untied)["matmul"]  # the head still multiplies


def test_qkv_and_fc1_layouts():
    """Per query group [its query heads; its key head; its value head]; fc1 = [gate; up]."""
    heads, groups, d, h = 4, 2, 3, 5
    q = torch.arange(heads * d)[:, None].float().expand(-1, h)  # row = query feature index
    k = 100 + torch.arange(groups * d)[:, None].float().expand(-1, h)
    v = 200 + torch.arange(groups * d)[:, None].float().expand(-1, h)
    fused = hf_llama.fuse_qkv(q, k, v, heads, groups)[:, 0].tolist()
    group0 = [*range(0, 6), 100, 101, 102, 200, 201, 202]  # query heads 0, 1; kv head 0
    group1 = [*range(6, 12), 103, 104, 105, 203, 204, 205]
    assert fused == group0 + group1
    back = hf_llama.split_qkv(hf_llama.fuse_qkv(q, k, v, heads, groups), heads, groups)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def _hf_dict(**changes) -> dict:
    base = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-6,
    }
    return {**base, **changes}


def test_pure_mapping_round_trip_and_legacy_rope_config():
    legacy = _hf_dict(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    section = hf_llama.model_section(legacy)
    assert section["rope_theta"] == 500000.0 and section["rope_scaling"]["factor"] == 32.0
    assert hf_llama.model_section(_hf_dict())["rope_scaling"] is None
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (10, 8),
        "lm_head.weight": (10, 8),
        "model.norm.weight": (8,),
        "model.layers.0.input_layernorm.weight": (8,),
        "model.layers.0.post_attention_layernorm.weight": (8,),
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.layers.0.self_attn.k_proj.weight": (4, 8),
        "model.layers.0.self_attn.v_proj.weight": (4, 8),
        "model.layers.0.self_attn.o_proj.weight": (8, 8),
        "model.layers.0.mlp.gate_proj.weight": (16, 8),
        "model.layers.0.mlp.up_proj.weight": (16, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 16),
    }
    hf = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    mf = hf_llama.hf_to_mf(hf, section, 16)
    assert mf[hf_llama.MF_EMBED].shape == (16, 8) and not mf[hf_llama.MF_OUTPUT][10:].any()
    assert torch.equal(mf["decoder.layers.0.mlp.linear_fc1.weight"][:16], hf["model.layers.0.mlp.gate_proj.weight"])
    back = hf_llama.mf_to_hf(mf, section, 10)
    assert sorted(back) == sorted(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    with pytest.raises(hf_llama.UnsupportedModel, match="biases"):
        hf_llama.hf_to_mf({**hf, "model.layers.0.self_attn.q_proj.bias": torch.zeros(8)}, section, 16)
    with pytest.raises(hf_llama.UnsupportedModel, match="no tensor 'lm_head.weight'"):
        hf_llama.hf_to_mf({k: v for k, v in hf.items() if k != "lm_head.weight"}, section, 16)


@pytest.mark.parametrize(
    "changes,words",
    [
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "only Llama"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"head_dim": 8}, "head_dim=8"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "low_freq_factor"),
    ],
)
def test_unsupported_hf_configs_are_refused_by_name(changes, words):
    with pytest.raises(hf_llama.UnsupportedModel, match=words.replace("(", r"\(").replace("[", r"\[")):
        hf_llama.model_section(_hf_dict(**changes))


def test_exports_only_llamas_and_bad_rope_scaling_is_named():
    with pytest.raises(hf_llama.UnsupportedModel, match="model.qk_norm=True"):
        hf_llama.check_exportable(load_config(None).to_dict()["model"])
    with pytest.raises(ConfigError, match="missing"):
        validate(load_config(None, ["model.rope_scaling={factor: 8}"]), 1)
    with pytest.raises(ConfigError, match="high_freq_factor=1 must be larger"):
        validate(
            load_config(
                None,
                [
                    "model.rope_scaling={factor: 8, low_freq_factor: 1, high_freq_factor: 1, "
                    "original_max_position_embeddings: 64}"
                ],
            ),
            1,
        )
    with pytest.raises(ConfigError, match="model.rope_scaling"):
        load_config(None, ["model.rope_scaling=8"])


CONVERT_CASES = """
import contextlib, io, json, sys
from megafusion.commands.main import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out.append([main(["convert", *argv]), err.getvalue()])
print(json.dumps(out))
"""


def convert_refusals(*cases: list) -> list[tuple[int, str]]:
    """``megafusion convert`` on each argv in turn, in ONE fresh process: (status, stderr) of each."""
    argv = json.dumps([[str(a) for a in case] for case in cases])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CONVERT_CASES, argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [tuple(r) for r in json.loads(done.stdout.strip().splitlines()[-1])]


def test_bad_command_line_inputs_are_refused(tmp_path, models):
    _, found = models
    biased = tmp_path / "biased"
    biased.mkdir()
    config = json.loads((found["untied"][0] / "config.json").read_text())
    (biased / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "config.json").write_text(json.dumps(config))
    (binary / "pytorch_model.bin").write_bytes(b"")
    results = convert_refusals(
        ["hf-to-mf", "--hf", tmp_path / "nowhere", "--output", tmp_path / "x"],
        ["hf-to-mf", "--hf", biased, "--output", tmp_path / "x"],
        ["hf-to-mf", "--hf", binary, "--output", tmp_path / "x"],
        ["hf-to-mf", "--hf", found["untied"][0], "--output", tmp_path / "x", "--vocab-size", "100"],
        ["mf-to-hf", "--input", tmp_path / "nowhere", "--output", tmp_path / "y"],
    )
    expected = [
        [f"--hf {tmp_path / 'nowhere'}: no such file or directory"],
        ["attention_bias=true"],
        ["only safetensors", "pytorch_model.bin"],
        ["--vocab-size 100 is smaller than the HF vocabulary (200 rows)"],
        [f"--ckpt {tmp_path / 'nowhere'}: no such file or directory"],
    ]
    for (status, err), fragments in zip(results, expected):
        assert status == 2 and all(f in err for f in fragments), (status, err, fragments)
