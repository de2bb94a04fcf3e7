"""The package layout's import rules, read from the source with `ast` (nothing is imported):

- only `pipeline/ray/` imports `ray`;
- `attamba/` (the model) imports none of `pipeline`, `ray`, `deepspeed`, `mlflow`, `optuna`;
- `pipeline/`'s top level holds only its shared modules; everything else lives in a stage package;
- `pipeline/search/` does not import from `pipeline/study/` (both stand on `pipeline/ray/` and `tracking/`);
- each stage imports only the stages and engines docs/architecture.md allows it (ALLOWED below).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_TOP_LEVEL = {"__init__.py", "__main__.py", "cli.py", "config.py", "schema.py", "yamlio.py"}
NOT_IN_MODEL = ("pipeline", "ray", "deepspeed", "mlflow", "optuna")
ENGINES = ("ray", "deepspeed", "mlflow", "optuna")
# What each part of pipeline/ may import: other pipeline parts and engines (docs/architecture.md, "Packages").
ALLOWED = {
    "__init__": set(),
    "schema": set(),
    "yamlio": set(),
    "config": {"data", "tracking", "yamlio"},
    "preflight": {"config", "data", "tracking"},
    "data": set(),
    "tracking": {"schema", "mlflow"},
    "eval": {"data", "train", "schema", "yamlio"},
    "train": {"config", "schema", "data", "eval", "tracking", "deepspeed"},
    "ray": {"config", "schema", "data", "train", "tracking", "ray"},
    "study": {"config", "schema", "data", "ray", "tracking", "report", "preflight"},
    "search": {"config", "schema", "data", "ray", "tracking", "optuna", "preflight"},
    "report": {"schema", "mlflow"},
    "bench": {"train"},
    "cli": {"config", "schema", "data", "tracking", "eval", "train", "study", "search", "report", "bench", "preflight"},
}


def imported(source: str) -> set[str]:
    """Absolute names of the modules `source` imports, anywhere (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "pipeline":  # from pipeline import schema -> pipeline.schema
                names.update(f"pipeline.{alias.name}" for alias in node.names)
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


def _part(path: Path) -> str:
    """The part of pipeline/ a file belongs to: its stage package, or its top-level module's name."""
    rel = path.relative_to(ROOT / "pipeline").parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def uses(source: str) -> set[str]:
    """The pipeline parts and engines that `source` imports."""
    found = set()
    for name in imported(source):
        parts = name.split(".")
        if parts[0] == "pipeline" and len(parts) > 1:
            found.add(parts[1])
        elif parts[0] in ENGINES:
            found.add(parts[0])
    return found


def test_the_part_detector_reads_stages_and_engines():
    assert uses("from pipeline import schema\nfrom pipeline.ray.cluster import Resources\nimport optuna.trial\n"
                "def f():\n    import mlflow\n") == {"schema", "ray", "optuna", "mlflow"}


@pytest.mark.parametrize("path", _files("pipeline"), ids=_id)
def test_each_stage_imports_only_what_it_may(path):
    part = _part(path)
    assert part in ALLOWED, f"{_id(path)}: add pipeline/{part} to ALLOWED and to docs/architecture.md"
    extra = uses(path.read_text()) - ALLOWED[part] - {part}
    assert not extra, (f"{_id(path)} imports {sorted(extra)}, which pipeline/{part} may not "
                       "(docs/architecture.md); move the shared code down a layer")
