"""Device copies of small host-side int tables (group offsets, weight offsets), made once.

The kernels read group boundaries and weight addresses from the device. Building those
tensors in every call would copy from pageable host memory each time, and such a copy waits
for the GPU; the tables repeat (every layer of a microbatch has the same group counts, and a
layer's weights do not move), so each distinct table is copied once, from pinned memory on
CUDA, and kept in a small LRU cache.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 512


def device_ints(values: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    key = (values, device, dtype)
    table = _CACHE.get(key)
    if table is None:
        host = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            host = host.pin_memory()
        table = _CACHE[key] = host.to(device, non_blocking=True)
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return table


def group_offsets(counts, device: torch.device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """``[0, c0, c0+c1, ...]`` (``G + 1`` entries) on ``device``."""
    ends, total = [0], 0
    for c in counts:
        total += int(c)
        ends.append(total)
    return device_ints(tuple(ends), device, dtype)
