"""Decoding benchmark: Attamba against the full transformer of the same dims, cache bytes and tokens/s.

Both models decode through attamba.cache: the transformer keeps every position in one preallocated K/V
buffer per layer and attends with SDPA over it (a standard KV cache); Attamba keeps its boundary store,
its L+1 window and its SSM states. Cache bytes are measured (bytes of the storages held) right after the
prefill, before `reserve` makes room for the decoded tokens, and set against attamba.costs.

    python -m pipeline.bench.decode 1024 4096 16384
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import dataclass

import torch

from attamba import costs
from attamba.cache import decode_step, prefill
from attamba.model import AttambaLM, can_compile_decoding
from attamba.presets import model_config

from pipeline.bench.models import BenchModels

_BLOCK = 8  # decoding steps timed per turn


class _Decoder:
    """One model with its prefilled cache; `block(n)` times n greedy decoding steps."""

    def __init__(self, model, prompts: list[torch.Tensor], new_tokens: int):
        self.model = model
        start = time.perf_counter()
        self.cache, logits = prefill(model, prompts)
        self.prefill_s = time.perf_counter() - start
        self.cache_bytes = self.cache.nbytes()  # before `reserve` makes room for the decoded tokens
        self.cache.reserve(new_tokens + 2)
        self.tokens = torch.stack([out[-1] for out in logits]).argmax(-1)
        self.block(2)  # warm-up steps (and compilation), not timed

    def block(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.tokens = decode_step(self.model, self.cache, self.tokens).argmax(-1)
        return time.perf_counter() - start


@dataclass(frozen=True, kw_only=True)
class DecodeBench(BenchModels):
    """What a decoding benchmark feeds the two models (BenchModels): `batch` random prompts of `context` tokens
    (seeded by `seed`) and `new_tokens` greedy steps."""

    context: int
    new_tokens: int = 64
    batch: int = 1
    seed: int = 0


@torch.no_grad()
def bench_decode(bench: DecodeBench, threads: int | None = None, compile: bool | None = None) -> dict:
    """Prefill `bench.context` random tokens per sequence into each model, then time `bench.new_tokens` greedy
    steps.

    Returns per-model prefill seconds, measured and analytic cache bytes (all sequences, after the prefill),
    decode tokens/s, and the Attamba / transformer ratios cache_bytes_ratio, analytic_cache_bytes_ratio
    and decode_speedup (the median over blocks of 8 steps, taken in turn by the two models, of Attamba's
    tokens/s over the transformer's; block_speedups lists them). threads sets torch's intra-op threads
    for the run (restored after): on a loaded shared machine a second thread mostly spins. compile: both
    models decode through AttambaLM.compile_decoding (torch.compile of each block's tensor work and of the
    output head; the compilation happens during the untimed warm-up); None (the default) compiles where a
    C++ compiler is found, as a deployment would, and falls back to eager if compiling fails
    (`compiled` in the result says which ran, `compile_error` why it fell back).
    """
    auto = compile is None
    compile = can_compile_decoding() if auto else compile
    if bench.context < 1 or bench.new_tokens < 1 or bench.batch < 1:
        raise ValueError(f"context, new_tokens and batch must be >= 1, got {bench.context}, {bench.new_tokens}, "
                         f"{bench.batch}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _compare(bench, compile, auto)
    finally:
        torch.set_num_threads(previous_threads)


def _compare(bench: DecodeBench, compile: bool, auto: bool) -> dict:
    context, new_tokens, batch, vocab = bench.context, bench.new_tokens, bench.batch, bench.vocab
    common = dict(dim=bench.dim, n_layers=bench.n_layers, n_heads=bench.n_heads, vocab_size=vocab,
                  max_seq_len=context + new_tokens + 2, seed=bench.seed)
    configs = {
        "attamba": model_config("s60m", attention="attamba", chunk_size=bench.chunk_size,
                                leading_tokens=bench.leading_tokens, boundaries=bench.boundaries, **common),
        "full": model_config("s60m", attention="full", **common),
    }
    gen = torch.Generator().manual_seed(bench.seed)
    prompts = [torch.randint(0, vocab, (context,), generator=gen) for _ in range(batch)]
    result: dict = {"context": context, "batch": batch, "chunk_size": bench.chunk_size,
                    "leading_tokens": bench.leading_tokens, "dim": bench.dim, "n_layers": bench.n_layers,
                    "new_tokens": new_tokens, "threads": torch.get_num_threads(), "compiled": compile}
    try:
        decoders = {name: _Decoder(AttambaLM(cfg).eval().compile_decoding(compile), prompts, new_tokens)
                    for name, cfg in configs.items()}
    except Exception as exc:  # Inductor's errors (a compiler without Python's headers, say) are plain Exceptions
        if not (compile and auto):
            raise
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        warnings.warn(f"torch.compile failed ({first_line}); measuring both models eager instead", stacklevel=2)
        result.update(compiled=False, compile_error=first_line)
        decoders = {name: _Decoder(AttambaLM(cfg).eval(), prompts, new_tokens) for name, cfg in configs.items()}
    # The models decode in turn, BLOCK tokens at a time: a shared machine's drifting speed then slows both
    # alike, and the speedup is the median over blocks of the per-block ratio.
    seconds = {name: [] for name in decoders}
    for start in range(0, new_tokens, _BLOCK):
        for name, decoder in decoders.items():
            seconds[name].append(decoder.block(min(_BLOCK, new_tokens - start)))
    for name, cfg in configs.items():
        decoder = decoders[name]
        result[f"{name}_prefill_s"] = decoder.prefill_s
        result[f"{name}_cache_bytes"] = decoder.cache_bytes
        result[f"{name}_analytic_cache_bytes"] = batch * costs.kv_cache_bytes(cfg, context)
        result[f"{name}_decode_tokens_per_s"] = batch * new_tokens / sum(seconds[name])
    result["block_speedups"] = [f / a for a, f in zip(seconds["attamba"], seconds["full"])]
    result["cache_bytes_ratio"] = result["attamba_cache_bytes"] / result["full_cache_bytes"]
    result["analytic_cache_bytes_ratio"] = result["attamba_analytic_cache_bytes"] / result["full_analytic_cache_bytes"]
    result["decode_speedup"] = statistics.median(result["block_speedups"])
    return result


_COLUMNS = ("context", "threads", "compiled", "attamba_prefill_s", "full_prefill_s", "attamba_cache_bytes",
            "full_cache_bytes", "cache_bytes_ratio", "analytic_cache_bytes_ratio", "attamba_decode_tokens_per_s",
            "full_decode_tokens_per_s", "decode_speedup")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contexts", type=int, nargs="+")
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--leading-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="decode through torch.compile, both models (default: where a C++ compiler is found)")
    args = parser.parse_args(argv)
    print(" | ".join(_COLUMNS))
    for context in args.contexts:
        bench = DecodeBench(context=context, chunk_size=args.chunk_size, leading_tokens=args.leading_tokens,
                            new_tokens=args.new_tokens,
                            batch=args.batch)
        row = bench_decode(bench, threads=args.threads, compile=args.compile)
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in _COLUMNS), flush=True)


if __name__ == "__main__":
    main()
