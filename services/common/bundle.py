"""A run's support bundle: one zip with its events, the ids that find its logs, its manifest and artifact
references and the environment's versions, every secret this process knows of scrubbed from every file.

Built here once for `GET /api/runs/{id}/bundle` and `tuneline bundle RUN`. The bulk artifacts (splits,
adapters, exports) stay out: their references (uri, sha256, size) are enough to find and check them."""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from urllib.parse import unquote, urlsplit

from services.common.redact import url_passwords

PACKAGES = ("torch", "transformers", "peft", "tuneline")
MANIFEST_MAX_BYTES = 4 << 20
# An environment variable whose name says it holds a secret: its value never leaves in a bundle.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|DSN", re.IGNORECASE)
_MIN_SECRET_LEN = 6  # shorter values ("1", "true") would mask ordinary text without protecting anything
# Secrets by shape, whatever variable they came from: API tokens, provider keys, a libpq password=.
_SECRET_SHAPES = (re.compile(r"\btl_[A-Za-z0-9_-]{16,}"), re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),
                  re.compile(r"(?i)(?<=password=)[^\s'\"&;]+"))
MASK = "***"


@dataclass(frozen=True)
class RunBundle:
    run_id: str
    data: bytes           # the zip
    events: int
    artifacts: int
    manifest: bool        # whether the manifest's content is in it (else only its reference)
    scrubbed: int         # secrets masked while writing it

    @property
    def filename(self) -> str:
        return bundle_filename(self.run_id)


def bundle_filename(run_id: str) -> str:
    return f"tuneline-bundle-{re.sub(r'[^A-Za-z0-9_.-]', '_', run_id)}.zip"


# --- secrets (pure) ------------------------------------------------------------------------------


def _url_password(value: str) -> str | None:
    try:
        parts = urlsplit(value.strip())
        return parts.password if parts.scheme and parts.password else None
    except ValueError:
        return None


def known_secrets(environ: Mapping[str, str], urls: Iterable[str | None] = ()) -> list[str]:
    """The secret values this process can see: every variable whose name says secret, and the password of
    every URL in the environment or in `urls` (DATABASE_URL, NATS_URL, a DSN the settings hold); longest
    first, so that a secret containing another is masked whole."""
    found: set[str] = set()
    for name, value in environ.items():
        if _SECRET_NAME.search(name) and len(value) >= _MIN_SECRET_LEN:
            found.add(value)
    for value in [*environ.values(), *(u for u in urls if u)]:
        pw = _url_password(value)
        if pw and len(pw) >= 3:
            found.update({pw, unquote(pw)})
    return sorted(found, key=lambda s: (-len(s), s))


def scrub(text: str, secrets: Iterable[str]) -> tuple[str, int]:
    """`text` with every known secret, URL password and secret-shaped string masked; and how many were."""
    count = 0
    for secret in secrets:
        for form in {secret, json.dumps(secret)[1:-1]}:  # as written, and as it looks inside a JSON string
            if form in text:
                count += text.count(form)
                text = text.replace(form, MASK)
    masked = url_passwords(text)
    if masked != text:
        count += masked.count(":***@") - text.count(":***@")
        text = masked
    for shape in _SECRET_SHAPES:
        text, n = shape.subn(MASK, text)
        count += n
    return text, count


# --- the bundle (pure) -----------------------------------------------------------------------------


def _json(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"


def run_summary(run_id: str, events: list[dict], created_at: datetime) -> dict:
    """The ids that find the run in logs and on the bus: every service logs JSON lines with run_id,
    correlation_id and event_id bound (services/common/logging.py)."""
    correlations = sorted({e["correlation_id"] for e in events})
    plan = next((e["payload"]["plan"] for e in events if isinstance(e["payload"].get("plan"), dict)), {})
    failures = [{"position": e["global_position"], "type": e["type"], "reason_code": e["reason_code"],
                 "severity": e["severity"]} for e in events if e["severity"] in ("error", "critical")]
    return {
        "run_id": run_id, "target": plan.get("target"), "correlation_ids": correlations,
        "events": len(events), "positions": [events[0]["global_position"], events[-1]["global_position"]],
        "first_at": events[0]["occurred_at"], "last_at": events[-1]["occurred_at"], "failures": failures,
        "event_ids": [{"position": e["global_position"], "event_id": e["event_id"], "type": e["type"],
                       "causation_id": e["causation_id"], "producer": e["producer"]} for e in events],
        "find_logs": [f"grep -h '\"run_id\": \"{run_id}\"' <data dir>/logs/*.log"]
                     + [f"grep -h '\"correlation_id\": \"{c}\"' <data dir>/logs/*.log" for c in correlations
                        if c != run_id],
        "bundle_created_at": created_at,
    }


def scrub_files(files: dict[str, str], secrets: Iterable[str]) -> tuple[dict[str, str], int]:
    """`files` (name -> text) each scrubbed, and how many secrets were masked in all."""
    secrets, out, masked = list(secrets), {}, 0
    for name, text in files.items():
        out[name], n = scrub(text, secrets)
        masked += n
    return out, masked


def zip_files(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buf.getvalue()


README = """Tuneline support bundle for run {run_id}

run.json          the ids that find the run: run id, correlation ids, every event id and position, and the
                  grep lines for the services' logs (<data dir>/logs/*.log, one JSON object per line)
events.jsonl      every event of the run from run_events, in global position order
artifacts.json    the run's artifact references (uri, sha256, size), not the artifacts themselves
manifest.json     the dataset manifest prep wrote (present when its artifact was readable where the bundle was made)
environment.json  versions where the bundle was made (python, packages, nats-server, PostgreSQL) and the
                  preflight checks the trainer recorded for the run

Secrets the bundling process could see (variables named *KEY*, *TOKEN*, *SECRET*, *PASSWORD*, URL passwords)
are replaced by {mask}: {scrubbed} masked.
"""


# --- I/O -------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def nats_server_version(nc) -> str:
    v = nc.connected_server_version
    return f"{v.major}.{v.minor}.{v.patch}" + (f"-{v.dev}" if v.dev else "")


async def _run_events(conn, run_id: str) -> list[dict]:
    rows = await conn.fetch("SELECT * FROM run_events WHERE run_id = $1 ORDER BY global_position", run_id)
    out = []
    for r in rows:
        e = dict(r)
        e["event_id"] = str(e["event_id"])
        e["causation_id"] = str(e["causation_id"]) if e["causation_id"] else None
        e["payload"] = json.loads(e["payload"])
        out.append(e)
    return out


def _read_manifest(ref) -> tuple[str | None, str | None]:
    """(the manifest's text, None) or (None, why not): only a small file:// artifact that checks out."""
    from services.common.run_artifacts import store_of

    if ref.size > MANIFEST_MAX_BYTES:
        return None, f"{ref.size} bytes, over the {MANIFEST_MAX_BYTES} a bundle carries"
    try:
        return store_of(ref).path(ref).read_text(encoding="utf-8"), None
    except Exception as exc:  # noqa: BLE001 - gone, corrupt, not file://: the reference still goes in
        return None, f"not readable here: {exc}"


async def build_bundle(conn, run_id: str, *, nats_server: str | None, environ: Mapping[str, str] | None = None,
                       urls: Iterable[str | None] = ()) -> RunBundle | None:
    """The run's support bundle, or None when no event of the run is recorded. `nats_server`: the version of
    the server this process is connected to (None when it is not reachable); `urls`: the connection URLs
    in use, whose passwords are masked like the environment's secrets."""
    from services.common.run_artifacts import run_artifacts

    events = await _run_events(conn, run_id)
    if not events:
        return None
    artifacts = run_artifacts(events)
    manifest_ref = next((a.ref for a in artifacts if a.name in ("prep.prepared.manifest",
                                                                "training.completed.manifest")), None)
    manifest_text, manifest_note = (await asyncio.to_thread(_read_manifest, manifest_ref)) if manifest_ref else \
        (None, "the run recorded no manifest")
    preflight = next((e for e in reversed(events) if e["type"] in ("preflight.passed", "preflight.blocked")), None)
    environment = {
        "where": "the process that made this bundle (the API or the CLI), and the servers it is connected to",
        "versions": package_versions() | {"nats-server": nats_server or "not reachable",
                                          "postgres": await conn.fetchval("SHOW server_version")},
        "preflight_checks": (preflight["payload"].get("checks") if preflight else None),
    }
    artifact_rows = [{"name": a.name, "uri": a.ref.uri, "sha256": a.ref.sha256, "size": a.ref.size, "also": a.also}
                     for a in artifacts]
    files = {
        "run.json": _json(run_summary(run_id, events, datetime.now(UTC))),
        "events.jsonl": "".join(json.dumps(e, sort_keys=True, default=str) + "\n" for e in events),
        "artifacts.json": _json({"artifacts": artifact_rows,
                                 "manifest": {"ref": manifest_ref.model_dump(mode="json") if manifest_ref else None,
                                              "included": manifest_text is not None, "note": manifest_note}}),
        "environment.json": _json(environment),
    }
    if manifest_text is not None:
        files["manifest.json"] = manifest_text
    secrets = known_secrets(os.environ if environ is None else environ, urls)
    clean, masked = scrub_files(files, secrets)
    readme, _ = scrub(README.format(run_id=run_id, mask=MASK, scrubbed=masked), secrets)
    return RunBundle(run_id=run_id, data=zip_files({"README.txt": readme, **clean}), events=len(events),
                     artifacts=len(artifacts), manifest=manifest_text is not None, scrubbed=masked)
