"""Pre-flight: the checks of a command's input that can run before anything is written or started.

Each command parses its input, runs these checks, and only then writes: run folders, locks, the token cache,
Ray and MLflow all come after. Config values are checked where they are built (the frozen configs'
`__post_init__`); what needs this machine or its file system is checked here: devices and resources
(`machine`), the places a run writes (`paths`), one run config as a whole (`run`), with the data source,
tokenizer and vocabulary checks of `pipeline/data/checks.py`. `phase.validating` marks the phase, so any error it raises is one line.
"""

from pipeline.preflight.phase import InputError, one_line, validating
from pipeline.preflight.run import check_places, check_run, ignored_fields

__all__ = ["InputError", "check_places", "check_run", "ignored_fields", "one_line", "validating"]
