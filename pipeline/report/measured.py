"""What a study measured, stated before any result: corpus, tokenizer, sequence length and the evaluation
context behind the cost axes, training tokens per run, validation tokens scored, seeds per configuration
and the code version(s). Read from each run's tracked config params, cost metrics and tags (load.py)."""
from __future__ import annotations

import math

import pandas as pd

from pipeline import schema
from pipeline.report import fmt

NOT_RECORDED = "not recorded"
CONFIG = ["variant", schema.TAG_SIZE, schema.M_TRAIN_TOKENS]


def _text(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        return NOT_RECORDED
    return fmt.num(v, 4) if isinstance(v, float) else str(v)


def _distinct(values: pd.Series, what: str = "runs") -> str:
    """'a (all 4 runs)' when every run agrees, else 'a (3 runs); b (1 run)', most common first."""
    counts = values.map(_text).value_counts(sort=False)
    counts = counts.sort_values(ascending=False, kind="stable")
    if len(counts) == 1:
        n = counts.iloc[0]
        return f"{counts.index[0]} (all {n} {what})" if n > 1 else f"{counts.index[0]} (the one {what.rstrip('s')})"
    return "; ".join(f"{v} ({n} {what if n != 1 else what.rstrip('s')})" for v, n in counts.items())


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series([""] * len(df), index=df.index, dtype=object)


def _corpus(df: pd.DataFrame) -> pd.Series:
    source, dataset = _column(df, "data.source"), _column(df, "data.dataset")
    return pd.Series([f"{s} (dataset {d})" if d not in ("", "None") else s for s, d in zip(source, dataset)],
                     index=df.index, dtype=object)


def _tokenizer(df: pd.DataFrame) -> pd.Series:
    tok, vocab = _column(df, "data.tokenizer"), _column(df, "model.vocab_size")
    # data.source=mqar reads no text: its data.tokenizer is an unused default
    tok = tok.where(_column(df, "data.source") != "mqar", "none (MQAR task ids)")
    return pd.Series([f"{t}, vocabulary {v}" if t and v else (t or "") for t, v in zip(tok, vocab)],
                     index=df.index, dtype=object)


def _val_tokens(df: pd.DataFrame) -> pd.Series:
    """Per run: the targets its final evaluation scored; runs from before the whole-split evaluation
    logged no count and scored the first eval.batches batches only."""
    tokens, batches = _column(df, schema.M_VAL_TOKENS), _column(df, "eval.batches")
    out = []
    for t, k in zip(tokens, batches):
        if isinstance(t, (int, float)) and math.isfinite(t):
            out.append(f"{fmt.num(t, 4)} tokens")
        elif k == "0":
            out.append("the whole split (count not logged)")
        elif k:
            out.append(f"first {k} batches only")
        else:
            out.append("")
    return pd.Series(out, index=df.index, dtype=object)


def _train_tokens(df: pd.DataFrame, what: str) -> str:
    tokens = _column(df, schema.M_TRAIN_TOKENS)
    if tokens.map(_text).nunique() <= 1:
        return _distinct(tokens, what)
    per = df.assign(_t=tokens.map(_text)).groupby("_t", sort=False)
    return "; ".join(f"{t}: " + ", ".join(sorted({f"{v} @ {s}" for v, s in zip(g["variant"], g[schema.TAG_SIZE])}))
                     for t, g in per)


def _seeds(df: pd.DataFrame) -> str:
    keys = df.assign(**{schema.M_TRAIN_TOKENS: _column(df, schema.M_TRAIN_TOKENS).map(_text)})
    n = keys.groupby(CONFIG, sort=True).size()
    if n.nunique() == 1:
        return f"{n.iloc[0]} (each of the {len(n)} configurations)" if len(n) > 1 else f"{n.iloc[0]} (one configuration)"
    return "; ".join(f"{v} @ {s}: {k}" for (v, s, _), k in n.items())


def measured_table(runs: pd.DataFrame, ok: pd.DataFrame) -> pd.DataFrame:
    """Two columns, `measured` and `value`: one row per fact. Facts come from the usable runs, or from
    every run when none is usable."""
    df = ok if len(ok) else runs
    if df.empty:
        return pd.DataFrame(columns=["measured", "value"])
    what = "usable runs" if len(ok) else "runs"   # with none usable, what the failed runs were set up with
    rows = [
        ("corpus (data.source)", _distinct(_corpus(df), what)),
        ("tokenizer", _distinct(_tokenizer(df), what)),
        ("sequence length (data.seq_len)", _distinct(_column(df, "data.seq_len"), what)),
        ("evaluation context behind the KV-cache and attention-FLOP axes (tokens)",
         _distinct(_column(df, schema.M_EVAL_CONTEXT), what)),
        ("training tokens per run", _train_tokens(df, what)),
        ("validation tokens scored by the final evaluation", _distinct(_val_tokens(df), what)),
        ("seeds per configuration (variant @ size)", _seeds(df)),
        ("code version", _distinct(_column(df, schema.TAG_CODE_VERSION), what)),
    ]
    return pd.DataFrame(rows, columns=["measured", "value"])
