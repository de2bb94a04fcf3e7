"""Empty sections that say why they are empty.

A section's table is a DataFrame; an empty one carries its reason in `attrs`, and summary.md and
report.html both print that reason where the table would be. Any table may also carry a note (`with_note`),
printed above it. `reasons(table)` words the usual causes
from what the study holds ("no iso-KV baseline in this study", "no runs finished", ...).
"""
from __future__ import annotations

import pandas as pd

from pipeline import schema

REASON = "empty_reason"
NO_REASON = "no rows"   # printed only for an empty table that was given no reason


def empty(reason: str) -> pd.DataFrame:
    """An empty section table whose rendering is `reason`."""
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError(f"reason must be a non-empty sentence saying why the section is empty, got {reason!r}")
    df = pd.DataFrame()
    df.attrs[REASON] = reason
    return df


def or_empty(df: pd.DataFrame, reason: str) -> pd.DataFrame:
    """`df` when it has rows, else empty(reason)."""
    return df if len(df) else empty(reason)


def reason_of(df: pd.DataFrame) -> str:
    """What to print for an empty table."""
    return df.attrs.get(REASON) or NO_REASON


NOTE = "note"


def with_note(df: pd.DataFrame, note: str) -> pd.DataFrame:
    """`df` with a sentence that summary.md and report.html print above it (empty or not)."""
    df.attrs[NOTE] = note
    return df


def note_of(df: pd.DataFrame) -> str:
    return df.attrs.get(NOTE, "")


def _kinds(ok: pd.DataFrame) -> set[str]:
    if ok.empty:
        return set()
    return set(ok[schema.TAG_KIND])


def _n_sizes(ok: pd.DataFrame) -> int:
    return ok[schema.TAG_SIZE].nunique() if len(ok) else 0


ISO_NAMES = {"iso_kv": "iso-KV", "iso_flop": "iso-FLOP", "iso_param": "iso-parameter"}


def reasons(runs: pd.DataFrame, ok: pd.DataFrame) -> dict[str, str]:
    """Why each kind of section would be empty for this study. runs: every run; ok: the usable ones.

    Keys: status, results, fits, predictions, gap, iso_kv, iso_flop, iso_param, pareto:<cost metric>, recall."""
    if ok.empty:
        none = "no runs finished" if len(runs) else "no runs in this experiment"
        out = {k: none for k in ("results", "fits", "predictions", "gap", *ISO_NAMES, "recall")}
        out.update({f"pareto:{c}": none for c in (schema.M_KV_BYTES, schema.M_ATTN_FLOPS_PER_TOKEN)})
        out["status"] = "every run finished and none is missing" if len(runs) else "no runs in this experiment"
        return out
    kinds, n_sizes = _kinds(ok), _n_sizes(ok)
    sizes = f"this study has {n_sizes} size{'s' if n_sizes != 1 else ''}"
    if "full" not in kinds:
        gap = "no full-attention transformer run in this study"
    elif kinds == {"full"}:
        gap = "every run in this study is the transformer itself"
    else:
        gap = "no run shares a size and token budget with a transformer run"
    iso = {}
    for kind, name in ISO_NAMES.items():
        if kind not in kinds:
            iso[kind] = f"no {name} baseline in this study"
        elif "attamba" not in kinds:
            iso[kind] = "no Attamba run in this study"
        else:
            iso[kind] = f"no Attamba run shares a size and token budget with an {name} baseline"
    out = {
        "status": "every run finished and none is missing",
        "results": "no runs finished",
        "fits": f"no scaling law could be fitted: {sizes}",
        "predictions": f"no scaling law was fitted, so nothing is predicted: {sizes}",
        "gap": gap,
        **iso,
        "recall": "no MQAR lengths evaluated (eval.mqar_lengths)",
    }
    for cost in (schema.M_KV_BYTES, schema.M_ATTN_FLOPS_PER_TOKEN):
        missing = [m for m in (cost, schema.M_VAL_PPL) if m not in ok or not ok[m].notna().any()]
        out[f"pareto:{cost}"] = (f"no finished run logged {missing[0]}" if missing
                                 else "no configuration has both the cost and a perplexity")
    return out
