"""``megafusion convert btx-merge`` (Branch-Train-MiX) and the checkpoint lineage it relies on.

Tiny runs make the inputs: a dense seed and a MoT seed (1 step each); branches started from them
with ``checkpoint.init_from`` (1 step, different learning rates so they differ), one of the dense
branches trained under TP=2 (the one torchrun launch) and one resumed for a second step; an
LMFusion seed (from the dense seed) and two LMFusion branches; a bf16 seed and three bf16
branches. The merges run as a user runs them, and are checked against the branch checkpoints read
independently (``dist_checkpointing.load_plain_tensors``: whole tensors, whatever layout saved them):

- lineage: recorded by ``init_from`` (the same seed identity under TP=1 and TP=2), kept on resume,
  a new seed's own identity when the seed itself has a lineage;
- each expert is bit-equal to its branch's FFN (the TP=2 branch's too; per modality from a MoT);
- every other tensor is the fp32 mean of the branches' (with ``--keep-seed-expert``: and the
  seed's), bit for bit, also for bf16 branches (where mergoo's running bf16 mean differs); the
  merged keys are exactly the branches' minus their FFN plus the experts and routers (every key
  once, nothing left over); LMFusion's frozen text is copied, its deltas added into the rows;
- K copies of one branch give that branch's logits (fp32, 1e-6) for random routers, and do not
  with ``btx.pre_softmax=true`` (the control); routing forced to expert i gives branch i's FFN;
- refusals name the checkpoint and the key; the printed overrides start a run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from megatron.core import dist_checkpointing

from megafusion import checkpoint as ck
from megafusion.checkpoint.manifest import write_manifest
from megafusion.commands import convert
from megafusion.core.errors import CheckpointError
from megafusion.layers.expert_groups import MIXED, ExpertGroups
from tests.helpers import ROOT, run_train, train_command
from tests.models.test_mot import batch_with_modalities, build, forward

CONFIG = "tests/configs/mixed_small.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
FFN = ("linear_fc1", "linear_fc2")
EXPERTS = "decoder.layers.mlp.experts.experts.{fc}.weight"  # [layers, experts, ...] in a checkpoint
ROUTER = "decoder.layers.mlp.router.weight"
# The merges: (seed, branches, extra flags).
MERGES = {
    "dense": ("seed", ["a", "b_tp2"], []),
    "keep_seed": ("seed", ["a", "b_tp2"], ["--keep-seed-expert"]),
    "copies": ("seed", ["a", "a", "a"], []),
    "mot": ("mot_seed", ["mot_a", "mot_b"], []),
    "lmfusion": ("lmf_seed", ["lmf_a", "lmf_b"], []),
    "bf16": ("bf16_seed", ["bf16_a", "bf16_b", "bf16_c"], []),  # bf16 weights: averaged in fp32 all the same
}


def launch(tmp, tag: str, overrides: list[str], nproc: int = 1) -> subprocess.Popen:
    args = [
        "--config",
        str(ROOT / CONFIG),
        f"logging.out_dir={tmp / tag}",
        "logging.wandb=false",
        "checkpoint.save=true",
        f"checkpoint.dir={tmp / tag / 'ck'}",
        "checkpoint.interval=1",
        "train.steps=1",
        *overrides,
    ]
    return subprocess.Popen(
        train_command(nproc, args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(procs: dict) -> dict:
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}:\n{stdout[-2000:]}\n{stderr[-4000:]}"
        out[name] = stdout
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SimpleNamespace(tmp, ck={tag: checkpoint dir}, merged={name: (dir, stdout)})."""
    tmp = tmp_path_factory.mktemp("btx")
    ckpt = {tag: tmp / tag / "ck" for tag in ("seed", "mot_seed", "a", "b_tp2", "mot_a", "mot_b")}
    ckpt.update({tag: tmp / tag / "ck" for tag in ("lmf_seed", "lmf_a", "lmf_b", "bf16_seed", "bf16_a", "bf16_b")})
    ckpt["bf16_c"] = tmp / "bf16_c" / "ck"
    mot, lmf, bf16 = ["model.arch=mot"], ["model.arch=mot", "model.freeze_text=true"], ["model.params_dtype=bf16"]
    finish(
        {
            "seed": launch(tmp, "seed", []),
            "mot_seed": launch(tmp, "mot_seed", mot),
            "bf16_seed": launch(tmp, "bf16_seed", bf16),
        }
    )
    from_seed, from_mot = f"checkpoint.init_from={ckpt['seed']}", f"checkpoint.init_from={ckpt['mot_seed']}"
    finish(
        {
            "a": launch(tmp, "a", [from_seed]),
            "b_tp2": launch(tmp, "b_tp2", [from_seed, "train.lr=1e-2", "parallel.tp=2"], nproc=2),
            "mot_a": launch(tmp, "mot_a", [*mot, from_mot]),
            "mot_b": launch(tmp, "mot_b", [*mot, from_mot, "train.lr=1e-2"]),
            "lmf_seed": launch(tmp, "lmf_seed", [*lmf, from_seed]),
        }
    )
    from_lmf, from_bf16 = f"checkpoint.init_from={ckpt['lmf_seed']}", f"checkpoint.init_from={ckpt['bf16_seed']}"
    finish(
        {
            # A resume (a second step in the same directory): it keeps the run's lineage.
            "a_resumed": launch(tmp, "a", [from_seed, "train.steps=2"]),
            "lmf_a": launch(tmp, "lmf_a", [*lmf, from_lmf]),
            "lmf_b": launch(tmp, "lmf_b", [*lmf, from_lmf, "train.lr=1e-2"]),
            **{
                tag: launch(tmp, tag, [*bf16, from_bf16, f"train.lr={lr}"])
                for tag, lr in (("bf16_a", 3e-3), ("bf16_b", 1e-2), ("bf16_c", 2e-2))
            },
        }
    )
    procs = {}
    for name, (seed, branches, extra) in MERGES.items():
        argv = ["--seed", str(ckpt[seed]), *(w for b in branches for w in ("--branch", str(ckpt[b])))]
        command = [sys.executable, "-m", "megafusion", "convert", "btx-merge", *argv, "--output", str(tmp / name)]
        procs[name] = subprocess.Popen(
            [*command, *extra], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    printed = finish(procs)
    merged = {name: (tmp / name, printed[name]) for name in MERGES}
    return SimpleNamespace(tmp=tmp, ck={k: ck.resolve_checkpoint(v) for k, v in ckpt.items()}, merged=merged)


def model_tensors(path) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors, whole (any saved layout), without a training checkpoint's optimizer state."""
    loaded = dist_checkpointing.load_plain_tensors(str(path))
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}


def merge_sources(runs, name: str) -> list[str]:
    """The tags of the merge's averaged sources: its branches, and the seed with --keep-seed-expert."""
    seed, branches, extra = MERGES[name]
    return [*branches, *([seed] if "--keep-seed-expert" in extra else [])]


def groups_of(path) -> ExpertGroups:
    return ExpertGroups.from_config(SimpleNamespace(experts=ck.run_config(path).btx.experts, capacity=None))


def test_lineage_is_recorded_by_init_from_and_kept_on_resume(runs):
    seed = runs.ck["seed"]
    seed_id = ck.identity(seed, ck.read_manifest(seed))
    assert ck.recorded_lineage(ck.read_manifest(seed)) is None  # trained from scratch
    want = {"seed": seed_id, "seed_path": str(seed), "seed_step": 1}
    a = runs.ck["a"]
    assert a.name == "step_0000002"  # resumed for a second step
    for step in (a.parent / "step_0000001", a):  # the first run's checkpoint and the resumed run's
        assert ck.recorded_lineage(ck.read_manifest(step)) == want, step
    # The same seed identity whatever layout the branch trains in (TP=2 here).
    assert ck.recorded_lineage(ck.read_manifest(runs.ck["b_tp2"])) == want
    # An older checkpoint without a file table: the same identity, computed from its files.
    manifest = ck.read_manifest(seed)
    manifest.pop("files")
    assert ck.identity(seed, manifest) == seed_id
    # A seed that has a lineage of its own (the LMFusion seed, started from the dense seed): its
    # branches record its identity, not its seed's.
    lmf_seed = runs.ck["lmf_seed"]
    assert ck.recorded_lineage(ck.read_manifest(lmf_seed))["seed"] == seed_id
    lmf_id = ck.identity(lmf_seed, ck.read_manifest(lmf_seed))
    assert lmf_id != seed_id and ck.recorded_lineage(ck.read_manifest(runs.ck["lmf_a"]))["seed"] == lmf_id


@pytest.mark.parametrize("name", ["dense", "keep_seed", "mot", "lmfusion", "bf16"])
def test_every_expert_is_its_branch_ffn_bit_for_bit(runtime, runs, name):
    merged_path = runs.merged[name][0]
    merged = model_tensors(merged_path)
    sources = [model_tensors(runs.ck[tag]) for tag in merge_sources(runs, name)]
    groups = groups_of(merged_path)
    modality_groups = groups.names != (MIXED,)
    assert modality_groups == (name in ("mot", "lmfusion"))
    assert groups.sizes == (len(sources),) * len(groups.sizes)
    for fc in FFN:
        experts = merged[EXPERTS.format(fc=fc)]
        assert experts.shape[1] == groups.total
        for e in range(groups.total):
            group, j = groups.expert_name(e).split(".")
            key = f"decoder.layers.mlp.{fc}.weight" if group == MIXED else f"decoder.layers.mlp.{group}.{fc}.weight"
            assert torch.equal(experts[:, e], sources[int(j)][key]), f"{name}: expert {e} ({group}.{j}) {fc}"
            if not (name == "lmfusion" and group == "text"):  # LMFusion's text FFN is frozen: alike everywhere
                others = [s[key] for i, s in enumerate(sources) if i != int(j)]
                assert all(not torch.equal(experts[:, e], o) for o in others), "branches alike: the check is vacuous"
    router = merged[ROUTER]
    assert router.shape[1] == groups.total and router.std() > 0  # seeded fresh init, not zeros


@pytest.mark.parametrize("name", ["dense", "keep_seed", "mot", "lmfusion", "bf16"])
def test_every_other_tensor_is_the_fp32_mean_of_the_branches(runtime, runs, name):
    merged_path = runs.merged[name][0]
    merged = model_tensors(merged_path)
    sources = [model_tensors(runs.ck[tag]) for tag in merge_sources(runs, name)]
    ffn = {k for k in sources[0] if k.startswith("decoder.layers.mlp.")}
    deltas = {k for k in sources[0] if "new_rows" in k}  # LMFusion's: added into the rows (below)
    new = {EXPERTS.format(fc=fc) for fc in FFN} | {ROUTER}
    # Every merged key once: the branches' minus their FFN, plus experts and routers; nothing left over.
    assert sorted(merged) == sorted((set(sources[0]) - ffn - deltas) | new)
    assert bool(deltas) == (name == "lmfusion")
    manifest = ck.read_manifest(merged_path)
    folded = {}
    if name == "lmfusion":  # the frozen text is copied; the deltas are added into the rows they belong to
        seed = model_tensors(runs.ck["lmf_seed"])
        first = ck.run_config(runs.ck["lmf_seed"]).model.frozen_vocab_rows
        assert manifest["origin"]["lmfusion_folded"] and "freeze_text" not in manifest["model"]
        for target, delta in (
            ("embedding.word_embeddings.weight", "embedding_new_rows.weight"),
            ("output_layer.weight", "output_new_rows.weight"),
        ):
            rows = seed[target].float()
            rows[first:] += torch.stack([s[delta] for s in sources]).float().mean(0)
            folded[target] = rows.to(seed[target].dtype)
            assert torch.equal(merged[target][:first], seed[target][:first])
    averaged = running = 0
    for key, got in merged.items():
        if key in new:
            continue
        if key in folded:
            assert torch.equal(got, folded[key]), key
        elif name == "lmfusion" and "text" in key.split("."):
            assert all(torch.equal(got, s[key]) for s in sources), key  # frozen: copied, equal everywhere
        else:
            want = torch.stack([s[key] for s in sources]).float().mean(0).to(got.dtype)
            assert torch.equal(got, want), f"{name}: {key} is not the fp32 mean of the branches"
            averaged += not all(torch.equal(sources[0][key], s[key]) for s in sources[1:])
            # mergoo's running mean in the stored dtype (prev + x / n): what the fp32 mean avoids.
            mean = sources[0][key] / len(sources)
            for s in sources[1:]:
                mean = mean + s[key] / len(sources)
            running += not torch.equal(mean, got)
    assert averaged >= 5, "too few tensors differ between the branches: the check is vacuous"
    if name == "bf16":
        assert all(v.dtype == torch.bfloat16 for v in merged.values() if v.dtype != torch.float32)
        assert merged["decoder.final_layernorm.weight"].dtype == torch.bfloat16
        assert running >= 5, "a bf16 running mean would pass the check: it cannot tell"
    origin = manifest["origin"]
    seed_tag, branches, extra = MERGES[name]
    assert origin["conversion"] == "btx-merge" and origin["keep_seed_expert"] == bool(extra)
    assert origin["seed"]["identity"] == ck.identity(runs.ck[seed_tag], ck.read_manifest(runs.ck[seed_tag]))
    assert [b["path"] for b in origin["branches"]] == [str(runs.ck[b]) for b in branches]
    assert manifest["weights_only"] and manifest["step"] == 0 and manifest["model"]["arch"] == "btx"


def test_copies_of_one_branch_give_its_logits_for_any_router(runtime, runs):
    """K copies of a model: every top-2 pick mixes equal experts with gates summing to 1 (fp32, 1e-6)."""
    a, merged_path = runs.ck["a"], runs.merged["copies"][0]
    dense = build(ck.run_config(a), runtime)
    ck.load_weights(a, [dense])
    batch = batch_with_modalities(ck.run_config(a), seed=5)
    with torch.no_grad():
        want = forward(dense.eval(), batch)
        for pre_softmax in (False, True):
            cfg = ck.run_config(merged_path)
            cfg.btx.pre_softmax = pre_softmax
            moe = build(cfg, runtime)
            ck.load_weights(merged_path, [moe])
            gen = torch.Generator().manual_seed(3)
            routers = [layer.mlp.router.weight for layer in moe.decoder.layers]
            for weight in routers:  # far from the seeded init: any router
                weight.copy_(torch.randn(weight.shape, generator=gen))
            got = forward(moe.eval(), batch)
            if not pre_softmax:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            else:  # softmax over 3 experts, then top-2: gates sum to less than 1
                assert (got - want).abs().max() > 1e-3


def forced_to(expert: int):
    """A ``routing_of`` that sends every routable token to ``expert`` alone, gate 1."""

    def routing_of(logits, allowed, routable):
        probs = torch.zeros_like(logits)
        probs[:, expert] = routable.to(logits.dtype)
        return probs, probs > 0, probs

    return routing_of


def test_routing_forced_to_expert_i_computes_branch_i_ffn(runtime, runs):
    merged_path = runs.merged["dense"][0]
    cfg = ck.run_config(merged_path)
    moe = build(cfg, runtime)
    ck.load_weights(merged_path, [moe])
    batch = batch_with_modalities(cfg, seed=7)
    layer, outputs = 1, []
    for i, tag in enumerate(MERGES["dense"][1]):
        branch = build(ck.run_config(runs.ck[tag]), runtime)
        ck.load_weights(runs.ck[tag], [branch])
        seen = {}
        hook = moe.decoder.layers[layer].mlp.register_forward_hook(
            # Clones: the layer adds the residual into the output in place.
            lambda m, a, out, seen=seen: seen.update(x=a[0].clone(), y=out[0].clone())
        )
        for each in moe.decoder.layers:
            each.mlp.router.routing_of = forced_to(i)
        try:
            with torch.no_grad():
                forward(moe.eval(), batch)
                want = branch.eval().decoder.layers[layer].mlp(seen["x"])[0]
        finally:
            hook.remove()
        torch.testing.assert_close(seen["y"], want, rtol=0, atol=1e-6)
        outputs.append(seen["y"])
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3  # the branches' FFNs differ: the check can fail


def forged(runs, tag: str, name: str, change) -> str:
    """A copy of checkpoint ``tag`` whose megafusion.json ``change`` edits (resealed; its files, and
    so its identity, unchanged)."""
    path = runs.tmp / "forged" / name
    shutil.copytree(runs.ck[tag], path)
    manifest = ck.read_manifest(path)
    change(manifest)
    write_manifest(path, manifest)
    return str(path)


def test_refusals_name_the_checkpoint_and_the_key(runs, tmp_path):
    seed, a = str(runs.ck["seed"]), str(runs.ck["a"])

    def refused(*branches):
        argv = ["btx-merge", "--seed", seed, *(w for b in branches for w in ("--branch", b))]
        with pytest.raises(CheckpointError) as info:
            convert.convert_command([*argv, "--output", str(tmp_path / "out")])
        message = str(info.value)
        assert "\n" not in message and not (tmp_path / "out").exists()
        return message

    message = refused(a, seed)  # the seed itself: no lineage
    assert f"--branch 2 {seed}" in message and "records no lineage" in message
    mot_a = str(runs.ck["mot_a"])
    message = refused(a, mot_a)  # a branch of another seed
    assert f"--branch 2 {mot_a}: lineage.seed" in message and seed in message

    def width(m):
        m["model"]["ffn_hidden_size"] = 96

    def vocab(m):
        m["model"]["vocab_size"] = 512

    def tokenizer(m):
        m["data"]["tokenizer"]["sentencepiece_sha256"] = "0" * 64

    path = forged(runs, "a", "width", width)
    assert f"--branch 2 {path}: model key ffn_hidden_size is 96, the seed's is 64" in refused(a, path)
    path = forged(runs, "a", "vocab", vocab)
    assert f"{path}: model key vocab_size is 512" in refused(a, path)
    path = forged(runs, "a", "tokenizer", tokenizer)
    assert f"--branch 1 {path}: data tokenizer is" in refused(path, a)


def test_lmfusion_frozen_text_that_differs_is_refused_naming_the_key():
    from megafusion.interop.btx_merge import Take, merge_tensors

    key = "decoder.layers.0.mlp.text.linear_fc1.weight"
    sources = [{key: torch.ones(2, 2)} for _ in range(3)]
    sources[1][key] = sources[1][key].clone()
    sources[1][key][0, 0] += 1e-3
    target = {"out": torch.nn.Parameter(torch.zeros(2, 2))}
    labels = ["--branch 1 A", "--branch 2 B", "--seed S"]
    with pytest.raises(CheckpointError, match=f"--branch 2 B: frozen text weight {key} .* differs from --branch 1 A"):
        merge_tensors(target, sources, [0, 1], {"out": Take("copy", key)}, labels)
    sources[1][key] = sources[0][key].clone()
    merge_tensors(target, sources, [0, 1], {"out": Take("copy", key)}, labels)  # equal: copied
    assert torch.equal(target["out"], sources[0][key])


def test_the_printed_overrides_start_a_run(runs):
    path, stdout = runs.merged["dense"]
    assert "(2 branches merged: experts mixed 2, routers initialised)" in stdout
    printed = shlex.split(stdout.split("train with ", 1)[1].split(" (a new run")[0])
    assert printed[-1] == f"checkpoint.init_from={path}"
    _, _, log = run_train(runs.tmp, 1, CONFIG, [*printed, "train.steps=1", "logging.dump_grads=null"], "finetune")
    assert f"initialised from {path}" in log
    assert "model.freeze_text=false" in runs.merged["lmfusion"][1]


def test_btx_merge_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        convert._parser().parse_args(["btx-merge", "--help"])
    text = capsys.readouterr().out
    for flag in ("--seed CKPT", "--branch CKPT", "--output DIR", "--keep-seed-expert"):
        assert flag in text
    examples = [shlex.split(line) for line in text.split("\nexamples:\n", 1)[1].splitlines() if line.strip()]
    assert len(examples) == 2
    for words in examples:
        args = convert._parser().parse_args(words[2:])
        assert args.command == "btx-merge" and len(args.branch) >= 2
