"""The CPU layer maps megatron-core's CUDA requests to the CPU and nothing else."""

from __future__ import annotations

import torch


def test_cuda_requests_land_on_cpu(runtime):
    from megafusion.runtime import cpu_compat

    assert cpu_compat.is_enabled() and not torch.cuda.is_available()
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    # The optimizer's dtype dispatch reads these names.
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    # Conversions through .type(dtype) still work.
    assert torch.ones(1).type(torch.float64).dtype == torch.float64
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.default_stream())
    torch.cuda.synchronize()


def test_megatron_rng_tracker_forks_the_cpu_generator(runtime):
    from megatron.core import tensor_parallel

    from megafusion.runtime import seed_everything

    seed_everything(5)
    before = torch.rand(3)
    seed_everything(5)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        inside = torch.rand(3)
    after = torch.rand(3)
    assert not torch.equal(inside, before), "the fork must use its own stream"
    assert torch.equal(after, before), "the default stream resumes where it was"


def test_megatron_import_skips_inductor_on_cpu_and_wandb_until_it_is_used():
    """megafusion/core/lazy_imports.py: megatron's fusion functions are left undecorated on a CPU (their
    torch.compile wrappers import Inductor at import time), and wandb runs its code at its first use."""
    import subprocess
    import sys

    code = (
        "import sys, megafusion, megatron.core, megatron.core.jit as jit\n"
        "print(jit.jit_fuser is jit.noop_decorator, 'torch._inductor.compile_fx' in sys.modules,"
        " 'wandb.sdk' in sys.modules)\n"
        "import wandb\n"
        "print(callable(wandb.init), 'wandb.sdk' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "False", "False", "True", "True"], out.stdout + out.stderr[-2000:]
