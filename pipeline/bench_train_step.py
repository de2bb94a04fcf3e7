"""One training step of Attamba against the full-attention transformer of the same size, same run."""

from __future__ import annotations

import statistics
import time

import torch

from attamba import costs
from attamba.model import AttambaLM
from attamba.presets import model_config

from .bench_attention import synchronize


def _step_times(model: AttambaLM, tokens: torch.Tensor, repeats: int, autocast: torch.dtype | None) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    device = tokens.device
    for i in range(repeats + 1):  # the first step warms up allocators and kernels (and compiles on CUDA)
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return times


def bench_train_step(seq_len: int = 4096, chunk_size: int = 8, leading_tokens: int = 32, dim: int = 512,
                     n_layers: int = 4, n_heads: int = 8, vocab: int = 4096, batch: int = 1,
                     repeats: int = 3, boundaries: str = "cyclic", device: str = "cpu",
                     autocast: torch.dtype | None = None) -> dict:
    """Median step time of a `dim` x `n_layers` Attamba LM over the transformer's, measured in one run.

    Parameters stay float32; `autocast` (e.g. torch.bfloat16) runs the forward in mixed precision.
    """
    common = dict(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, max_seq_len=seq_len)
    configs = {
        "attamba": model_config("small", **common, chunk_size=chunk_size, leading_tokens=leading_tokens,
                                boundaries=boundaries),
        "transformer": model_config("small", **common, attention="full"),
    }
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0)).to(device)
    result = {"seq_len": seq_len, "chunk_size": chunk_size, "leading_tokens": leading_tokens, "dim": dim,
              "n_layers": n_layers, "n_heads": n_heads, "batch": batch, "threads": torch.get_num_threads(),
              "device": torch.cuda.get_device_name(tokens.device) if tokens.is_cuda else "cpu",
              "autocast": str(autocast).removeprefix("torch.") if autocast is not None else None}
    for name, cfg in configs.items():
        model = AttambaLM(cfg).to(device).train()
        times = _step_times(model, tokens, repeats, autocast)
        result[f"{name}_step_s"] = statistics.median(times)
        result[f"{name}_params"] = costs.param_count(cfg, non_embedding=False)
        result[f"{name}_train_flops_per_token"] = costs.training_flops_per_token(cfg, seq_len)
        del model
    result["attamba_over_transformer"] = result["attamba_step_s"] / result["transformer_step_s"]
    return result
