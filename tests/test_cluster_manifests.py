"""The cluster files, checked offline: jobs/cluster.yaml against the schema Ray's cluster launcher ships and
through the launcher's own preparation; jobs/k8s/ against KubeRay's RayCluster and RayJob CRD schemas (v1,
vendored in tests/schemas/kuberay/), strictly: a field the schema does not know is an error, as kubectl's
strict field validation makes it. Then what ties them to this project: the image and Ray versions of
docker/versions.env, the shared volume at ATTAMBA_HOME on every node, every secret a node reads, and the
study they are written for fitting their nodes. Nothing here starts a cluster."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.runs.resources import check_placement, check_resources
from pipeline.study.spec import load_study
from tests.helpers import REPO_ROOT as REPO

K8S = REPO / "jobs" / "k8s"
LAUNCHER = REPO / "jobs" / "cluster.yaml"
KUBERAY = REPO / "tests" / "schemas" / "kuberay"
SHARED_ENV = ("ATTAMBA_HOME", "ATTAMBA_CACHE", "MLFLOW_TRACKING_URI", "ATTAMBA_OPTUNA_STORAGE")


def _versions() -> dict[str, str]:
    lines = (REPO / "docker" / "versions.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(path: Path) -> dict:
    (doc,) = _docs(path)
    return doc


# ---- Ray's cluster launcher ----------------------------------------------------------------------------

def test_the_launcher_file_passes_the_schema_ray_ships_and_rays_own_checks():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))   # what `ray up` does before calling the cloud
    typo = {**config, "head_node_typ": config["head_node_type"]}
    with pytest.raises(jsonschema.ValidationError, match="head_node_typ"):
        jsonschema.validate(typo, schema)


def test_the_launcher_runs_the_project_image_with_efs_at_attamba_home_and_secrets_from_a_file():
    config = yaml.safe_load(LAUNCHER.read_text())
    docker = config["docker"]
    assert docker["image"].rsplit("/", 1)[1] == f"attamba-gpu:torch{_versions()['TORCH_VERSION']}"
    options = docker["run_options"]
    mount = next(o for o in options if o.startswith("-v /mnt/efs"))
    home = next(o for o in options if o.startswith("-e ATTAMBA_HOME=")).split("=", 1)[1]
    assert mount.split(":")[1] == home == "/data/attamba"
    assert "-e ATTAMBA_CACHE=/data/attamba/cache" in options and "--env-file /etc/attamba/attamba.env" in options
    init = " ".join(config["initialization_commands"])
    assert "mount -t nfs4" in init and "nfsvers=4.1" in init and "/mnt/efs" in init
    assert "PASSWORD" not in LAUNCHER.read_text().replace("MLFLOW_TRACKING_USERNAME/PASSWORD", "")
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


# ---- KubeRay --------------------------------------------------------------------------------------------

def _strict(schema):
    """The CRD schema with unknown fields refused: `additionalProperties: false` on every object that lists its
    properties and neither keeps unknown fields (x-kubernetes-preserve-unknown-fields) nor states its own."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) if k not in ("enum", "required", "default", "example") else v for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and \
            not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _crd(kind: str) -> dict:
    return _strict(json.loads((KUBERAY / f"{kind}.v1.schema.json").read_text()))


def _validate(doc: dict, kind: str) -> None:
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(_crd(kind)).validate(doc)


def test_the_vendored_schemas_say_where_they_came_from():
    readme = (KUBERAY / "README.md").read_text()
    assert "feeaf72facab4881ba2b179248bb67315634e229" in readme and "ray.io_rayclusters.yaml" in readme
    assert (KUBERAY / "LICENSE").read_text().lstrip().startswith("Apache License")
    for kind in ("raycluster", "rayjob"):
        assert _crd(kind)["properties"]["spec"]["type"] == "object"


def test_the_raycluster_and_rayjob_pass_kuberays_crd_schemas_strictly():
    cluster, job = _one(K8S / "raycluster.yaml"), _one(K8S / "rayjob-study.yaml")
    _validate(cluster, "raycluster")
    _validate(job, "rayjob")
    # the strict check is not vacuous: a misspelled field and a wrong type are refused
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        _validate(typo, "raycluster")
    wrong = copy.deepcopy(job)
    wrong["spec"]["shutdownAfterJobFinishes"] = "yes"
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'boolean'"):
        _validate(wrong, "rayjob")
    container = copy.deepcopy(cluster)
    container["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(jsonschema.ValidationError, match="volumeMount"):
        _validate(container, "raycluster")


def _pods(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]


def test_every_node_runs_the_project_image_with_the_shared_volume_at_attamba_home():
    cluster = _one(K8S / "raycluster.yaml")
    versions = _versions()
    assert cluster["spec"]["rayVersion"] == versions["RAY_VERSION"]
    (claim,) = _docs(K8S / "storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in _pods(cluster):
        (container,) = pod["containers"]
        assert container["image"].rsplit("/", 1)[1] == f"attamba-gpu:torch{versions['TORCH_VERSION']}"
        env = {e["name"]: e for e in container["env"]}
        assert set(SHARED_ENV) <= set(env)
        home = env["ATTAMBA_HOME"]["value"]
        assert env["ATTAMBA_CACHE"]["value"].startswith(home + "/"), "the token cache on the shared volume"
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == home]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert pod["securityContext"]["fsGroup"] == 1001     # the image's user may write the volume


def test_every_secret_a_node_reads_is_in_the_secrets_template():
    cluster = _one(K8S / "raycluster.yaml")
    secrets = {s["metadata"]["name"]: s for s in _docs(K8S / "secrets.example.yaml")}
    assert all(s["kind"] == "Secret" and all(v.startswith(("change-me", "https://", "postgresql+psycopg2://"))
                                              for v in s["stringData"].values()) for s in secrets.values())
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": "attamba-ray-token"}
    assert "auth_token" in secrets["attamba-ray-token"]["stringData"]   # the key KubeRay reads
    for pod in _pods(cluster):
        for env in pod["containers"][0]["env"]:
            if "valueFrom" in env:
                ref = env["valueFrom"]["secretKeyRef"]
                assert ref["key"] in secrets[ref["name"]]["stringData"], env["name"]
    job = _one(K8S / "rayjob-study.yaml")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}


def _study_of(entrypoint: str):
    command, config = entrypoint.split()[:2], entrypoint.split()[2]
    assert command == ["attamba", "study"] and config.startswith("/opt/attamba/")   # WORKDIR of the image
    return load_study(REPO / config.removeprefix("/opt/attamba/"))


def _limits(pod: dict) -> dict:
    limits = pod["containers"][0]["resources"]["limits"]
    return {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}


def test_the_study_each_file_is_written_for_fits_its_nodes():
    """paper_60m's runs (8 workers of 8 CPUs and 1 GPU) fit the GPU nodes of both clusters, by the same checks
    a study makes before its first trial; its outputs are relative, so they go under ATTAMBA_HOME."""
    cluster = _one(K8S / "raycluster.yaml")
    study = _study_of(_one(K8S / "rayjob-study.yaml")["spec"]["entrypoint"])
    assert not Path(study.out_dir).is_absolute()
    head = {"CPU": float(cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"]), "GPU": 0.0}
    nodes = [head] + [_limits(g["template"]["spec"]) for g in cluster["spec"]["workerGroupSpecs"]
                      for _ in range(g["minReplicas"])]
    launcher = yaml.safe_load(LAUNCHER.read_text())
    types = launcher["available_node_types"]
    launched = [types[launcher["head_node_type"]]["resources"]] + [
        t["resources"] for name, t in types.items() if name != launcher["head_node_type"]
        for _ in range(t["min_workers"])]
    for nodes in (nodes, launched):
        check_resources(study.resources, {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")})
        check_placement(study.resources, nodes)
