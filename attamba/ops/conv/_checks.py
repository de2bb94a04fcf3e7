"""Input checks shared by the causal conv implementations."""

ACTIVATIONS = (None, "silu")


def check_conv_inputs(x, weight, bias, seq_idx, initial_state, activation):
    if x.dim() != 3:
        raise ValueError(f"x must be [Bt, T, Cc], got shape {tuple(x.shape)}")
    bt, t, cc = x.shape
    if weight.dim() != 2 or weight.shape[0] != cc or weight.shape[1] < 1:
        raise ValueError(f"weight must be [Cc, W] with Cc={cc}, W >= 1, got {tuple(weight.shape)}")
    w = weight.shape[1]
    if bias is not None and bias.shape != (cc,):
        raise ValueError(f"bias must be [Cc] = {(cc,)} or None, got {tuple(bias.shape)}")
    if seq_idx is not None and seq_idx.shape != (bt, t):
        raise ValueError(f"seq_idx must be [Bt, T] = {(bt, t)}, got {tuple(seq_idx.shape)}")
    if initial_state is not None and initial_state.shape != (bt, cc, w - 1):
        raise ValueError(f"initial_state must be [Bt, Cc, W-1] = {(bt, cc, w - 1)}, got {tuple(initial_state.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
