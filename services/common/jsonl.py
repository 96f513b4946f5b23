"""JSON Lines encoding of row artifacts."""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import orjson

from contracts.common import ArtifactRef
from services.common.artifacts import ArtifactIntegrityError, ArtifactStore

_READ_CHUNK = 8 << 20
_WRITE_CHUNK = 512 << 10


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while many long-lived row dicts are built or walked: the
    collector would traverse all of them again and again, and row dicts make no reference cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def loads_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def read_jsonl(store: ArtifactStore, ref: ArtifactRef) -> list[dict]:
    """The rows of a JSONL artifact, checked against its sha256 (the bytes read are the bytes
    hashed: one pass over the file, in chunks)."""
    path = store.path(ref, verify=False)
    h = hashlib.sha256()
    loads = orjson.loads
    rows: list[dict] = []
    rest = b""
    with gc_paused(), open(path, "rb") as f:
        try:
            while chunk := f.read(_READ_CHUNK):
                h.update(chunk)
                lines = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
                rest = lines.pop()
                rows.extend([loads(line) for line in lines if line.strip()])
            if rest.strip():
                rows.append(loads(rest))
        except orjson.JSONDecodeError:
            while chunk := f.read(_READ_CHUNK):  # a corrupt file is reported as such, not as bad JSON
                h.update(chunk)
            _check(ref, h)
            raise
    _check(ref, h)
    return rows


def _check(ref: ArtifactRef, h) -> None:
    if h.hexdigest() != ref.sha256:
        raise ArtifactIntegrityError(f"artifact {ref.sha256[:12]} is corrupt: its content hashes to {h.hexdigest()[:12]}")


def write_jsonl(store: ArtifactStore, rows: Iterable[dict], chunk_bytes: int = _WRITE_CHUNK) -> ArtifactRef:
    """Stream rows into a JSONL artifact, a chunk of lines per write."""
    return write_lines(store, map(orjson.dumps, rows), chunk_bytes)


def write_lines(store: ArtifactStore, lines: Iterable[bytes], chunk_bytes: int = _WRITE_CHUNK) -> ArtifactRef:
    """Stream already-encoded JSON lines (no trailing newline) into an artifact, a chunk of lines per
    write. (Lines are copied into one buffer at once: holding many of orjson's outputs would cost
    more, as the output of a small row keeps a 4 KB allocation.)"""
    buf = bytearray()
    with store.writer() as w:
        for line in lines:
            buf += line
            buf += b"\n"
            if len(buf) >= chunk_bytes:
                w.write(bytes(buf))
                buf.clear()
        if buf:
            w.write(bytes(buf))
        return w.commit()
