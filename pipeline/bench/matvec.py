"""Single-row weight products (decoding at batch 1): F.linear against ops.matvec, eager and compiled.

Each shape cycles through enough distinct weights (`sweep_bytes`, more than the last-level cache) that every
product reads its weight from memory, as a decoding step does; bandwidth is weight bytes over seconds.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from attamba.model import can_compile_decoding
from attamba.ops.matvec import matvec

# The products of one decoding step of the benchmarked model (dim 512, FFN 1408, SSM in_proj 584 rows,
# out_proj 256 columns, vocabulary 4096).
SHAPES = ((512, 512), (584, 512), (512, 256), (2816, 512), (512, 1408), (4096, 512))


def _seconds(fn, x, weights, rounds: int) -> float:
    """Median over rounds of the mean seconds per product, one round = one pass over all weights."""
    for w in weights[:2]:
        fn(x, w)  # warm-up (and compilation)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for w in weights:
            fn(x, w)
        times.append((time.perf_counter() - start) / len(weights))
    return statistics.median(times)


@torch.no_grad()
def bench_matvec(shapes=SHAPES, sweep_bytes: int = 256 << 20, rounds: int = 5, compile: bool | None = None) -> dict:
    """GB/s per shape of F.linear, matvec and (where a C++ compiler is found) torch.compile'd matvec, and the
    median over shapes of linear's time over each (`matvec_speedup`, `compiled_matvec_speedup`)."""
    if rounds < 1 or sweep_bytes < 1:
        raise ValueError(f"rounds and sweep_bytes must be >= 1, got {rounds}, {sweep_bytes}")
    compile = can_compile_decoding() if compile is None else compile
    fns = {"linear": F.linear, "matvec": matvec}
    if compile:
        fns["compiled_matvec"] = torch.compile(matvec, dynamic=False)
    result: dict = {"threads": torch.get_num_threads(), "compiled": compile, "shapes": []}
    gen = torch.Generator().manual_seed(0)
    for out_dim, in_dim in shapes:
        nbytes = out_dim * in_dim * 4
        weights = [torch.randn(out_dim, in_dim, generator=gen) for _ in range(max(4, sweep_bytes // nbytes))]
        x = torch.randn(1, in_dim, generator=gen)
        row = {"shape": [out_dim, in_dim]}
        for name, fn in fns.items():
            row[f"{name}_gb_per_s"] = nbytes / _seconds(fn, x, weights, rounds) / 1e9
        result["shapes"].append(row)
        del weights
    for name in fns:
        if name != "linear":
            result[f"{name}_speedup"] = statistics.median(
                r[f"{name}_gb_per_s"] / r["linear_gb_per_s"] for r in result["shapes"])
    return result
