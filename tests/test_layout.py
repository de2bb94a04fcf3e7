"""The package layout's import rules, read from the source with `ast` (nothing is imported):

- only `pipeline/ray/` imports `ray`;
- `attamba/` (the model) imports none of `pipeline`, `ray`, `deepspeed`, `mlflow`, `optuna`;
- `pipeline/`'s top level holds only its shared modules; everything else lives in a stage package;
- `pipeline/search/` does not import from `pipeline/study/` (both stand on `pipeline/ray/` and `tracking/`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_TOP_LEVEL = {"__init__.py", "__main__.py", "cli.py", "config.py", "schema.py"}
NOT_IN_MODEL = ("pipeline", "ray", "deepspeed", "mlflow", "optuna")


def imported(source: str) -> set[str]:
    """Absolute names of the modules `source` imports, anywhere (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def imports_any(source: str, packages: tuple[str, ...]) -> set[str]:
    """The modules of `packages` (or below them) that `source` imports."""
    return {name for name in imported(source) if name.split(".")[0] in packages}


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("snippet, found", [
    ("import ray", {"ray"}),
    ("import ray.train as rt", {"ray.train"}),
    ("from ray import tune", {"ray"}),
    ("from ray.tune.search import Searcher", {"ray.tune.search"}),
    ("def f():\n    import os, ray\n", {"ray"}),
    ("import raytracing\nfrom pipeline.ray import cluster\nfrom . import ray\n", set()),
])
def test_the_detector_finds_ray_imports_and_only_those(snippet, found):
    assert imports_any(snippet, ("ray",)) == found


@pytest.mark.parametrize("path", [p for p in _files("pipeline") if "ray" not in p.relative_to(ROOT / "pipeline").parts],
                         ids=_id)
def test_only_pipeline_ray_imports_ray(path):
    found = imports_any(path.read_text(), ("ray",))
    assert not found, f"{_id(path)} imports {sorted(found)}; Ray belongs in pipeline/ray/ only"


@pytest.mark.parametrize("path", _files("attamba"), ids=_id)
def test_the_model_imports_no_pipeline_or_infrastructure(path):
    found = imports_any(path.read_text(), NOT_IN_MODEL)
    assert not found, f"{_id(path)} imports {sorted(found)}; attamba/ is pure PyTorch"


@pytest.mark.parametrize("path", _files("pipeline/search"), ids=_id)
def test_search_does_not_import_study(path):
    found = {name for name in imported(path.read_text()) if name.startswith("pipeline.study")}
    assert not found, f"{_id(path)} imports {sorted(found)}; share code through pipeline/ray or tracking/"


def test_pipeline_top_level_holds_only_shared_modules():
    files = {p.name for p in (ROOT / "pipeline").glob("*.py")}
    assert PIPELINE_TOP_LEVEL >= files, f"move {sorted(files - PIPELINE_TOP_LEVEL)} into a stage package"
    assert {"__init__.py", "cli.py", "config.py", "schema.py"} <= files
