"""Timing of Attamba attention, forward + backward: dense-mask reference, fast path, causal SDPA."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from attamba.ops.attention import attention, resolve_backend, visible_keys


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock intervals measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_step(fn, inputs, repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of forward + backward after one warm-up.

    CPU seconds are reported too because wall time on a shared machine mostly measures the neighbours.
    On CUDA the first call also compiles kernels (FlexAttention, Triton); it is the warm-up.
    """
    walls, cpus = [], []
    device = inputs[0].device
    for i in range(repeats + 1):
        for x in inputs:
            x.grad = None
        synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        synchronize(device)
        if i > 0:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def bench_attention(
    seq_len: int,
    chunk_size: int = 8,
    leading_tokens: int = 32,
    heads: int = 8,
    head_dim: int = 64,
    batch: int = 1,
    repeats: int = 3,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    reference: bool = True,
) -> dict:
    """Seconds per forward+backward at q, k, v of shape [batch, heads, seq_len, head_dim].

    Uniform boundaries (chunk ends P-1, 2P-1, ... and the sink at 0). Reference = dense T x T mask;
    fast = the backend "auto" picks (fast_backend: "blocked" on CPU, "flex" on CUDA); causal_sdpa =
    SDPA(is_causal=True), what a transformer pays. reference=False skips the dense reference (its T x T
    mask is the largest thing here at long T); its figures are then None.
    """
    if seq_len < 1 or chunk_size < 1 or repeats < 1:
        raise ValueError(
            f"seq_len, chunk_size and repeats must be >= 1, got {seq_len}, {chunk_size}, {repeats}"
        )
    pos = torch.arange(seq_len)
    boundaries = pos % chunk_size == chunk_size - 1
    boundaries[0] = True
    boundaries = boundaries.to(device)
    gen = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(batch, heads, seq_len, head_dim, generator=gen, dtype=dtype).to(device).requires_grad_()
        for _ in range(3)
    ]

    def run(backend):
        return lambda q, k, v: attention(
            q, k, v, boundaries=boundaries, leading_tokens=leading_tokens, backend=backend
        )

    reference_s = reference_cpu_s = None
    if reference:
        reference_s, reference_cpu_s = _time_step(run("naive"), inputs, repeats)
    fast_s, fast_cpu_s = _time_step(run(None), inputs, repeats)
    causal_s, causal_cpu_s = _time_step(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), inputs, repeats
    )
    visible = int(visible_keys(seq_len, boundaries.cpu(), leading_tokens).sum())
    return {
        "seq_len": seq_len,
        "chunk_size": chunk_size,
        "leading_tokens": leading_tokens,
        "batch": batch,
        "heads": heads,
        "head_dim": head_dim,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if inputs[0].is_cuda else "cpu",
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "fast_backend": resolve_backend(None, inputs[0].device, full_causal=False),
        "reference_s": reference_s,
        "fast_s": fast_s,
        "fast_over_reference": None if reference_s is None else fast_s / reference_s,
        "causal_sdpa_s": causal_s,
        "fast_over_causal_sdpa": fast_s / causal_s,
        "reference_cpu_s": reference_cpu_s,
        "fast_cpu_s": fast_cpu_s,
        "causal_sdpa_cpu_s": causal_cpu_s,
        "fast_over_reference_cpu": None if reference_cpu_s is None else fast_cpu_s / reference_cpu_s,
        "visible_keys": visible,
        "flop_ratio_vs_dense": visible / (seq_len * seq_len),
        "flop_ratio_vs_causal": visible / (seq_len * (seq_len + 1) / 2),
    }
