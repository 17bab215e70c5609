"""What a real run holds, measured: bytes of the DDP parameter / gradient buffers and of the
optimizer states on this rank, and the peak bytes of activations saved for backward.

The planner's memory model (:mod:`megafusion.planning.memory`) is checked against these.

- :func:`state_bytes` walks the DDP chunks and the (distributed) optimizer of this rank:
  ``params`` (the model's parameter storage: DDP's ``param_data`` buffer with the distributed
  optimizer, else every parameter's own tensor), ``grads`` (DDP's ``grad_data`` buffers, padding
  included), ``optimizer`` (fp32 main copies that the optimizer allocated, never views of the
  model's own fp32 parameters, plus Adam's ``exp_avg`` / ``exp_avg_sq``). Adam's scalar ``step``
  counters (4 bytes per tensor) are left out on both sides.
- :class:`SavedActivations`: a ``torch.autograd.graph.saved_tensors_hooks`` context. Every tensor
  autograd saves is counted once per storage (views of one storage share it), parameters
  excluded, from when it is saved until autograd drops it; ``peak`` is the most bytes alive at
  once, i.e. over a pipeline schedule the microbatches in flight on this rank.
"""

from __future__ import annotations

import torch


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def state_bytes(model_chunks, optimizer) -> dict[str, int]:
    """``params``, ``grads``, ``optimizer`` bytes this rank allocated (see the module docstring)."""
    params = grads = 0
    param_storages: set[tuple[int, int]] = set()
    for chunk in model_chunks:
        for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
            grads += buffer.grad_data.numel() * buffer.grad_data.element_size()
        for p in chunk.parameters():
            param_storages.add(_storage_key(p.data))
    for _data_ptr, nbytes in param_storages:
        params += nbytes
    opt = 0
    seen: set[tuple[int, int]] = set()
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = inner.optimizer
        for group in torch_opt.param_groups:
            for p in group["params"]:
                key = _storage_key(p)
                # A main param is a copy when its storage is not the model's parameter storage.
                if key not in param_storages and key not in seen:
                    seen.add(key)
                    opt += p.numel() * p.element_size()
                for name in ("exp_avg", "exp_avg_sq"):
                    state = torch_opt.state.get(p, {}).get(name)
                    if state is not None:
                        opt += state.numel() * state.element_size()
    return {"params": params, "grads": grads, "optimizer": opt}


class _Saved:
    """What the pack hook returns: holds the tensor; its release is autograd dropping it."""

    __slots__ = ("tensor", "owner", "key")

    def __init__(self, tensor, owner, key):
        self.tensor, self.owner, self.key = tensor, owner, key

    def __del__(self):
        self.owner._release(self.key)


class SavedActivations:
    """``with SavedActivations(params) as s: ...``; then ``s.peak`` (bytes) and ``s.live``."""

    def __init__(self, parameters=()):
        self.exclude = {_storage_key(p.data) for p in parameters}
        self.refs: dict[tuple[int, int], int] = {}
        self.live = 0
        self.peak = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key in self.exclude or key[1] == 0:
            return t
        if self.refs.get(key, 0) == 0:
            self.live += key[1]
            self.peak = max(self.peak, self.live)
        self.refs[key] = self.refs.get(key, 0) + 1
        return _Saved(t, self, key)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= key[1]

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
