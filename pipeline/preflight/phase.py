"""The validation phase of a command: everything its input can be checked for, before it writes or starts
anything. An error raised there is the user's to fix, so it leaves as one line; after it, an unexpected
error is a bug and keeps its traceback."""

from __future__ import annotations

import contextlib
import os

import yaml

MAX_LINE = 800      # characters of an error line; longer ones lose their middle, keeping the field and the fix
DEBUG_ENV = "ATTAMBA_DEBUG"   # set to 1: errors of the validation phase keep their traceback

# What parsing and checking input can raise besides ValueError: a shape the checks did not foresee (a list
# where text belongs), a path the OS refuses, a file that is not YAML or not UTF-8, a structure too deep.
INPUT_ERRORS = (TypeError, KeyError, IndexError, AttributeError, OSError, RecursionError, OverflowError,
                UnicodeError, yaml.YAMLError)


class InputError(ValueError):
    """Bad input found in the validation phase: one line, naming the field, the value and the fix."""


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """`text` on one line, at most `limit` characters (the middle of a longer one is cut out)."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    keep = limit - 40
    return f"{text[:keep]} [... {len(text) - keep - 30} characters ...] {text[-30:]}"


@contextlib.contextmanager
def validating(what: str):
    """The body parses and checks the input of `what` (a command, a file): a ValueError passes as it is, and
    any other error of INPUT_ERRORS becomes an InputError naming its type, so the command prints one line
    and exits 2. With ATTAMBA_DEBUG=1 the original error and its traceback pass instead."""
    try:
        yield
    except ValueError:
        raise
    except INPUT_ERRORS as exc:
        if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            raise
        detail = "maximum nesting depth exceeded" if isinstance(exc, RecursionError) else str(exc)
        raise InputError(one_line(f"{what}: the input could not be read ({type(exc).__name__}: {detail}); check "
                                  f"the value this names, or run with {DEBUG_ENV}=1 for the traceback")) from exc
