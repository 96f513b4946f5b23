"""`tuneline artifacts RUN [--out DIR]`: a run's artifacts, found in its events, under readable names.

Every ArtifactRef an event of the run carries (`uri`, `sha256`, `size`, at any depth of its payload) is
one artifact, named by the event type and the field that holds it (`prep.prepared.train`,
`ingest.committed.rejected`, `training.completed.adapter`), so a field added to an event later shows
up without a change here. One artifact referenced by several events keeps its first name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from services.common.run_artifacts import NamedArtifact, run_artifacts, store_of  # noqa: F401 (the command's API)


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
        store = store_of(art.ref)
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
