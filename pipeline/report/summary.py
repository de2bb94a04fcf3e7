"""The report's key numbers as tables (shared by summary.md and report.html) and the Markdown summary.

Numbers are printed by pipeline.report.fmt: 3 significant figures, 4 for losses and perplexities (LOSS_SIG);
the full values are in fits.json, claims.json and runs.csv.
"""
from __future__ import annotations

import pandas as pd

from pipeline import schema
from pipeline.report.empty import note_of, reason_of
from pipeline.report.fmt import interval, num, signed
from pipeline.report.uncertainty import MIN_REFIT_FRACTION, PLAUSIBLE_EXPONENT
from pipeline.report.load import RunTable
from pipeline.report.scaling import VariantFits

LOSS_SIG = 4   # losses and perplexities: differences between variants often sit in the third figure


def status_table(table: RunTable) -> pd.DataFrame:
    bad = table.not_ok
    rows = [{"trial": r["trial"], "state": r["state"], "mlflow_status": r["mlflow_status"], "run_id": r["run_id"]}
            for _, r in bad.iterrows()]
    rows += [{"trial": name, "state": "missing", "mlflow_status": "", "run_id": ""} for name in table.missing]
    return pd.DataFrame(rows, columns=["trial", "state", "mlflow_status", "run_id"])


def best_table(ok: pd.DataFrame) -> pd.DataFrame:
    """Per variant, the run with the lowest val/loss (its own loss and perplexity, as logged)."""
    rows = []
    for variant, df in ok.groupby("variant", sort=True):
        r = df.loc[df[schema.M_VAL_LOSS].idxmin()]
        rows.append({"variant": variant, "best val/loss": num(r[schema.M_VAL_LOSS], LOSS_SIG),
                     "val/ppl": num(r.get(schema.M_VAL_PPL, float("nan")), LOSS_SIG), "trial": r["trial"],
                     "run_id": r["run_id"], "runs": len(df)})
    return pd.DataFrame(rows)


def fits_table(fits: dict[str, VariantFits]) -> pd.DataFrame:
    """One row per fitted law: its form, sizes and runs used, status, parameters with 95% intervals and the
    fraction of bootstrap refits that succeeded (or why the intervals were omitted), flags and notes."""
    rows = []
    for variant, vf in fits.items():
        for law, lr in vf.laws.items():
            f = lr.fit
            row = {"variant": variant, "law": lr.law, "form": f.form, "sizes": f.n_distinct, "runs": f.n_points,
                   "status": f.status}
            if not f.ok:
                row["result"] = f"not fitted: {f.reason}"
            elif f.intervals:
                row["result"] = "; ".join(f"{k}={num(v)} {interval(*f.intervals[k])}" for k, v in f.params.items())
                row["result"] += f" ({f.n_bootstrap_ok}/{f.n_bootstrap} bootstrap refits)"
            else:
                row["result"] = "; ".join(f"{k}={num(v)}" for k, v in f.params.items()) + f" ({f.interval_note})"
            if lr.note:
                row["result"] += f"; {lr.note}"
            row["flags"] = "; ".join(f.flags)
            rows.append(row)
    return pd.DataFrame(rows)


def predictions_table(fits: dict[str, VariantFits]) -> pd.DataFrame:
    rows = []
    for variant, vf in fits.items():
        for law, lr in vf.laws.items():
            for p in lr.predictions:
                rows.append({"variant": variant, "law": law, "at": " x ".join(num(v) for v in p["x"]),
                             "factor": f"{p['factor']:g}x", "predicted loss": num(p["loss"], LOSS_SIG),
                             "95% interval": interval(p["lo"], p["hi"], LOSS_SIG),
                             "kind": "EXTRAPOLATION" if p["extrapolation"] else "largest size in study"})
    return pd.DataFrame(rows)


def comparison_table(comp: pd.DataFrame) -> pd.DataFrame:
    """A comparison (compare.pct_difference rows) with its verdict and both models' non-embedding parameters."""
    if comp.empty:
        return comp
    return pd.DataFrame({
        "variant": comp["variant"], "size": comp[schema.TAG_SIZE], "reference": comp["reference"],
        "ppl": comp["ppl"].map(lambda v: num(v, LOSS_SIG)), "ref ppl": comp["ref_ppl"].map(lambda v: num(v, LOSS_SIG)),
        "ppl diff %": comp["pct_mean"].map(signed),
        "95% interval": [interval(lo, hi) for lo, hi in zip(comp["pct_lo"], comp["pct_hi"])],
        "verdict": comp["verdict"],
        "pairs": comp["n_pairs"], "paired by seed": comp["paired_by_seed"],
        "runs": [f"{a} vs {b}" for a, b in zip(comp["n_runs"], comp["n_ref_runs"])],
        "params": comp["params"].map(num), "ref params": comp["ref_params"].map(num),
        "params ratio": comp["params_ratio"].map(num),
        "KV bytes": comp["kv_bytes"].map(num), "ref KV bytes": comp["ref_kv_bytes"].map(num),
        "KV ratio (ref / variant)": (comp["ref_kv_bytes"] / comp["kv_bytes"]).map(num),
        "attn FLOPs/token": comp["attn_flops"].map(num), "ref attn FLOPs/token": comp["ref_attn_flops"].map(num),
    })


def pareto_points_table(front: pd.DataFrame, cost: str) -> pd.DataFrame:
    """Front points labelled by variant and size: `point` says whether the weights were trained as this
    variant or trained as `trained as` and evaluated at this variant; `params` is the non-embedding count."""
    if front.empty:
        return front
    out = pd.DataFrame({"variant": front["variant"], "point": front["point"], "trained as": front["trained_as"],
                        "size": front[schema.TAG_SIZE], "params": front[schema.M_PARAMS_NON_EMB].map(num)})
    if front[schema.M_TRAIN_TOKENS].nunique() > 1:
        out["train tokens"] = front[schema.M_TRAIN_TOKENS].map(lambda v: num(v) if v >= 0 else "n/a")
    out[cost] = front[cost].map(num)
    out["mean val/ppl"] = front[schema.M_VAL_PPL].map(lambda v: num(v, LOSS_SIG))
    out["seeds"] = front["n_seeds"]
    return out


def recall_points_table(recall: pd.DataFrame) -> pd.DataFrame:
    if recall.empty:
        return recall
    return pd.DataFrame({"variant": recall["variant"], "size": recall[schema.TAG_SIZE],
                         "P": recall[schema.TAG_CHUNK].map(num), "L": recall[schema.TAG_LEADING].map(num),
                         "context T": recall["context"].map(num), "accuracy": recall["acc_mean"].map(num),
                         "std": recall["acc_std"].map(num), "runs": recall["n"]})


def md_table(df: pd.DataFrame) -> str:
    note = f"{note_of(df)}\n\n" if note_of(df) else ""
    if df.empty:
        return f"{note}_{reason_of(df)}_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |")
    return note + "\n".join(lines) + "\n"


def intro_lines(table: RunTable) -> list[str]:
    """The methods paragraphs: run counts, what the percentages and intervals mean, what the points are."""
    n_total, n_ok = len(table.runs), len(table.ok)
    return [f"Runs: {n_total} in {table.source}, {n_ok} usable, {n_total - n_ok} failed or incomplete, "
            f"{len(table.missing)} expected but missing.",
            "Percent differences are 100 * (ppl / reference ppl - 1): negative means better than the reference. "
            "Intervals are 95%: for fits, a bootstrap that resamples runs within each size, reported with the "
            f"fraction of refits that succeeded and omitted below {MIN_REFIT_FRACTION:.0%}; for comparisons, "
            "Student-t across seed-paired runs (Welch where seeds do not pair), with a verdict: better / worse "
            "when the interval excludes 0, inconclusive when it spans 0. A law is fitted only when its sizes "
            "identify it (a 3-parameter law needs >= 4 sizes); exponents outside "
            f"[{PLAUSIBLE_EXPONENT[0]:g}, {PLAUSIBLE_EXPONENT[1]:g}] are flagged implausible. params are "
            "non-embedding parameters. Numbers have 3 significant figures (4 for losses and perplexities; "
            "k, M, G = 10^3, 10^6, 10^9); fits.json, claims.json and runs.csv hold them in full.",
            "Pareto points are labelled with their size and non-embedding parameter count; `point` is `trained` "
            "(weights trained as that variant) or `evaluated` (weights trained as `trained as`, evaluated at "
            "that variant's attention setting), each averaged over its seeds."]


def block_markdown(block) -> str:
    """A front.Block as Markdown: heading, lead paragraphs, bullet lines, table, paragraphs after."""
    out = [f"## {block.title}\n"] if block.title else []
    out += [f"{line}\n" for line in block.lead]
    if block.lines:
        out.append("\n".join(f"- {line}" for line in block.lines) + "\n")
    if block.table is not None:
        out.append(md_table(block.table))
    out += [f"{line}\n" for line in block.after]
    return "\n".join(out)


def summary_markdown(experiment: str, table: RunTable, sections: dict[str, pd.DataFrame],
                     front: list | None = None, opening: list | None = None) -> str:
    """Markdown: the title, the `front` blocks (the answer first), the methods paragraphs, the `opening`
    blocks, then one heading per section; section tables come from the functions above."""
    out = [f"# Study report: {experiment}\n"]
    out += [block_markdown(b) for b in front or []]
    out += [f"{line}\n" for line in intro_lines(table)]
    out += [block_markdown(b) for b in opening or []]
    for title, df in sections.items():
        out.append(f"## {title}\n")
        out.append(md_table(df))
    return "\n".join(out)
