"""A report rebuilt from the runs.csv an earlier report saved: read back as the very DataFrame the MLflow loader
gave (dtypes, NaNs, tags only some runs carry), and the same report (claims, fits, figures, runs.csv) comes out
of it, through `attamba report --runs`."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline import schema
from pipeline.cli import main
from pipeline.report import make_report
from pipeline.report.load import load_runs, read_runs_file
from tests.pipeline.report.test_claims import VARIANTS, _log
from tests.pipeline.report.test_report import _log_run, mlflow_experiment

NAME = "claims"   # the study tag _log writes: the experiment a runs file is known by


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs_file")
    uri, client, exp_id = mlflow_experiment(root, NAME)
    for variant, spec in VARIANTS.items():
        for size in spec[-1]:
            for seed in spec[-2]:
                _log(client, exp_id, variant, size, seed)
    # a failed run: kept in the table with its state, and no validation metrics
    _log_run(client, exp_id, "s1__attamba-P16-L8-cyclic__s0", "attamba-P16-L8-cyclic", "attamba", "s1", 0, "16",
             "8", 3.0, 1e5, status="FAILED", extra_tags={schema.TAG_STUDY: NAME})
    from_mlflow = root / "from_mlflow"
    make_report(NAME, from_mlflow, tracking_uri=uri, n_bootstrap=20)
    return {"uri": uri, "root": root, "from_mlflow": from_mlflow}


def test_the_saved_file_reads_back_as_the_loaders_frame(saved):
    frame = load_runs(NAME, saved["uri"]).runs
    back = read_runs_file(saved["from_mlflow"] / "runs.csv")
    pd.testing.assert_frame_equal(back, frame, check_exact=True)
    # what makes that hold: tags only some runs carry are NaN elsewhere, metrics NaN where not logged
    label = schema.TAG_EVAL_VARIANT_PREFIX + "swa-W33"
    assert back[label].isna().sum() == (back["variant"] != "full").sum() > 0
    assert back[schema.M_VAL_PPL].isna().sum() == 1 and (back["state"] == "failed").sum() == 1
    assert back[schema.TAG_SEED].dtype.kind in "if" and back[schema.TAG_CHUNK].isna().any()


def test_the_report_rebuilt_from_it_is_the_same(saved, tmp_path):
    first, again = saved["from_mlflow"], tmp_path / "again"
    assert main(["report", "--runs", str(first / "runs.csv"), "--out", str(again)]) == 0
    for name in ("claims.json", "fits.json", "runs.csv"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    assert json.loads((again / "claims.json").read_text())["experiment"] == NAME
    figures = sorted(p.name for p in (first / "figures").glob("*.png"))
    assert figures and figures == sorted(p.name for p in (again / "figures").glob("*.png"))
    for name in figures:
        assert (again / "figures" / name).read_bytes() == (first / "figures" / name).read_bytes(), name
    a, b = (first / "summary.md").read_text(), (again / "summary.md").read_text()
    assert a.replace("in MLflow,", "in runs.csv,", 1) == b   # the only difference: where the runs were read


def test_runs_file_refusals(saved, tmp_path, capsys):
    runs = str(saved["from_mlflow"] / "runs.csv")
    assert main(["report", "--runs", runs, "--tracking-uri", saved["uri"], "--out", str(tmp_path / "x")]) == 2
    assert "--tracking-uri names an MLflow store" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["report", "--runs", runs, "--experiment", NAME])
    assert exc.value.code == 2
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="must be a runs.csv written by `attamba report`"):
        make_report(None, tmp_path / "y", runs_file=other)
