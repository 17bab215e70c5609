"""Model FLOPs utilisation: achieved model FLOP/s per device over the device's peak.

The peak is the *dense* (no 2:4 sparsity) bf16 tensor-core throughput of one device, from the
vendor's data sheet, whatever ``model.params_dtype`` is. A device that is not in the table
(every CPU, any GPU not listed) gets no peak and no MFU, with a one-line explanation
(:func:`describe_peak`) instead of a silent guess; ``logging.peak_tflops`` supplies or
overrides the peak.

The achieved FLOPs are the model FLOPs of :func:`~megafusion.accounting.flops.batch_flops`, the
*active* ones: MoMa's experts on the tokens they take and its router, never every expert on every
token (the FLOPs a dense model of MoMa's total parameters would spend).
"""

from __future__ import annotations

import torch

# (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s). The first match wins, so
# variants come before the family name they contain ("H100 PCIe" before "H100").
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("A100-SXM4-80GB", 312.0),
    ("A100-SXM4-40GB", 312.0),
    ("A100-PCIE-40GB", 312.0),
    ("A100-PCIE-80GB", 312.0),
    ("A100 80GB PCIe", 312.0),
    ("A100-SXM-80GB", 312.0),
    ("A100", 312.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
)

OVERRIDE_KEY = "logging.peak_tflops"


def device_name(device=None) -> str:
    """A name to look up: ``torch.cuda.get_device_name`` for CUDA devices, else the device type.

    ``device`` may be a ``torch.device``, a device string (``"cuda:0"``, ``"cpu"``), a GPU name
    as printed by ``get_device_name`` (returned unchanged) or None (the current CUDA device when
    there is one, else ``"cpu"``).
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except (RuntimeError, ValueError):
            return device  # already a product name, e.g. "NVIDIA H100 80GB HBM3"
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def table_peak(name: str) -> float | None:
    """Dense bf16 TFLOP/s of the device called ``name`` from :data:`PEAK_TFLOPS`, or None."""
    lowered = name.lower()
    for pattern, peak in PEAK_TFLOPS:
        if pattern.lower() in lowered:
            return peak
    return None


def peak_tflops(device=None, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of one device: ``override`` (``logging.peak_tflops``) wins, then the
    table; None when neither applies (never a default)."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"{OVERRIDE_KEY}={override} must be > 0")
        return float(override)
    return table_peak(device_name(device))


def describe_peak(device=None, override: float | None = None) -> str:
    """One line to print once at start-up saying which peak MFU uses, or why there is no MFU."""
    name = device_name(device)
    if override is not None:
        return f"MFU against {float(override):g} TFLOP/s per device ({OVERRIDE_KEY}; device {name!r})"
    peak = table_peak(name)
    if peak is None:
        return f"MFU not reported: no peak for {name!r}; set {OVERRIDE_KEY}=<dense bf16 TFLOP/s of one device>"
    return f"MFU against {peak:g} TFLOP/s per device (dense bf16 peak of {name!r}; override with {OVERRIDE_KEY})"


def mfu(flops_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]-ish: achieved FLOP/s of one device / (peak TFLOP/s * 1e12)."""
    if peak is None:
        return None
    return flops_per_s_per_device / (peak * 1e12)
