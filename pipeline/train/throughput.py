"""Training throughput as model FLOP/s and MFU (model FLOPs utilisation) from measured tokens/s.

Model FLOPs per token come from attamba.costs (6 x matmul parameters plus the attention term from the
keys each query really sees, method.md section 5): the work the model needs, not what the kernels spend
(padding, masked blocks, recomputation do not count). MFU divides model FLOP/s by the peak dense bf16
rate of the devices that ran the step; it is logged only where that peak is known: a GPU in the table
below, or an override in ATTAMBA_PEAK_FLOPS (FLOP/s per device). CPU runs log FLOP/s alone.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from attamba import costs
from attamba.config import ModelConfig

from pipeline import schema

PEAK_ENV = "ATTAMBA_PEAK_FLOPS"

# Dense bf16 tensor-core peak, FLOP/s per device. Source: the vendor datasheet, dense (datasheets print
# the 2:4-sparsity figure first, twice these). First matching pattern wins, so variants come before
# their family. The A10G (AWS) has no NVIDIA datasheet: set ATTAMBA_PEAK_FLOPS there.
PEAK_BF16_FLOPS: tuple[tuple[str, str, float], ...] = (
    (r"H200.*NVL", "H200 NVL", 835.5e12),
    (r"H200", "H200 SXM", 989.5e12),
    (r"H100.*NVL", "H100 NVL", 835.5e12),
    (r"H100.*PCIe", "H100 PCIe", 756.5e12),
    (r"H100", "H100 SXM", 989.5e12),
    (r"A100", "A100", 312e12),
    (r"\bL4\b", "L4", 121e12),
    (r"RTX 4090", "GeForce RTX 4090", 165.2e12),  # Ada whitepaper: bf16 with fp32 accumulate
)


def known_peak(device_name: str) -> tuple[str, float] | None:
    """(table entry, peak FLOP/s) for a device name as torch.cuda.get_device_name gives it, or None."""
    for pattern, entry, peak in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return entry, peak
    return None


def peak_override() -> float | None:
    """ATTAMBA_PEAK_FLOPS as a float (FLOP/s per device), or None when unset."""
    raw = os.environ.get(PEAK_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{PEAK_ENV} must be a positive number of FLOP/s per device (e.g. 989.5e12), got {raw!r}")
    return value


def device_peak(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device: the override, else the table for a known GPU, else None."""
    override = peak_override()
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    found = known_peak(torch.cuda.get_device_name(device))
    return None if found is None else found[1]


@dataclass(frozen=True)
class Throughput:
    """What turns tokens/s (all ranks together) into model FLOP/s and MFU."""

    flops_per_token: float
    devices: int
    peak_per_device: float | None

    def metrics(self, tokens_per_s: float) -> dict[str, float]:
        flops_per_s = tokens_per_s * self.flops_per_token
        out = {schema.M_FLOPS_PER_S: flops_per_s}
        if self.peak_per_device is not None:
            out[schema.M_MFU] = flops_per_s / (self.peak_per_device * self.devices)
        return out


def throughput(model: ModelConfig, seq_len: int, devices: int, device: torch.device) -> Throughput:
    """For training `model` on sequences of seq_len tokens over `devices` devices like `device`."""
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    return Throughput(costs.training_flops_per_token(model, seq_len), devices, device_peak(device))
