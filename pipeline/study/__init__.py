"""Studies: a declared grid (sizes x variants x seeds x token budgets) expanded into named runs, and the
driver that trains the missing ones on Ray, tracks them under one MLflow parent run and writes the report."""

from pipeline.study.driver import run_study
from pipeline.study.spec import RunSpec, StudyConfig, expand, load_study

__all__ = ["RunSpec", "StudyConfig", "expand", "load_study", "run_study"]
