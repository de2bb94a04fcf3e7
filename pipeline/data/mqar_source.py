"""`data.source: mqar`: a synthetic data source of MQAR sequences (pipeline/data/mqar.py) to train recall.

Training draws fresh sequences every step: the batch rank r reads at position p (micro-batches consumed)
is make_mqar(batch_size, ..., seed=(data.seed, TRAIN, p, r)), a pure function of those, so a run resumed
from a checkpoint's position reads exactly the batches an uninterrupted run would have. The validation
and test sets are fixed: `data.mqar.val_examples` sequences each, from streams of their own. Nothing is
written to disk. Batches are (inputs [B, T], targets [B, T]) pairs with IGNORE (-100) except at the
queries, so the loss is on the answers only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from attamba.checks import at_least, integer, positive

from pipeline.data.mqar import FORMAT, MQAR, POWER_A, check_sizes, make_mqar

SOURCE = "mqar"
STREAMS = {"train": 0, "validation": 1, "test": 2}   # the second seed word of each split's sequences


@dataclass(frozen=True)
class MQARConfig:
    """`data.mqar`: the task's sizes; data.seq_len is T and data.seed seeds every split."""

    pairs: int = 4                 # key-value pairs per sequence (each key queried once)
    vocab_size: int = 128          # ids of the task and the model's vocabulary (it is set from this)
    power_a: float = POWER_A       # query gaps: p(gap) ~ gap^(power_a - 1), Zoology's 0.01
    val_examples: int = 512        # sequences in the fixed validation set (and in the test set)

    def __post_init__(self):
        integer("pairs", self.pairs, 1)
        integer("vocab_size", self.vocab_size, 1)
        positive("power_a", self.power_a, finite=True, fix="Zoology uses 0.01")
        at_least("val_examples", self.val_examples, 1, integer=True)


def check(mqar: MQARConfig, seq_len: int) -> None:
    """The sizes together (DataConfig checks them when data.source is mqar), named as config fields."""
    check_sizes(seq_len, mqar.pairs, mqar.vocab_size, mqar.power_a,
                names=("data.seq_len", "data.mqar.pairs", "data.mqar.vocab_size", "data.mqar.power_a"))


class MQARBatches:
    """Endless training batches for one rank: (inputs, targets), LongTensors [batch_size, seq_len].

    `position` is the number of batches read; saved in a checkpoint and passed back as `start` (same
    seed, batch_size, rank) it resumes the stream exactly."""

    def __init__(self, mqar: MQARConfig, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, seed: int = 0):
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("start", start, 0)):
            integer(name, value, low)
        integer("rank", rank, 0, world_size - 1)
        self.mqar, self.seq_len, self.batch_size = mqar, seq_len, batch_size
        self.rank, self.world_size, self.seed, self.position = rank, world_size, seed, start

    def batch(self, position: int) -> MQAR:
        """The sequences this rank reads at `position`."""
        m = self.mqar
        return make_mqar(self.batch_size, self.seq_len, m.pairs, m.vocab_size,
                         seed=(self.seed, STREAMS["train"], position, self.rank), power_a=m.power_a)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch(self.position)
        self.position += 1
        return b.inputs, b.targets

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size}


class MQARData:
    """What `prepare` returns for data.source=mqar, with the parts of PreparedData that training and
    evaluation use: vocab_size, seq_len, meta (the data identity a checkpoint records), batches; and
    examples(split), the fixed evaluation sets. There is no tokenizer and no text."""

    tokenizer = None

    def __init__(self, config):
        check(config.mqar, config.seq_len)
        self.config = config
        self._examples: dict[str, MQAR] = {}
        spec = {"format": FORMAT, "seq_len": config.seq_len, "seed": config.seed, **asdict(config.mqar)}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
        # the identity a checkpoint stores and a resume compares (the corpus hash of text sources)
        self.meta = {"corpus": f"{SOURCE}-{key}", "tokenizer": None, "key": key, "source": SOURCE, **spec}

    vocab_size = property(lambda self: self.config.mqar.vocab_size)
    seq_len = property(lambda self: self.config.seq_len)

    def batches(self, split: str = "train", batch_size: int = 8, rank: int = 0, world_size: int = 1,
                start: int = 0, seed: int | None = None) -> MQARBatches:
        if split != "train":
            raise ValueError(f"MQAR training batches come from the train stream, not {split!r}; score the "
                             f"{split} split with examples({split!r})")
        seed = self.config.seed if seed is None else seed
        return MQARBatches(self.config.mqar, self.config.seq_len, batch_size, rank, world_size, start, seed)

    def examples(self, split: str) -> MQAR:
        """The fixed evaluation set of `split` (validation or test): data.mqar.val_examples sequences."""
        if split not in ("validation", "test"):
            raise ValueError(f"split must be 'validation' or 'test' for a fixed MQAR set, got {split!r}")
        if split not in self._examples:
            m = self.config.mqar
            self._examples[split] = make_mqar(m.val_examples, self.config.seq_len, m.pairs, m.vocab_size,
                                              seed=(self.config.seed, STREAMS[split]), power_a=m.power_a)
        return self._examples[split]
