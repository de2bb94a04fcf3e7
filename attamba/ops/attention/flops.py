"""FLOP formulas for the CPU flash-attention ops, which torch.utils.flop_counter does not count by itself.

Without them FlopCounterMode reports zero attention FLOPs for every SDPA call on CPU (dense-mask, causal
and the blocked fast path alike). Counts follow torch's own CUDA formulas: 4*B*H*Lq*Lk*D forward and
2.5x that backward, i.e. every query-key pair a kernel multiplies, masked or not. One exception:
is_causal=True counts only the Lq*(Lq+1)/2 (Lq == Lk) pairs the kernel computes, so a causal transformer is
charged its visible keys, as docs/method.md section 5 asks, not the full square.
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter

_aten = torch.ops.aten


def _causal_fraction(query_shape, key_shape, is_causal: bool) -> float:
    q_len, k_len = query_shape[-2], key_shape[-2]
    if not is_causal or q_len != k_len:
        return 1.0
    return (q_len + 1) / (2 * q_len)


def _forward(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    full = flop_counter.sdpa_flop_count(query, key, value)
    return int(full * _causal_fraction(query, key, is_causal))


def _backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *args,
              out_shape=None, **kwargs) -> int:
    full = flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)
    return int(full * _causal_fraction(query, key, is_causal))


def register() -> None:
    """Register the formulas once; later calls (or a torch that already counts these ops) change nothing."""
    for op, formula in (
        (_aten._scaled_dot_product_flash_attention_for_cpu, _forward),
        (_aten._scaled_dot_product_flash_attention_for_cpu_backward, _backward),
    ):
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)
