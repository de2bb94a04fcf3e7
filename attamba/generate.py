"""Generation through the decoding cache: sampling rules, batched generation, step-by-step logits."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .cache import DecodeCache, decode_step, empty_cache, prefill


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None):
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids int64 [B]. temperature 0 is greedy (argmax); top_k keeps the k largest
    logits; top_p keeps the smallest set of tokens whose probability reaches top_p (the most likely always)."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens strictly more likely already reach top_p.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_id: int | None = None, stream: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens through the decoding cache.

    Prompts may have different lengths: each sequence decodes at its own positions. A sequence stops after
    emitting eos_id (included in its output). stream(index, token) is called for every token as it is chosen.
    Returns the new tokens of each prompt (prompts excluded). seed fixes the sampling generator.
    """
    _check_sampling(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    was_training = model.training
    model.eval()
    try:
        device = model.embed.weight.device
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        cache, logits = prefill(model, [torch.tensor(p, dtype=torch.int64, device=device) for p in prompts])
        last = torch.stack([out[-1] for out in logits])
        outputs: list[list[int]] = [[] for _ in prompts]
        active = [True] * len(prompts)
        for step in range(max_new_tokens):
            tokens = sample(last, temperature, top_k, top_p, generator)
            for i, token in enumerate(tokens.tolist()):
                if not active[i]:
                    continue
                outputs[i].append(token)
                if stream is not None:
                    stream(i, token)
                if eos_id is not None and token == eos_id:
                    active[i] = False
            if not any(active) or step == max_new_tokens - 1:
                break
            # Finished sequences keep stepping (their outputs are ignored) so the batch stays aligned.
            last = decode_step(model, cache, tokens)
        return outputs
    finally:
        model.train(was_training)


@torch.no_grad()
def decode_logits(model, tokens: torch.Tensor, prefill_length: int = 0) -> torch.Tensor:
    """Logits of every position computed through the decoding cache. tokens: int64 [B, T] -> [B, T, V].

    The first prefill_length positions go through the parallel prefill; every later one is a decode step.
    """
    bsz, seqlen = tokens.shape
    if not 0 <= prefill_length <= seqlen:
        raise ValueError(f"prefill_length must be in [0, {seqlen}], got {prefill_length}")
    if prefill_length:
        cache, logits = prefill(model, list(tokens[:, :prefill_length]))
        out = [torch.stack(logits)]
    else:
        cache, out = empty_cache(model, bsz), []
    for t in range(prefill_length, seqlen):
        out.append(decode_step(model, cache, tokens[:, t])[:, None])
    return torch.cat(out, dim=1)


@torch.no_grad()
def decode_perplexity(model, tokens: torch.Tensor) -> float:
    """Per-token perplexity of int64 [B, T] computed step by step through the decoding cache."""
    logits = decode_logits(model, tokens)
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return float(loss.exp())


__all__ = ["DecodeCache", "decode_logits", "decode_perplexity", "generate", "sample"]
