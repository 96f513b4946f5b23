"""`tuneline artifacts RUN [--out DIR]`: a run's artifacts, found in its events, under readable names.

Every ArtifactRef an event of the run carries (`uri`, `sha256`, `size`, at any depth of its payload) is
one artifact, named by the event type and the field that holds it (`prep.prepared.train`,
`ingest.committed.rejected`, `training.completed.adapter`), so a field added to an event later shows
up without a change here. One artifact referenced by several events keeps its first name.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from contracts.common import ArtifactRef
from services.common.artifacts import ArtifactIntegrityError, ArtifactStore


@dataclass
class NamedArtifact:
    name: str
    ref: ArtifactRef
    also: list[str] = field(default_factory=list)  # other events' fields that name the same artifact


def _refs(value, path: tuple[str, ...] = ()):
    """(field path, ArtifactRef) for every ArtifactRef-shaped dict in a payload, depth first."""
    if isinstance(value, dict):
        if isinstance(value.get("uri"), str) and isinstance(value.get("sha256"), str) and "size" in value:
            try:
                yield path, ArtifactRef(uri=value["uri"], sha256=value["sha256"], size=value["size"])
                return
            except ValueError:
                pass
        for key, item in value.items():
            yield from _refs(item, path + (str(key),))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _refs(item, path + (str(i),))


def run_artifacts(events: list[dict]) -> list[NamedArtifact]:
    """The artifacts a run's events (in order, as `tuneline events --json` gives them) refer to."""
    by_sha: dict[str, NamedArtifact] = {}
    for event in events:
        payload = event["payload"]
        for path, ref in _refs(payload):
            if path[:1] == ("plan",):
                continue  # the plan restates what started the run, never an output of it
            name = ".".join((event["type"], *path))
            if ref.sha256 in by_sha:
                by_sha[ref.sha256].also.append(name)
            else:
                by_sha[ref.sha256] = NamedArtifact(name, ref)
    return list(by_sha.values())


def _store_of(ref: ArtifactRef) -> ArtifactStore:
    """The file store holding `ref` (its objects live at <root>/objects/<sha[:2]>/<sha>)."""
    parsed = urlparse(ref.uri)
    if parsed.scheme != "file":
        raise ArtifactIntegrityError(f"{ref.uri}: only file:// artifacts can be copied out")
    return ArtifactStore(Path(unquote(parsed.path)).parents[2])


def _kind(path: Path) -> str:
    """"dir" for a stored directory's manifest, else the file's extension by its content: JSON lines
    (each line a JSON value, newline-terminated: a one-row split too), JSON, text or binary."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head.lstrip()[:1] in (b"{", b"["):
        first, newline, _ = head.partition(b"\n")
        try:
            json.loads(first)
            if newline:
                return ".jsonl"
        except ValueError:
            pass
        try:
            doc = json.loads(path.read_bytes()) if path.stat().st_size <= 64 << 20 else None
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("kind") == "directory" and isinstance(doc.get("files"), dict):
            return "dir"
        if doc is not None:
            return ".json"
    try:
        head.decode("utf-8")
        return ".txt"
    except UnicodeDecodeError:
        return ".bin"


def materialise(artifacts: list[NamedArtifact], out: Path) -> list[tuple[NamedArtifact, Path]]:
    """Copy every artifact (checked against its sha256) to `out/<name><ext>`, a stored directory
    (an adapter, an export) to `out/<name>/`; returns where each went."""
    out.mkdir(parents=True, exist_ok=True)
    placed = []
    for art in artifacts:
        store = _store_of(art.ref)
        src = store.path(art.ref)
        kind = _kind(src)
        if kind == "dir":
            dest = out / art.name
            if dest.exists():
                shutil.rmtree(dest)
            store.materialize_dir(art.ref, dest)
        else:
            dest = out / f"{art.name}{kind}"
            shutil.copyfile(src, dest)
        placed.append((art, dest))
    return placed


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def artifacts_text(run_id: str, artifacts: list[NamedArtifact], placed: list[tuple[NamedArtifact, Path]] | None) -> str:
    if not artifacts:
        return f"run {run_id} has no artifacts"
    where = {id(a): p for a, p in placed or []}
    width = max(len(a.name) for a in artifacts)
    lines = []
    for a in artifacts:
        target = where.get(id(a))
        lines.append(f"{a.name:<{width}}  {_size(a.ref.size):>10}  {a.ref.sha256[:12]}  "
                     + (str(target) if target else a.ref.uri))
    if placed is None:
        lines.append(f"`tuneline artifacts {run_id} --out DIR` copies them out under these names")
    return "\n".join(lines)
