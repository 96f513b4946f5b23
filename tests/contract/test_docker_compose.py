"""docker-compose.yml and the Dockerfile run the same services as `tuneline up` (ARCHITECTURE D10),
against containerised NATS (JetStream with `sync_interval: always`, D1) and PostgreSQL.

These read the files; they need no Docker engine."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from services.cli.stack import NATS_AUTH_CONF, NATS_CONF, REPLICABLE, SERVICES, nats_server_binary
from services.common import nats_auth

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = REPO / "pyproject.toml"

INFRA_SERVICES = ("nats", "postgres", "migrate")
NEEDS_DATABASE = ("audit", "migrate")

_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: str) -> str:
    """Compose's variable interpolation with nothing set in the environment: `${X:-d}` and `${X-d}`
    give d, `$$` gives `$`. A variable without a default would be empty at deploy time, which
    these tests refuse."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(2) is None:
            raise AssertionError(f"{value!r}: ${{{m.group(1) or m.group(3)}}} has no default")
        return m.group(2)

    return _INTERPOLATION.sub(sub, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict), "docker-compose.yml is not a mapping"
    return doc


@pytest.fixture(scope="module")
def services(compose) -> dict:
    svcs = compose.get("services")
    assert isinstance(svcs, dict) and svcs, "docker-compose.yml defines no services"
    return svcs


def env_of(service: dict) -> dict[str, str]:
    """A service's environment, given as a mapping or as a list of KEY=VALUE, interpolated."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = {}
        for item in raw:
            key, sep, value = str(item).partition("=")
            assert sep, f"environment entry {item!r} has no value"
            pairs[key] = value
        raw = pairs
    return {str(k): interpolate(str(v)) for k, v in raw.items() if v is not None}


def mounts_of(service: dict) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only), from short (`src:dst[:ro]`) or long volume syntax."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            source, target = parts[0], parts[1]
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        else:
            source, target = v.get("source", ""), v["target"]
            read_only = bool(v.get("read_only"))
        out[target] = (source, read_only)
    return out


def depends_on(service: dict) -> dict[str, str]:
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return {name: "service_started" for name in raw}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def command_of(service: dict) -> list[str]:
    cmd = service.get("command")
    return cmd.split() if isinstance(cmd, str) else list(cmd or [])


def test_compose_file_is_a_compose_spec_file_without_a_version_key(compose):
    # The compose spec ignores (and newer clients warn about) the legacy top-level `version`.
    assert "version" not in compose
    assert set(compose) <= {"services", "volumes", "networks", "configs", "secrets", "name"} | {
        k for k in compose if k.startswith("x-")
    }


def test_compose_runs_every_stack_service_plus_nats_postgres_and_migrate(services):
    missing = [name for name in (*SERVICES, *INFRA_SERVICES) if name not in services]
    assert not missing, f"docker-compose.yml lacks {missing}"


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_runs_its_module_with_the_env_it_needs(services, name):
    svc = services[name]
    assert svc.get("build") in (".", {"context": "."}) or (
        isinstance(svc.get("build"), dict) and svc["build"].get("context") == "."
    ), f"{name} is not built from the repository's Dockerfile"
    assert command_of(svc) == ["python", "-m", f"services.{name}"]
    assert importlib.util.find_spec(f"services.{name}.__main__") is not None, (
        f"services.{name} has no __main__ module to run"
    )

    env = env_of(svc)
    nats = urlsplit(env.get("NATS_URL", ""))
    assert (nats.scheme, nats.hostname) == ("nats", "nats"), f"{name}: NATS_URL={env.get('NATS_URL')!r}"
    assert nats.port in (None, 4222)
    assert "nats" in depends_on(svc), f"{name} does not wait for nats"

    data_dir = env.get("TUNELINE_DATA_DIR")
    assert data_dir and data_dir.startswith("/"), f"{name}: TUNELINE_DATA_DIR={data_dir!r}"
    assert data_dir in mounts_of(svc), f"{name}: nothing is mounted at its data dir {data_dir}"


def test_every_stage_shares_one_named_artifact_volume_at_its_data_dir(compose, services):
    # Artifacts are file:// URIs under the data dir: a URI one stage writes, the next must read.
    sources = set()
    for name in SERVICES:
        svc = services[name]
        source, read_only = mounts_of(svc)[env_of(svc)["TUNELINE_DATA_DIR"]]
        assert not read_only, f"{name} mounts its data dir read-only"
        sources.add(source)
    assert len(sources) == 1, f"stages mount different volumes at their data dir: {sources}"
    (source,) = sources
    assert source in (compose.get("volumes") or {}), f"{source!r} is not a declared named volume"
    assert len({env_of(services[n])["TUNELINE_DATA_DIR"] for n in SERVICES}) == 1


@pytest.mark.parametrize("name", NEEDS_DATABASE)
def test_audit_and_migrate_reach_the_postgres_service_with_its_credentials(services, name):
    env = env_of(services[name])
    url = urlsplit(env.get("DATABASE_URL", ""))
    assert url.scheme in ("postgresql", "postgres"), f"{name}: DATABASE_URL={env.get('DATABASE_URL')!r}"
    assert url.hostname == "postgres"
    assert url.port in (None, 5432)

    pg = env_of(services["postgres"])
    assert url.username == pg["POSTGRES_USER"]
    assert url.password == pg["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == pg["POSTGRES_DB"]
    # `tuneline migrate` (services.cli.main.urls) refuses to run without NATS_URL as well.
    assert env.get("NATS_URL", "").startswith("nats://nats")
    # migrate sets the application role's password, and audit logs in with it (services/audit/db.py)
    assert env.get("TUNELINE_APP_DB_PASSWORD"), f"{name}: no TUNELINE_APP_DB_PASSWORD"


def test_migrate_runs_once_after_postgres_is_healthy_and_audit_waits_for_it(services):
    migrate = services["migrate"]
    assert command_of(migrate) == ["tuneline", "migrate"]
    assert depends_on(migrate).get("postgres") == "service_healthy"
    assert str(migrate.get("restart", "no")) in ("no", "False", "false")
    assert depends_on(services["audit"]).get("migrate") == "service_completed_successfully"
    assert "healthcheck" in services["postgres"]


def _uncommented(path: Path) -> str:
    return "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())


def variables(path: Path) -> set[str]:
    """The environment variables a nats config reads: `$NAME` outside quoted strings ("$JS.API.>" is a subject)."""
    return set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", re.sub(r'"[^"]*"', '""', _uncommented(path))))


def config_files(service: dict) -> tuple[Path, list[tuple[Path, str]]]:
    """The repo config a nats service starts with (-c), and every file it includes (recursively) with the
    path it must be mounted at; each include is checked mounted read-only from the repo file."""
    cmd = command_of(service)
    flag = next((i for i, a in enumerate(cmd) if a in ("-c", "--config")), None)
    assert flag is not None, f"nats is not started with the repo's config: {cmd}"
    mounts = mounts_of(service)
    todo, seen = [(cmd[flag + 1], None)], []
    while todo:
        target, _ = todo.pop()
        assert target in mounts, f"nothing is mounted at {target}"
        source, read_only = mounts[target]
        path = (REPO / source).resolve()
        assert path.is_file() and read_only, f"{target}: {source} (read-only: {read_only})"
        seen.append((path, target))
        for inc in re.findall(r'^\s*include\s+"?([^"\s]+)"?', _uncommented(path), re.M):
            todo.append((str(Path(target).parent / inc), target))
    return seen[0][0], seen


def test_nats_mounts_the_repo_config_and_sets_every_variable_it_reads(services):
    nats = services["nats"]
    top, files = config_files(nats)
    # the server with a user per service: nats-server.conf and the generated auth.conf
    assert top == NATS_AUTH_CONF.resolve()
    assert {p for p, _ in files} == {NATS_AUTH_CONF.resolve(), NATS_CONF.resolve(), nats_auth.AUTH_CONF.resolve()}
    mounts = mounts_of(nats)
    conf_in_container = files[0][1]

    referenced = set().union(*(variables(path) for path, _ in files))
    assert referenced, "the nats conf references no variables; this test no longer pins anything"
    env = env_of(nats)
    unset = sorted(v for v in referenced if not env.get(v))
    assert not unset, f"nats conf reads {unset}, which the nats service does not set"

    listen_port = env["TUNELINE_NATS_LISTEN"].rsplit(":", 1)[-1]
    assert listen_port == "4222", "the services' NATS_URL points at port 4222"
    store = env["TUNELINE_NATS_STORE_DIR"]
    assert any(store == t or store.startswith(t.rstrip("/") + "/") for t in mounts
               if t not in {target for _, target in files}), (
        f"JetStream's store_dir {store} is not on a volume: the stream would not survive a restart"
    )
    assert "healthcheck" in nats


def test_nats_conf_fsyncs_every_write(services):
    # D1: the default 2-minute fsync loses acknowledged writes on power loss.
    conf = "\n".join(line.split("#", 1)[0] for line in NATS_CONF.read_text().splitlines())
    assert re.search(r"^\s*sync_interval\s*[:=]\s*always\s*$", conf, re.M)


def test_every_service_depending_on_another_names_a_defined_service(services):
    for name, svc in services.items():
        for dep, condition in depends_on(svc).items():
            assert dep in services, f"{name} depends on undefined {dep}"
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"


def _dockerfile_instructions() -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ))
    return [line.strip() for line in text.splitlines() if line.strip()]


def _pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)", dep)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_dockerfile_installs_the_project_and_pins_nothing_pyproject_does_not(services):
    instructions = _dockerfile_instructions()
    assert instructions[0].upper().startswith("FROM PYTHON:3.11"), "requires-python is 3.11"

    runs = [i for i in instructions if i.upper().startswith("RUN ")]
    installs = [r for r in runs if re.search(r"\bpip3?\s+install\b", r)]
    assert any(re.search(r"\spip3?\s+install\b[^&;]*\s\.(\s|$)", " " + r[4:]) for r in installs), (
        "the Dockerfile does not `pip install .` the project"
    )

    pins = _pyproject_pins()
    assert "torch" in pins
    text = " ".join(instructions)
    for pkg, version in re.findall(r"([A-Za-z0-9_.\-]+)\s*(?:===?|~=|>=|<=)\s*([0-9][^\s\"',;]*)", text):
        key = pkg.lower().replace("_", "-")
        assert pins.get(key) == version, f"the Dockerfile pins {pkg} {version}; pyproject.toml pins {pins.get(key)}"
    for version in re.findall(r"torch-([0-9][^\s\"'/]*?)(?:%2B|\+|-cp|\.whl)", text):
        assert version == pins["torch"], f"the Dockerfile fetches torch {version}"


def test_image_runs_the_source_tree_that_holds_the_migrations_as_a_non_root_user():
    instructions = _dockerfile_instructions()
    text = "\n".join(instructions)
    assert re.search(r"^WORKDIR\s+/app\s*$", text, re.M)
    copied = " ".join(i for i in instructions if i.upper().startswith("COPY "))
    for path in ("contracts", "services", "infra", "pyproject.toml"):
        assert re.search(rf"(^|\s){re.escape(path)}/?(\s|$)", copied), f"the image does not copy {path}"
        assert (REPO / path).exists()
    # services/audit/migrate.py finds infra/postgres relative to itself: /app must win over
    # the copy pip put in site-packages.
    assert re.search(r"PYTHONPATH=/app\b", text)
    for var in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"):
        assert var in text
    users = [i.split(None, 1)[1] for i in instructions if i.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_docker_build_context_leaves_out_local_state():
    ignored = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    # The venv is host-specific and large; .tuneline holds the embedded stack's data and database.
    for path in (".venv", ".tuneline", ".git"):
        assert path in ignored, f".dockerignore does not leave out {path}"
    for path in ("contracts", "services", "infra", "pyproject.toml"):
        assert path not in ignored


def test_nats_server_accepts_the_compose_config_with_the_compose_passwords(services, tmp_path):
    # nats-server parses an environment variable as a config value: the compose defaults must be strings.
    env = {**os.environ, **env_of(services["nats"]), "TUNELINE_NATS_STORE_DIR": str(tmp_path)}
    ok = subprocess.run([str(nats_server_binary()), "-t", "-c", str(NATS_AUTH_CONF)], env=env, capture_output=True,
                        text=True, timeout=30)
    assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_connects_as_its_own_nats_user_with_the_password_nats_reads(services, name):
    env = env_of(services[name])
    assert env.get("NATS_USER") == name, f"{name}: NATS_USER={env.get('NATS_USER')!r}"
    nats_env = env_of(services["nats"])
    assert env.get("NATS_PASSWORD") == nats_env[nats_auth.password_variable(name)]
    for node in ("nats-1", "nats-2", "nats-3"):
        assert env_of(services[node])[nats_auth.password_variable(name)] == env["NATS_PASSWORD"]


def test_every_nats_user_has_a_password_and_passwords_differ(services):
    nats_env = env_of(services["nats"])
    passwords = [nats_env.get(nats_auth.password_variable(u)) for u in nats_auth.USERS]
    assert all(passwords) and len(set(passwords)) == len(passwords)


def test_stage_services_scale_with_deploy_replicas_and_the_recorder_and_api_do_not(services):
    for name in SERVICES:
        replicas = (services[name].get("deploy") or {}).get("replicas")
        if name in REPLICABLE:
            assert replicas is not None, f"{name} has no deploy.replicas"
            assert int(interpolate(str(replicas))) >= 1
            assert "ports" not in services[name], f"{name}: replicas cannot share a published port"
        else:
            assert replicas in (None, 1), f"{name} runs as one instance"


def test_the_cluster_profile_runs_three_jetstream_nodes_routed_to_each_other(services, compose):
    from services.cli.stack import REPO_ROOT

    nodes = {n: s for n, s in services.items() if "cluster" in (s.get("profiles") or [])}
    assert sorted(nodes) == ["nats-1", "nats-2", "nats-3"]
    cluster_conf = (REPO_ROOT / "infra" / "nats" / "cluster.conf").resolve()
    names, stores = set(), set()
    for name, svc in nodes.items():
        top, files = config_files(svc)
        assert top == cluster_conf and nats_auth.AUTH_CONF.resolve() in {p for p, _ in files}
        env = env_of(svc)
        referenced = set().union(*(variables(path) for path, _ in files))
        assert not sorted(v for v in referenced if not env.get(v)), name
        names.add(env["TUNELINE_NATS_SERVER_NAME"])
        routes = re.findall(r"nats-route://([^:,\]\s]+):(\d+)", env["TUNELINE_NATS_ROUTES"])
        port = env["TUNELINE_NATS_CLUSTER_LISTEN"].rsplit(":", 1)[1]
        assert sorted(routes) == [(n, port) for n in sorted(nodes)], routes
        source, _ = mounts_of(svc)["/data"]
        assert source in (compose.get("volumes") or {})
        stores.add(source)
    assert len(names) == 3 and len(stores) == 3, "each node has its own name and its own store"
    # the services reach the cluster with TUNELINE_NATS_URL and make their streams R3
    env = env_of(services["trainer"])
    assert "TUNELINE_STREAM_REPLICAS" in env
