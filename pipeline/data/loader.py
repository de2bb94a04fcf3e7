"""Batches from a packed token stream: sharded across ranks, shuffled per epoch, resumable.

Sequence j of a split is tokens[j*T : j*T + T + 1] (T = seq_len): consecutive sequences overlap by one
token, so every token after the first is a target exactly once. A batch row holds T+1 tokens; the
model's inputs are row[:-1] and its targets row[1:].
"""

from __future__ import annotations

import numpy as np
import torch


def num_sequences(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def _gather(tokens: np.ndarray, seq_len: int, idx: np.ndarray) -> torch.Tensor:
    rows = np.stack([np.asarray(tokens[j * seq_len: j * seq_len + seq_len + 1]) for j in idx])
    return torch.from_numpy(rows.astype(np.int64))


def _check_shard(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


class TrainBatches:
    """Endless training batches for one rank, LongTensor [batch_size, seq_len + 1].

    A step consumes one global batch of `batch_size * world_size` sequences taken in order from the
    epoch's seeded permutation; rank r takes every world_size-th of them starting at r, so ranks are
    disjoint and together cover exactly the global batch. The sequences that do not fill a whole
    global batch at the end of an epoch are skipped in that epoch (the next permutation differs).

    `position` is the number of steps consumed. Saving it in a checkpoint and passing it back as
    `start` (with the same seed, batch_size and world_size) resumes with exactly the batches an
    uninterrupted run would have produced.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, start: int = 0, seed: int = 0):
        _check_shard(batch_size, rank, world_size)
        if start < 0:
            raise ValueError(f"start must be >= 0 (a saved position), got {start}")
        self.tokens, self.seq_len = tokens, seq_len
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.n_sequences = num_sequences(len(tokens), seq_len)
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = self.n_sequences // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size * world_size = {self.global_batch} sequences exceeds the split's "
                f"{self.n_sequences} sequences of seq_len={seq_len}; lower batch_size or seq_len, or add data"
            )
        self.position = start
        self._epoch, self._perm = -1, None

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences)

    def indices(self, step: int) -> np.ndarray:
        """Sequence indices this rank reads at `step`, shape [batch_size]."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, self.epoch_permutation(epoch)
        lo = i * self.global_batch
        return self._perm[lo + self.rank: lo + self.global_batch: self.world_size]

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        batch = _gather(self.tokens, self.seq_len, self.indices(self.position))
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size}


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1):
    """Every sequence of a split once, in order, LongTensor [<= batch_size, seq_len + 1].

    Rank r takes sequences r, r + world_size, ...; the last batch may be short.
    """
    _check_shard(batch_size, rank, world_size)
    mine = np.arange(rank, num_sequences(len(tokens), seq_len), world_size)
    for lo in range(0, len(mine), batch_size):
        yield _gather(tokens, seq_len, mine[lo:lo + batch_size])
