"""megafusion: Megatron-style distributed pretraining for mixed-modal early-fusion models.

Packages by layer, lowest first (each imports only from the ones below it; the contract is
``.importlinter``): core; config; runtime, ops; layers; models; objectives; data; accounting;
training, inference, evaluation, interop, planning; commands. See docs/architecture.md.
"""

import warnings

__version__ = "0.1.0"

# megatron-core warns at import time, once per module, that Transformer Engine / Apex are
# missing and it falls back to torch. That is the expected state on CPU and says nothing
# about the run; the training banner states which kernels are in use instead.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")
warnings.filterwarnings("ignore", message=r"full scope is deprecated")
# megatron-core 0.16 dist_checkpointing still calls torch's deprecated ShardedTensor /
# load_state_dict APIs on every load; nothing a user can act on (it is megatron's to move).
warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating ShardedTensor")
warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated", category=FutureWarning)

# Two parts of megatron-core's import that do nothing for megafusion are skipped (~2-3 s per process;
# megafusion/core/lazy_imports.py says which and why).
from megafusion.core import lazy_imports as _lazy_imports  # noqa: E402

_lazy_imports.install()
