"""JSON Lines encoding of row artifacts."""

from __future__ import annotations

import json
from collections.abc import Iterable

import orjson

from contracts.common import ArtifactRef
from services.common.artifacts import ArtifactStore


def loads_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def read_jsonl(store: ArtifactStore, ref: ArtifactRef) -> list[dict]:
    """The rows of a JSONL artifact (its sha256 checked first)."""
    with open(store.path(ref), "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]


def write_jsonl(store: ArtifactStore, rows: Iterable[dict], chunk: int = 2000) -> ArtifactRef:
    """Stream rows into a JSONL artifact, a chunk of lines per write."""
    dumps, buf = orjson.dumps, []
    with store.writer() as w:
        for r in rows:
            buf.append(dumps(r))
            if len(buf) >= chunk:
                w.write(b"\n".join(buf) + b"\n")
                buf.clear()
        if buf:
            w.write(b"\n".join(buf) + b"\n")
        return w.commit()
