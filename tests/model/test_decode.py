"""Step-by-step decoding through the cache against the parallel forward, and generation."""

import math

import pytest
import torch
import torch.nn.functional as F

from attamba.cache import decode_step, empty_cache, prefill
from attamba.generate import decode_logits, decode_perplexity, generate, sample
from attamba.model import AttambaLM
from attamba.ops import ssd
from tests.helpers import assert_close, errors
from tests.model.decode_models import CUDA_KINDS, VOCAB, small

TOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def model_of(**overrides):
    return AttambaLM(small(**overrides)).eval()


# P in {1, 3, 8} x L in {0, 2, 9} (cyclic: micro has 2 layers, so offsets differ per layer for P > 1),
# every other strategy and kind at least once.
VARIANTS = {f"cyclic-P{p}-L{l}": {"boundaries": "cyclic", "chunk_size": p, "leading_tokens": l}
            for p in (1, 3, 8) for l in (0, 2, 9)}
VARIANTS.update({
    "uniform-P8-L2": {"boundaries": "uniform", "chunk_size": 8, "leading_tokens": 2},
    "cyclic_released-P8-L0": {"boundaries": "cyclic_released", "chunk_size": 8, "leading_tokens": 0},
    "random-P3-L2": {"boundaries": "random", "chunk_size": 3, "leading_tokens": 2},
    "random-P8-L9": {"boundaries": "random", "chunk_size": 8, "leading_tokens": 9, "boundary_seed": 7},
    "pseudo-P8": {"pseudo_chunk": True, "chunk_size": 8},
    "kvproj-nores-P3-L2": {"kv_proj": True, "ssm_residual": False, "chunk_size": 3, "leading_tokens": 2},
    "full": {"attention": "full"},
    "swa-W5": {"attention": "swa", "window": 5},
    "iso_kv-F8": {"attention": "iso_kv", "kv_dim": 8},
    "iso_kv-F8-W5": {"attention": "iso_kv", "kv_dim": 8, "sliding_window": True, "window": 5},
})


@pytest.mark.parametrize("name", VARIANTS)
def test_decode_matches_parallel(name):
    model = model_of(**VARIANTS[name])
    tokens = torch.randint(0, VOCAB, (2, 72), generator=torch.Generator().manual_seed(1))
    parallel = model(tokens)
    for prefill_length in (0, 29):
        stepped = decode_logits(model, tokens, prefill_length)
        assert_close(f"prefill {prefill_length}", parallel, stepped, TOL)


def test_decode_long_sequence_many_chunks():
    model = AttambaLM(small(boundaries="cyclic", chunk_size=3, leading_tokens=2, max_seq_len=100)).eval()
    tokens = torch.randint(0, VOCAB, (1, 100), generator=torch.Generator().manual_seed(2))
    assert_close("logits", model(tokens), decode_logits(model, tokens, 7), TOL)


@pytest.mark.parametrize("overrides", [
    {"boundaries": "cyclic", "chunk_size": 3, "leading_tokens": 9},
    {"boundaries": "random", "chunk_size": 8, "leading_tokens": 2},
    {"attention": "swa", "window": 6},
])
def test_batch_of_uneven_prompts(overrides):
    model = model_of(**overrides)
    gen = torch.Generator().manual_seed(3)
    lengths, steps = (5, 17, 40), 23
    seqs = [torch.randint(0, VOCAB, (n + steps,), generator=gen) for n in lengths]
    cache, logits = prefill(model, [s[:n] for s, n in zip(seqs, lengths)])
    stepped = [[] for _ in seqs]
    for j in range(steps):
        tokens = torch.stack([s[n + j] for s, n in zip(seqs, lengths)])
        out = decode_step(model, cache, tokens)
        for i in range(len(seqs)):
            stepped[i].append(out[i])
    assert cache.positions().tolist() == [n + steps for n in lengths]
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        parallel = model(s[None])[0]
        assert_close(f"sequence {i} prefill", parallel[:n], logits[i], TOL)
        assert_close(f"sequence {i} steps", parallel[n:], torch.stack(stepped[i]), TOL)


def test_perplexity_through_decode_path_equals_parallel():
    model = model_of(boundaries="cyclic", chunk_size=8, leading_tokens=2)
    text = "Now is the winter of our discontent made glorious summer by this sun of York."
    tokens = torch.tensor([[b % VOCAB for b in text.encode()]])
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    assert math.isclose(decode_perplexity(model, tokens), math.exp(loss.item()), rel_tol=1e-4)


def test_offset_segmentation_is_refused():
    model = model_of(ssm_segmentation="offset", chunk_size=4)
    with pytest.raises(ValueError, match="ssm_segmentation"):
        empty_cache(model, 1)
    with pytest.raises(ValueError, match="ssm_segmentation"):
        generate(model, [[1, 2, 3]], 2)


def test_greedy_generation_follows_the_parallel_argmax():
    model = model_of(boundaries="cyclic", chunk_size=3, leading_tokens=2)
    prompts = [[5, 9, 1, 4, 4, 7, 2], [3, 8]]
    streamed = []
    out = generate(model, prompts, 12, stream=lambda i, t: streamed.append((i, t)))
    for i, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out[i] == seq[len(prompt):]
    assert sorted(streamed) == sorted((i, t) for i, o in enumerate(out) for t in o)
    assert [t for i, t in streamed if i == 0] == out[0]


def test_sampling_is_seeded_and_eos_stops():
    model = model_of(boundaries="uniform", chunk_size=3, leading_tokens=2)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    a = generate(model, prompts, 16, temperature=1.5, seed=11)
    b = generate(model, prompts, 16, temperature=1.5, seed=11)
    c = generate(model, prompts, 16, temperature=1.5, seed=12)
    assert a == b and a != c
    eos = a[0][3]
    stopped = generate(model, prompts, 16, temperature=1.5, seed=11, eos_id=eos)
    assert stopped[0] == a[0][: a[0].index(eos) + 1]
    assert generate(model, prompts, 10, temperature=1.0, top_k=1, seed=0) == generate(model, prompts, 10)


def test_sample_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits[:3]), torch.zeros(3, dtype=torch.int64))
    top_k = sample(logits, temperature=1.0, top_k=2, generator=gen)
    assert set(top_k.tolist()) == {0, 1}
    top_p = sample(logits, temperature=1.0, top_p=0.75, generator=gen)  # 0.5 + 0.3 reaches 0.75
    assert set(top_p.tolist()) == {0, 1}
    counts = torch.bincount(top_p, minlength=4).float() / len(top_p)
    assert abs(counts[0].item() - 0.5 / 0.8) < 0.03
    free = sample(logits, temperature=1.0, generator=gen)
    assert set(free.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, temperature=-1.0)


def test_sample_temperature_scales_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(6000, 3)
    gen = torch.Generator().manual_seed(1)
    freq = torch.bincount(sample(logits, temperature=2.0, generator=gen), minlength=3).float() / 6000
    expected = F.softmax(torch.tensor([2.0, 1.0, 0.0]) / 2.0, dim=0)
    assert_close("frequencies", expected, freq, 0.03)


def test_paired_step_equals_two_single_steps_and_sees_parameter_changes():
    from attamba.config import SSMConfig
    from attamba.ssm import ChunkSSM, paired_step

    torch.manual_seed(0)
    dim, batch = 16, 3
    cfg = SSMConfig(state_dim=4, inner_dim=16, heads=4).resolved(dim)
    ssm_k, ssm_v = ChunkSSM(dim, cfg), ChunkSSM(dim, cfg)
    for m in (ssm_k, ssm_v):
        m.reset_parameters(0.5)
    uk, uv = torch.randn(batch, dim), torch.randn(batch, dim)
    conv_shape, scan_shape = ssm_k.state_shapes(batch)
    conv, scan = torch.randn(2, *conv_shape), torch.randn(2, *scan_shape)

    def check():
        with torch.no_grad():
            yk, yv, conv2, scan2 = paired_step(ssm_k, ssm_v, uk, uv, conv, scan)
            k_ref = ssm_k.step(uk, conv[0], scan[0])
            v_ref = ssm_v.step(uv, conv[1], scan[1])
        names = ("k", "k conv state", "k scan state", "v", "v conv state", "v scan state")
        for name, got, ref in zip(names, (yk, conv2[0], scan2[0], yv, conv2[1], scan2[1]), (*k_ref, *v_ref)):
            assert_close(name, ref, got, 1e-6)

    check()
    with torch.no_grad():
        ssm_v.D.add_(0.5)          # in place: the stacked copy must follow
        ssm_k.A_log.mul_(1.1)
    check()


@pytest.mark.parametrize("name", ["cyclic-P3-L2", "full"])
def test_compiled_decoding_matches_parallel(name):
    """compile_decoding (torch.compile of each block's tensor work) gives the parallel forward's logits."""
    model = model_of(**VARIANTS[name]).compile_decoding()
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    for rows in (2, 1):  # one row: the weight products are ops.matvec's sums, fused by Inductor
        stepped = decode_logits(model, tokens[:rows], 11)
        assert_close(f"{rows} rows", model(tokens[:rows]), stepped, TOL)
    assert model.compile_decoding(False)._compiled_steps is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestDecodeOnCuda:
    @pytest.mark.parametrize("kind", [k for k in CUDA_KINDS if k != "attamba-offset"])  # offset: no decoding (tested)
    def test_decode_matches_parallel_on_cuda(self, kind, monkeypatch, cuda_backends):
        """Prefill through the fast kernels, then token-by-token decoding on the GPU: the parallel logits."""
        monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
        cuda_backends("auto", "triton" if ssd.triton_available() else "chunked")
        model = AttambaLM(small(**CUDA_KINDS[kind])).cuda().eval()
        tokens = torch.randint(0, model.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(2)).cuda()
        parallel = model(tokens)
        for prefill_length in (0, 37):
            stepped = decode_logits(model, tokens, prefill_length)
            print(f"\n{kind}: decode (prefill {prefill_length}) vs parallel max abs diff "
                  f"{errors(parallel, stepped)['abs']:.2e}")
            assert_close(f"prefill {prefill_length}", parallel, stepped, 1e-4)
