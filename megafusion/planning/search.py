"""The layouts ``megafusion plan`` compares: every combination that ``config.validate`` accepts.

For ``N`` GPUs it tries TP in the divisors of N up to a node's GPUs (TP across nodes is never a
good idea and the launch plan warns about it), SP on and off (TP > 1), PP in the divisors of N
and of the layer count, VPP 1 and every chunk count that divides the layers per stage (PP > 1),
EP in the divisors of the expert count (``model.arch=moma``), the distributed optimizer on and
off (DP x CP > 1: it shards over both), ``train.recompute`` none / selective / full, micro-batch
sizes 1, 2, 4, 8 and the context-parallel sizes it is given (CP; :mod:`megafusion.planning.plan`
says which it tries); DP is what is left, ``N / (TP CP PP)``. A combination is kept when
``validate(cfg, N)`` raises nothing.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

from megafusion.config import ConfigError, validate
from megafusion.config.checks import divisors
from megafusion.core.choices import RECOMPUTE_MODES

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
    cp: int = 1

    def apply(self, cfg):
        """A copy of ``cfg`` with this layout: new ``parallel`` and ``train`` sections, the others shared
        (nothing downstream writes to them; a deep copy per candidate layout was a fifth of the plan's time)."""
        out = copy.copy(cfg)
        out.parallel, out.train = copy.copy(cfg.parallel), copy.copy(cfg.train)
        p = out.parallel
        p.tp, p.sp, p.pp, p.ep, p.cp = self.tp, self.sp, self.pp, self.ep, self.cp
        p.vpp = self.vpp if self.vpp > 1 else None
        p.distributed_optimizer = self.distributed_optimizer
        out.train.recompute = self.recompute
        out.train.micro_batch_size = self.micro_batch_size
        return out

    def label(self) -> str:
        return (
            f"tp{self.tp}{'+sp' if self.sp else ''}{f' cp{self.cp}' if self.cp > 1 else ''} "
            f"pp{self.pp}{f'x{self.vpp}' if self.vpp > 1 else ''} dp{self.dp}{f' ep{self.ep}' if self.ep > 1 else ''}"
        )


def layouts(
    cfg, world_size: int, gpus_per_node: int = 8, recompute=None, micro_batch_sizes=None, cp_sizes=(1,)
) -> list[Layout]:
    """Every layout of ``cfg`` on ``world_size`` GPUs that validates (see the module docstring), for
    each context-parallel size in ``cp_sizes``."""
    from megafusion.accounting.params import layer_costs

    # parallel.ep splits every expert layer's experts evenly: it divides each layer's count.
    expert_counts = [cost.experts for cost in layer_costs(cfg) if cost.experts]
    experts = math.gcd(*expert_counts) if expert_counts else None
    layers = cfg.model.num_layers
    modes = tuple(recompute or RECOMPUTE_MODES)
    sizes = tuple(micro_batch_sizes or MICRO_BATCH_SIZES)
    found = []
    for cp, tp, pp in itertools.product(cp_sizes, divisors(world_size), divisors(world_size)):
        if tp > gpus_per_node or world_size % (tp * pp * cp) or layers % pp:
            continue
        dp = world_size // (tp * pp * cp)
        vpps = [1] + ([v for v in divisors(layers // pp) if v > 1] if pp > 1 else [])
        # Expert-parallel groups are carved out of TP x CP x DP (megatron's expert rank generator).
        eps = [e for e in divisors(experts) if (tp * cp * dp) % e == 0] if experts is not None else [1]
        for sp, vpp, ep, dist_opt, mode, mbs in itertools.product(
            (False, True) if tp > 1 else (False,), vpps, eps, (False, True) if dp * cp > 1 else (False,), modes, sizes
        ):
            layout = Layout(tp, sp, pp, vpp, dp, ep, dist_opt, mode, mbs, cp)
            try:
                validate(layout.apply(cfg), world_size)
            except ConfigError:
                continue
            found.append(layout)
    return found
