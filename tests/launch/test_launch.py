"""The launch plan equals what megatron-core builds, and the SLURM launcher runs the right command.

- ``layout()`` is checked against real process groups: two torchrun agents (2 "nodes" x 2
  processes, c10d rendezvous on localhost, CPU + gloo) go through several TP / PP / VPP / CP /
  EP layouts with ``megafusion.runtime.initialize`` and report each rank's coordinates and, for
  the interleaved layouts, the ``layer_number``s and pre/post-process flags of the built chunks.
- ``launch/slurm/train.sbatch`` runs with fake SLURM variables, a fake ``scontrol`` and a fake
  ``srun`` (``MEGAFUSION_SRUN``) that records its argv and environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from megafusion.commands.dry_run import main as dry_run_main
from megafusion.config import Config, load_config
from megafusion.planning.layout import format_layout, groups, layout, resolve_world
from tests.helpers import ROOT

CONFIG = ROOT / "examples/configs/tiny_dense.yaml"
SBATCH = ROOT / "launch/slurm/train.sbatch"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
for _k in [k for k in ENV if k.startswith(("SLURM_", "NNODES", "GPUS_PER_NODE", "RDZV_"))] + ["WORLD_SIZE"]:
    ENV.pop(_k, None)

# (overrides, build the model chunks?) -- all for world 4 = 2 nodes x 2 processes.
COMBOS = [
    ({}, False),  # dp 4
    ({"tp": 2}, False),  # tp 2 x dp 2
    ({"pp": 2}, False),  # pp 2 x dp 2: pp crosses the "nodes"
    ({"tp": 2, "pp": 2}, False),
    ({"tp": 4}, False),  # tp spans both "nodes"
    ({"pp": 2, "vpp": 2, "num_layers": 8}, True),  # interleaved, dp 2
    ({"pp": 4, "vpp": 2, "num_layers": 8}, True),  # interleaved, 4 stages
    ({"tp": 2, "cp": 2}, False),  # context parallel
    ({"pp": 2, "ep": 2}, False),  # expert parallel carved out of dp
    ({"tp": 2, "ep": 2}, False),  # expert parallel across tp (whole experts per rank: expert tp 1)
]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from megafusion.runtime import initialize, shutdown
    from megatron.core import parallel_state as ps

    from tests.launch.test_launch import _cfg

    combos, out_dir = json.loads(sys.argv[1]), sys.argv[2]
    records = []
    for overrides, build in combos:
        cfg = _cfg(overrides)  # the same config the layout() side of the test uses
        rt = initialize(cfg)
        rec = {"rank": rt.rank, "node": int(os.environ["GROUP_RANK"]), "local_rank": int(os.environ["LOCAL_RANK"]),
               "tp": rt.tp_rank, "pp": rt.pp_rank, "dp": rt.dp_rank,
               "cp": ps.get_context_parallel_rank(), "ep": ps.get_expert_model_parallel_rank(),
               "groups": {"tp": ps.get_tensor_model_parallel_group().size(),
                          "pp": ps.get_pipeline_model_parallel_world_size()}}
        if build:
            from megafusion.objectives.build import build_model_chunks
            from megafusion.models.transformer_config import build_transformer_config
            chunks = build_model_chunks(cfg, build_transformer_config(cfg, rt.device), rt)
            rec["chunks"] = [[layer.layer_number - 1 for layer in c.decoder.layers] for c in chunks]
            rec["pre_process"] = [bool(c.pre_process) for c in chunks]
            rec["post_process"] = [bool(c.post_process) for c in chunks]
        records.append(rec)
    with open(os.path.join(out_dir, f"rank{rt.rank}.json"), "w") as f:
        json.dump(records, f)
    shutdown()
    """
)


def _cfg(overrides: dict) -> Config:
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.num_attention_heads, m.num_query_groups = 16, 4, 4
    m.ffn_hidden_size, m.vocab_size, m.seq_length = 32, 64, 8
    m.num_layers = overrides.get("num_layers", 4)
    for k in ("tp", "pp", "vpp", "cp", "ep"):
        if k in overrides:
            setattr(cfg.parallel, k, overrides[k])
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def real_groups(tmp_path_factory):
    """Per combo, per global rank: what megatron-core reported inside a real 2 x 2 torchrun job."""
    tmp = tmp_path_factory.mktemp("launch_groups")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    # Two torchrun agents = two "nodes" of 2 processes, rendezvousing like srun + torchrun do.
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "launch-test",
        "--local-addr",
        "127.0.0.1",
        "--max-restarts",
        "0",
        str(script),
        json.dumps(COMBOS),
        str(tmp),
    ]
    agents = [
        subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = []
    for a in agents:
        try:
            outputs.append(a.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for b in agents:
                b.kill()
            raise
    assert all(a.returncode == 0 for a in agents), "\n".join(o[-4000:] for o in outputs)
    per_rank = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(4)]
    return [[per_rank[r][i] for r in range(4)] for i in range(len(COMBOS))]


@pytest.mark.torchrun
@pytest.mark.parametrize("index", range(len(COMBOS)), ids=[json.dumps(c[0]) for c in COMBOS])
def test_layout_matches_real_megatron_groups(real_groups, index):
    overrides, build = COMBOS[index]
    cfg = _cfg(overrides)
    plan = layout(cfg, world_size=4, nproc_per_node=2)
    for got, real in zip(plan, real_groups[index]):
        assert got["rank"] == real["rank"]
        for key in ("node", "local_rank", "tp", "pp", "dp", "cp", "ep"):
            assert got[key] == real[key], (key, got, real)
        if build:
            assert got["chunks"] == real["chunks"]
            # GPTModel.pre_process / post_process: embedding on the first chunk of stage 0, output
            # layer on the last chunk of the last stage.
            pre, post = real["pre_process"], real["post_process"]
            assert got["embedding"] == pre[0] and not any(pre[1:])
            assert got["output_layer"] == post[-1] and not any(post[:-1])
    assert sorted(sum((r["layers"] for r in plan if r["dp"] == 0 and r["tp"] == 0 and r["cp"] == 0), [])) == list(
        range(cfg.model.num_layers)
    )


def test_the_plain_python_layout_is_megatrons():
    """The rank groups and the layer split the dry-run computes without torch equal megatron-core's own
    functions for every size, order and group kind here (the torchrun test above checks real groups)."""
    import inspect
    import itertools

    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megafusion.planning.layout import ORDER, RankGenerator, _stage_layers

    assert inspect.signature(ps.initialize_model_parallel).parameters["order"].default == ORDER
    checked = 0
    for tp, ep, dp, pp, cp in itertools.product([1, 2, 4], [1, 2], [1, 2, 3], [1, 2, 4], [1, 2]):
        for order in (ORDER, "tp-dp-pp", "tp-pp-dp", "tp-cp-ep-pp-dp"):
            if ep > 1 and cp > 1 or cp > 1 and "cp" not in order or ep > 1 and "ep" not in order:
                continue  # megatron refuses these
            theirs = ps.RankGenerator(tp=tp, ep=ep, dp=dp, pp=pp, cp=cp, order=order)
            mine = RankGenerator(tp=tp, ep=ep, dp=dp, pp=pp, cp=cp, order=order)
            for token in ("tp", "pp", "dp", "cp", "ep", "tp-pp", "dp-cp", "tp-dp-cp", "tp-ep", "pp-dp"):
                if all(t in theirs.order for t in token.split("-")):
                    assert mine.get_ranks(token) == theirs.get_ranks(token), (tp, ep, dp, pp, cp, order, token)
                    checked += 1
    assert checked > 1000
    for layers, pp, vpp in itertools.product([4, 8, 12, 24], [1, 2, 3, 4], [None, 2, 3]):
        if vpp and pp == 1 or layers % (pp * (vpp or 1)):
            continue
        tconfig = TransformerConfig(
            num_layers=layers,
            hidden_size=16,
            num_attention_heads=4,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            pipeline_dtype=torch.float32,
        )
        cfg = _cfg({"pp": pp, "vpp": vpp, "num_layers": layers})
        for pp_rank, chunks in _stage_layers(cfg).items():
            expected = []
            for v in range(vpp or 1):
                stage = v if vpp else None
                first = get_transformer_layer_offset(tconfig, vp_stage=stage, pp_rank=pp_rank)
                expected.append(list(range(first, first + get_num_layers_to_build(tconfig, stage, pp_rank))))
            assert chunks == expected, (layers, pp, vpp, pp_rank)


def test_interleaved_layer_assignment_pp2_vpp2():
    """megatron's interleaving: stage 0 holds [0,1] and [4,5], stage 1 holds [2,3] and [6,7]."""
    cfg = _cfg({"pp": 2, "vpp": 2, "num_layers": 8})
    by_stage = {r["pp"]: r for r in layout(cfg, 4, 2)}
    assert by_stage[0]["chunks"] == [[0, 1], [4, 5]] and by_stage[0]["embedding"] and not by_stage[0]["output_layer"]
    assert by_stage[1]["chunks"] == [[2, 3], [6, 7]] and by_stage[1]["output_layer"] and not by_stage[1]["embedding"]
    g = groups(cfg, 4)
    assert g["pp"] == [[0, 2], [1, 3]] and g["dp"] == [[0, 1], [2, 3]]


def test_format_layout_is_compact_for_many_ranks():
    cfg = load_config(
        str(CONFIG),
        [
            "parallel.tp=8",
            "parallel.pp=4",
            "model.num_layers=8",
            "model.num_attention_heads=8",
            "model.num_query_groups=8",
        ],
    )
    text = format_layout(cfg, 128, 8)
    assert "world 128 = tp 8 x pp 4 x dp 4" in text
    lines = text.splitlines()
    assert len(lines) < 40, text  # one line per (node, pipeline stage), not per rank
    assert any(line.split()[:4] == ["15", "120-127", "0-7", "3"] for line in lines), text
    per_rank = format_layout(cfg, 128, 8, per_rank=True)
    assert len(per_rank.splitlines()) > 128


def test_world_size_from_environment():
    assert resolve_world({}, {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"})[:2] == (16, 8)
    assert resolve_world({}, {"SLURM_NNODES": "4", "SLURM_GPUS_PER_NODE": "h100:8"})[:2] == (32, 8)
    assert resolve_world({"nnodes": 2, "nproc_per_node": 4}, {})[:2] == (8, 4)
    assert resolve_world({}, {})[:2] == (1, 1)


def test_dry_run_names_the_recompute_mode(capsys):
    assert dry_run_main(["--config", str(CONFIG), "--world-size", "1"]) == 0
    assert "| recompute none" in capsys.readouterr().out
    assert dry_run_main(["--config", str(CONFIG), "train.recompute=full", "--world-size", "1"]) == 0
    assert "| recompute full" in capsys.readouterr().out


def test_bad_world_size_exits_2_and_names_the_keys(capsys):
    rc = dry_run_main(
        ["--config", str(CONFIG), "parallel.tp=2", "parallel.pp=2", "--world-size", "6", "--nproc-per-node", "6"]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "world size 6" in err and "parallel.tp" in err and "parallel.pp" in err
    # the same through the module entry point, before any torch import
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megafusion",
            "train",
            "--dry-run",
            "--config",
            str(CONFIG),
            "parallel.tp=4",
            "--world-size=6",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "parallel.tp" in proc.stderr
    assert dry_run_main(["--config", str(CONFIG), "--world-size", "x"]) == 2
    assert (
        dry_run_main(
            ["--config", str(CONFIG), "train.global_batch_size=32", "--world-size", "16", "--nproc-per-node", "6"]
        )
        == 2
    )
    assert "--nproc-per-node" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# launch/slurm/train.sbatch


@pytest.fixture
def fake_slurm(tmp_path):
    """PATH with fake scontrol / srun, SLURM variables of a 2-node job, and the capture files."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\necho gpu-node-017\necho gpu-node-018\n'
    )
    capture = tmp_path / "srun"
    (bin_dir / "fake-srun").write_text(
        f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {capture}.argv\nenv > {capture}.env\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        **ENV,
        "PATH": f"{bin_dir}:{ENV['PATH']}",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NAME": "mf",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node-[017-018]",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": "0",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "PYTHON": sys.executable,
        "MEGAFUSION_SRUN": str(bin_dir / "fake-srun"),
        "NCCL_IB_HCA": "mlx5_0,mlx5_1",
    }
    env.pop("NCCL_DEBUG", None)
    env.pop("OMP_NUM_THREADS", None)
    return tmp_path, env, capture


TP8_PP2 = [
    "--config",
    str(CONFIG),
    "parallel.tp=8",
    "parallel.pp=2",
    "parallel.sp=true",
    "model.num_attention_heads=8",
    "model.num_query_groups=8",
]


def test_sbatch_runs_one_torchrun_per_node(fake_slurm):
    cwd, env, capture = fake_slurm
    proc = subprocess.run(
        ["bash", str(SBATCH), *TP8_PP2, "train.steps=3"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    argv = capture.with_suffix(".argv").read_text().splitlines()
    # python launch/torchrun_report.py --log <one file per node> -- <torchrun's arguments>
    i = argv.index(sys.executable)
    srun_args, launcher = argv[:i], argv[i : argv.index("--") + 1]
    assert launcher == [
        sys.executable,
        str(ROOT / "launch/torchrun_report.py"),
        "--log",
        f"{cwd}/logs/123456/torchrun/agent-node%n.log",
        "--",
    ]
    assert "--nodes=2" in srun_args and "--ntasks-per-node=1" in srun_args and "--ntasks=2" in srun_args
    assert "--cpus-per-task=64" in srun_args and "--kill-on-bad-exit=1" in srun_args
    rest = argv[argv.index("--") + 1 :]

    def flag(name):
        return rest[rest.index(name) + 1]

    assert flag("--nnodes") == "2" and flag("--nproc-per-node") == "8"
    assert flag("--rdzv-backend") == "c10d"
    assert flag("--rdzv-endpoint") == f"gpu-node-017:{15000 + 123456 % 15000}"
    assert flag("--rdzv-id") == "123456"
    m = rest.index("-m")
    assert rest[m + 1] == "megafusion.train"
    assert rest[m + 2 :] == [*TP8_PP2, "train.steps=3", "logging.out_dir=runs/mf-123456"]

    exported = dict(line.split("=", 1) for line in capture.with_suffix(".env").read_text().splitlines() if "=" in line)
    assert exported["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert exported["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and exported["NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert exported["OMP_NUM_THREADS"] == "8"  # 64 CPUs / 8 GPUs
    assert exported["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"  # the site's setting passes through
    assert str(ROOT) in exported["PYTHONPATH"].split(":")
    # pre-flight layout and the command are kept in the per-job log directory
    assert "world 16 = tp 8 x pp 2 x dp 1" in (cwd / "logs/123456/layout.txt").read_text()
    assert "--rdzv-endpoint gpu-node-017:" in (cwd / "logs/123456/command.txt").read_text()


def test_sbatch_keeps_a_given_out_dir_and_refuses_bad_config(fake_slurm):
    cwd, env, capture = fake_slurm
    proc = subprocess.run(
        ["bash", str(SBATCH), "--config", str(CONFIG), "parallel.tp=3", "logging.out_dir=runs/x"],
        cwd=cwd,
        env={**env, "MEGAFUSION_PREFLIGHT": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "parallel.tp" in proc.stdout + proc.stderr
    assert not capture.with_suffix(".argv").exists(), "srun must not run for a bad config"


def test_sbatch_dry_run_prints_layout_and_command(fake_slurm):
    cwd, env, capture = fake_slurm
    env = {**env}
    env.pop("MEGAFUSION_SRUN")
    proc = subprocess.run(
        ["bash", str(SBATCH), "--dry-run", *TP8_PP2], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "16 processes = 2 nodes x 8 per node" in out
    assert "world 16 = tp 8 x pp 2 x dp 1" in out
    table = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert len(table) == 16
    assert table[0][:6] == ["0", "0", "0", "0", "0", "0"] and table[0][-1] == "emb"
    assert table[15][:6] == ["15", "1", "7", "7", "1", "0"] and table[15][-1] == "out"
    cmd = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "--rdzv-endpoint gpu-node-017:" in cmd and "--nnodes 2 --nproc-per-node 8" in cmd
    assert "-m megafusion.train --config" in cmd
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in out
    assert not capture.with_suffix(".argv").exists() and not (cwd / "logs").exists()


# ---------------------------------------------------------------------------------------------
# launch/torchrun_report.py: the line and the exit status launch/torchrun.sh ends with (a real
# preempted run through it: tests/training/test_faults.py)


def test_torchrun_report_line_and_status():
    spec = importlib.util.spec_from_file_location("torchrun_report", ROOT / "launch/torchrun_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    def outcome(status_text, code, failed=""):
        return report.report(status_text, code, failed, "logs/t.log")

    line, code = outcome("preempted step 3 runs/x/checkpoints/step_0000003", 75, "rank 1 exited with status 75")
    assert code == 75 and line.startswith("preempted at step 3, saved runs/x/checkpoints/step_0000003; run the same")
    assert outcome("preempted step 3", 75)[0].startswith("preempted at step 3, nothing saved (checkpoint.save=false)")
    line, code = outcome("forced second signal (SIGTERM)", 143, "torchrun stopped on SIGTERM")
    assert code == 76 and line.startswith("stopped without saving (second signal (SIGTERM)); checkpoint.dir/latest")
    assert outcome("done step 6", 0) == (None, 0)
    assert outcome("", 2, "rank 0 exited with status 2") == (None, 2)  # the ranks' one line says it all
    # a crash (also after rank 0 wrote "done"): the failed rank's own status and torchrun's log, never 75/76
    for status_text in ("", "done step 6"):
        line, code = outcome(status_text, 1, "rank 1 exited with status 1")
        assert code == 1
        assert line == "rank 1 exited with status 1: the ranks' messages are above, torchrun's in logs/t.log"
    assert report._status_of(-9) == 137 and report._describe(-9) == "was killed by SIGKILL (exit status 137)"
    assert report._status_of(2) == 2 and report._describe(2) == "exited with status 2"
