"""How the report prints a number: one helper for every table, headline line and figure label.

Tables show at most 3 significant figures (4 for losses and perplexities, `sig=4`), so that a reader sees
`+13.6% [8.23, 19.0]`, not `13.6401 [8.23202, 19.0481]`; the full values are in fits.json, claims.json
and runs.csv. Rules, for a finite value v:
- a whole number below 10,000 is printed exactly (`4` seeds, P = `8`, `300` steps);
- |v| >= 10,000 gets an SI suffix with `sig` significant figures: 614400 -> `614k`, 1.31e6 -> `1.31M`;
- 1,000 <= |v| < 10,000 is rounded to an integer (at most 4 figures): 2345.6 -> `2346`;
- |v| < 0.001 (but not 0) is scientific: `1.23e-05`;
- anything else keeps `sig` significant figures, trailing zeros included: 19.0481 -> `19.0`, 4.6 -> `4.60`.
None, NaN and infinities are `n/a`.
"""
from __future__ import annotations

import math
import numbers

NA = "n/a"
SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def _finite(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def num(v, sig: int = 3, whole: bool = True) -> str:
    """`v` with `sig` significant figures under the module's rules; strings pass through unchanged.
    whole=False prints a whole float like any other (`4.00`, not `4`): for a measured ratio."""
    if v is None:
        return NA
    if isinstance(v, str):
        return v
    if isinstance(v, (bool,)):
        return str(v)
    if not isinstance(v, numbers.Real):
        return str(v)
    if not math.isfinite(v):
        return NA
    a = abs(v)
    if (isinstance(v, numbers.Integral) or (whole and float(v).is_integer())) and a < 1e4:
        return str(int(v))
    if a >= 1e4:
        units = SI[::-1]                                    # k, M, G, T
        i = max(j for j, (scale, _) in enumerate(units) if a >= scale)
        mantissa = float(f"{v / units[i][0]:.{sig}g}")
        if abs(mantissa) >= 1000 and i + 1 < len(units):    # 999.6k rounds to 1000k: 1M
            i += 1
            mantissa = float(f"{v / units[i][0]:.{sig}g}")
        text = f"{mantissa:.0f}" if abs(mantissa) >= 1000 else f"{mantissa:.{sig}g}"   # beyond T
        return text + units[i][1]
    if a >= 1e3:
        return str(int(round(v)))
    if a == 0:
        return "0"
    if a < 1e-3:
        return f"{v:.{max(sig - 1, 0)}e}"
    if abs(float(f"{v:.{sig}g}")) >= 1e3:         # 999.7 at 3 figures: 1000, not 1.00e+03
        return str(int(round(v)))
    text = f"{v:#.{sig}g}"
    return text[:-1] if text.endswith(".") else text


def signed(v, sig: int = 3) -> str:
    """`num` with an explicit sign for a positive value: `+13.6`, `-2.10`, `0`."""
    text = num(v, sig)
    return "+" + text if _finite(v) and v > 0 else text


def interval(lo, hi, sig: int = 3) -> str:
    """`[8.23, 19.0]`; `no interval` when either end is missing (one seed pair)."""
    if not (_finite(lo) and _finite(hi)):
        return "no interval"
    return f"[{num(lo, sig)}, {num(hi, sig)}]"


def pct(mean, lo=None, hi=None, sig: int = 3) -> str:
    """A percent difference with its interval: `+13.6% [8.23, 19.0]` (`+13.6%` without lo and hi)."""
    text = f"{signed(mean, sig)}%" if _finite(mean) else NA
    if lo is None and hi is None:
        return text
    return f"{text} {interval(lo, hi, sig)}"


def ratio(v, sig: int = 3) -> str:
    """A ratio as a factor: `1.94x`, `4.00x`."""
    return f"{num(v, sig, whole=False)}x" if _finite(v) else NA


def parse(text: str) -> float:
    """The number `num` printed (SI suffixes and a trailing % read back); for tests and tools."""
    t = str(text).strip().rstrip("%x").lstrip("+")
    for scale, unit in SI:
        if t.endswith(unit):
            return float(t[:-1]) * scale
    return float(t)
