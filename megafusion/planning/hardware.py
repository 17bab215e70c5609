"""The GPUs ``megafusion plan`` knows: peak dense bf16 FLOP/s, HBM, link bandwidths.

Every number is a vendor data-sheet figure (per GPU, one direction for links) and every one is
overridable on the command line (``megafusion plan --peak-tflops / --gpu-memory /
--nvlink-gbps / --nodes-bandwidth / --hbm-gbps``), and the plan prints the ones it used.

- peak: dense (no 2:4 sparsity) bf16 tensor-core TFLOP/s, the same table as MFU
  (:data:`megafusion.accounting.mfu.PEAK_TFLOPS`): A100 SXM 312, H100 SXM5 989, H200 SXM 989.
- hbm_gb: A100 80 GB, H100 80 GB, H200 141 GB; hbm_gbps (GB/s): 2039, 3350, 4800
  (NVIDIA A100 / H100 / H200 data sheets).
- nvlink_gbps: per GPU and direction, half the data sheet's bidirectional total: A100 NVLink 3
  600 GB/s -> 300; H100 / H200 NVLink 4 900 GB/s -> 450.
- nodes_gbps: one NIC per GPU, the usual DGX / HGX fabric: A100 HDR InfiniBand 200 Gb/s = 25
  GB/s; H100 / H200 NDR 400 Gb/s = 50 GB/s.
- gpus_per_node: 8 (DGX / HGX).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from megafusion.core.errors import UsageError


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float  # dense bf16 per GPU
    hbm_gb: float  # memory per GPU (GB = 1e9 bytes)
    hbm_gbps: float  # HBM bandwidth, GB/s
    nvlink_gbps: float  # per GPU, one direction, GB/s
    nodes_gbps: float  # inter-node per GPU, one direction, GB/s
    gpus_per_node: int = 8

    def as_dict(self) -> dict:
        return asdict(self)


GPUS: dict[str, Hardware] = {
    "a100": Hardware("a100", peak_tflops=312.0, hbm_gb=80.0, hbm_gbps=2039.0, nvlink_gbps=300.0, nodes_gbps=25.0),
    "h100": Hardware("h100", peak_tflops=989.0, hbm_gb=80.0, hbm_gbps=3350.0, nvlink_gbps=450.0, nodes_gbps=50.0),
    "h200": Hardware("h200", peak_tflops=989.0, hbm_gb=141.0, hbm_gbps=4800.0, nvlink_gbps=450.0, nodes_gbps=50.0),
}


# The `megafusion plan` flag that overrides each field (named in messages).
FLAGS = {
    "peak_tflops": "--peak-tflops",
    "hbm_gb": "--gpu-memory",
    "hbm_gbps": "--hbm-gbps",
    "nvlink_gbps": "--nvlink-gbps",
    "nodes_gbps": "--nodes-bandwidth",
    "gpus_per_node": "--gpus-per-node",
}


def hardware(name: str, **overrides) -> Hardware:
    """The table's entry for ``name`` with any non-None ``overrides`` (field name -> value)."""
    key = name.lower()
    if key not in GPUS:
        raise UsageError(f"--gpu {name}: unknown GPU; choose one of {', '.join(GPUS)} (and override its numbers)")
    given = {k: v for k, v in overrides.items() if v is not None}
    for k, v in given.items():
        if not v > 0:
            raise UsageError(
                f"{FLAGS[k]} {v:g}: must be > 0 (the {GPUS[key].name} table's value: {getattr(GPUS[key], k):g})"
            )
    return replace(GPUS[key], **given)
