"""Model FLOP/s and MFU from tokens/s: the FLOPs per token, the peak-rate table and its override."""

from __future__ import annotations

import pytest
import torch

from attamba import boundaries as bnd
from attamba.model import AttambaLM
from attamba.ops.attention.mask import visible_keys
from attamba.presets import model_config
from pipeline import schema
from pipeline.train import throughput as tp


@pytest.mark.parametrize("name, entry", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090"),
])
def test_known_gpus_by_their_device_names(name, entry):
    found = tp.known_peak(name)
    assert found is not None and found[0] == entry and found[1] > 1e14


@pytest.mark.parametrize("name", ["NVIDIA L40S", "NVIDIA A10G", "Tesla T4", "cpu"])
def test_unknown_devices_have_no_peak(name):
    assert tp.known_peak(name) is None


def test_hopper_sxm_peak_is_the_dense_datasheet_figure():
    # Datasheets print 1979 TFLOPS bf16 "with sparsity"; dense is half.
    assert tp.known_peak("NVIDIA H100 80GB HBM3")[1] == pytest.approx(1979e12 / 2, rel=1e-3)
    assert tp.known_peak("NVIDIA H200")[1] == tp.known_peak("NVIDIA H100 80GB HBM3")[1]


def flops_per_token_by_hand(cfg, seq_len: int) -> float:
    """6 x the parameters a token multiplies (everything but the input embedding) + 3 x the forward
    attention scores (4 x attn_dim per visible key, averaged over the positions)."""
    model = AttambaLM(cfg)
    matmul = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
    if model.output is None:  # tied: the head reuses the embedding in a matmul
        matmul += model.embed.weight.numel()
    pos = torch.arange(seq_len)
    keys = 0
    for layer in range(cfg.n_layers):
        ends = bnd.chunk_ends(cfg.boundaries, cfg.chunk_size, layer, cfg.n_layers, pos, cfg.boundary_seed)
        keys += int(visible_keys(seq_len, bnd.visible_boundaries(ends, pos), cfg.leading_tokens).sum())
    return 6 * matmul + 3 * 4 * cfg.attn_dim * keys / seq_len


def test_flops_per_s_on_cpu_and_no_mfu(monkeypatch):
    monkeypatch.delenv(tp.PEAK_ENV, raising=False)
    cfg = model_config("micro", max_seq_len=256, attention="attamba", chunk_size=8, leading_tokens=7,
                       boundaries="cyclic")
    rates = tp.throughput(cfg, 256, devices=1, device=torch.device("cpu"))
    assert rates.flops_per_token == pytest.approx(flops_per_token_by_hand(cfg, 256), rel=1e-12)
    metrics = rates.metrics(1234.0)
    assert metrics == {schema.M_FLOPS_PER_S: pytest.approx(1234.0 * rates.flops_per_token, rel=1e-12)}


def test_override_gives_mfu_over_all_devices(monkeypatch):
    monkeypatch.setenv(tp.PEAK_ENV, "2.5e11")
    cfg = model_config("micro", max_seq_len=128, attention="full")
    rates = tp.throughput(cfg, 128, devices=2, device=torch.device("cpu"))
    metrics = rates.metrics(1000.0)
    assert metrics[schema.M_MFU] == pytest.approx(metrics[schema.M_FLOPS_PER_S] / 5e11, rel=1e-12)


@pytest.mark.parametrize("raw", ["fast", "0", "-1e12", "nan", "inf"])
def test_bad_override_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(tp.PEAK_ENV, raw)
    with pytest.raises(ValueError, match=tp.PEAK_ENV):
        tp.peak_override()


def test_devices_must_be_positive():
    with pytest.raises(ValueError, match="devices must be >= 1"):
        tp.throughput(model_config("micro"), 64, devices=0, device=torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_this_gpu_has_a_peak_or_is_named(monkeypatch):
    monkeypatch.delenv(tp.PEAK_ENV, raising=False)
    name = torch.cuda.get_device_name(0)
    peak = tp.device_peak(torch.device("cuda", 0))
    print(f"\n{name}: peak dense bf16 {peak}")
    if any(family in name for family in ("H100", "H200", "A100")):
        assert peak is not None


def test_bench_train_step_takes_a_size_preset_and_reports_flops(monkeypatch):
    from attamba import costs
    from pipeline.bench.train_step import TrainStepBench, bench_train_step

    monkeypatch.delenv(tp.PEAK_ENV, raising=False)
    row = bench_train_step(TrainStepBench(seq_len=32, vocab=97, repeats=1, size="micro", chunk_size=4,
                                          leading_tokens=3))
    assert (row["size"], row["dim"], row["n_layers"], row["n_heads"]) == ("micro", 32, 2, 2)
    for name, attention in (("attamba", "attamba"), ("transformer", "full")):
        cfg = model_config("micro", vocab_size=97, max_seq_len=32, attention=attention, chunk_size=4,
                           leading_tokens=3)
        assert row[f"{name}_train_flops_per_token"] == costs.training_flops_per_token(cfg, 32)
        assert row[f"{name}_flops_per_s"] == pytest.approx(
            row[f"{name}_train_flops_per_token"] * 32 / row[f"{name}_step_s"], rel=1e-12)
        assert row[f"{name}_mfu"] is None  # no known peak on a CPU


def test_bench_attention_names_its_fast_path_and_can_skip_the_reference():
    from pipeline.bench.attention import bench_attention

    row = bench_attention(128, chunk_size=8, leading_tokens=8, heads=2, head_dim=16, repeats=1, reference=False)
    assert row["fast_backend"] == "blocked" and row["reference_s"] is None and row["fast_over_reference"] is None
    assert row["fast_s"] > 0 and row["causal_sdpa_s"] > 0 and row["heads"] == 2
