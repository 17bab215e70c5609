"""The part of megatron-core's import that megafusion skips: its ``torch.compile`` decorations.

``import megatron.core`` takes about 5 s on top of torch's 2 s on a 2-core CPU, paid by every
process a run or a test starts. ``megatron.core.jit`` sets ``jit_fuser = torch.compile``, and its
fusion modules decorate their functions with it at import, which imports ``torch._dynamo`` and
Inductor (~1.5-2 s). megafusion never calls those functions: the settings that select them
(``bias_activation_fusion``, ``bias_dropout_fusion``, ``apply_rope_fusion``, MoE expert bias, L2
norm, output gates) stay off, and its norms, activations and experts are its own. So on a machine
without CUDA (``torch.cuda.is_available()`` false when ``megatron.core.jit`` runs), right after
that module runs, megafusion calls megatron's own ``disable_jit_fuser()`` (``jit_fuser`` becomes
its ``noop_decorator``) before any fusion module reads it. With CUDA nothing changes.

(megatron-core also imports ``wandb``, ~1 s, only to know whether it is installed; a lazy module,
``importlib.util.LazyLoader``, does not help on Python 3.11: a second ``import wandb`` reads the
module's ``__spec__``, which loads it.)

:func:`install` adds one import hook for that one module name (``megafusion/__init__`` calls it;
it imports nothing itself). ``MEGAFUSION_EAGER_IMPORTS=1`` turns it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_JIT = "megatron.core.jit"


class _AfterJit(importlib.abc.Loader):
    """megatron.core.jit's own loader, then ``disable_jit_fuser()`` when there is no CUDA."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        import torch

        if not torch.cuda.is_available() and hasattr(module, "disable_jit_fuser"):
            module.disable_jit_fuser()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _JIT:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _AfterJit(spec.loader)
        return spec


def install() -> None:
    if os.environ.get("MEGAFUSION_EAGER_IMPORTS") == "1" or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
