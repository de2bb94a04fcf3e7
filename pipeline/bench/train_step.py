"""One training step of Attamba against the full-attention transformer of the same size, same run."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from attamba import costs
from attamba.model import AttambaLM
from attamba.presets import model_config

from pipeline.bench.attention import synchronize
from pipeline.bench.models import BenchModels
from pipeline.train.throughput import device_peak


class _Trainer:
    """One model, its optimizer and its data: `step()` runs and times one training step."""

    def __init__(self, model: AttambaLM, tokens: torch.Tensor, autocast: torch.dtype | None):
        self.model, self.tokens, self.autocast = model, tokens, autocast
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(self) -> tuple[float, float]:
        """Wall seconds and this process's CPU seconds of one step."""
        device = self.tokens.device
        synchronize(device)
        start, cpu = time.perf_counter(), time.process_time()
        with torch.autocast(device.type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = self.model(self.tokens[:, :-1], targets=self.tokens[:, 1:])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start, time.process_time() - cpu


@dataclass(frozen=True, kw_only=True)
class TrainStepBench(BenchModels):
    """What a training-step benchmark times: the two models (BenchModels, or the preset `size`'s dims), each
    stepping `repeats` times on one seeded batch of `batch` x `seq_len` tokens."""

    seq_len: int = 4096
    batch: int = 1
    repeats: int = 3
    size: str | None = None


def bench_train_step(bench: TrainStepBench, device: str = "cpu", autocast: torch.dtype | None = None) -> dict:
    """Step time of a `bench.dim` x `bench.n_layers` Attamba LM over the transformer's, measured in one run.

    The models step in turn; the ratio is the median of the `bench.repeats` per-pair ratios (wall clock; the
    same from process CPU time is attamba_over_transformer_cpu).

    Parameters stay float32; `autocast` (e.g. torch.bfloat16) runs the forward in mixed precision.
    `bench.size` (a preset such as "s125m") takes dim, n_layers and n_heads from the preset instead.
    Model FLOP/s (attamba.costs) of each, and MFU where the device's peak bf16 rate is known
    (pipeline.train.throughput).
    """
    seq_len, batch, size = bench.seq_len, bench.batch, bench.size
    common = dict(vocab_size=bench.vocab, max_seq_len=seq_len)
    if size is None:
        size, common = "small", dict(common, dim=bench.dim, n_layers=bench.n_layers, n_heads=bench.n_heads)
    configs = {
        "attamba": model_config(size, **common, chunk_size=bench.chunk_size, leading_tokens=bench.leading_tokens,
                                boundaries=bench.boundaries),
        "transformer": model_config(size, **common, attention="full"),
    }
    dim, n_layers, n_heads = configs["attamba"].dim, configs["attamba"].n_layers, configs["attamba"].n_heads
    tokens = torch.randint(0, bench.vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0)).to(device)
    result = {"size": size, "seq_len": seq_len, "chunk_size": bench.chunk_size, "leading_tokens": bench.leading_tokens,
              "dim": dim,
              "n_layers": n_layers, "n_heads": n_heads, "batch": batch, "threads": torch.get_num_threads(),
              "device": torch.cuda.get_device_name(tokens.device) if tokens.is_cuda else "cpu",
              "autocast": str(autocast).removeprefix("torch.") if autocast is not None else None}
    trainers = {name: _Trainer(AttambaLM(cfg).to(device).train(), tokens, autocast) for name, cfg in configs.items()}
    for trainer in trainers.values():  # warm-up: allocators, kernels, compilation on CUDA
        trainer.step()
    # Alternate the two models step by step: a machine whose speed drifts (shared CPUs, clocks) then slows
    # both alike, and each pair's ratio compares steps taken moments apart.
    times = {name: [] for name in trainers}
    cpu_times = {name: [] for name in trainers}
    for _ in range(bench.repeats):
        for name, trainer in trainers.items():
            wall, cpu = trainer.step()
            times[name].append(wall)
            cpu_times[name].append(cpu)
    peak = device_peak(tokens.device)
    result["peak_flops_per_s"] = peak
    for name, cfg in configs.items():
        result[f"{name}_step_s"] = statistics.median(times[name])
        result[f"{name}_step_cpu_s"] = statistics.median(cpu_times[name])
        result[f"{name}_params"] = costs.param_count(cfg, non_embedding=False)
        result[f"{name}_train_flops_per_token"] = costs.training_flops_per_token(cfg, seq_len)
        flops_per_s = result[f"{name}_train_flops_per_token"] * batch * seq_len / result[f"{name}_step_s"]
        result[f"{name}_flops_per_s"] = flops_per_s
        result[f"{name}_mfu"] = None if peak is None else flops_per_s / peak
    ratios = [a / t for a, t in zip(times["attamba"], times["transformer"])]
    result["attamba_over_transformer"] = statistics.median(ratios)
    result["pair_ratios"] = ratios
    # CPU seconds of the process (all its threads): a second reading, less moved by time the host gives
    # to other guests; the wall-clock ratio above is the figure the targets are stated in.
    result["attamba_over_transformer_cpu"] = statistics.median(
        a / t for a, t in zip(cpu_times["attamba"], cpu_times["transformer"]))
    return result
