"""MQAR sequences (pipeline/data/mqar.py): the layout Zoology states, and what a model that does not bind keys
to values can score on it."""

import numpy as np
import pytest
import torch

from pipeline.data.mqar import IGNORE, bands, make_mqar, min_vocab_size, reserved_ids


def _per_example(batch, i):
    return {k: getattr(batch, k)[i].tolist() for k in batch._fields}


def test_layout_every_key_queried_once_and_answers_only_as_labels():
    n, T, V = 6, 64, 100
    b = make_mqar(200, T, n, V, seed=3)
    assert b.inputs.shape == b.targets.shape == (200, T) and b.keys.shape == b.distances.shape == (200, n)
    assert all(t.dtype == torch.int64 for t in b)
    key_band, value_band = bands(V)
    for i in range(200):
        e = _per_example(b, i)
        x = e["inputs"]
        assert x[0:2 * n:2] == e["keys"] and x[1:2 * n:2] == e["values"]      # the context: k1 v1 ... kn vn
        assert len(set(e["keys"])) == n and len(set(e["values"])) == n
        assert all(k in key_band for k in e["keys"]) and all(v in value_band for v in e["values"])
        after = x[2 * n:]
        for key, value, pos in zip(e["keys"], e["values"], e["positions"]):
            assert after.count(key) == 1 and x[pos] == key                       # each key queried exactly once
            assert e["targets"][pos] == value                                     # the answer is the label there
            if pos + 1 < T:
                assert x[pos + 1] != value                                         # never the next input
        assert not set(after) & set(e["values"])                                   # no value after the context
        scored = [t for t, y in enumerate(e["targets"]) if y != IGNORE]
        assert scored == sorted(e["positions"])
        assert min(x) >= reserved_ids(V) and max(x) < V                            # the reserved band stays free


def test_bands_are_disjoint_above_the_reserved_ids():
    for V in (11, 64, 128, 300, 32000):
        keys, values = bands(V)
        assert reserved_ids(V) == keys.start and keys.stop == values.start and values.stop == V
        assert len(keys) <= len(values) <= len(keys) + 1
    assert (reserved_ids(128), bands(128)) == (8, (range(8, 68), range(68, 128)))


def test_query_positions_and_distances_are_as_stated():
    n, T = 4, 64
    b = make_mqar(500, T, n, 128, seed=1)
    pos, dist = b.positions, b.distances
    assert torch.equal(dist, pos - 2 * torch.arange(n))                           # from k_i at 2i to its query
    assert (pos >= 2 * n).all() and (pos < T).all() and (pos % 2 == 0).all()      # even slots after the context
    assert all(len(set(row)) == n for row in pos.tolist())
    # Zoology gives the first gap drawn to the first key, so key 1 tends to be asked first; here the order of
    # the queries says nothing about the keys' order: key 1 is asked first in 1/n of the sequences.
    first = (pos.argmin(1) == 0).double().mean().item()
    assert abs(first - 1 / n) < 4 * (0.25 * 0.75 / 500) ** 0.5


@pytest.mark.parametrize("power_a", [0.01, 0.5, 1.0])
def test_gaps_follow_zoologys_power_law(power_a):
    """One pair: the gap g (query at 2 + 2g) is one draw of p(g) ~ (g + 1)^(a - 1), g < (T - 2) / 2."""
    T, N = 40, 20000
    g = ((make_mqar(N, T, 1, 64, seed=7, power_a=power_a).positions[:, 0] - 2) // 2).numpy()
    space = (T - 2) // 2
    p = np.arange(1, space + 1, dtype=float) ** (power_a - 1)
    p /= p.sum()
    seen = np.bincount(g, minlength=space) / N
    assert len(seen) == space
    assert np.all(np.abs(seen - p) < 5 * np.sqrt(p * (1 - p) / N) + 1e-3), (seen, p)


def test_sequences_are_a_pure_function_of_the_seed():
    a, b = make_mqar(8, 32, 4, 64, seed=(5, 1)), make_mqar(8, 32, 4, 64, seed=(5, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.inputs, make_mqar(8, 32, 4, 64, seed=(5, 2)).inputs)
    assert not torch.equal(a.inputs, make_mqar(8, 32, 4, 64, seed=6).inputs)
    assert torch.equal(make_mqar(3, 32, 4, 64, seed=-1).inputs, make_mqar(3, 32, 4, 64, seed=2**64 - 1).inputs)


def test_fillers_are_uniform_over_the_ids_a_sequence_does_not_use():
    n, T, V = 2, 400, 16          # V=16: ids 2..15 usable, 4 taken by the pairs, 10 fillers
    b = make_mqar(50, T, n, V, seed=0)
    for i in range(50):
        used = set(b.keys[i].tolist()) | set(b.values[i].tolist())
        fill = [t for pos, t in enumerate(b.inputs[i].tolist()) if pos >= 2 * n and pos not in b.positions[i].tolist()]
        counts = np.bincount(fill, minlength=V)
        allowed = [t for t in range(reserved_ids(V), V) if t not in used]
        assert set(fill) == set(allowed)
        expected = len(fill) / len(allowed)
        assert np.all(np.abs(counts[allowed] - expected) < 5 * np.sqrt(expected))


@pytest.mark.parametrize("args, message", [
    ((8, 28, 8, 128), "seq_len must be >= 32 for MQAR with n_pairs=8 .*, got 28; raise seq_len or lower n_pairs"),
    ((8, 64, 8, 18), "vocab_size must be >= 19 for MQAR with n_pairs=8 .*, got 18; raise vocab_size or lower n_pairs"),
    ((8, 64, 0, 128), "n_pairs must be an integer >= 1, got 0"),
    ((0, 64, 4, 128), "n_examples must be an integer >= 1, got 0"),
])
def test_bad_sizes_are_refused_in_one_line(args, message):
    with pytest.raises(ValueError, match=message) as error:
        make_mqar(*args, seed=0)
    assert "\n" not in str(error.value)


def test_smallest_sizes_work_and_power_a_must_be_positive():
    assert min_vocab_size(8) == 19 and make_mqar(1, 32, 8, 19, seed=0).inputs.shape == (1, 32)
    with pytest.raises(ValueError, match="power_a must be a finite number > 0, got 0.0"):
        make_mqar(2, 32, 4, 64, seed=0, power_a=0.0)


# ---- what a model that does not bind keys to values can score ---------------------------------------------

def _context_values(x, n):
    return x[1:2 * n:2]


def _unanswered_guess(inputs, targets, n):
    """The shortcut of the layout this replaced: at each query, guess uniformly among the context's values not
    yet seen after the context. Expected accuracy, exactly."""
    scores = []
    for x, y in zip(inputs.tolist(), targets.tolist()):
        values = _context_values(x, n)
        for t, answer in enumerate(y):
            if answer != IGNORE:
                left = [v for v in values if v not in x[2 * n:t + 1]]
                scores.append((answer in left) / len(left))
    return float(np.mean(scores))


def _order_guess(inputs, targets, n):
    """The t-th query (in time) answered with the t-th value of the context."""
    right = []
    for x, y in zip(inputs.tolist(), targets.tolist()):
        asked = [answer for answer in y if answer != IGNORE]
        right += [a == v for a, v in zip(asked, _context_values(x, n))]
    return float(np.mean(right))


def _binding_oracle(inputs, n):
    """Looks the query up in the context and answers the value after it."""
    pred = torch.full_like(inputs, -1)
    for i, x in enumerate(inputs.tolist()):
        pairs = dict(zip(x[0:2 * n:2], x[1:2 * n:2]))
        for t in range(2 * n, len(x)):
            pred[i, t] = pairs.get(x[t], -1)
    return pred


def _leaky_layout(b, n):
    """The replaced layout: the same pairs, the n queries at the end, each followed by its answer."""
    inputs, targets = b.inputs.clone(), torch.full_like(b.targets, IGNORE)
    T = inputs.shape[1]
    for i in range(len(inputs)):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(i))
        inputs[i, T - 2 * n::2], inputs[i, T - 2 * n + 1::2] = b.keys[i, order], b.values[i, order]
        targets[i, T - 2 * n::2] = b.values[i, order]
    return inputs, targets


def test_without_binding_recall_is_one_in_n_and_the_old_shortcut_is_gone():
    from pipeline.eval.mqar import score

    n = 4
    b = make_mqar(2000, 64, n, 128, seed=11)
    # The old layout let the "values not yet answered" guess score 1/4, 1/3, 1/2, 1 at the four slots: 52%.
    leaky_inputs, leaky_targets = _leaky_layout(b, n)
    assert _unanswered_guess(leaky_inputs, leaky_targets, n) == pytest.approx((1 / 4 + 1 / 3 + 1 / 2 + 1) / 4)
    # Here no value is ever an input after the context: the same guess is exactly chance.
    assert _unanswered_guess(b.inputs, b.targets, n) == pytest.approx(1 / n, abs=1e-12)
    # Query order carries no information about which context slot is asked (Zoology's order gives 28%).
    assert abs(_order_guess(b.inputs, b.targets, n) - 1 / n) < 4 * (3 / 16 / (2000 * n)) ** 0.5
    # Binding a key to the value beside it solves every query.
    assert score(_binding_oracle(b.inputs, n), b.targets) == 1.0
