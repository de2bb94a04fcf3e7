"""Multi-query associative recall (MQAR; Zoology, Arora et al. 2023, `multiquery_ar`): seeded sequences.

One sequence of T tokens with n key-value pairs:

    positions 0 .. 2n-1     k_1 v_1 k_2 v_2 ... k_n v_n            (the context)
    position 2n + 2 g_i     k_i again, as a query                   (each key exactly once)
    every other position    a random filler token

The gaps g_1..g_n are drawn without replacement from {0, ..., (T - 2n) / 2 - 1} with
p(g) proportional to (g + 1)^(a - 1), a = power_a (Zoology's 0.01: most queries come soon after the context,
some far), then given to the keys in a random order. The target at a query's position is its key's value,
every other target is IGNORE: the answer is a label only. Fillers come from the key and value bands
without the sequence's own keys and values, so after the context no value appears as an input and no key
except as its one query. Keys and values are drawn without replacement from disjoint bands above a small
reserved band of low ids (specials of a text tokenizer, when a language model is probed).

What a model cannot use. The layout this replaced wrote each answer after its query (`q1 a1 q2 a2 ...`),
so predicting uniformly among the context's values not yet answered scored 1/n, 1/(n-1), ..., 1 at the n
query slots (52% at n=4) without binding a key to its value. Here the inputs after the context never hold
a value, so a model that does not bind keys to values is at 1/n. Zoology gives the gaps to the keys in
context order, so the first key tends to be queried first (28% for guessing "the t-th query asks the
t-th key" at T=64, n=4, against 25%); the random assignment makes query order uninformative.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

IGNORE = -100
POWER_A = 0.01     # Zoology's default
# Bumped whenever the sequences a given seed produces change: a checkpoint trained on another format is
# not resumed (its data position would continue on other sequences).
FORMAT = 1


class MQAR(NamedTuple):
    """A batch of MQAR sequences; n = pairs, all int64."""

    inputs: torch.Tensor      # [N, T] token ids
    targets: torch.Tensor     # [N, T] the value at each query's position, IGNORE elsewhere
    keys: torch.Tensor        # [N, n] in context order: keys[:, i] sits at position 2i
    values: torch.Tensor      # [N, n] values[:, i] (at position 2i + 1) belongs to keys[:, i]
    positions: torch.Tensor   # [N, n] where keys[:, i] is queried
    distances: torch.Tensor   # [N, n] positions - 2i: tokens from a key in the context to its query


def reserved_ids(vocab_size: int) -> int:
    """How many low ids (specials of text tokenizers) are never keys, values or fillers."""
    return min(8, vocab_size // 8)


def bands(vocab_size: int) -> tuple[range, range]:
    """(key ids, value ids): disjoint halves of the ids above the reserved band."""
    low = reserved_ids(vocab_size)
    half = (vocab_size - low) // 2
    return range(low, low + half), range(low + half, vocab_size)


def min_vocab_size(n_pairs: int) -> int:
    """The smallest vocabulary holding n_pairs keys, n_pairs values and at least one filler id."""
    v = 2 * n_pairs + 1
    while v - reserved_ids(v) < 2 * n_pairs + 1:
        v += 1
    return v


def check_sizes(seq_len, n_pairs, vocab_size, power_a=POWER_A, *, names=("seq_len", "n_pairs", "vocab_size",
                                                                           "power_a")) -> None:
    """ValueError (one line, naming the field by `names`, the value and the fix) unless sequences of
    seq_len tokens with n_pairs pairs over vocab_size ids can be made: the context (2n tokens) and n
    queries at distinct even positions after it need seq_len >= 4n; n keys, n values and a filler need
    min_vocab_size(n) ids."""
    seq_name, pairs_name, vocab_name, power_name = names
    for name, value in ((seq_name, seq_len), (pairs_name, n_pairs), (vocab_name, vocab_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not 0 < power_a < float("inf"):
        raise ValueError(f"{power_name} must be a finite number > 0, got {power_a!r}; Zoology uses 0.01 "
                         f"(p(gap) proportional to gap^(a-1): small a puts most queries right after the context)")
    if seq_len < 4 * n_pairs:
        raise ValueError(f"{seq_name} must be >= {4 * n_pairs} for MQAR with {pairs_name}={n_pairs} (2 tokens per "
                         f"pair, then each key queried at its own even position), got {seq_len}; raise {seq_name} "
                         f"or lower {pairs_name}")
    need = min_vocab_size(n_pairs)
    if vocab_size < need:
        raise ValueError(f"{vocab_name} must be >= {need} for MQAR with {pairs_name}={n_pairs} (reserved low ids, "
                         f"{n_pairs} keys, {n_pairs} values and a filler), got {vocab_size}; raise {vocab_name} "
                         f"or lower {pairs_name}")


def _entropy(seed) -> list[int]:
    """numpy's seed entropy from an int or a sequence of ints (negative ones wrapped, numpy refuses them)."""
    items = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
    return [int(s) % 2**64 for s in items]


def _gaps(rng: np.random.Generator, n_examples: int, space: int, n_pairs: int, power_a: float) -> np.ndarray:
    """[N, n] distinct gaps in [0, space) drawn without replacement with p(g) ~ (g + 1)^(a - 1).

    Gumbel top-k: the n largest of log p(g) + Gumbel noise are, in order, a draw of n items without
    replacement with probabilities p (the law of numpy's sequential choice(replace=False, p=p))."""
    log_p = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
    scores = log_p - np.log(-np.log(rng.random((n_examples, space))))
    return np.argsort(-scores, axis=1, kind="stable")[:, :n_pairs]


def _draw_distinct(rng: np.random.Generator, n_examples: int, band: range, k: int) -> np.ndarray:
    """[N, k] ids of `band`, distinct within each row, uniformly drawn."""
    return np.argsort(rng.random((n_examples, len(band))), axis=1)[:, :k] + band.start


def make_mqar(n_examples: int, seq_len: int, n_pairs: int, vocab_size: int, seed,
              power_a: float = POWER_A) -> MQAR:
    """n_examples sequences (module docstring) of seq_len tokens with n_pairs pairs over vocab_size ids.

    seed: an int or a sequence of ints (e.g. (seed, stream, step, rank)); the result is a pure function
    of the arguments."""
    check_sizes(seq_len, n_pairs, vocab_size, power_a)
    if not isinstance(n_examples, (int, np.integer)) or n_examples < 1:
        raise ValueError(f"n_examples must be an integer >= 1, got {n_examples!r}")
    rng = np.random.default_rng(_entropy(seed))
    n, ctx = n_pairs, 2 * n_pairs
    key_band, value_band = bands(vocab_size)
    keys = _draw_distinct(rng, n_examples, key_band, n)
    values = _draw_distinct(rng, n_examples, value_band, n)
    gaps = _gaps(rng, n_examples, (seq_len - ctx) // 2, n, power_a)
    # Zoology gives the i-th gap drawn to the i-th key; a random assignment keeps query order uninformative
    gaps = np.take_along_axis(gaps, np.argsort(rng.random((n_examples, n)), axis=1), axis=1)
    positions = ctx + 2 * gaps
    # Fillers: uniform over the key and value bands without this sequence's keys and values. Draw an index
    # among the allowed ids, then step over each excluded id (ascending) at or below it.
    low = key_band.start
    excluded = np.sort(np.concatenate([keys, values], axis=1), axis=1) - low
    inputs = rng.integers(0, vocab_size - low - ctx, size=(n_examples, seq_len))
    for j in range(ctx):
        inputs += inputs >= excluded[:, j:j + 1]
    inputs += low
    inputs[:, 0:ctx:2], inputs[:, 1:ctx:2] = keys, values
    rows = np.arange(n_examples)[:, None]
    inputs[rows, positions] = keys
    targets = np.full((n_examples, seq_len), IGNORE, dtype=np.int64)
    targets[rows, positions] = values
    distances = positions - 2 * np.arange(n)[None, :]
    return MQAR(*(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
                  for a in (inputs, targets, keys, values, positions, distances)))
