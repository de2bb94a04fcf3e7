"""Models shared by the decoding, cost and CUDA tests."""

from attamba.config import SSMConfig
from attamba.presets import model_config

VOCAB = 61

# The model kinds compared on a CUDA GPU: fast kernels against the references, and decoding.
CUDA_KINDS = {
    "attamba-cyclic": dict(attention="attamba", chunk_size=8, leading_tokens=7, boundaries="cyclic"),
    "attamba-random": dict(attention="attamba", chunk_size=4, leading_tokens=3, boundaries="random"),
    "attamba-offset": dict(attention="attamba", chunk_size=8, leading_tokens=5, ssm_segmentation="offset"),
    "full": dict(attention="full"),
    "swa": dict(attention="swa", window=16),
    "iso_kv": dict(attention="iso_kv", kv_dim=32),
}


def small(**overrides):
    # Slow decay, large steps and a wider init make the SSM states matter at the 1e-4 tolerance,
    # so a state carried across a chunk start (or wrongly dropped) shows in the logits.
    ssm = SSMConfig(state_dim=8, inner_dim=32, heads=2, scan_chunk=8, a_init_min=0.05, a_init_max=0.5,
                    dt_min=0.1, dt_max=1.0)
    return model_config("micro", **{"vocab_size": VOCAB, "max_seq_len": 128, "ssm": ssm,
                                    "init_std": 0.1, **overrides})


