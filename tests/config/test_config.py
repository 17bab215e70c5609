"""Tests for megafusion.config: YAML/CLI loading, type coercion and validation."""

import re
import subprocess
import sys

import pytest

from megafusion.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    parse_cli,
    validate,
)
from tests.helpers import ROOT


def make(*overrides: str) -> Config:
    return load_config(None, list(overrides))


def problems_of(cfg: Config, world_size: int, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size, **kw)
    return str(info.value)


def assert_all_in(text: str, *parts: str) -> None:
    for part in parts:
        assert part in text, f"{part!r} not in:\n{text}"


# ---------------------------------------------------------------- loading


def test_defaults_and_to_dict():
    cfg = load_config(None, [])
    d = cfg.to_dict()
    assert d["parallel"]["tp"] == 1 and d["model"]["arch"] == "dense"
    from megafusion.core.registries import FAMILIES, OBJECTIVES, known_options

    core = {"parallel", "model", "train", "data", "objective", "checkpoint", "eval", "logging", "ops"}
    # MoMa's moe section, Branch-Train-MiX's btx, and those of any plugin registered in this process
    plugins = {
        s
        for key, name, o in known_options()
        if name not in {*FAMILIES.builtin, *OBJECTIVES.builtin}
        for s in o.sections
    }
    assert set(d) == core | {"moe", "btx"} | plugins
    assert cfg.model.effective_ffn_hidden_size() == 4 * cfg.model.hidden_size
    assert cfg.model.effective_num_query_groups() == cfg.model.num_attention_heads
    assert cfg.data_parallel_size(8) == 8


def test_config_package_is_pure_python():
    # The package runs before any process group exists; it must not pull in torch.

    code = "import sys, megafusion.config; assert 'torch' not in sys.modules and 'megatron' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "parallel:\n  tp: 2\n  sp: true\n  vpp: null\n"
        "model:\n  num_layers: 4\n  ffn_hidden_size: 128\n"
        "train:\n  lr: 3e-4\n  min_lr: 0\n"
        "logging:\n  out_dir: runs/x\n"
    )
    cfg = load_config(str(path), [])
    assert cfg.parallel.tp == 2 and type(cfg.parallel.tp) is int
    assert cfg.parallel.sp is True and cfg.parallel.vpp is None
    assert cfg.model.num_layers == 4 and cfg.model.ffn_hidden_size == 128
    assert cfg.train.lr == pytest.approx(3e-4) and type(cfg.train.lr) is float
    assert cfg.train.min_lr == 0.0 and type(cfg.train.min_lr) is float
    assert cfg.logging.out_dir == "runs/x"
    assert cfg.model.hidden_size == 64  # untouched default
    # to_dict output loads back to the same config
    assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_win_over_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("parallel:\n  tp: 2\ntrain:\n  steps: 5\n")
    cfg = load_config(str(path), ["parallel.tp=4", "train.lr=1e-3"])
    assert cfg.parallel.tp == 4 and cfg.train.steps == 5 and cfg.train.lr == 1e-3


@pytest.mark.parametrize(
    "text,what", [("", "no settings"), ("# nothing yet\n", "no settings"), ("{}\n", "an empty mapping {}")]
)
def test_an_empty_config_file_is_refused(tmp_path, text, what):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), [])
    assert str(info.value) == (
        f"config file '{path}' holds {what}: give the sections to set (parallel, model, train, data, ...; "
        "examples/configs/ has complete ones)"
    )
    assert load_config(None, []) == Config()  # no file at all: the defaults, as before


def test_a_config_file_that_is_not_utf8_is_one_line_naming_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    raw = "model:\n  hidden_size: 64  # caf\xe9\n".encode("latin-1")
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), [])
    assert str(info.value) == (
        f"config file '{path}' is not UTF-8 text: byte 0xe9 at position {raw.index(0xE9)} (line 2) cannot be decoded: "
        "save the file as UTF-8"
    )


@pytest.mark.parametrize(
    "text,key,first,line",
    [
        ("model:\n  hidden_size: 64\n  num_layers: 2\n  hidden_size: 128\n", "hidden_size", 2, 4),
        ("train:\n  steps: 3\nmodel:\n  num_layers: 2\ntrain:\n  lr: 0.1\n", "train", 1, 5),
        ("moe:\n  experts: {text: 4, image: 2, text: 2}\n", "text", 2, 2),
    ],
    ids=["key", "section", "nested"],
)
def test_a_key_given_twice_is_refused_naming_the_key_the_file_and_the_line(tmp_path, text, key, first, line):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), [])
    assert str(info.value) == (
        f"config file '{path}' line {line}: key '{key}' is given twice (first on line {first}; "
        "YAML would keep only the last): keep one"
    )
    # The same mapping in an override is refused too; YAML anchors and merges stay usable.
    with pytest.raises(ConfigError, match=r"override 'moe.experts=\{text: 4, text: 2\}': key 'text' is given twice"):
        make("moe.experts={text: 4, text: 2}")
    path.write_text("model:\n  <<: {num_layers: 2}\n  num_layers: 3\n")
    assert load_config(str(path), []).model.num_layers == 3


@pytest.mark.parametrize("raw,expected", [("3e-4", 3e-4), ("1", 1.0), ("0.5", 0.5), ("1E-3", 1e-3)])
def test_float_parsing(raw, expected):
    cfg = make(f"train.lr={raw}")
    assert type(cfg.train.lr) is float and cfg.train.lr == pytest.approx(expected)


@pytest.mark.parametrize(
    "raw,expected",
    [("true", True), ("false", False), ("1", True), ("0", False), ("yes", True), ("no", False), ("True", True)],
)
def test_bool_parsing(raw, expected):
    assert make(f"parallel.sp={raw}").parallel.sp is expected


@pytest.mark.parametrize("raw", ["null", "none", "None", "~"])
def test_null_for_optional(raw):
    cfg = make("parallel.vpp=2", f"parallel.vpp={raw}", "logging.dump_losses=a.json", f"logging.dump_losses={raw}")
    assert cfg.parallel.vpp is None and cfg.logging.dump_losses is None


def test_int_and_string_coercion():
    cfg = make("train.steps=1e3", "parallel.tp='2'", "logging.out_dir=0123", "logging.dump_grads=g.pt")
    assert cfg.train.steps == 1000 and cfg.parallel.tp == 2
    assert cfg.logging.out_dir == "0123"  # kept verbatim, not parsed as a YAML number
    assert cfg.logging.dump_grads == "g.pt"


@pytest.mark.parametrize(
    "item,parts",
    [
        ("parallel.tp=abc", ["parallel.tp", "'abc'", "int"]),
        ("parallel.tp=2.5", ["parallel.tp", "2.5", "int"]),
        ("parallel.tp=true", ["parallel.tp", "True", "int"]),  # bools are not ints here
        ("train.lr=fast", ["train.lr", "'fast'", "float"]),
        ("parallel.sp=maybe", ["parallel.sp", "'maybe'", "bool"]),
        ("parallel.tp=null", ["parallel.tp", "null", "int"]),
    ],
)
def test_wrong_type(item, parts):
    with pytest.raises(ConfigError) as info:
        make(item)
    assert_all_in(str(info.value), *parts)


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"did you mean 'parallel\.tp'") as info:
        make("parallel.tpp=2")
    assert_all_in(str(info.value), "parallel.tpp", "tp, pp, vpp")


def test_unknown_section_suggests_close_match():
    with pytest.raises(ConfigError, match=r"'modle'.*did you mean 'model'"):
        make("modle.num_layers=2")


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layer: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), [])
    assert_all_in(str(info.value), str(path), "model.num_layer", "model.num_layers")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="no '='"):
        make("parallel.tp")
    with pytest.raises(ConfigError, match="section.key"):
        make("tp=2")


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml", [])


def test_unparsable_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), [])
    message = str(info.value)
    assert message.startswith(f"config file '{path}' is not valid YAML at line 2, column 1: ") and "\n" not in message


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "42\n", "model: 3\n"])
def test_yaml_top_level_not_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(str(path), [])


# ---------------------------------------------------------------- parse_cli


def test_parse_cli_forms():
    assert parse_cli([]) == (None, [])
    assert parse_cli(["--config", "a.yaml", "parallel.tp=2"]) == ("a.yaml", ["parallel.tp=2"])
    assert parse_cli(["parallel.tp=2", "--config=b.yaml", "x.y=1"]) == ("b.yaml", ["parallel.tp=2", "x.y=1"])


def test_several_config_files_layer_key_by_key(tmp_path):
    base, model = tmp_path / "run.yaml", tmp_path / "model.yaml"
    base.write_text("model:\n  num_layers: 4\n  hidden_size: 128\ntrain:\n  steps: 7\n")
    model.write_text(
        "model:\n  hidden_size: 64\n  rope_scaling: {factor: 8.0, low_freq_factor: 1.0, "
        "high_freq_factor: 4.0, original_max_position_embeddings: 64}\n"
    )
    paths, overrides = parse_cli(["--config", str(base), f"--config={model}", "train.steps=9"])
    assert paths == [str(base), str(model)]
    cfg = load_config(paths, overrides)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.steps) == (4, 64, 9)
    assert cfg.model.rope_scaling["factor"] == 8.0
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config([str(base), str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize(
    "argv,bad", [(["--foo"], "--foo"), (["stray"], "stray"), (["--config"], "--config"), (["--config="], "--config=")]
)
def test_parse_cli_rejects(argv, bad):
    with pytest.raises(ConfigError, match=re.escape(bad)):
        parse_cli(argv)


# ---------------------------------------------------------------- validation


def test_valid_configs_pass():
    validate(make(), 1)
    validate(make("parallel.tp=2", "parallel.pp=2"), 4)
    validate(make("parallel.tp=2", "parallel.pp=2", "parallel.sp=true"), 8)
    validate(make("parallel.pp=2", "parallel.vpp=2", "model.num_layers=4", "train.global_batch_size=8"), 2)


def test_distributed_optimizer_with_dp1_is_fine():
    validate(make("parallel.distributed_optimizer=true", "parallel.tp=2"), 2)


def test_heads_not_divisible_by_tp():
    msg = problems_of(
        make("model.num_attention_heads=6", "model.hidden_size=60", "parallel.tp=4", "model.vocab_size=256"), 4
    )
    assert_all_in(
        msg, "model.num_attention_heads=6 is not divisible by parallel.tp=4", "choose parallel.tp in {1, 2, 3, 6}"
    )


def test_query_groups_must_divide_heads():
    msg = problems_of(make("model.num_attention_heads=8", "model.num_query_groups=3"), 1)
    assert_all_in(msg, "model.num_query_groups=3", "model.num_attention_heads=8", "{1, 2, 4, 8}")


def test_query_groups_divisible_by_tp():
    msg = problems_of(make("model.num_attention_heads=8", "model.num_query_groups=2", "parallel.tp=4"), 4)
    assert_all_in(
        msg, "model.num_query_groups=2", "parallel.tp=4", "model.num_query_groups in {4, 8}", "parallel.tp in {1, 2}"
    )
    validate(make("model.num_attention_heads=8", "model.num_query_groups=4", "parallel.tp=4"), 4)


def test_hidden_not_divisible_by_heads():
    msg = problems_of(make("model.hidden_size=66"), 1)
    assert_all_in(msg, "model.hidden_size=66", "model.num_attention_heads=4", "64 or 68")


def test_ffn_not_divisible_by_tp():
    msg = problems_of(make("model.ffn_hidden_size=101", "parallel.tp=2"), 2)
    assert_all_in(msg, "model.ffn_hidden_size=101", "parallel.tp=2", "100 or 102")


def test_vocab_not_divisible_by_tp():
    msg = problems_of(make("model.vocab_size=255", "parallel.tp=2"), 2)
    assert_all_in(msg, "model.vocab_size=255", "parallel.tp=2", "pad", "model.vocab_size=256")


def test_layers_not_divisible_by_pipeline_chunks():
    msg = problems_of(make("model.num_layers=6", "parallel.pp=2", "parallel.vpp=2"), 2)
    assert_all_in(msg, "model.num_layers=6", "parallel.pp", "parallel.vpp", "= 4", "4 or 8")
    msg = problems_of(make("model.num_layers=3", "parallel.pp=2"), 2)
    assert_all_in(msg, "model.num_layers=3", "parallel.pp x parallel.vpp = 2 x 1", "parallel.vpp=null", "2 or 4")


def test_vpp_needs_pp():
    msg = problems_of(make("parallel.vpp=2"), 1)
    assert_all_in(msg, "parallel.vpp=2", "parallel.pp>1", "parallel.vpp=null")
    validate(make("parallel.vpp=1"), 1)  # vpp=1 means off


def test_unet_patch_must_hold_its_downsampling():
    tf = ["objective.name=transfusion", "data.source=builtin", "objective.patchify=unet", "data.image_size=12"]
    msg = problems_of(make(*tf, "objective.latent_patch_size=3"), 1)
    assert_all_in(msg, "objective.latent_patch_size=3", "multiple of 2", "objective.patchify=unet", "2 or 4")
    validate(make(*tf, "objective.latent_patch_size=2"), 1)
    validate(make(*tf[:-2], "data.image_size=12", "objective.latent_patch_size=3"), 1)  # linear: any divisor


def test_vpp_microbatches_divisible_by_pp():
    # dp=1, 3 microbatches, pp=2 -> interleaved schedule refuses
    msg = problems_of(
        make(
            "parallel.pp=2",
            "parallel.vpp=2",
            "model.num_layers=4",
            "train.micro_batch_size=2",
            "train.global_batch_size=6",
        ),
        2,
    )
    assert_all_in(msg, "train.global_batch_size", "interleaved", "parallel.pp=2", "4 or 8")


def test_world_size_not_divisible():
    msg = problems_of(make("parallel.tp=2", "parallel.pp=2"), 6)
    assert_all_in(msg, "world size 6", "--nproc-per-node x --nnodes", "parallel.tp", "parallel.pp", "= 4", "4 or 8")


def test_world_smaller_than_model_parallel():
    msg = problems_of(make("parallel.tp=4"), 2)
    assert_all_in(msg, "world size 2", "4")


def test_ep_needs_moe():
    msg = problems_of(make("parallel.ep=2"), 2)
    assert_all_in(msg, "expert parallelism needs a model with experts", "model.arch=moma", "parallel.ep=1")


def test_moma_experts_capacity_and_layout():
    msg = problems_of(make("model.arch=moma", "moe.experts={text: 3, image: 0}", "moe.capacity={text: 2}"), 1)
    assert_all_in(msg, "moe.experts: {'image': 0}", "moe.capacity={'text': 2} must name", "moe.capacity.text=2")
    msg = problems_of(make("model.arch=moma", "moe.experts={text: 2}"), 1)
    assert_all_in(msg, "must name every modality (text, image)", "{mixed: 8}")
    msg = problems_of(make("model.arch=moma", "moe.experts={text: 2, image: 1}", "parallel.ep=2"), 2)
    assert_all_in(msg, "holds 3 experts, not divisible by parallel.ep=2", "parallel.ep in {1, 3}")
    msg = problems_of(make("model.arch=moma", "parallel.ep=2", "parallel.tp=2"), 4)
    assert_all_in(msg, "needs parallel.sp=true")
    msg = problems_of(make("model.arch=moma", "parallel.ep=4"), 2)
    assert_all_in(msg, "parallel.ep=4 does not divide parallel.tp x dp x parallel.cp = 1 x 2 x 1", "{1, 2}")
    msg = problems_of(make("model.arch=moma", "moe.dispatcher=flex", "moe.router_noise=-1"), 1)
    assert_all_in(msg, "moe.dispatcher='flex': choose one of alltoall, allgather", "moe.router_noise=-1.0")
    validate(make("model.arch=moma", "moe.experts={mixed: 4}", "parallel.ep=2", "parallel.tp=2", "parallel.sp=true"), 8)


def test_moe_keys_on_a_model_without_experts_are_refused():
    msg = problems_of(make("model.arch=mot", "moe.router_noise=1.0", "moe.capacity={text: 0.5, image: 0.5}"), 1)
    assert_all_in(
        msg,
        "1 problem)",
        "moe.capacity={'text': 0.5, 'image': 0.5}, moe.router_noise=1.0 are set, but model.arch=mot ignores the moe "
        "section: remove them, or use model.arch=moma",
    )
    assert_all_in(problems_of(make("moe.dispatcher=allgather"), 1), "moe.dispatcher='allgather' is set", "remove it")
    # A key at its default value changes nothing: fine on any family (a shared config file).
    validate(make("model.arch=dense", "moe.experts={image: 4, text: 4}", "moe.router_noise=0", "moe.capacity=null"), 1)


def test_what_validation_knows_of_a_family_it_asks_its_options():
    """Sections, checks and expert counts come from a family's options (built-in: the torch-free
    companion; a plugin: its object's ``options``), not from a list of names."""
    from types import SimpleNamespace

    from megafusion.core.options import Options
    from megafusion.core.registries import FAMILIES
    from megafusion.models.moma_options import MoEConfig, total_experts
    from megafusion.models.registry import get_family

    for name in FAMILIES.builtin:  # the companion is the family's own options
        assert get_family(name).options is FAMILIES.options(name), name
    moe_like = SimpleNamespace(name="plugin_moe", options=Options(sections={"moe": MoEConfig}, experts=total_experts))
    plain = SimpleNamespace(name="plugin_dense", options=Options(problems=lambda cfg: ["plugin_dense: no way"]))
    known = (*FAMILIES.builtin, "plugin_moe", "plugin_dense")
    try:
        FAMILIES.register(moe_like)
        FAMILIES.register(plain)
        msg = problems_of(make("model.arch=plugin_dense", "moe.router_noise=1.0"), 1, known_archs=known)
        assert_all_in(msg, "model.arch=plugin_dense ignores the moe section", "model.arch=moma/plugin_moe", "no way")
        msg = problems_of(make("model.arch=plugin_dense", "parallel.ep=2"), 2, known_archs=known)
        assert_all_in(msg, "expert parallelism needs a model with experts (model.arch=moma/btx/plugin_moe)")
        validate(make("model.arch=plugin_moe", "moe.router_noise=1.0", "parallel.ep=2"), 2, known_archs=known)
    finally:
        FAMILIES._registered.pop("plugin_moe", None)
        FAMILIES._registered.pop("plugin_dense", None)


def test_a_moe_dict_of_the_wrong_type_says_the_form():
    form = "moe.capacity={text: 0.25, image: 0.25}"
    with pytest.raises(ConfigError) as info:
        make("model.arch=moma", "moe.capacity=1.5")
    assert_all_in(str(info.value), "moe.capacity: cannot use 1.5", form, "or null for 1/experts of each group")
    with pytest.raises(ConfigError) as info:
        make("model.arch=moma", "moe.experts=8")
    assert_all_in(str(info.value), "moe.experts: cannot use 8", "moe.experts={text: 4, image: 4}", "{mixed: 8}")
    cfg = make("model.arch=moma")
    cfg.moe.capacity = 1.5  # set by hand: validate says the same
    assert_all_in(problems_of(cfg, 1), "moe.capacity=1.5 is a float, expected dict or null: write it as " + form)


def test_global_batch_not_divisible():
    msg = problems_of(
        make("parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=2", "train.global_batch_size=10"), 8
    )
    assert_all_in(msg, "train.global_batch_size=10", "train.micro_batch_size", "dp = world size 8", "= 4", "8 or 12")


def test_global_batch_smaller_than_one_step():
    msg = problems_of(make("train.micro_batch_size=4", "train.global_batch_size=2"), 2)
    assert_all_in(msg, "train.global_batch_size=2", "set train.global_batch_size to 8 ")


def test_sp_needs_tp():
    msg = problems_of(make("parallel.sp=true"), 1)
    assert_all_in(
        msg,
        "parallel.sp=true (sequence parallel) needs parallel.tp>1",
        "set parallel.tp=2 or more, or parallel.sp=false",
    )


def test_sp_seq_length_divisible_by_tp():
    msg = problems_of(make("parallel.sp=true", "parallel.tp=4", "model.seq_length=66"), 4)
    assert_all_in(msg, "model.seq_length=66", "parallel.tp=4", "64 or 68", "parallel.sp=false")
    validate(make("parallel.tp=4", "model.seq_length=66"), 4)  # fine without sp


def test_cp_rows_must_cut_into_chunks():
    """Context parallelism cuts rows into 2 x cp (x tp under SP) chunks; Transformer Engine's CP
    takes no masks. (More in tests/distributed/test_context_parallel.py.)"""
    msg = problems_of(make("parallel.cp=2", "model.seq_length=30", "model.attention_backend=te"), 2)
    assert_all_in(msg, "model.seq_length=30", "2 x parallel.cp", "model.attention_backend=te")


def test_unknown_arch():
    msg = problems_of(make("model.arch=moma"), 1, known_archs=("dense", "mot"))
    assert_all_in(msg, "model.arch='moma'", "dense, mot")
    validate(make("model.arch=mot"), 1, known_archs=("dense", "mot"))


@pytest.mark.parametrize(
    "item,parts",
    [
        ("model.num_layers=0", ["model.num_layers=0", ">= 1"]),
        ("model.hidden_size=-4", ["model.hidden_size=-4", ">= 1"]),
        ("model.num_attention_heads=0", ["model.num_attention_heads=0"]),
        ("train.steps=0", ["train.steps=0"]),
        ("train.micro_batch_size=0", ["train.micro_batch_size=0"]),
        ("train.global_batch_size=0", ["train.global_batch_size=0"]),
        ("model.seq_length=1", ["model.seq_length=1", ">= 2"]),
        ("model.vocab_size=1", ["model.vocab_size=1", ">= 2"]),
        ("train.lr=0", ["train.lr=0.0", "> 0"]),
        ("parallel.tp=0", ["parallel.tp=0"]),
        ("parallel.pp=0", ["parallel.pp=0"]),
        ("parallel.ep=0", ["parallel.ep=0"]),
        ("parallel.cp=0", ["parallel.cp=0"]),
        ("parallel.vpp=0", ["parallel.vpp=0", "null"]),
        ("data.docs_per_sequence=0", ["data.docs_per_sequence=0"]),
        ("data.docs_per_sequence=33", ["data.docs_per_sequence=33", "model.seq_length // 2 = 32"]),
        ("model.params_dtype=fp16", ["model.params_dtype='fp16'", "auto, fp32, bf16"]),
        ("model.attention_backend=flash", ["model.attention_backend='flash'", "auto, sdpa, flex, te"]),
        ("data.source=webdataset", ["data.source='webdataset'", "synthetic"]),
        ("train.min_lr=1", ["train.min_lr=1.0", "train.lr"]),
    ],
)
def test_range_checks(item, parts):
    assert_all_in(problems_of(make(item), 1), *parts)


def test_hand_built_wrong_type_is_reported():
    cfg = Config()
    cfg.parallel.tp = "2"
    assert_all_in(problems_of(cfg, 2), "parallel.tp='2'", "expected int")


def test_all_problems_reported_at_once():
    cfg = make(
        "model.num_attention_heads=6",
        "model.hidden_size=60",
        "parallel.tp=4",
        "parallel.sp=true",
        "model.vocab_size=255",
        "parallel.cp=2",
        "model.seq_length=60",
    )
    with pytest.raises(ConfigError) as info:
        validate(cfg, 6)
    msg = str(info.value)
    assert_all_in(msg, "model.num_attention_heads=6", "model.vocab_size=255", "model.seq_length=60", "world size 6")
    assert len(info.value.problems) >= 4
    assert msg.count("\n  - ") == len(info.value.problems)


def test_none_on_the_command_line_is_a_choice_where_null_is_not_allowed():
    """``train.recompute=none`` is the choice "none" (a str key that may not be null); an optional
    key still reads ``none`` as null."""
    cfg = load_config(None, ["train.recompute=none", "objective.image_positions=none", "logging.dump_grads=none"])
    assert cfg.train.recompute == "none" and cfg.objective.image_positions == "none"
    assert cfg.logging.dump_grads is None


@pytest.mark.parametrize(
    "path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").rglob("*.yaml")), ids=lambda p: p
)
def test_every_example_config_loads_with_its_keys_where_they_were(path):
    """The keys a family or objective owns (``moe.*``, Transfusion's ``objective.*``) are read from
    the same YAML places as before they moved out of the central schema, and every example validates
    (an experiment's indexed data path is given by its runner: a stand-in here)."""
    import yaml

    cfg = load_config(str(ROOT / path))
    written = yaml.safe_load((ROOT / path).read_text())
    for section, values in written.items():
        for key, value in (values or {}).items():
            got = getattr(getattr(cfg, section), key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert float(got) == float(value), (section, key, got, value)
            elif not (isinstance(value, str) and isinstance(got, float)):  # "3e-4": a YAML 1.1 string
                assert got == value, (section, key, got, value)
    if cfg.data.source == "indexed" and not (cfg.data.path or cfg.data.blend):
        cfg.data.path = "prepared/by/the/runner"
    p = cfg.parallel
    validate(cfg, p.tp * p.pp * p.cp)
    assert config_from_dict(cfg.to_dict()) == cfg
