"""Causal depthwise conv (width W) with causal-conv1d's seq_idx semantics, and its decoding step.

causal_conv1d(x [Bt, T, Cc], weight [Cc, W], bias [Cc] | None, *, seq_idx [Bt, T] | None,
              initial_state [Bt, Cc, W-1] | None, activation None | "silu", return_final_state)
    -> y [Bt, T, Cc] (, final_state [Bt, Cc, W-1] = the last W-1 inputs, before activation)
"""

from attamba.ops.conv.fast import causal_conv1d_fast, conv_step
from attamba.ops.conv.naive import causal_conv1d_naive

causal_conv1d = causal_conv1d_fast

__all__ = ["causal_conv1d", "causal_conv1d_fast", "causal_conv1d_naive", "conv_step"]
