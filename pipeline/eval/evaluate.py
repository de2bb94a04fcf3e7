"""Held-out evaluation: token perplexity, bits per byte, the paper's tail metric, MQAR recall (the probe, and
the recall of runs trained on data.source=mqar).

Bits per byte = total nats / (ln 2 * UTF-8 bytes of the evaluated text), with every predicted token
(EOS included) in the numerator, so it is comparable across tokenizers. The model is put in eval mode
first: random boundaries then come from `model.boundary_seed`, so evaluation is reproducible.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from pipeline import schema
from pipeline.data.prepare import bits_per_byte
from pipeline.data.mqar_source import MQARData


def _windows(n_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """[start, stop) windows of <= seq_len + 1 tokens overlapping by one, so that every token after the
    first is a target exactly once (the last window may be short)."""
    out, start = [], 0
    while start < n_tokens - 1:
        stop = min(start + seq_len + 1, n_tokens)
        out.append((start, stop))
        start = stop - 1
    return out


class StreamNLL(NamedTuple):
    nats: float                   # summed nats of every target scored
    count: int                    # targets scored
    position_nats: np.ndarray     # [seq_len] float64: summed nats of the targets at each position (index p - 1)
    position_count: np.ndarray    # [seq_len] int64: targets at each position


@torch.no_grad()
def stream_nll(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8,
               max_windows: int | None = None, device="cpu") -> StreamNLL:
    """Summed nats and number of targets of a token stream [N], scored in windows of seq_len, also per
    position in the window: the target at index t of a window's targets is at position t + 1, the number of
    tokens the model could see when predicting it."""
    model.eval()
    windows = _windows(len(tokens), seq_len)[:max_windows]
    pos_nats, pos_count = torch.zeros(seq_len, dtype=torch.float64), torch.zeros(seq_len, dtype=torch.int64)
    full = [w for w in windows if w[1] - w[0] == seq_len + 1]
    short = [w for w in windows if w[1] - w[0] != seq_len + 1]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in short]
    for group in groups:
        rows = torch.from_numpy(np.stack([np.asarray(tokens[a:b]) for a, b in group]).astype(np.int64)).to(device)
        loss = model(rows[:, :-1], rows[:, 1:], reduction="none")   # [B, T]
        n = loss.shape[1]
        pos_nats[:n] += loss.double().sum(0).cpu()
        pos_count[:n] += loss.shape[0]
    return StreamNLL(float(pos_nats.sum()), int(pos_count.sum()), pos_nats.numpy(), pos_count.numpy())


def position_losses(nll: StreamNLL, seq_len: int) -> dict[str, float]:
    """Mean nats per target in each position bucket (schema.position_buckets), named loss_pos_<first>-<last>;
    a bucket no target reached (a split shorter than it) is left out."""
    out = {}
    for first, last in schema.position_buckets(seq_len):
        count = int(nll.position_count[first - 1:last].sum())
        if count:
            out[schema.loss_pos_name(first, last)] = float(nll.position_nats[first - 1:last].sum()) / count
    return out


def evaluate_split(model, data, split: str = "validation", batch_size: int = 8, max_batches: int = 0,
                   device="cpu") -> dict[str, float]:
    """loss (mean nats per token), ppl, bpb on `split` of a PreparedData, and "by_position": the loss per
    position bucket (position_losses).

    max_batches=0 scores every token of the split, and the byte count is exact. Otherwise only the first
    max_batches * batch_size windows are scored and the bytes are the split's bytes scaled by the
    fraction of its targets scored (a documented estimate for the periodic evaluations)."""
    tokens = data.tokens(split)
    seq_len = data.config.seq_len
    limit = max_batches * batch_size if max_batches else None
    nll = stream_nll(model, tokens, seq_len, batch_size, limit, device)
    nats, count = nll.nats, nll.count
    if count == 0:
        raise ValueError(f"the {split} split has {len(tokens)} tokens, too few to evaluate; raise "
                         f"data.val_fraction or add documents")
    n_bytes = data.n_bytes(split) * count / max(1, len(tokens) - 1)
    loss = nats / count
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": bits_per_byte(nats, n_bytes),
            "tokens": count, "bytes": n_bytes, "by_position": position_losses(nll, seq_len)}


@torch.no_grad()
def paper_metric(model, documents: list[np.ndarray], tail: int, device="cpu") -> dict[str, float]:
    """The paper's WikiText-2 metric: each document [BOS, ..., EOS] cut to its last `tail` tokens (the
    model sees only those), per-token perplexity over the predictions inside the tail."""
    if tail > model.config.max_seq_len:
        raise ValueError(f"eval.paper_tail={tail} exceeds model.max_seq_len={model.config.max_seq_len}; "
                         f"lower eval.paper_tail")
    model.eval()
    nats, count = 0.0, 0
    for doc in documents:
        piece = torch.as_tensor(np.asarray(doc[-tail:]).astype(np.int64), device=device)[None]
        if piece.shape[1] < 2:
            continue
        loss = model(piece[:, :-1], piece[:, 1:], reduction="none")
        nats += float(loss.double().sum())
        count += loss.numel()
    if count == 0:
        raise ValueError("no document has 2 or more tokens; nothing to score for the paper metric")
    return {"paper_loss": nats / count, "paper_ppl": math.exp(min(nats / count, 700.0)), "paper_tokens": count}


def evaluate_model(model, data, eval_cfg, batch_size: int, device="cpu", full: bool = False,
                   split: str = "validation", paper: bool | None = None) -> dict[str, float]:
    """The metrics a run logs (names from pipeline.schema) for one evaluation: loss, ppl, bpb and the number
    of targets scored, named by their split (val/ppl, test/ppl); for an MQAR source (data.source=mqar)
    loss, recall and recall by key-query distance instead (pipeline.eval.mqar.evaluate_recall). full=True
    scores the whole split, else the first eval_cfg.batches batches. A whole-split evaluation of text also
    gives the loss by position in the context (val/loss_pos_1-8, ...: schema.position_buckets), from the same
    forward passes."""
    from pipeline.eval.mqar import evaluate_recall, mqar_accuracy

    if isinstance(data, MQARData):   # a recall task: loss on the answers, recall by distance; no text metrics
        out = evaluate_recall(model, data, split, batch_size, 0 if full else eval_cfg.batches, device)
    else:
        res = evaluate_split(model, data, split, batch_size, 0 if full else eval_cfg.batches, device)
        out = {schema.split_metric(split, name): res[name] for name in ("loss", "ppl", "bpb", "tokens")}
        if full:
            out.update({schema.split_metric(split, name): v for name, v in res["by_position"].items()})
    if eval_cfg.paper_metric if paper is None else paper:
        pm = paper_metric(model, data.document_tokens(split), eval_cfg.paper_tail, device)
        out[schema.split_metric(split, "paper_ppl")] = pm["paper_ppl"]
    for length in eval_cfg.mqar_lengths:
        if length <= model.config.max_seq_len:
            acc = mqar_accuracy(model, length, eval_cfg.mqar_pairs, eval_cfg.mqar_examples, eval_cfg.seed,
                                batch_size=batch_size, device=device)
            out[f"{schema.M_MQAR_PREFIX}{length}"] = acc
    return out


