"""CPU compatibility layer: lets megatron-core's CUDA-only code paths run on CPU + gloo.

megatron-core 0.16 assumes CUDA in a handful of places that have nothing to do with the
maths: tensors created with ``device="cuda"`` or ``torch.cuda.current_device()``
(pipeline schedules, p2p receive buffers, the global memory buffer used by sequence
parallel, DDP grad buffers, grad clipping), ``torch.cuda.Stream`` / ``Event`` objects
for overlapping communication, and ``param.type() == 'torch.cuda.FloatTensor'`` checks
in the (distributed) optimizer. None of these change results; they only pin storage.

``enable()`` is called by :mod:`megafusion.runtime.distributed` only when CUDA is not
available, and patches exactly this:

1. a ``TorchFunctionMode`` that rewrites ``device="cuda"`` / integer devices in factory
   functions and ``.to(...)`` to the CPU, makes ``Tensor.cuda()`` a no-op, and answers
   ``Tensor.type()`` (no arguments) with the ``torch.cuda.*`` name of the same dtype, so
   that the optimizer's dtype dispatch takes its fp32/bf16 branches;
2. ``torch.cuda.current_device`` returns the CPU device; ``torch.cuda.Stream`` /
   ``Event`` / ``stream`` / ``default_stream`` / ``current_stream`` / ``synchronize`` become
   no-op stand-ins (everything on CPU is synchronous);
3. megatron's MoE all-to-all dispatcher hands its split sizes to ``all_to_all_single`` through
   ``maybe_move_tensor_to_cpu(..., as_numpy=True)``, which converts CUDA tensors only; CPU
   tensors are converted here too (``all_to_all_single`` refuses tensor split sizes);
4. the CUDA generator calls (``torch.cuda.get_rng_state`` / ``set_rng_state`` /
   ``manual_seed`` and megatron's ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``) act on
   the CPU generator, so megatron's RNG tracker works: sequence parallelism and dropout
   fork it to give each tensor-parallel rank its own stream, exactly as on a GPU.

On a machine with CUDA nothing here runs, so GPU behaviour is untouched.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: TorchFunctionMode | None = None
_CPU = torch.device("cpu")


def _to_cpu_device(device):
    """Map anything that names a CUDA device (or a bare GPU index) to the CPU device."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CudaOnCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU; see the module docstring for why."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            # The optimizer dispatches on these names; the dtype part is what matters.
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        return func(*args, **kwargs)


class _NoOpStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _NoOpEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NoOpEvent:
    """Stand-in for ``torch.cuda.Event``."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def enable() -> None:
    """Install the CPU stand-ins (idempotent). Refuses to run where CUDA exists."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megafusion.runtime.cpu_compat must not be enabled on a CUDA machine")
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpEvent
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.default_stream = lambda device=None: _NoOpStream()
    cuda.current_stream = lambda device=None: _NoOpStream()
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.manual_seed = torch.manual_seed
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    from megatron.core.transformer.moe import token_dispatcher

    moved = token_dispatcher.maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = lambda tensor, as_numpy=False, record_stream=False: (
        tensor.numpy()
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda
        else moved(tensor, as_numpy, record_stream)
    )
    _MODE = _CudaOnCpuMode()
    _MODE.__enter__()
    _ENABLED = True


def is_enabled() -> bool:
    return _ENABLED
