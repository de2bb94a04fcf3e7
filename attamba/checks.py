"""Field validators shared by every config: the model's here in attamba/ and each section of pipeline/'s.

Each checks one value and raises `ValueError("NAME must be REQUIREMENT, got VALUE; FIX")` (the fix is
optional) or returns the value unchanged, so a `__post_init__` reads as one requirement per line.
`integer` and `in_range` state the whole requirement in every message ("an integer >= 1"); `at_least`
and `positive` name the type when the type is wrong and the bound when the value is out of range.
`or_none=True` also accepts None ("must be None or ..."). They live in attamba/ because attamba must not
import pipeline/, and pipeline's configs import them from here.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable

# Names that become folder names (a study, a run, an experiment): one path component, never '.' or '..'
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
SEED_LIMIT = 2**63          # seeds are 64-bit signed integers to torch, numpy (via % 2**32) and the data split
CONTROL = re.compile(r"[\x00-\x1f\x7f]")   # a newline, NUL, tab, escape ...: never part of a name or a path
SHOWN = 80                  # characters of a value's repr quoted in an error
YAML11_BOOLEANS = ("yes", "no", "on", "off", "y", "n")   # booleans to YAML 1.1, text to YAML 1.2 and here


def shown(value) -> str:
    """`repr(value)`, cut to SHOWN characters: an error line stays one short line whatever the value."""
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN - 20]}...{text[-12:]} ({len(text)} characters)"


def fail(name: str, value, requirement: str, fix: str = ""):
    """Raise the one error form: `NAME must be REQUIREMENT, got VALUE[; FIX]`."""
    message = f"{name} must be {requirement}, got {shown(value)}"
    raise ValueError(f"{message}; {fix}" if fix else message)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value, finite: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        return False
    return math.isfinite(value) or not finite


def _requirement(text: str, or_none: bool) -> str:
    return f"None or {text}" if or_none else text


def number(name: str, value, *, finite: bool = False, or_none: bool = False, fix: str = ""):
    """A real number (not a bool, not NaN); `finite` also refuses infinities."""
    if value is None and or_none:
        return value
    if not _is_number(value, finite):
        fail(name, value, _requirement("a finite number" if finite else "a number", or_none), fix)
    return value


def integer(name: str, value, low: int | None = None, high: int | None = None, *, or_none: bool = False,
            fix: str = ""):
    """An integer (not a bool), optionally within [low, high]."""
    if value is None and or_none:
        return value
    if not (_is_integer(value) and (low is None or value >= low) and (high is None or value <= high)):
        if low is not None and high is not None:
            text = f"an integer in [{low}, {high}]"
        elif low is not None:
            text = f"an integer >= {low}"
        elif high is not None:
            text = f"an integer <= {high}"
        else:
            text = "an integer"
        fail(name, value, _requirement(text, or_none), fix)
    return value


def at_least(name: str, value, low, *, integer: bool = False, finite: bool = False, or_none: bool = False,
             fix: str = ""):
    """A number (an integer with `integer=True`) >= low."""
    if value is None and or_none:
        return value
    kind = "an integer" if integer else ("a finite number" if finite else "a number")
    if not (_is_integer(value) if integer else _is_number(value, finite)):
        fail(name, value, _requirement(f"{kind} >= {low}", or_none), fix)
    if value < low:
        fail(name, value, _requirement(f">= {low}", or_none), fix)
    return value


def positive(name: str, value, *, finite: bool = False, or_none: bool = False, fix: str = ""):
    """A number > 0."""
    if value is None and or_none:
        return value
    if not _is_number(value, finite):
        fail(name, value, _requirement(f"{'a finite number' if finite else 'a number'} > 0", or_none), fix)
    if value <= 0:
        fail(name, value, _requirement("> 0", or_none), fix)
    return value


def in_range(name: str, value, low, high, *, high_open: bool = False, fix: str = ""):
    """A number in [low, high] ([low, high) with `high_open`)."""
    inside = _is_number(value, finite=False) and low <= value and (value < high if high_open else value <= high)
    if not inside:
        fail(name, value, f"a number in [{low}, {high}{')' if high_open else ']'}", fix)
    return value


def one_of(name: str, value, choices: Iterable, *, what: str | None = None, fix: str = ""):
    """A member of `choices`. With `what` (e.g. "size preset") the message reads
    "NAME: unknown WHAT VALUE; choose from ...", the form used for entries of a list."""
    choices = tuple(choices)
    # True == 1: a bool is a member only of choices that list bools
    bool_slip = isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)
    if value not in choices or bool_slip:
        listed = ", ".join(str(c) for c in choices)
        if what is not None:
            raise ValueError(f"{name}: unknown {what} {shown(value)}; choose from {listed}"
                             + (f"; {fix}" if fix else ""))
        fail(name, value, f"one of {listed}", fix)
    return value


def boolean(name: str, value, *, fix: str = ""):
    if not isinstance(value, bool):
        if isinstance(value, str) and value.strip().lower() in YAML11_BOOLEANS:
            fix = fix or f"write true or false ({value!r} is text here, as in YAML 1.2)"
        fail(name, value, "true or false", fix)
    return value


def seed(name: str, value, *, fix: str = ""):
    """A seed: an integer in [0, 2**63)."""
    return integer(name, value, 0, SEED_LIMIT - 1, fix=fix or "a seed is an integer from 0 to 2**63 - 1")


def text(name: str, value, *, or_none: bool = False, fix: str = ""):
    """A non-empty string (not only spaces) without control characters (newline, NUL, tab, ...)."""
    if value is None and or_none:
        return value
    if not isinstance(value, str) or not value.strip():
        fail(name, value, _requirement("a non-empty string", or_none), fix)
    if CONTROL.search(value):
        fail(name, value, _requirement("text without control characters (newline, NUL, tab)", or_none), fix)
    return value


def safe_name(name: str, value, *, or_none: bool = False, fix: str = ""):
    """A name used as a folder: letters, digits, '.', '_' and '-', starting with a letter or digit, at most
    200 characters; so no '/', no '..' and nothing a shell or a file system would read specially."""
    if value is None and or_none:
        return value
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        fail(name, value, _requirement("letters, digits, '.', '_' or '-', starting with a letter or digit "
                                       "(at most 200 characters)", or_none),
             fix or "it becomes a folder name; e.g. 'my-study_1'")
    return value
