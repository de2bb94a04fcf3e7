"""Checks against this machine: the device a run asks for, the CPUs and GPUs a local Ray would have, and
a lower bound of how long the planned training would take here."""

from __future__ import annotations

import os

from attamba import costs

DAY_S = 86_400
# FLOP/s assumed per GPU: above every dense bf16 peak in pipeline/train/throughput.py, and per CPU core: 64
# float32 FLOPs a cycle (two AVX-512 FMA units) at 4 GHz, above what any core sustains. So a time estimated
# from them is a lower bound of the real one, and no run is held back that could finish within the day.
GPU_FLOPS = 1e15
CPU_FLOPS_PER_CORE = 64 * 4e9


def cuda_devices() -> int:
    """CUDA GPUs visible to this process."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(field: str, device: str) -> None:
    """`device` (auto | cpu | cuda) can be had here."""
    if device == "cuda" and cuda_devices() == 0:
        raise ValueError(f"{field}=cuda but no CUDA GPU is visible on this machine; use {field}=cpu (or auto), "
                         f"or run where a GPU is")


def local_resources() -> dict:
    """What a local Ray started here would offer: {"CPU": cores, "GPU": GPUs} (Ray counts the same way or lower)."""
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(cuda_devices())}


def cpu_flops() -> float:
    """An upper bound of this machine's CPU FLOP/s: CPU_FLOPS_PER_CORE on every core. A measurement would
    be no bound: on a shared machine it reads several times low."""
    return CPU_FLOPS_PER_CORE * (os.cpu_count() or 1)


def training_flops(cfg, world: int = 1) -> tuple[int, float]:
    """(tokens, training FLOPs) of the RunConfig `cfg` trained to cfg.train.steps on `world` ranks."""
    tokens = cfg.train.steps * cfg.tokens_per_step(world)
    return tokens, float(tokens) * costs.training_flops_per_token(cfg.model, cfg.data.seq_len)


def check_duration(flops: float, tokens: int, *, gpu: bool, what: str, fix: str, yes: bool) -> None:
    """Refuse, unless `yes`, training that needs more than a day even at the most this machine can do
    (`cpu_flops`, or GPU_FLOPS per visible GPU)."""
    if yes:
        return
    if gpu:
        gpus = max(1, cuda_devices())
        rate, basis = GPU_FLOPS * gpus, f"{gpus} GPU(s) at {GPU_FLOPS:.0e} each, more than any sustains"
    else:
        rate, basis = cpu_flops(), (f"{os.cpu_count() or 1} CPU core(s) at {CPU_FLOPS_PER_CORE:.3g} each, more than "
                                    f"any sustains")
    seconds = flops / rate
    if seconds <= DAY_S:
        return
    days = seconds / DAY_S
    span = f"{days:,.0f} days" if days < 1e6 else f"{days:.2g} days"
    raise ValueError(f"{what}: {tokens:.3g} training tokens, {flops:.3g} FLOPs, at least {span} here at "
                     f"{rate:.3g} FLOP/s ({basis}); pass --yes to start it anyway, or {fix}")

