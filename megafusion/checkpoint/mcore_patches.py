"""The megatron-core 0.16.1 workarounds that checkpoint loading needs, in one place.

Each one is a bug or assumption of megatron-core 0.16.1 found by megafusion's resume tests
(torch's Adam, i.e. without Apex / Transformer Engine, as on CPU); with Apex / TE they change
nothing. They were written against that version only: ``check_version`` refuses any other
with the fix, so an upgrade is a deliberate act (re-run tests/checkpoint/test_resume.py, then
add the version to ``TESTED``).
"""

from __future__ import annotations

import os

import torch

from megafusion.core.errors import CheckpointError

TESTED = ("0.16.1",)
ALLOW_ENV = "MEGAFUSION_ALLOW_UNTESTED_MCORE"


def check_version() -> None:
    from megatron.core.package_info import __version__

    if __version__ not in TESTED and os.environ.get(ALLOW_ENV) != "1":
        raise CheckpointError(
            f"megatron-core {__version__} is installed, but megafusion's checkpoint workarounds "
            f"(megafusion/checkpoint/mcore_patches.py) are tested with {', '.join(TESTED)} only: "
            f"pip install megatron-core=={TESTED[-1]}, or set {ALLOW_ENV}=1 to try anyway (then check that "
            f"tests/checkpoint/test_resume.py passes)"
        )


def loading_state_dict(build_state, optimizer) -> dict:
    """``build_state()`` (the sharded state dict to load into) with a fresh distributed optimizer.

    Without Apex / Transformer Engine the DistributedOptimizer's ``state_dict()`` asserts that all
    parameter states share one ``step``, and a fresh optimizer has none. Give them a temporary
    ``step`` while the state dict is built, then remove it: ``load_state_dict`` restores the
    checkpoint's step and refuses extra keys.
    """
    primed = []
    for torch_opt in _torch_adams(optimizer):
        for group in torch_opt.param_groups:
            for p in group["params"]:
                state = torch_opt.state[p]
                if "step" not in state:
                    # The moments as megatron's init_state_fn makes them (it skips non-empty states).
                    state.setdefault("exp_avg", torch.zeros_like(p.data))
                    state.setdefault("exp_avg_sq", torch.zeros_like(p.data))
                    state["step"] = torch.tensor(0.0)
                    primed.append(state)
    state = build_state()
    for param_state in primed:
        del param_state["step"]
    return state


def keep_step_on_fully_reshardable_load() -> None:
    """Loading ``fully_reshardable`` optimizer state: with torch's Adam every parameter's state
    holds a ``step``, which the checkpoint stores once, not per tensor; ``load_state_dict``
    restores it first and then ``_set_main_param_and_optimizer_states`` looks for it among each
    parameter's tensors (KeyError). Keep the restored value instead. Installed once."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_megafusion_patched", False):
        return

    def set_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    set_states._megafusion_patched = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def unshare_adam_steps(optimizer) -> None:
    """megatron-core restores torch Adam's ``step`` as *one* tensor shared by all parameter
    states; Adam increments it in place once per parameter, so the bias correction after a
    resume would be wrong. Give every parameter its own ``step`` tensor."""
    for torch_opt in _torch_adams(optimizer):
        for state in torch_opt.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


def _torch_adams(optimizer):
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if type(inner).__name__ == "DistributedOptimizer" and isinstance(torch_opt, torch.optim.Adam):
            yield torch_opt


def no_writer_manager() -> None:
    """Keep megatron-core's checkpoint writer from starting a multiprocessing ``Manager``.

    ``filesystem_async._get_write_results_queue`` creates, on the first save, a queue served by a
    spawned ``Manager`` process (and multiprocessing's resource tracker): two processes that a
    run killed by a signal leaves running forever. Saves here are synchronous, so the queue only
    carries the write results from the save function back to the same process, which reads it at
    once with ``get_nowait``: a thread queue does that (a multiprocessing queue's feeder thread
    may not have delivered the item yet). Idempotent."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
