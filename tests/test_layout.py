"""The package layout's import rules, read from the source with `ast` (nothing is imported):

- only `pipeline/ray/` imports `ray`, and every module in it does (what needs no Ray lives below it);
- in `pipeline/study/` and `pipeline/search/` only the drivers import `pipeline.ray`;
- `attamba/` (the model) imports none of `pipeline`, `ray`, `deepspeed`, `mlflow`, `optuna`;
- `pipeline/`'s top level holds only its shared modules; everything else lives in a stage package;
- `pipeline/search/` does not import from `pipeline/study/` (both stand on `pipeline/runs/` and `tracking/`);
- each part of `pipeline/` imports only the parts, model modules and engines docs/architecture.md allows it
  (ALLOWED below), and ALLOWED points only down the floors of LEVELS: no import climbs, no two parts
  import each other;
- no modules import each other in a circle (scripts/import_graph.py, which also counts upward imports).
Each rule is a function of source text, tested on snippets here and applied to every file.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_TOP_LEVEL = {"__init__.py", "__main__.py", "checkpoints.py", "cli.py", "config.py", "loader.py",
                      "schema.py", "yamlio.py"}
NOT_IN_MODEL = ("pipeline", "ray", "deepspeed", "mlflow", "optuna")
ENGINES = ("ray", "deepspeed", "mlflow", "optuna")
DRIVERS = {"pipeline/study/driver.py", "pipeline/search/driver.py"}
# The floors, lowest first: a part imports only parts on floors below its own (scripts/import_graph.py counts
# the imports that do not). attamba's modules are parts of their own, pipeline's stages and top-level modules.
LEVELS = {
    "attamba.checks": 0, "attamba.ops": 0, "attamba.config": 1, "attamba.boundaries": 2, "attamba.layers": 1,
    "attamba.presets": 2, "attamba.cache": 3, "attamba.costs": 3, "attamba.ssm": 2, "attamba.attention": 3,
    "attamba.model": 4, "attamba.generate": 4, "attamba.variants": 5, "attamba": 6,
    "__init__": 10, "yamlio": 10, "schema": 10,
    "data": 11, "tracking": 11, "loader": 11,
    "config": 12, "report": 12, "runs": 12,
    "preflight": 13, "checkpoints": 13,
    "eval": 14,
    "train": 15,
    "bench": 16,
    "ray": 17,
    "study": 18, "search": 18,
    "cli": 19,
}
# What each part of pipeline/ may import: other pipeline parts, attamba's modules and engines
# (docs/architecture.md, "Packages").
ALLOWED = {
    "__init__": set(),
    "schema": set(),
    "yamlio": set(),
    "loader": {"yamlio", "attamba.checks"},
    "config": {"data", "loader", "tracking", "attamba.checks", "attamba.config", "attamba.costs",
               "attamba.presets", "attamba.variants"},
    "checkpoints": {"config", "data", "attamba.model"},
    "preflight": {"config", "data", "tracking", "attamba.checks", "attamba.costs", "attamba.presets"},
    "data": {"attamba.checks"},
    "tracking": {"schema", "mlflow", "attamba.checks"},
    "eval": {"checkpoints", "data", "schema", "tracking", "yamlio", "attamba.config", "attamba.costs",
             "attamba.model", "attamba.variants"},
    "train": {"checkpoints", "config", "loader", "schema", "data", "eval", "runs", "tracking", "deepspeed",
              "attamba.config", "attamba.costs", "attamba.model"},
    "runs": {"schema", "tracking", "attamba.checks"},
    "ray": {"checkpoints", "config", "schema", "data", "runs", "train", "tracking", "ray"},
    "study": {"config", "loader", "schema", "data", "preflight", "ray", "report", "runs", "tracking", "attamba.checks",
              "attamba.config", "attamba.costs", "attamba.presets"},
    "search": {"config", "loader", "schema", "data", "preflight", "ray", "runs", "tracking", "optuna", "attamba.checks",
               "attamba.config", "attamba.costs"},
    "report": {"schema", "tracking", "mlflow"},  # tracking: mlflow_client.search_all, the one paging loop
    "bench": {"train", "attamba.cache", "attamba.costs", "attamba.model", "attamba.ops", "attamba.presets"},
    "cli": {"checkpoints", "config", "loader", "schema", "data", "tracking", "eval", "train", "study", "search", "report",
            "bench", "preflight", "attamba.generate"},
}


def imported(source: str) -> set[str]:
    """Absolute names of the modules `source` imports, anywhere (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module in ("pipeline", "attamba"):  # from pipeline import schema -> pipeline.schema
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
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


def misplaced_ray(rel: str, source: str) -> str | None:
    """Why the module at `rel` (relative to the repository) breaks the Ray rule, or None: Ray is imported in
    pipeline/ray/ only, and there by every module (its package face aside)."""
    in_ray = rel.startswith("pipeline/ray/")
    uses_ray = bool(imports_any(source, ("ray",)))
    if uses_ray and not in_ray:
        return f"{rel} imports ray; Ray belongs in pipeline/ray/ only"
    if in_ray and not uses_ray and not rel.endswith("__init__.py"):
        return f"{rel} does not import ray; move it below (pipeline/runs/ or the stage that owns it)"
    return None


@pytest.mark.parametrize("rel, source, broken", [
    ("pipeline/ray/tune.py", "def f():\n    from ray import tune\n", False),
    ("pipeline/study/spec.py", "import ray\n", True),
    ("pipeline/ray/outputs.py", "import os\nfrom pipeline import schema\n", True),
    ("pipeline/ray/__init__.py", '"""Ray."""\n', False),
    ("pipeline/study/spec.py", "from pipeline.runs.resources import Resources\n", False),
])
def test_the_ray_rule_refuses_ray_outside_and_non_ray_inside(rel, source, broken):
    assert (misplaced_ray(rel, source) is not None) == broken


@pytest.mark.parametrize("path", _files("pipeline"), ids=_id)
def test_only_pipeline_ray_imports_ray_and_all_of_it_does(path):
    why = misplaced_ray(_id(path), path.read_text())
    assert why is None, why


def ray_users(rel: str, source: str) -> set[str]:
    """The `pipeline.ray` modules a study or search module other than a driver imports (none allowed)."""
    if rel in DRIVERS or not rel.startswith(("pipeline/study/", "pipeline/search/")):
        return set()
    return {name for name in imported(source) if name == "pipeline.ray" or name.startswith("pipeline.ray.")}


@pytest.mark.parametrize("rel, source, found", [
    ("pipeline/study/spec.py", "from pipeline.ray.cluster import Resources\n", {"pipeline.ray.cluster"}),
    ("pipeline/search/space.py", "def f():\n    from pipeline.ray import tune\n", {"pipeline.ray"}),
    ("pipeline/study/driver.py", "from pipeline.ray import cluster\n", set()),
    ("pipeline/study/checks.py", "from pipeline.runs.markers import read_attempts\n", set()),
    ("pipeline/cli.py", "from pipeline.ray.cluster import connect\n", set()),
])
def test_the_driver_rule_finds_ray_below_the_drivers(rel, source, found):
    assert ray_users(rel, source) == found


@pytest.mark.parametrize("path", _files("pipeline/study") + _files("pipeline/search"), ids=_id)
def test_only_the_drivers_of_study_and_search_import_pipeline_ray(path):
    found = ray_users(_id(path), path.read_text())
    assert not found, f"{_id(path)} imports {sorted(found)}; only the drivers call Ray (move the code to pipeline/runs/)"


@pytest.mark.parametrize("snippet, found", [
    ("import torch\nfrom attamba.config import ModelConfig\n", set()),
    ("from pipeline.schema import M_LOSS\n", {"pipeline.schema"}),
    ("def f():\n    import mlflow\n", {"mlflow"}),
    ("import deepspeed, optuna\n", {"deepspeed", "optuna"}),
])
def test_the_model_rule_finds_infrastructure(snippet, found):
    assert imports_any(snippet, NOT_IN_MODEL) == found


@pytest.mark.parametrize("path", _files("attamba"), ids=_id)
def test_the_model_imports_no_pipeline_or_infrastructure(path):
    found = imports_any(path.read_text(), NOT_IN_MODEL)
    assert not found, f"{_id(path)} imports {sorted(found)}; attamba/ is pure PyTorch"


def study_imports(source: str) -> set[str]:
    return {name for name in imported(source) if name.startswith("pipeline.study")}


def test_the_search_rule_finds_study_imports():
    assert study_imports("from pipeline.study.grid import Grid\nfrom pipeline.runs import lease\n") == {
        "pipeline.study.grid"}
    assert study_imports("from pipeline.search.space import Space\n") == set()


@pytest.mark.parametrize("path", _files("pipeline/search"), ids=_id)
def test_search_does_not_import_study(path):
    found = study_imports(path.read_text())
    assert not found, f"{_id(path)} imports {sorted(found)}; share code through pipeline/runs or tracking/"


def extra_top_level(names: set[str]) -> set[str]:
    """The modules at pipeline/'s top level that are not its shared ones."""
    return names - PIPELINE_TOP_LEVEL


def test_the_top_level_rule_finds_strays():
    assert extra_top_level({"cli.py", "schema.py", "train_loop.py"}) == {"train_loop.py"}


def test_pipeline_top_level_holds_only_shared_modules():
    files = {p.name for p in (ROOT / "pipeline").glob("*.py")}
    assert not extra_top_level(files), f"move {sorted(extra_top_level(files))} into a stage package"
    assert {"__init__.py", "cli.py", "config.py", "schema.py"} <= files


def _part(path: Path) -> str:
    """The part of pipeline/ a file belongs to: its stage package, or its top-level module's name."""
    rel = path.relative_to(ROOT / "pipeline").parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def uses(source: str) -> set[str]:
    """The pipeline parts, attamba modules (`attamba.ops` for all of ops/) and engines that `source` imports."""
    found = set()
    for name in imported(source):
        parts = name.split(".")
        if parts[0] == "pipeline" and len(parts) > 1:
            found.add(parts[1])
        elif parts[0] == "attamba" and len(parts) > 1:
            found.add(".".join(parts[:2]))
        elif parts[0] in ENGINES:
            found.add(parts[0])
    return found


def test_the_part_detector_reads_stages_models_and_engines():
    assert uses("from pipeline import schema\nfrom pipeline.runs.resources import Resources\nimport optuna.trial\n"
                "from attamba import costs\nfrom attamba.ops.attention import attention\n"
                "def f():\n    import mlflow\n") == {"schema", "runs", "optuna", "mlflow", "attamba.costs",
                                                        "attamba.ops"}


def not_allowed(part: str, source: str, allowed: dict = ALLOWED) -> set[str]:
    """What `source`, a module of pipeline part `part`, imports that `allowed` does not give that part."""
    return uses(source) - allowed[part] - {part}


@pytest.mark.parametrize("part, source, found", [
    ("eval", "def load():\n    from pipeline.train.checkpoint import load_model\n", {"train"}),
    ("eval", "from pipeline.checkpoints import load_model\n", set()),
    ("data", "from attamba.model import AttambaLM\n", {"attamba.model"}),
    ("train", "import ray\n", {"ray"}),
    ("ray", "from pipeline.ray.cluster import connect\nimport ray\n", set()),
])
def test_the_stage_rule_refuses_what_a_part_may_not_import(part, source, found):
    assert not_allowed(part, source) == found


@pytest.mark.parametrize("path", _files("pipeline"), ids=_id)
def test_each_stage_imports_only_what_it_may(path):
    part = _part(path)
    assert part in ALLOWED, f"{_id(path)}: add pipeline/{part} to ALLOWED and to docs/architecture.md"
    extra = not_allowed(part, path.read_text())
    assert not extra, (f"{_id(path)} imports {sorted(extra)}, which pipeline/{part} may not "
                       "(docs/architecture.md); move the shared code down a layer")


def climbing(allowed: dict, levels: dict) -> list[tuple[str, str]]:
    """The (part, allowed part) pairs of `allowed` that do not point to a lower floor of `levels`."""
    return [(part, other) for part, others in allowed.items() for other in sorted(others)
            if other not in ENGINES and levels[other] >= levels[part]]


def test_the_floor_rule_finds_pairs_that_climb():
    levels = {"a": 0, "b": 1, "c": 2}
    assert climbing({"a": set(), "b": {"a"}, "c": {"a", "b", "ray"}}, levels) == []
    assert climbing({"a": {"b"}, "b": {"a"}, "c": {"c"}}, levels) == [("a", "b"), ("c", "c")]


def test_allowed_points_only_down_the_floors():
    assert set(ALLOWED) <= set(LEVELS), f"give {sorted(set(ALLOWED) - set(LEVELS))} a floor in LEVELS"
    assert climbing(ALLOWED, LEVELS) == []


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_circle_finder_finds_circles():
    graph = _import_graph()
    assert graph.circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert graph.circles({"a": {"b"}, "b": set()}) == []


def test_no_modules_import_each_other_in_a_circle():
    graph = _import_graph()
    assert graph.circles(graph.graph(ROOT)) == []


def test_every_model_module_and_pipeline_part_has_a_floor():
    graph = _import_graph()
    parts = {graph.part(module) for module in graph.graph(ROOT)}
    assert parts <= set(LEVELS), f"give {sorted(parts - set(LEVELS))} a floor in LEVELS"
    assert graph.upward(graph.graph(ROOT), LEVELS) == []
