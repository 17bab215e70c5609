"""The layouts ``megafusion plan`` compares: every combination that ``config.validate`` accepts.

For ``N`` GPUs it tries TP in the divisors of N up to a node's GPUs (TP across nodes is never a
good idea and the launch plan warns about it), SP on and off (TP > 1), PP in the divisors of N
and of the layer count, VPP 1 and every chunk count that divides the layers per stage (PP > 1),
EP in the divisors of the expert count (``model.arch=moma``), the distributed optimizer on and
off (DP > 1), ``train.recompute`` none / selective / full and micro-batch sizes 1, 2, 4, 8; DP is
what is left, ``N / (TP PP)``. A combination is kept when ``validate(cfg, N)`` raises nothing.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

from megafusion.config import ConfigError, validate
from megafusion.core.choices import RECOMPUTE_MODES
from megafusion.core.numbers import divisors

MICRO_BATCH_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Layout:
    tp: int
    sp: bool
    pp: int
    vpp: int
    dp: int
    ep: int
    distributed_optimizer: bool
    recompute: str
    micro_batch_size: int

    def apply(self, cfg):
        """A copy of ``cfg`` with this layout: new ``parallel`` and ``train`` sections, the others shared
        (nothing downstream writes to them; a deep copy per candidate layout was a fifth of the plan's time)."""
        out = copy.copy(cfg)
        out.parallel, out.train = copy.copy(cfg.parallel), copy.copy(cfg.train)
        p = out.parallel
        p.tp, p.sp, p.pp, p.ep = self.tp, self.sp, self.pp, self.ep
        p.vpp = self.vpp if self.vpp > 1 else None
        p.distributed_optimizer = self.distributed_optimizer
        out.train.recompute = self.recompute
        out.train.micro_batch_size = self.micro_batch_size
        return out

    def label(self) -> str:
        return (
            f"tp{self.tp}{'+sp' if self.sp else ''} pp{self.pp}{f'x{self.vpp}' if self.vpp > 1 else ''} "
            f"dp{self.dp}{f' ep{self.ep}' if self.ep > 1 else ''}"
        )


def layouts(cfg, world_size: int, gpus_per_node: int = 8, recompute=None, micro_batch_sizes=None) -> list[Layout]:
    """Every layout of ``cfg`` on ``world_size`` GPUs that validates (see the module docstring)."""
    from megafusion.models.registry import get_family

    experts = get_family(cfg.model.arch).experts(cfg)
    layers = cfg.model.num_layers
    modes = tuple(recompute or RECOMPUTE_MODES)
    sizes = tuple(micro_batch_sizes or MICRO_BATCH_SIZES)
    found = []
    for tp, pp in itertools.product(divisors(world_size), divisors(world_size)):
        if tp > gpus_per_node or world_size % (tp * pp) or layers % pp:
            continue
        dp = world_size // (tp * pp)
        vpps = [1] + ([v for v in divisors(layers // pp) if v > 1] if pp > 1 else [])
        eps = [e for e in divisors(experts.total) if (tp * dp) % e == 0] if experts is not None else [1]
        for sp, vpp, ep, dist_opt, mode, mbs in itertools.product(
            (False, True) if tp > 1 else (False,), vpps, eps, (False, True) if dp > 1 else (False,), modes, sizes
        ):
            layout = Layout(tp, sp, pp, vpp, dp, ep, dist_opt, mode, mbs)
            try:
                validate(layout.apply(cfg), world_size)
            except ConfigError:
                continue
            found.append(layout)
    return found
