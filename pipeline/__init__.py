"""The pipeline around the model: data, train, eval, tracking, ray, study, search, report, bench.

Modules that lived at this package's top level before it was split into stage packages still import (and
still run with `python -m`) under their old names, with a FutureWarning naming the new module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "bench_attention": "bench.attention", "bench_decode": "bench.decode", "bench_matvec": "bench.matvec",
    "bench_train_step": "bench.train_step", "checkpoint": "train.checkpoint", "train_engine": "train.engine",
    "train_tracking": "train.run_tracking", "data_cache": "data.cache", "data_loader": "data.loader",
    "data_sources": "data.sources", "tokenizer": "data.tokenizer", "evaluate": "eval.evaluate",
    "mqar": "eval.mqar", "lm_eval_adapter": "eval.harness", "tracking_config": "tracking.config",
    "tracking_journal": "tracking.journal", "tracking_mlflow": "tracking.mlflow_client",
    "ray_adapter": "ray.trainer", "study_spec": "study.spec", "search_results": "search.results",
    "search_space": "search.space", "search_store": "search.store", "generate_cli": "cli",
}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`pipeline.<old>` resolves to the module that now holds it: imports get that module object itself,
    `python -m pipeline.<old>` runs its code."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.partition(".")
        if prefix != __name__ or old not in MOVED:
            return None
        new = importlib.util.find_spec(f"{__name__}.{MOVED[old]}")
        return importlib.util.spec_from_loader(fullname, self, origin=new.origin)

    @staticmethod
    def _target(fullname: str) -> str:
        new = f"{__name__}.{MOVED[fullname.partition('.')[2]]}"
        warnings.warn(f"{fullname} moved to {new}; the old name will be removed", FutureWarning, stacklevel=3)
        return new

    def create_module(self, spec):
        return importlib.import_module(self._target(spec.name))

    def exec_module(self, module):
        pass

    def get_code(self, fullname):
        return importlib.util.find_spec(self._target(fullname)).loader.get_code(None)


sys.meta_path.append(_MovedModule())
