"""MQAR recall (Zoology's multi-query associative recall, pipeline/data/mqar.py): scoring a model on it.

Two uses: the probe `mqar_accuracy` (eval.mqar_lengths: a language model scored on seeded MQAR sequences
of other lengths, val/mqar_acc_T<length>), and `evaluate_recall`, the evaluation of a run trained on
`data.source: mqar`: the loss on the answers, recall overall and by key-query distance bucket.
"""

from __future__ import annotations

import torch

from pipeline import schema
from pipeline.data.mqar import IGNORE, MQAR, check_sizes, make_mqar

BUCKET_BASE, BUCKET_FIRST = 4, 8   # distance buckets 1-8, 9-32, 33-128, 129-512, ...: log-spaced, base 4


def distance_bucket(distance: int) -> tuple[int, int]:
    """The bucket (lo, hi), both inclusive, that a key-query distance >= 1 falls in."""
    if distance < 1:
        raise ValueError(f"a key-query distance is >= 1, got {distance}")
    lo, hi = 1, BUCKET_FIRST
    while distance > hi:
        lo, hi = hi + 1, hi * BUCKET_BASE
    return lo, hi


def score(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of query positions (targets != IGNORE) where predictions [N, T] equal targets [N, T]."""
    mask = targets != IGNORE
    if not mask.any():
        raise ValueError("no query positions in targets")
    return float((predictions[mask] == targets[mask]).float().mean())


@torch.no_grad()
def recall(model, examples: MQAR, batch_size: int = 8, device="cpu") -> dict:
    """Greedy recall of `model` on `examples`: {"loss": mean nats on the answers, "recall": fraction of
    queries answered right, "queries": their number, "buckets": {(lo, hi): (right, queries)} by key-query
    distance}."""
    model.eval()
    nats, right = 0.0, []
    for i in range(0, len(examples.inputs), batch_size):
        inputs = examples.inputs[i:i + batch_size].to(device)
        targets = examples.targets[i:i + batch_size].to(device)
        logits = model(inputs).float()
        nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum",
                                                        ignore_index=IGNORE).double())
        at = examples.positions[i:i + batch_size].to(device)
        predicted = logits.argmax(-1).gather(1, at)
        right.append((predicted == examples.values[i:i + batch_size].to(device)).cpu())
    right = torch.cat(right)
    buckets: dict[tuple[int, int], list[int]] = {}
    for ok, d in zip(right.flatten().tolist(), examples.distances.flatten().tolist()):
        counts = buckets.setdefault(distance_bucket(d), [0, 0])
        counts[0] += ok
        counts[1] += 1
    return {"loss": nats / right.numel(), "recall": int(right.sum()) / right.numel(), "queries": right.numel(),
            "buckets": {b: tuple(c) for b, c in sorted(buckets.items())}}


def recall_metrics(result: dict, split: str = "validation") -> dict[str, float]:
    """The tracked metrics of a `recall` result on `split`: loss, recall, one recall per distance bucket
    that holds queries (val/recall_d1-8, ...), and the number of answers scored (val/tokens). No ppl or
    bpb: the answers are not text, and a perplexity of them would only restate the loss."""
    out = {schema.split_metric(split, "loss"): result["loss"], schema.split_metric(split, "recall"): result["recall"],
           schema.split_metric(split, "tokens"): result["queries"]}
    for (lo, hi), (right, count) in result["buckets"].items():
        out[schema.recall_distance_metric(split, lo, hi)] = right / count
    return out


def evaluate_recall(model, data, split: str = "validation", batch_size: int = 8, max_batches: int = 0,
                    device="cpu") -> dict[str, float]:
    """recall_metrics of `model` on the fixed `split` set of an MQAR source (pipeline.data.mqar_source);
    max_batches=0 scores the whole set, else its first max_batches * batch_size sequences."""
    examples = data.examples(split)
    if max_batches:
        examples = MQAR(*(t[:max_batches * batch_size] for t in examples))
    return recall_metrics(recall(model, examples, batch_size, device), split)


@torch.no_grad()
def mqar_accuracy(model, seq_len: int, n_pairs: int, n_examples: int, seed: int, batch_size: int = 8,
                  device="cpu") -> float:
    """Greedy recall accuracy of `model` on seeded MQAR sequences of length seq_len (the probe of
    eval.mqar_lengths: keys and values from the model's own vocabulary)."""
    check_sizes(seq_len, n_pairs, model.config.vocab_size,
                names=("eval.mqar_lengths", "eval.mqar_pairs", "model.vocab_size", "power_a"))
    examples = make_mqar(n_examples, seq_len, n_pairs, model.config.vocab_size, seed=(seed, seq_len, n_pairs))
    return recall(model, examples, batch_size, device)["recall"]
