"""``megafusion convert upcycle``: MoMa from a MoT checkpoint, every expert a copy of its modality's FFN.

A tiny MoT trains 2 steps (its text and image FFNs then differ, so a copy from the wrong modality
shows) and is upcycled twice, by the command as a user runs it:

- 2t2i: every expert's fc1 / fc2 in the MoMa checkpoint is bit-equal to its modality's MoT FFN
  (experts numbered as megatron's interleaved global numbers), attention, norms, embedding and
  output layer are the MoT's, the routers are new; the manifest says where the source's data
  stream stopped; a run starts from it with the overrides the command prints.
- 1t1i at capacity 1 with every router's gate held at 1: the MoMa model computes the MoT's logits
  on the same batch (the routing and combine wiring, not only the copy); with sigmoid gates it
  does not (the check can fail).
- Bad input is named: not a checkpoint, a MoMa checkpoint already, a ``--untie`` that would merge
  the MoT's modality copies; and the parameter map for a modality-blind group and a dense source.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from megatron.core import dist_checkpointing

from megafusion import checkpoint as ck
from megafusion.commands import convert
from megafusion.core.errors import CheckpointError, ConfigError
from megafusion.layers.expert_groups import ExpertGroups
from megafusion.models.init import tied_name
from megafusion.models.param_layout import global_param_names
from tests.helpers import ROOT, run_train
from tests.models.test_mot import batch_with_modalities, build, forward

CONFIG = "tests/configs/mixed_small.yaml"
STEPS, GLOBAL_BATCH = 2, 8  # the MoT's steps; mixed_small.yaml's global batch
UPCYCLES = {
    "2t2i": ["--experts", "{text: 2, image: 2}", "--keep-data-order"],
    "1t1i": ["--experts", "{text: 1, image: 1}", "--capacity", "{text: 1.0, image: 1.0}"],
}


def upcycle_command(src, out, *extra) -> list[str]:
    cli = [sys.executable, "-m", "megafusion", "convert", "upcycle"]
    return [*cli, "--input", str(src), "--output", str(out), *extra]


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    """(tmp, the MoT's step directory, {name: (MoMa checkpoint, the command's stdout)})."""
    tmp = tmp_path_factory.mktemp("upcycle")
    mot_ckpt = tmp / "mot_ckpt"
    save = ["checkpoint.save=true", f"checkpoint.dir={mot_ckpt}", "logging.dump_grads=null"]
    run_train(tmp, 1, CONFIG, ["model.arch=mot", f"train.steps={STEPS}", *save], "mot")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # Both conversions at once: each is mostly imports.
    procs = {
        name: subprocess.Popen(
            upcycle_command(mot_ckpt, tmp / name, *extra),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, extra in UPCYCLES.items()
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert f"checkpoint.init_from={tmp / name}" in stdout, stdout
        out[name] = (tmp / name, stdout)
    return tmp, ck.resolve_checkpoint(mot_ckpt), out


def model_tensors(path) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors, whole (a training checkpoint's optimizer state left out)."""
    return {k: v for k, v in dist_checkpointing.load_plain_tensors(str(path)).items() if not k.startswith("optimizer")}


@pytest.mark.parametrize("name", list(UPCYCLES))
def test_every_expert_is_a_bit_equal_copy_of_its_modality_ffn(runtime, upcycled, name):
    tmp, mot_path, out = upcycled
    moma_path, stdout = out[name]
    mot, moma = model_tensors(mot_path), model_tensors(moma_path)
    groups = ExpertGroups.from_config(ck.run_config(moma_path).moe)
    for fc in ("linear_fc1", "linear_fc2"):
        text, image = (mot[f"decoder.layers.mlp.{m}.{fc}.weight"] for m in ("text", "image"))
        assert not torch.equal(text, image), "the MoT's FFNs are alike: the check would not see a wrong modality"
        experts = moma[f"decoder.layers.mlp.experts.experts.{fc}.weight"]  # [layers, experts, ...]
        assert experts.shape == (text.shape[0], groups.total, *text.shape[1:])
        for e in range(groups.total):
            modality = groups.expert_name(e).split(".")[0]
            want = mot[f"decoder.layers.mlp.{modality}.{fc}.weight"]
            assert torch.equal(experts[:, e], want), f"{name}: expert {e} ({groups.expert_name(e)}) {fc}"
    shared = [k for k in moma if ".mlp." not in k]
    assert len(shared) == 16 and all(torch.equal(moma[k], mot[k]) for k in shared)  # attention, norms, embeddings
    router = moma["decoder.layers.mlp.router.weight"]
    assert router.shape == (4, groups.total, 32) and router.std() > 0  # seeded fresh init, not zeros

    manifest = ck.read_manifest(moma_path)
    origin = manifest["origin"]
    assert manifest["weights_only"] and manifest["step"] == 0 and manifest["model"]["arch"] == "moma"
    assert origin["conversion"] == "upcycle" and origin["converted_from"] == str(mot_path)
    assert origin["consumed_samples"] == STEPS * GLOBAL_BATCH
    assert origin["keep_data_order"] == ("--keep-data-order" in UPCYCLES[name])

    if name == "2t2i":  # the printed overrides start a run from it
        printed = shlex.split(stdout.split("train with ", 1)[1].split(" (a new run")[0])
        assert printed[-1] == f"checkpoint.init_from={moma_path}"
        _, _, log = run_train(tmp, 1, CONFIG, [*printed, "train.steps=1", "logging.dump_grads=null"], "from_2t2i")
        assert f"initialised from {moma_path}" in log
        # --keep-data-order: the new run (step 0, fresh schedule) continues the MoT's data stream.
        assert f"data from sample {STEPS * GLOBAL_BATCH}, where the source run stopped" in log
        first = json.loads((tmp / "from_2t2i" / "metrics.jsonl").read_text().splitlines()[0])
        assert first["step"] == 1 and first["consumed_samples"] == (STEPS + 1) * GLOBAL_BATCH


def test_upcycled_1t1i_at_capacity_1_with_unit_gates_computes_the_mot_logits(runtime, upcycled):
    _, mot_path, out = upcycled
    moma_path = out["1t1i"][0]
    models = []
    for path in (mot_path, moma_path):
        model = build(ck.run_config(path), runtime)
        ck.load_weights(path, [model])
        models.append(model.eval())
    mot, moma = models
    assert any(".mlp.experts." in n for n in global_param_names(moma))
    batch = batch_with_modalities(ck.run_config(mot_path), seed=5)
    assert 0 < int(batch["modality_ids"].sum()) < batch["modality_ids"].numel()  # both modalities
    with torch.no_grad():
        want = forward(mot, batch)
        sigmoid_gates = forward(moma, batch)
        for layer in moma.decoder.layers:
            layer.mlp.router.gate = "one"
        got = forward(moma, batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (sigmoid_gates - want).abs().max() > 1e-2  # the comparison sees the gates


def test_bad_input_is_named(upcycled, tmp_path):
    _, mot_path, out = upcycled

    def refused(error, *argv):
        with pytest.raises(error) as info:
            convert.convert_command(["upcycle", *argv, "--output", str(tmp_path / "out")])
        return str(info.value)

    message = refused(CheckpointError, "--ckpt", str(tmp_path / "nowhere"))
    assert f"--ckpt {tmp_path / 'nowhere'}: no such file or directory" in message
    message = refused(CheckpointError, "--ckpt", str(out["2t2i"][0]))
    assert "model.arch='moma'" in message and "MoMa already" in message and str(out["2t2i"][0]) in message
    message = refused(ConfigError, "--ckpt", str(mot_path), "--untie", "norms")
    assert "ties attention" in message
    message = refused(ConfigError, "--ckpt", str(mot_path), "--experts", "{text: 2}")
    assert "moe.experts" in message
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_parameter_map_for_a_modality_blind_group_and_a_dense_source():
    from megafusion.interop.upcycle import parameter_map

    ffn = [f"decoder.layers.0.mlp.linear_fc{i}.weight" for i in (1, 2)]
    mot_ffn = [tied.replace("mlp.", f"mlp.{m}.") for tied in ffn for m in ("text", "image")]
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    mot_qkv = [qkv.replace("linear_qkv.", f"linear_qkv.{m}.") for m in ("text", "image")]
    mixed = ExpertGroups(("mixed",), (3,), (None,))
    moma = [f"decoder.layers.0.mlp.experts.{e}.linear_fc{i}.weight" for e in range(3) for i in (1, 2)]
    moma += ["decoder.layers.0.mlp.router.weight", *mot_qkv]
    # From a MoT: every modality-blind expert copies the text FFN; the image FFN is left out.
    mapping = parameter_map(moma, {*mot_ffn, *mot_qkv}, mixed)
    assert mapping["decoder.layers.0.mlp.router.weight"] is None
    assert {mapping[n] for n in moma if ".experts." in n} == {n for n in mot_ffn if ".text." in n}
    # From a dense model: the one FFN, and each attention copy starts as the dense attention.
    mapping = parameter_map(moma, {*ffn, qkv}, mixed)
    assert {mapping[n] for n in moma if ".experts." in n} == set(ffn)
    assert all(mapping[n] == tied_name(n) == qkv for n in mot_qkv)
    # A MoMa with tied attention has no tensor to start from in a MoT with untied attention, and a
    # source tensor that MoMa lacks is named instead of silently dropped.
    tied = [n for n in moma if n not in mot_qkv] + [qkv]
    with pytest.raises(CheckpointError, match="no tensor for MoMa's decoder.layers.0.self_attention.linear_qkv"):
        parameter_map(tied, {*mot_ffn, *mot_qkv}, mixed)
    with pytest.raises(CheckpointError, match="no place for these source tensors: extra.weight"):
        parameter_map(moma, {*mot_ffn, *mot_qkv, "extra.weight"}, mixed)


def test_upcycle_help_lists_its_options(capsys):
    # The parser, not convert.main: main shuts the runtime down, which the in-process tests share.
    with pytest.raises(SystemExit):
        convert._parser().parse_args(["upcycle", "--help"])
    text = capsys.readouterr().out
    for flag in ("--ckpt CKPT", "--output DIR", "--experts", "--capacity", "--untie", "--keep-data-order"):
        assert flag in text
    examples = [shlex.split(line) for line in text.split("\nexamples:\n", 1)[1].splitlines() if line.strip()]
    assert len(examples) == 2
    for words in examples:  # each parses, its --experts as the config spells it
        args = convert._parser().parse_args(words[2:])
        assert args.command == "upcycle" and args.experts in (None, "{text: 2, image: 2}")
