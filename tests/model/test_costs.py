"""The analytic costs against measurement: bytes held by the decoding cache, attention FLOPs counted."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attamba.ops.attention as attention_ops
from attamba import costs
from attamba.cache import decode_step, empty_cache, prefill
from attamba.model import AttambaLM
from attamba.config import SSMConfig
from attamba.presets import model_config
from tests.model.decode_models import VOCAB, small



@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


KINDS = {
    "cyclic-P3-L2": {"boundaries": "cyclic", "chunk_size": 3, "leading_tokens": 2},
    "uniform-P8-L9": {"boundaries": "uniform", "chunk_size": 8, "leading_tokens": 9},
    "random-P3-L0": {"boundaries": "random", "chunk_size": 3, "leading_tokens": 0},
    "pseudo-P4": {"pseudo_chunk": True, "chunk_size": 4},
    "full": {"attention": "full"},
    "swa-W5": {"attention": "swa", "window": 5},
    "iso_kv-F8": {"attention": "iso_kv", "kv_dim": 8},
}


@pytest.mark.parametrize("name", KINDS)
def test_cache_bytes_equal_the_formula_while_decoding(name):
    cfg = small(**KINDS[name])
    model = AttambaLM(cfg).eval()
    tokens = torch.randint(0, VOCAB, (1, 50), generator=torch.Generator().manual_seed(0))
    cache = empty_cache(model, 1)
    assert cache.nbytes() == costs.kv_cache_bytes(cfg, 0)
    for t in range(tokens.shape[1]):
        decode_step(model, cache, tokens[:, t])
        assert cache.nbytes() == costs.kv_cache_bytes(cfg, t + 1), f"after {t + 1} tokens"


@pytest.mark.parametrize("name", ["cyclic-P3-L2", "uniform-P8-L9", "full", "swa-W5"])
def test_cache_bytes_after_prefill_and_reserve(name):
    cfg = small(**KINDS[name])
    model = AttambaLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    for length in (1, 2, 3, 10, 11, 37):
        cache, _ = prefill(model, [torch.randint(0, VOCAB, (length,), generator=gen)])
        assert cache.nbytes() == costs.kv_cache_bytes(cfg, length), f"prefill {length}"
        # reserve allocates exactly what the next tokens will use, so the count is exact again after them
        cache.reserve(13)
        assert cache.nbytes() == costs.kv_cache_bytes(cfg, length + 13)
        for _ in range(13):
            decode_step(model, cache, torch.randint(0, VOCAB, (1,), generator=gen))
        assert cache.nbytes() == costs.kv_cache_bytes(cfg, length + 13)


def test_batch_cache_bytes_are_the_sum_over_sequences():
    cfg = small(**KINDS["random-P3-L0"])
    model = AttambaLM(cfg).eval()
    lengths = (4, 19, 33)
    cache, _ = prefill(model, [torch.randint(0, VOCAB, (n,)) for n in lengths])
    assert cache.nbytes() == sum(costs.kv_cache_bytes(cfg, n) for n in lengths)
    for step in range(1, 8):
        decode_step(model, cache, torch.randint(0, VOCAB, (3,)))
        assert cache.nbytes() == sum(costs.kv_cache_bytes(cfg, n + step) for n in lengths)


def test_attamba_cache_grows_one_boundary_every_chunk():
    p, lead = 8, 9
    cfg = small(boundaries="uniform", chunk_size=p, leading_tokens=lead)
    model = AttambaLM(cfg).eval()
    cache = empty_cache(model, 1)
    entry = cfg.n_layers * 2 * cfg.attn_dim * 4  # one boundary's K and V in every layer, float32
    sizes, stored = [], []
    for _ in range(80):
        decode_step(model, cache, torch.randint(0, VOCAB, (1,)))
        sizes.append(cache.nbytes())
        stored.append(cache.layers[0].stored_boundaries(0))
    for t in range(lead + 1, 80 - p):  # sizes[i] is after i + 1 tokens; the window is full from L + 1
        assert sizes[t + p] - sizes[t] == entry
    # the store holds the sink and every chunk end that left the window: (T - L - 1) // P boundaries, plus 0
    assert stored[-1] == 1 + (80 - lead - 1) // p
    assert all(b - a in (0, 1) for a, b in zip(stored, stored[1:]))


def _attention_op_flops(counter: FlopCounterMode, n_layers: int) -> int:
    """FLOPs counted inside each layer's attention module but outside its sub-modules (projections, SSMs)."""
    counts = counter.get_flop_counts()
    total = 0
    for layer in range(n_layers):
        name = f"AttambaLM.layers.{layer}.attn"
        own = sum(counts[name].values())
        children = [k for k in counts if k.startswith(name + ".") and k.count(".") == name.count(".") + 1]
        total += own - sum(sum(counts[c].values()) for c in children)
    return total


@pytest.fixture
def flop_model():
    ssm = SSMConfig(state_dim=8, inner_dim=32, heads=2, scan_chunk=8)
    cfg = model_config("micro", dim=64, n_heads=4, vocab_size=VOCAB, max_seq_len=2048, ssm=ssm,
                       boundaries="cyclic", chunk_size=8, leading_tokens=32)
    return cfg, AttambaLM(cfg).eval()


def _count(model, seq_len: int):
    tokens = torch.randint(0, VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens)
    return counter


def test_fast_prefill_attention_flops_match_the_formula(flop_model, monkeypatch):
    cfg, model = flop_model
    seq_len = 2048
    monkeypatch.setattr(attention_ops, "DEFAULT_BACKEND", "auto")
    counter = _count(model, seq_len)
    measured = _attention_op_flops(counter, cfg.n_layers)
    expected = costs.attention_flops(cfg, seq_len)["prefill"]
    assert abs(measured - expected) <= 0.10 * expected, f"measured {measured}, formula {expected}"
    # the count comes from SDPA kernels (the formulas registered for the CPU flash op), not from nothing
    ops = {str(op) for op in counter.get_flop_counts()["AttambaLM.layers.0.attn"]}
    assert any("scaled_dot_product" in op for op in ops)


def test_naive_backend_shows_the_full_square(flop_model, monkeypatch):
    cfg, model = flop_model
    seq_len = 2048
    monkeypatch.setattr(attention_ops, "DEFAULT_BACKEND", "naive")
    measured = _attention_op_flops(_count(model, seq_len), cfg.n_layers)
    square = 4 * cfg.attn_dim * seq_len * seq_len * cfg.n_layers
    assert abs(measured - square) <= 0.01 * square
    assert measured > 5 * costs.attention_flops(cfg, seq_len)["prefill"]


def test_causal_transformer_attention_flops_match_the_formula(monkeypatch):
    cfg = model_config("micro", dim=64, n_heads=4, vocab_size=VOCAB, max_seq_len=1024, attention="full")
    monkeypatch.setattr(attention_ops, "DEFAULT_BACKEND", "auto")
    measured = _attention_op_flops(_count(AttambaLM(cfg).eval(), 1024), cfg.n_layers)
    expected = costs.attention_flops(cfg, 1024)["prefill"]
    assert abs(measured - expected) <= 0.01 * expected
