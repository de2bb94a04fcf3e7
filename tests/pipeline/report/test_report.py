"""Report: fits recover known laws, Pareto fronts match brute force, and a real SQLite MLflow experiment turns
into a report whose numbers are the logged metrics and whose HTML renders in headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from scipy.optimize import check_grad

from pipeline import schema
from pipeline.report import make_report
from pipeline.report.build import GAP_TITLE
from pipeline.report.fmt import parse
from pipeline.report.fits import _objective, fit_scaling_law, predict
from pipeline.report.pareto import pareto_mask, pareto_mask_naive


# ---------------------------------------------------------------- fits

def test_objective_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    z, log_y = rng.normal(size=(12, 2)), 1.0 + 0.05 * rng.normal(size=12)
    for delta in (1e-3, 1.0):  # linear and quadratic Huber regimes
        theta = np.array([0.4, 0.1, -0.2, 0.3, 0.5])
        err = check_grad(lambda t: _objective(t, z, log_y, delta)[0], lambda t: _objective(t, z, log_y, delta)[1],
                         theta, epsilon=1e-7)
        assert err < 1e-4 * max(1.0, np.abs(_objective(theta, z, log_y, delta)[1]).max())


def test_fit_recovers_single_variable_law():
    rng = np.random.default_rng(1)
    E, A, alpha = 1.69, 406.4, 0.34
    n = np.repeat(np.geomspace(1e6, 1e9, 7), 2)                      # 7 sizes x 2 seeds
    y = (E + A * n ** -alpha) * np.exp(rng.normal(0, 0.002, n.size))
    fit = fit_scaling_law(n, y, n_bootstrap=40, seed=0)
    assert fit.ok
    assert abs(fit.params["alpha"] - alpha) < 0.05
    assert abs(fit.params["E"] - E) / E < 0.02
    lo, hi = fit.intervals["alpha"]
    assert lo <= fit.params["alpha"] <= hi
    mid, plo, phi = predict(fit, np.array([1e10]))
    assert plo[0] <= mid[0] <= phi[0]
    assert abs(mid[0] - (E + A * 1e10 ** -alpha)) / mid[0] < 0.02


def test_fit_recovers_two_variable_law():
    rng = np.random.default_rng(2)
    E, A, alpha, B, beta = 1.69, 406.4, 0.34, 410.7, 0.28
    nn, dd = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e9, 5), np.geomspace(1e9, 1e11, 4)))
    y = (E + A * nn ** -alpha + B * dd ** -beta) * np.exp(rng.normal(0, 0.002, nn.size))
    fit = fit_scaling_law(np.stack([nn, dd], 1), y, n_bootstrap=10, seed=0)
    assert fit.ok
    assert abs(fit.params["alpha"] - alpha) < 0.05
    assert abs(fit.params["beta"] - beta) < 0.05
    gamma = fit_scaling_law(nn, y, n_bootstrap=0, names=["E", "A", "gamma"])
    assert list(gamma.params) == ["E", "A", "gamma"]
    assert abs(fit.params["E"] - E) / E < 0.02


def test_fit_refuses_too_few_sizes():
    fit = fit_scaling_law(np.array([1e6, 1e6, 4e6, 4e6]), np.array([3.0, 3.01, 2.5, 2.49]))
    assert fit.status == "not_identifiable"
    assert fit.reason == "not identifiable from 2 sizes (a 3-parameter law needs >= 4)"
    assert not fit.params and not fit.intervals
    with pytest.raises(ValueError, match="x must be"):
        fit_scaling_law(np.ones((3, 3)), np.ones(3))


# ---------------------------------------------------------------- pareto

@pytest.mark.parametrize("seed", range(5))
def test_pareto_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    # Small integers force ties in x, in y and in both.
    x, y = rng.integers(0, 8, 60).astype(float), rng.integers(0, 8, 60).astype(float)
    fast = pareto_mask(x, y)
    assert np.array_equal(fast, pareto_mask_naive(x, y))
    for i in range(len(x)):  # independent definition: nothing is <= in both and < in one
        dominated = any(x[j] <= x[i] and y[j] <= y[i] and (x[j] < x[i] or y[j] < y[i]) for j in range(len(x)))
        assert fast[i] == (not dominated)


# ---------------------------------------------------------------- end to end on a real MLflow store

SIZES = {"s1": 2e6, "s2": 8e6, "s3": 3.2e7}
VARIANTS = {  # variant -> (attention, P, L, E, KV bytes per non-embedding param)
    "full": ("full", "", "", 2.0, 1.0),
    "attamba-P4-L8-cyclic": ("attamba", "4", "8", 2.1, 0.3),
    "attamba-P8-L8-cyclic": ("attamba", "8", "8", 2.2, 0.18),
}
TOKENS = 1e8


def mlflow_experiment(folder, name: str):
    """(uri, client, experiment id) of a new experiment in a real SQLite MLflow store in `folder`."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment(name, artifact_location=str(folder / "artifacts"))


def _log_run(client, exp_id, trial, variant, attention, size, seed, P, L, loss, kv, status="FINISHED", mqar=None,
             extra_tags=None, overrides=None):
    """One fake training run in a real MLflow store; `extra_tags` add tags, `overrides` replace step-0 metrics."""
    run = client.create_run(exp_id, run_name=trial)
    rid = run.info.run_id
    tags = {schema.TAG_STUDY: "unit", schema.TAG_TRIAL: trial, schema.TAG_SIZE: size,
            schema.TAG_ATTENTION: attention, schema.TAG_VARIANT: variant, schema.TAG_CHUNK: P,
            schema.TAG_LEADING: L, schema.TAG_BOUNDARIES: "cyclic" if P else "", schema.TAG_SEED: str(seed),
            schema.TAG_STATUS: "finished" if status == "FINISHED" else "failed", **(extra_tags or {})}
    n = SIZES[size]
    metrics = [Metric(schema.M_PARAMS_NON_EMB, n, 0, 0), Metric(schema.M_PARAMS, n + 2e6, 0, 0),
               Metric(schema.M_KV_BYTES, kv, 0, 0), Metric(schema.M_ATTN_FLOPS_PER_TOKEN, kv * 3.0, 0, 0),
               Metric(schema.M_TRAIN_TOKENS, TOKENS, 0, 0), Metric(schema.M_TRAIN_FLOPS, 6 * n * TOKENS, 0, 0),
               Metric(schema.M_LOSS, loss + 0.1, 0, 200)]
    for name, value in (overrides or {}).items():
        metrics = [m for m in metrics if m.key != name] + [Metric(name, value, 0, 0)]
    if loss is not None and status == "FINISHED":
        # An earlier, worse evaluation: the report must read the last one.
        metrics += [Metric(schema.M_VAL_LOSS, loss + 0.5, 0, 100), Metric(schema.M_VAL_PPL, np.exp(loss + 0.5), 0, 100),
                    Metric(schema.M_VAL_LOSS, loss, 1, 200), Metric(schema.M_VAL_PPL, float(np.exp(loss)), 1, 200)]
    for ctx, acc in (mqar or {}).items():
        metrics.append(Metric(f"{schema.M_MQAR_PREFIX}{ctx}", acc, 1, 200))
    client.log_batch(rid, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(rid, status=status)
    return rid


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    uri, client, exp_id = mlflow_experiment(root, "unit-study")
    rng = np.random.default_rng(0)
    expected = []
    for variant, (attention, P, L, E, kv_per_param) in VARIANTS.items():
        for size, n in SIZES.items():
            for seed in (0, 1):
                trial = f"{variant}-{size}-seed{seed}"
                expected.append(trial)
                loss = float(E + 60.0 * n ** -0.3 + rng.normal(0, 0.004))
                mqar = {256: 0.9 / float(P) ** 0.5, 1024: 0.6 / float(P) ** 0.5} if P else None
                _log_run(client, exp_id, trial, variant, attention, size, seed, P, L, loss, kv_per_param * n,
                         mqar=mqar)
    for seed in (0, 1):
        trial = f"iso_kv-F96-s2-seed{seed}"
        expected.append(trial)
        _log_run(client, exp_id, trial, "iso_kv-F96", "iso_kv", "s2", seed, "", "",
                 2.3 + 60.0 * 8e6 ** -0.3 + 0.01 * seed, 0.28 * 8e6)
    _log_run(client, exp_id, "attamba-P16-L8-cyclic-s1-seed0", "attamba-P16-L8-cyclic", "attamba", "s1", 0,
             "16", "8", 3.0, 0.1 * 2e6, status="FAILED")
    expected += ["attamba-P16-L8-cyclic-s1-seed0", "attamba-P16-L8-cyclic-s2-seed0"]
    # The study's parent run holds no results: the report must not count it as a failed run.
    parent = client.create_run(exp_id, run_name="unit-study", tags={schema.TAG_STUDY: "unit", schema.TAG_ROLE: "parent"})
    client.set_terminated(parent.info.run_id, status="FINISHED")
    out = root / "out"
    result = make_report("unit-study", out, tracking_uri=uri, expected_runs=expected, n_bootstrap=200)
    return {"client": client, "exp_id": exp_id, "result": result, "out": out}


def _md_section(md: str, title: str) -> list[dict]:
    block = md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [l for l in block.splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, [c.strip() for c in l.strip("|").split("|")])) for l in lines[2:]]


def _all_runs(client, exp_id):
    return client.search_runs([exp_id], max_results=1000)


def test_figures_are_files_linked_from_the_summary(study):
    import re

    out = study["out"]
    md = (out / "summary.md").read_text()
    links = re.findall(r"!\[[^\]]+\]\((figures/[^)]+\.png)\)", md)
    assert links and sorted(links) == sorted(f"figures/{p.name}" for p in (out / "figures").glob("*.png"))
    for link in links:
        assert (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(links) == (out / "report.html").read_text().count("<figure>")


def test_report_writes_all_files_and_lists_failed_and_missing(study):
    res, out = study["result"], study["out"]
    for name in ("report.html", "summary.md", "runs.csv", "runs.json", "fits.json"):
        assert (out / name).stat().st_size > 0, name
    assert res.n_runs == 21 and res.n_ok == 20
    assert res.failed == ["attamba-P16-L8-cyclic-s1-seed0"]
    assert res.missing == ["attamba-P16-L8-cyclic-s2-seed0"]
    status = _md_section((out / "summary.md").read_text(), "Failed, incomplete and missing runs")
    assert {(r["trial"], r["state"]) for r in status} == {("attamba-P16-L8-cyclic-s1-seed0", "failed"),
                                                          ("attamba-P16-L8-cyclic-s2-seed0", "missing")}
    assert len(json.loads((out / "runs.json").read_text())) == 21


def test_summary_numbers_equal_mlflow_metrics(study):
    client, exp_id, out = study["client"], study["exp_id"], study["out"]
    md = (out / "summary.md").read_text()
    runs = [r for r in _all_runs(client, exp_id)
            if r.info.status == "FINISHED" and schema.TAG_ROLE not in r.data.tags]
    best = _md_section(md, "Best run per variant")
    assert {r["variant"] for r in best} == set(VARIANTS) | {"iso_kv-F96"}
    for row in best:
        logged = client.get_run(row["run_id"]).data.metrics
        # Losses and perplexities are printed with 4 significant figures: equal to a relative 5e-4.
        assert parse(row["best val/loss"]) == pytest.approx(logged[schema.M_VAL_LOSS], rel=5e-4)
        assert parse(row["val/ppl"]) == pytest.approx(logged[schema.M_VAL_PPL], rel=5e-4)
        same = [r.data.metrics[schema.M_VAL_LOSS] for r in runs if r.data.tags[schema.TAG_VARIANT] == row["variant"]]
        assert logged[schema.M_VAL_LOSS] == min(same)

    def ppl_of(variant, size):
        return {int(r.data.tags[schema.TAG_SEED]): r.data.metrics[schema.M_VAL_PPL] for r in runs
                if r.data.tags[schema.TAG_VARIANT] == variant and r.data.tags[schema.TAG_SIZE] == size}

    front = _md_section(md, "Pareto front: perplexity vs KV-cache bytes")
    assert front
    for row in front:
        assert parse(row["mean val/ppl"]) == pytest.approx(np.mean(list(ppl_of(row["variant"], row["size"]).values())),
                                                           rel=5e-4)
    gap = _md_section(md, GAP_TITLE)
    assert len(gap) == 2 * len(SIZES) + 1
    for row in gap:
        a, b = ppl_of(row["variant"], row["size"]), ppl_of("full", row["size"])
        pct = [100 * (a[s] / b[s] - 1) for s in sorted(a)]
        assert parse(row["ppl diff %"]) == pytest.approx(np.mean(pct), rel=5e-3, abs=1e-9)   # 3 figures
        assert row["paired by seed"] == "True"
    iso = _md_section(md, "Iso-KV comparison (the iso-KV baseline sized from each Attamba, same size)")
    assert [(r["variant"], r["reference"]) for r in iso] == [("attamba-P4-L8-cyclic", "iso_kv-F96"),
                                                             ("attamba-P8-L8-cyclic", "iso_kv-F96")]
    for row in iso:
        a, b = ppl_of(row["variant"], "s2"), ppl_of("iso_kv-F96", "s2")
        assert parse(row["ppl diff %"]) == pytest.approx(np.mean([100 * (a[s] / b[s] - 1) for s in a]), rel=5e-3)
        lo, hi = (parse(v) for v in row["95% interval"].strip("[]").split(", "))
        assert lo <= parse(row["ppl diff %"]) <= hi


def test_fits_in_report(study):
    fits = json.loads((study["out"] / "fits.json").read_text())["fits"]
    shared_e = set()
    for variant in VARIANTS:
        laws = fits[variant]["laws"]
        # 3 sizes for a 3-parameter law: exactly determined, so not fitted; the constrained forms take over.
        law = laws["L(N)"]
        assert law["status"] == "not_identifiable" and law["n_distinct_sizes"] == 3 and law["form"] == "free E"
        assert law["reason"] == "not identifiable from 3 sizes (a 3-parameter law needs >= 4)"
        assert not law["params"] and not law["intervals_95"] and not law["predictions"]
        for key, form in (("L(N) power law", "2-parameter power law, E = 0 (constrained)"),
                          ("L(N) shared E", "E shared across variants (constrained)")):
            law = laws[key]
            assert law["status"] == "ok" and law["form"] == form and law["law"] == "L(N)"
            lo, hi = law["intervals_95"]["alpha"]
            assert lo < law["params"]["alpha"] < hi
            assert law["refit_fraction"] >= 0.8 and law["n_bootstrap_ok"] == round(law["refit_fraction"] * 200)
            assert [p["extrapolation"] for p in law["predictions"]] == [False, True, True, True]
            assert len(law["residuals_log"]) == 6
        assert "E" not in laws["L(N) power law"]["params"]
        shared_e.add(laws["L(N) shared E"]["params"]["E"])
    assert len(shared_e) == 1
    assert fits["iso_kv-F96"]["laws"]["L(N)"]["status"] == "not_identifiable"
    assert "L(N) shared E" not in fits["iso_kv-F96"]["laws"]   # one size: not part of the joint fit
    for laws in (v["laws"] for v in fits.values()):
        for law in laws.values():
            assert all(hi > lo for lo, hi in law["intervals_95"].values())
    fits_md = _md_section((study["out"] / "summary.md").read_text(), "Scaling-law fits (95% bootstrap intervals)")
    assert any(r["variant"] == "iso_kv-F96" and "not fitted" in r["result"] for r in fits_md)
    rows = {(r["variant"], r["law"], r["form"]): r for r in fits_md}
    row = rows[("full", "L(N)", "2-parameter power law, E = 0 (constrained)")]
    assert row["status"] == "ok" and row["sizes"] == "3" and row["runs"] == "6" and "bootstrap refits)" in row["result"]
    assert "flags" in row


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_renders_in_headless_chromium(study, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed: apt-get install -y chromium")
    html = (study["out"] / "report.html").read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert html.count("data:image/png;base64,") >= 6
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         f"--screenshot={shot}", "--window-size=1200,2000", (study["out"] / "report.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=60)
    console = [l for l in proc.stderr.splitlines() if "Uncaught" in l or "ERROR:CONSOLE" in l]
    assert not console, console
    assert shot.exists(), proc.stderr[-2000:]
    from matplotlib.image import imread
    img = imread(shot)[..., :3]
    non_white = (img < 0.95).any(axis=2).mean()
    colours = len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert non_white > 0.05, non_white
    assert colours > 200, colours


def test_load_pages_through_every_run(study, monkeypatch):
    from pipeline.report import load
    monkeypatch.setattr(load, "PAGE_SIZE", 4)  # 21 runs -> 6 pages
    uri = study["client"].tracking_uri
    table = load.load_runs("unit-study", uri, expected_runs=["nope"])
    assert len(table.runs) == 21 and table.runs["run_id"].is_unique and table.missing == ["nope"]
    final = {r.info.run_id: r.data.metrics.get(schema.M_VAL_LOSS) for r in _all_runs(study["client"], study["exp_id"])}
    for _, row in table.ok.iterrows():
        assert row[schema.M_VAL_LOSS] == final[row["run_id"]]
    with pytest.raises(ValueError, match="experiment must name an existing"):
        load.load_runs("no-such-study", uri)


def test_variant_fits_with_several_token_budgets():
    import pandas as pd
    from pipeline.report.figures import nd_figure, scaling_figure
    from pipeline.report.scaling import LAW_C, LAW_N, LAW_ND, fit_variants
    rng = np.random.default_rng(3)
    rows = []
    for n in np.geomspace(1e7, 1e9, 4):
        for d in np.geomspace(1e9, 1e11, 3):
            for seed in (0, 1):
                loss = (1.69 + 406.4 * n ** -0.34 + 410.7 * d ** -0.28) * np.exp(rng.normal(0, 0.002))
                rows.append({"run_id": f"{n:g}-{d:g}-{seed}", "variant": "full", schema.M_PARAMS_NON_EMB: n,
                             schema.M_TRAIN_TOKENS: d, schema.M_TRAIN_FLOPS: 6 * n * d, schema.M_VAL_LOSS: loss})
    laws = fit_variants(pd.DataFrame(rows), n_bootstrap=10)["full"].laws
    assert laws[LAW_ND].fit.ok and abs(laws[LAW_ND].fit.params["alpha"] - 0.34) < 0.05
    assert laws[LAW_N].fit.n_points == 8 and "token budget" in laws[LAW_N].note   # one budget, 4 sizes x 2 seeds
    assert "frontier" in laws[LAW_C].note and laws[LAW_C].fit.n_points < 24
    assert nd_figure({"full": fit_variants(pd.DataFrame(rows), n_bootstrap=0)["full"]}) is not None
    assert scaling_figure(fit_variants(pd.DataFrame(rows), n_bootstrap=0), LAW_C, "C") is not None
