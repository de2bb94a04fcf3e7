"""`attamba generate`: stream a continuation from a checkpoint through the compressed KV-cache."""

from __future__ import annotations

import sys
from attamba.generate import generate

from .checkpoint import load_model, resolve_checkpoint


def generate_from_checkpoint(checkpoint, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                             out=sys.stdout, compile: bool = False) -> str:
    model, _, tokenizer = load_model(resolve_checkpoint(checkpoint))
    model.compile_decoding(compile)
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    new: list[int] = []
    shown = 0

    def stream(_index: int, token: int) -> None:
        # Decode the whole continuation each time: a multi-byte character can span several tokens.
        nonlocal shown
        new.append(token)
        text = tokenizer.decode([t for t in new if t != tokenizer.eos_id])
        if not text.endswith("\ufffd"):
            out.write(text[shown:])
            out.flush()
            shown = len(text)

    out.write(prompt)
    generate(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
             eos_id=tokenizer.eos_id, stream=stream)
    text = tokenizer.decode([t for t in new if t != tokenizer.eos_id])
    out.write(text[shown:] + "\n")
    return prompt + text
