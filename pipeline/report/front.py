"""What the report shows first: the answer, then the sections a reader needs before the details.

`front_blocks(data)` is the top of report.html and summary.md, right under the title and in this order:
the headline (`headline`: one line per Attamba variant and size with its gap to each baseline the study
has), then every function of FRONT_SECTIONS that returns a Block. The methods paragraph, what was measured,
the claims, the figures and the detailed tables follow (build.py).

`recall_matters` puts the recall section (pipeline/report/recall.py) of a study trained on MQAR first: recall
against KV-cache bytes and the claim "Attamba keeps recall that the window and iso-KV lose"; such a study's
headline is its recall per setting.

To add a section near the top, write a function (ReportData) -> list[Block] (empty: nothing to say for
this study, and no heading is printed) and put it in FRONT_SECTIONS where it should appear.
`context_matters` puts the section "Does context matter here?" (pipeline/report/context.py) right after
the headline: the context use, the claims it gates and the loss by position.

The claims section (`claims_block`) shows the claims this study measured as a table and collapses the
ones it did not measure into one line naming what would measure each (MEASURED_BY). Verdicts are shown
as claims.py words them; a verdict this module does not know is shown like any measured one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline import schema
from pipeline.report import fmt
from pipeline.report.claims import NOT_MEASURED, UNTESTABLE, Claim, claims_table
from pipeline.report.compare import ATTAMBA, CONFIG_KEYS, _with_keys
from pipeline.report.context import ContextSection
from pipeline.report.recall import RecallSection
from pipeline.report import recall as recall_report
from pipeline.report.empty import empty

CLAIMS_TITLE = "Claims: the paper's, recomputed from this study (rule in claims.json)"

# What a study would add to measure each claim (study YAML; README "Configuration"). A claim missing here
# falls back to the reason claims.py gives.
MEASURED_BY = {
    "attamba_vs_full_5pct": "an Attamba at `chunk_size: 4` (cyclic boundaries; the paper's L is 32) beside "
                            "`baselines: [full]`",
    "attamba_vs_full": "`baselines: [full]` beside a cyclic Attamba",
    "attamba_vs_iso_kv": "`baselines: [iso_kv]`",
    "attamba_vs_iso_kv_window": "an Attamba at `chunk_size: 4`, `baselines: [iso_kv]` and "
                                "`eval: {variants: [{window: W}]}`",
    "attamba_vs_iso_flop": "`baselines: [iso_flop]`",
    "cyclic_vs_uniform": "`attamba: {boundaries: [cyclic, uniform]}`",
    "cyclic_vs_random": "`attamba: {boundaries: [cyclic, random]}` or `eval: {variants: [{boundaries: random}]}`",
    "larger_L_better": "two L at one P, e.g. `attamba: {leading_tokens: [8, 32]}`",
    "collapse_P64_L1": "an Attamba entry `{chunk_size: 64, leading_tokens: 1}` beside `baselines: [full]`",
    "faithful_vs_released_segmentation": "`attamba: {ssm_segmentation: [chunk, offset]}`",
    recall_report.CLAIM_ID: recall_report.MEASURED_BY,
}

# (ReportData attribute, how the headline names the baseline); kind-matched by compare.py.
BASELINES = (("gap", "the transformer"), ("iso_kv", "the iso-KV transformer"),
             ("iso_flop", "the iso-FLOP transformer"))


@dataclass
class Block:
    """A part of the report: a heading, paragraphs (`lead`), lines (bullets), an optional table and paragraphs
    after it (`after`). Lines may
    use **bold** and `code`, the only markup both summary.md and report.html render."""

    title: str
    lines: list[str] = field(default_factory=list)
    lead: list[str] = field(default_factory=list)      # paragraphs before the lines
    table: pd.DataFrame | None = None
    after: list[str] = field(default_factory=list)
    css: str = ""                   # a class for report.html (the headline's box)


@dataclass
class ReportData:
    """What the report's sections are built from: the usable runs and the comparisons made from them."""

    ok: pd.DataFrame
    gap: pd.DataFrame
    iso_kv: pd.DataFrame
    iso_flop: pd.DataFrame
    claims: list[Claim]
    context: ContextSection | None = None
    recall: RecallSection | None = None


def _rows_by_config(df: pd.DataFrame) -> dict[tuple, pd.Series]:
    if df.empty:
        return {}
    return {(r["variant"], r[schema.TAG_SIZE], r[schema.M_TRAIN_TOKENS]): r for _, r in df.iterrows()}


def _kv_text(ref_kv: float, kv: float, whose: str, context: float) -> str:
    if not (np.isfinite(ref_kv) and np.isfinite(kv) and ref_kv > 0 and kv > 0):
        return f"KV-cache against {whose}: not logged"
    r = ref_kv / kv
    at = f" at a {fmt.num(context)}-token context" if np.isfinite(context) else ""
    return (f"KV-cache {fmt.ratio(r)} smaller than {whose}{at}" if r >= 1
            else f"KV-cache {fmt.ratio(1 / r)} larger than {whose}{at}")


def _pairs(row: pd.Series) -> str:
    if row.get("paired_by_seed", False):
        n = int(row["n_pairs"])
        return f"{n} seed pair{'' if n == 1 else 's'}"
    return f"unpaired seeds, Welch: {int(row['n_runs'])} vs {int(row['n_ref_runs'])} runs"


def _comparison(row: pd.Series, name: str, context: float) -> str:
    """One comparison: % gap with interval and verdict, the KV-cache ratio and the parameter ratio."""
    whose = "the transformer's" if name == "the transformer" else "the baseline's"
    return (f"perplexity {fmt.pct(row['pct_mean'], row['pct_lo'], row['pct_hi'])} against {name} "
            f"({row['reference']}): {row['verdict']} ({_pairs(row)}); "
            f"{_kv_text(row['ref_kv_bytes'], row['kv_bytes'], whose, context)}, "
            f"{fmt.ratio(row['params_ratio'])} {whose} non-embedding parameters")


def answer_lines(data: ReportData) -> list[str]:
    """One line per Attamba configuration (variant, size, token budget), smallest size first: its gap to
    the transformer and to its iso-KV / iso-FLOP baselines where the study has them."""
    ok = data.ok
    if ok.empty:
        return ["No run finished, so there is no answer yet: see the failed, incomplete and missing runs."]
    df = _with_keys(ok)
    att = df[df[schema.TAG_KIND] == ATTAMBA]
    if att.empty:
        kinds = ", ".join(sorted(set(df[schema.TAG_KIND]) - {""})) or "none"
        return [f"No Attamba run finished in this study (kinds that did: {kinds}): there is nothing to compare."]
    found = {attr: _rows_by_config(getattr(data, attr)) for attr, _ in BASELINES}
    several_budgets = df[schema.M_TRAIN_TOKENS].nunique() > 1
    configs = []
    for key, runs in att.groupby(CONFIG_KEYS, sort=True):
        params = runs[schema.M_PARAMS_NON_EMB].mean() if schema.M_PARAMS_NON_EMB in runs else np.nan
        configs.append((np.nan_to_num(params, nan=np.inf), key, runs))
    lines = []
    for _, (variant, size, tokens), runs in sorted(configs, key=lambda c: (c[0], c[1][1], c[1][0], c[1][2])):
        budget = f", {fmt.num(tokens)} training tokens" if several_budgets and tokens >= 0 else ""
        context = runs[schema.M_EVAL_CONTEXT].mean() if schema.M_EVAL_CONTEXT in runs else np.nan
        key = (variant, size, tokens)
        lead = f"**{variant} @ {size}**{budget}: "
        parts = [_comparison(found[attr][key], name, context) for attr, name in BASELINES if key in found[attr]]
        if not parts:
            ppl = fmt.num(runs[schema.M_VAL_PPL].mean(), 4) if schema.M_VAL_PPL in runs else fmt.NA
            lines.append(f"{lead}perplexity {ppl} over {len(runs)} run{'s' if len(runs) != 1 else ''}; no "
                         "transformer, iso-KV or iso-FLOP run shares its size and token budget, so nothing to "
                         "compare it with.")
            continue
        lines.append(lead + ". ".join(p[0].upper() + p[1:] if i else p for i, p in enumerate(parts)) + ".")
    return lines


def claims_tally(claims: list[Claim]) -> str:
    """One line: which claims this study decided, with their verdicts, which it could not test because
    context is not shown to matter here, and how many it did not measure."""
    untestable = [c.id for c in claims if c.verdict == UNTESTABLE]
    decided = [c for c in claims if c.verdict not in (NOT_MEASURED, UNTESTABLE)]
    missing = sum(c.verdict == NOT_MEASURED for c in claims)
    parts = [f"{len(decided)} of {len(claims)} decided here ("
             + ", ".join(f"{c.id}: {c.verdict}" for c in decided) + ")" if decided
             else f"none of the {len(claims)} decided here"]
    recall = [cid for cid in untestable if cid == recall_report.CLAIM_ID]
    context = [cid for cid in untestable if cid != recall_report.CLAIM_ID]
    if context:
        parts.append(f"{len(context)} untestable here, context not shown to matter ({', '.join(context)}; "
                     "see \"Does context matter here?\")")
    if recall:
        parts.append(f"{recall[0]} untestable here: the transformer itself does not recall (below "
                     f"{recall_report.SOLVED:.0%}) in any setting")
    if missing:
        parts.append(f"{missing} not measured (listed under Claims)")
    return "The paper's claims: " + "; ".join(parts) + "."


def _recall_study(data: ReportData) -> bool:
    """The study trained on MQAR only: its answer is recall, it has no perplexity to compare."""
    has_ppl = schema.M_VAL_PPL in data.ok and data.ok[schema.M_VAL_PPL].notna().any()
    return data.recall is not None and not data.recall.points.empty and not has_ppl


def headline(data: ReportData) -> Block:
    if _recall_study(data):
        lead = ("Recall of each model trained on MQAR (mean over seeds with its 95% interval, in %), per setting, "
                "from the largest KV-cache to the smallest; the claim below pairs each Attamba with the window and "
                "the iso-KV transformer of its setting.")
        return Block("The answer", recall_report.answer_lines(data.recall), lead=[lead],
                     after=[claims_tally(data.claims)], css="headline")
    lead = ("Perplexity of each Attamba against its baselines of the same size preset, as a % difference "
            "(negative: Attamba better) with its 95% interval over seed-paired runs and the verdict, beside "
            "the measured KV-cache and non-embedding parameter ratios.")
    return Block("The answer", answer_lines(data), lead=[lead], after=[claims_tally(data.claims)], css="headline")


def headline_text(block: Block) -> list[str]:
    """The headline's answer lines and claims line, without markup: for the MLflow run description and the
    CLI's JSON."""
    return [line.replace("**", "").replace("`", "") for line in block.lines + block.after]


def run_description(block: Block, report: str) -> str:
    """The headline as an MLflow run description (Markdown): where the report is, the answer lines, the
    claims line."""
    return "\n\n".join([f"**The answer** (report: `{report}`; also under this run's artifacts, `report/`)",
                        "\n".join(f"- {line}" for line in block.lines), *block.after])


def context_matters(data: ReportData) -> list[Block]:
    """"Does context matter here?" (context.context_section): one block per table, in its order."""
    if data.context is None:
        return []
    return [Block(title, table=table) for title, table in data.context.sections.items()]


def recall_matters(data: ReportData) -> list[Block]:
    """The recall section (recall.recall_section) of a study with MQAR-trained runs: one block per table."""
    if data.recall is None or data.recall.points.empty:
        return []
    return [Block(title, table=table) for title, table in data.recall.sections.items()]


FRONT_SECTIONS = [recall_matters, context_matters]


def front_blocks(data: ReportData) -> list[Block]:
    """The headline, then each FRONT_SECTIONS section that has something to say, in order."""
    blocks = [headline(data)]
    for section in FRONT_SECTIONS:
        blocks += section(data)
    return blocks


def not_measured_line(claims: list[Claim]) -> str:
    """The claims this study could not measure, in one line, each with what would measure it."""
    missing = [c for c in claims if c.verdict == NOT_MEASURED]
    if not missing:
        return ""
    return (f"Not measured ({len(missing)}): " + "; ".join(
        f"{c.id}, needs {MEASURED_BY[c.id]}" if c.id in MEASURED_BY else f"{c.id} ({c.reason or 'no reason given'})"
        for c in missing) + ".")


def claims_block(claims: list[Claim]) -> Block:
    """The claims measured here as a table (one row each), the ones not measured collapsed into one line."""
    measured = [c for c in claims if c.verdict != NOT_MEASURED]
    table = claims_table(measured) if measured else empty("no claim could be measured from this study's runs")
    after = [line for line in (not_measured_line(claims),) if line]
    return Block(CLAIMS_TITLE, table=table, after=after)
