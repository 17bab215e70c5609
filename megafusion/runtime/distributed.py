"""Device and backend choice, process-group setup through megatron-core, and teardown.

``initialize(cfg)`` is the one entry point: it picks CUDA + NCCL when a GPU is present and
CPU + gloo otherwise (installing :mod:`megafusion.runtime.cpu_compat` in that case), starts
``torch.distributed`` from torchrun's environment variables (or as a single process when
they are absent), and creates megatron-core's tensor / pipeline / virtual-pipeline /
context / expert / data-parallel groups, plus, for ``objective.patchify=unet`` with
``parallel.pp > 1``, the first-to-last-stage channel (``megafusion.runtime.stage_channel``).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megafusion.runtime import stage_channel


@dataclass(frozen=True)
class Runtime:
    """Where this process runs and which coordinates it holds in the parallel layout."""

    device: torch.device
    backend: str
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp: int
    pp: int
    dp: int
    vpp: int | None

    @property
    def is_logging_rank(self) -> bool:
        """The last global rank holds the last pipeline stage, where the loss is known."""
        return self.rank == self.world_size - 1


def init_process_group() -> tuple[str, torch.device]:
    """Start torch.distributed from torchrun's env (or alone) on the right backend."""
    use_cuda = torch.cuda.is_available()
    # megatron-core overlaps tensor-parallel communication with compute only when CUDA runs
    # one hardware queue; it must be set before the CUDA context exists (harmless on CPU).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if not use_cuda:
        from megafusion.runtime import cpu_compat

        cpu_compat.enable()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=10)
        if "RANK" in os.environ:  # torchrun (or srun + torchrun) set up the rendezvous
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # a plain `python -m megafusion.commands.train`: one process, an in-memory store.
            # No TCP port: picking a free one and binding it later races with other processes on
            # the host. The environment is left alone, so child processes inherit no rendezvous.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return backend, device


def initialize(cfg) -> Runtime:
    """Create the process groups for ``cfg.parallel``; the config must be validated already."""
    from megatron.core import parallel_state as ps

    backend, device = init_process_group()
    par = cfg.parallel
    vpp = par.vpp if par.vpp and par.vpp > 1 else None
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=par.cp,
        expert_model_parallel_size=par.ep,
        # Whole experts on every rank (no expert tensor parallelism): expert parallelism then spans
        # the tensor- and data-parallel ranks, megatron-core's usual layout for many small experts.
        expert_tensor_parallel_size=1,
    )
    stage_channel.close_channel()  # a model that needs it opens it at build (models.build)
    return Runtime(
        device=device,
        backend=backend,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp=par.tp,
        pp=par.pp,
        dp=ps.get_data_parallel_world_size(),
        vpp=vpp,
    )


_HOST_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def host_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A gloo group over ``group``'s ranks, for exchanging host-side ints (created on first use by
    the members only, so it may be called from inside a model's forward; cached)."""
    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks not in _HOST_GROUPS:
        _HOST_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
    return _HOST_GROUPS[ranks]


def all_gather_host_ints(values: list[int], group: dist.ProcessGroup) -> list[list[int]]:
    """Every member's ``values`` (same length everywhere), in ``group``'s rank order, on the host:
    a gloo all-gather, so it never touches (or waits for) an accelerator."""
    if dist.get_world_size(group) == 1:
        return [list(values)]
    mine = torch.tensor([dist.get_rank(group), *values], dtype=torch.int64)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=host_group(group))
    ordered = sorted(row.tolist() for row in rows)  # by the sender's rank in ``group``
    return [row[1:] for row in ordered]


def shutdown() -> None:
    """Tear down megatron-core's groups and the default group (safe to call twice)."""
    from megatron.core import parallel_state as ps

    stage_channel.close_channel()
    _HOST_GROUPS.clear()
    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
