"""pipeline/loader.py: the one YAML loader of run, study and search files, with dotted overrides."""

import pytest


def test_load_yaml_applies_dotted_overrides_without_changing_its_input(tmp_path):
    from pipeline.loader import apply_overrides, load_yaml

    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 5\nmodel:\n  ssm:\n    state_dim: 8\n")
    data = load_yaml(path, ["train.steps=7", "model.ssm.state_dim=16", "eval.mqar_lengths=[32, 64]",
                            "name=x", "tracking.uri="])
    assert data == {"train": {"steps": 7}, "model": {"ssm": {"state_dim": 16}}, "eval": {"mqar_lengths": [32, 64]},
                    "name": "x", "tracking": {"uri": ""}}
    base = {"train": {"steps": 5}}
    assert apply_overrides(base, ["train.steps=6"]) == {"train": {"steps": 6}} and base == {"train": {"steps": 5}}
    assert load_yaml(None, ["a.b=true"]) == {"a": {"b": True}}


@pytest.mark.parametrize("content, overrides, words", [
    (None, [], ["study file", "missing.yaml", "does not exist", "configs/studies/"]),
    ("a: [1, 2\n", [], ["study file", "is not valid YAML"]),
    ("- 1\n- 2\n", [], ["study file", "mapping", "got a list"]),
    ("a: 1\n", ["a.b=2"], ["override 'a.b=2'", "a is 1, not a mapping"]),
    ("a: 1\n", ["a"], ["override 'a' must look like key.path=value"]),
    ("a: 1\n", ["a..b=1"], ["override 'a..b=1' must look like key.path=value"]),
    ("a: 1\n", ["a=[1, 2"], ["override 'a=[1, 2'", "not valid YAML"]),
    ("run: base.yaml\n", [], ["run file", "base.yaml", "does not exist", "relative to the study file's folder"]),
])
def test_load_yaml_errors_name_the_file_or_the_override(tmp_path, content, overrides, words):
    from pipeline.loader import load_yaml

    path = tmp_path / ("missing.yaml" if content is None else "study.yaml")
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as err:
        load_yaml(path, overrides, kind="study", hint="see configs/studies/ for examples", includes=("run",))
    for word in words:
        assert word in str(err.value)
    assert "\n" not in str(err.value)


def test_included_run_file_is_read_before_and_after_the_overrides(tmp_path):
    from pipeline.loader import load_yaml

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "base.yaml").write_text("train:\n  steps: 5\n  seed: 1\n")
    (tmp_path / "runs" / "other.yaml").write_text("train:\n  steps: 9\n")
    study = tmp_path / "study.yaml"
    study.write_text("name: s\nrun: runs/base.yaml\n")
    assert load_yaml(study, ["run.train.steps=7"], includes=("run",))["run"] == {"train": {"steps": 7, "seed": 1}}
    assert load_yaml(study, ["run=runs/other.yaml"], includes=("run",))["run"] == {"train": {"steps": 9}}
    assert load_yaml(study)["run"] == "runs/base.yaml"   # only listed keys are files


def test_run_study_and_search_files_share_the_loader(tmp_path):
    from pipeline.config import load_run_config
    from pipeline.search.space import load_search
    from pipeline.study.spec import load_study

    for load, kind in ((load_run_config, "config"), (load_study, "study"), (load_search, "search")):
        with pytest.raises(ValueError, match=f"^{kind} file .*nothing.yaml' does not exist"):
            load(tmp_path / "nothing.yaml")
        bad = tmp_path / f"{kind}.yaml"
        bad.write_text("name: [unclosed\n")
        with pytest.raises(ValueError, match=f"^{kind} file .* is not valid YAML"):
            load(bad)
    run = tmp_path / "run.yaml"
    run.write_text("size: micro\ntrain:\n  steps: 3\n")
    assert load_run_config(run, ["train.steps=4"]).train.steps == 4
    study = tmp_path / "study.yaml"
    study.write_text("name: s\nsizes: [micro]\nrun: run.yaml\n")
    assert load_study(study, ["run.train.steps=6"]).run == {"size": "micro", "train": {"steps": 6}}


@pytest.mark.parametrize("data, place", [({"model": {"ssm": {"state_dim": 0}}}, "model.ssm.state_dim must be"),
                                         ({"model": {"dim": 0}}, "model.dim must be"),
                                         ({"train": {"steps": 0}}, "train.steps must be")])
def test_a_nested_field_error_names_its_place_once(data, place):
    from pipeline.config import run_config_from_dict

    with pytest.raises(ValueError) as info:
        run_config_from_dict(data)
    assert str(info.value).startswith(place), str(info.value)
