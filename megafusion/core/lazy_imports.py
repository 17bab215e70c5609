"""Two parts of megatron-core's import that megafusion skips: its ``torch.compile`` decorations on a
CPU machine, and loading ``wandb`` before a run asks for it.

``import megatron.core`` takes about 5 s on top of torch's 2 s on a 2-core CPU, paid by every
process a run or a test starts. Of that:

- ``megatron.core.jit`` sets ``jit_fuser = torch.compile``, and its fusion modules decorate their
  functions with it at import, which imports Inductor (~1-2 s). megafusion never calls those
  functions: the settings that select them (``bias_activation_fusion``, ``bias_dropout_fusion``,
  ``apply_rope_fusion``, MoE expert bias, L2 norm, output gates) stay off, and its norms,
  activations and experts are its own. So on a machine without CUDA (``torch.cuda.is_available()``
  false when ``megatron.core.jit`` runs), right after that module runs, megafusion calls
  megatron's own ``disable_jit_fuser()`` (``jit_fuser`` becomes its ``noop_decorator``) before any
  fusion module reads it. With CUDA nothing changes.
- three megatron-core modules ``import wandb`` (~1 s) only to know that it is installed. ``wandb``
  is imported as a module whose code runs at the first access of a name it does not define yet
  (``wandb.init``, ...): the import machinery's own reads (``__spec__``, ``__path__``) do not
  load it, which is why the standard library's ``LazyLoader`` (any attribute) does not serve on
  Python 3.11. A run with ``logging.wandb=true`` loads it at ``wandb.init`` as before.

:func:`install` adds one import hook for exactly these two module names (``megafusion/__init__``
calls it; it imports nothing itself). ``MEGAFUSION_EAGER_IMPORTS=1`` turns it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

_JIT, _WANDB = "megatron.core.jit", "wandb"


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


class _Deferred(types.ModuleType):
    """A module whose code runs at the first access of a name it does not have yet."""

    def __getattr__(self, name):
        loader = self.__dict__.pop("_megafusion_loader", None)
        if loader is None:  # loaded (or loading): a name it really does not have
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        self.__class__ = types.ModuleType
        loader.exec_module(self)
        return getattr(self, name)


class _OnFirstUse(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return _Deferred(spec.name)

    def exec_module(self, module):
        module.__dict__["_megafusion_loader"] = self.loader


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in (_JIT, _WANDB):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = (_AfterJit if name == _JIT else _OnFirstUse)(spec.loader)
        return spec


def install() -> None:
    if os.environ.get("MEGAFUSION_EAGER_IMPORTS") == "1" or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
