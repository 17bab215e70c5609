"""Runtime: device/backend choice, process groups (incl. the pipeline stage channel), CPU compatibility layer,
seeding."""

from megafusion.runtime.distributed import Runtime, initialize, shutdown
from megafusion.runtime.seed import seed_everything

__all__ = ["Runtime", "initialize", "shutdown", "seed_everything"]
