"""Multi-query associative recall (Zoology, Arora et al. 2023), as an evaluation probe.

A sequence of length T holds n key-value pairs `k1 v1 k2 v2 ... kn vn`, then filler, then the n keys
again in a shuffled order, each followed by its value: `q1 a1 q2 a2 ...`. The model is scored on
predicting each a_i at the position of q_i, which needs recall across the whole context: exactly what
compressing chunks of P tokens may lose. Keys and values come from disjoint id ranges of the vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100


def _ranges(vocab_size: int, n_pairs: int) -> tuple[range, range, int]:
    """Key ids, value ids (disjoint halves above a small reserved band), and the filler id."""
    low = min(8, vocab_size // 8)  # skip the lowest ids (often specials or control bytes)
    half = (vocab_size - low - 1) // 2
    if half < n_pairs:
        raise ValueError(f"eval.mqar_pairs={n_pairs} needs at least {2 * n_pairs + low + 1} vocabulary ids, "
                         f"the model has {vocab_size}; lower eval.mqar_pairs")
    return range(low, low + half), range(low + half, low + 2 * half), vocab_size - 1


def make_mqar(n_examples: int, seq_len: int, n_pairs: int, vocab_size: int, seed: int):
    """(inputs [N, T] int64, targets [N, T] int64 with IGNORE except at query positions, keys [N, n],
    values [N, n]). Deterministic for a given seed."""
    if 4 * n_pairs > seq_len:
        raise ValueError(f"MQAR with {n_pairs} pairs needs seq_len >= {4 * n_pairs}, got {seq_len}; "
                         f"lower eval.mqar_pairs or raise eval.mqar_lengths")
    keys_r, vals_r, filler = _ranges(vocab_size, n_pairs)
    rng = np.random.default_rng([seed, seq_len, n_pairs])
    inputs = np.full((n_examples, seq_len), filler, dtype=np.int64)
    targets = np.full((n_examples, seq_len), IGNORE, dtype=np.int64)
    keys = np.stack([rng.choice(len(keys_r), n_pairs, replace=False) for _ in range(n_examples)]) + keys_r.start
    values = rng.integers(vals_r.start, vals_r.stop, size=(n_examples, n_pairs))
    q0 = seq_len - 2 * n_pairs
    for i in range(n_examples):
        inputs[i, 0:2 * n_pairs:2], inputs[i, 1:2 * n_pairs:2] = keys[i], values[i]
        order = rng.permutation(n_pairs)
        inputs[i, q0::2], inputs[i, q0 + 1::2] = keys[i, order], values[i, order]
        targets[i, q0::2] = values[i, order]  # predicted at the query, i.e. the next token is the value
    return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(keys), torch.from_numpy(values)


def score(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of query positions (targets != IGNORE) where predictions [N, T] equal targets [N, T]."""
    mask = targets != IGNORE
    if not mask.any():
        raise ValueError("no query positions in targets")
    return float((predictions[mask] == targets[mask]).float().mean())


@torch.no_grad()
def mqar_accuracy(model, seq_len: int, n_pairs: int, n_examples: int, seed: int, batch_size: int = 8,
                  device="cpu") -> float:
    """Greedy recall accuracy of `model` on seeded MQAR sequences of length seq_len."""
    model.eval()
    inputs, targets, _, _ = make_mqar(n_examples, seq_len, n_pairs, model.config.vocab_size, seed)
    preds = torch.cat([model(inputs[i:i + batch_size].to(device)).argmax(-1).cpu()
                       for i in range(0, n_examples, batch_size)])
    return score(preds, targets)
