"""The Tune `Searcher` of a search: hands out the trials of an Optuna ask/tell (`pipeline.search.searcher`).

Tune pickles its search algorithm (with the Tuner, into `tuner.pkl`, and for Ray client sessions), so the
searcher is a module-level class that Ray's cloudpickle pickles by reference. A pickled copy carries only
`rebuild`, a module-level function (pickled by reference too), and `state`, plain data (storage URL, study,
tracking store, ...): unpickling calls `rebuild(**state)`, which reconnects to the Optuna storage and builds
a fresh ask/tell. The driver's own searcher keeps using the ask/tell it was given, never a rebuilt one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from ray.tune.search import Searcher


def _module_level(function: Callable) -> bool:
    """Whether pickle can name `function`: its module's attribute at its qualified name is itself."""
    found = sys.modules.get(getattr(function, "__module__", None) or "")
    for part in getattr(function, "__qualname__", "<lambda>").split("."):
        found = getattr(found, part, None)
    return found is function


class OptunaSearcher(Searcher):
    """Tune asks for a trial whenever a slot is free (`suggest`) and reports each trial's end
    (`on_trial_complete`); both go to `ask_tell`. The Optuna storage is the only state, so Tune's own
    searcher checkpoints hold nothing."""

    def __init__(self, ask_tell, rebuild: Callable, state: dict):
        if not _module_level(rebuild):
            raise ValueError(f"rebuild must be a module-level function (pickled by reference), got "
                             f"{getattr(rebuild, '__qualname__', rebuild)!r}; define it at the top of its module")
        try:
            json.dumps(state)
        except (TypeError, ValueError) as error:
            raise ValueError(f"state must be plain data (JSON: strings, numbers, lists, mappings, null) so a "
                             f"pickled searcher carries no live object; {error}") from None
        super().__init__()
        self.ask_tell, self.rebuild, self.state = ask_tell, rebuild, state

    def __getstate__(self) -> dict:
        return {"rebuild": self.rebuild, "state": self.state}

    def __setstate__(self, pickled: dict) -> None:
        self.__init__(pickled["rebuild"](**pickled["state"]), pickled["rebuild"], pickled["state"])

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the space is Optuna's; Tune's param_space stays empty

    def save_to_dir(self, *args, **kwargs) -> None:
        pass  # the Optuna storage is the searcher's state; nothing to checkpoint

    def restore_from_dir(self, *args, **kwargs) -> None:
        pass  # ... and nothing to read back: the ask/tell reads the storage

    def suggest(self, trial_id: str):
        config = self.ask_tell.suggest(trial_id)
        return Searcher.FINISHED if config == self.ask_tell.FINISHED else config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.ask_tell.on_trial_complete(trial_id, result, error)
