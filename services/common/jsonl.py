"""JSON Lines encoding of row artifacts."""

from __future__ import annotations

import json
from collections.abc import Iterable


def dumps_jsonl(rows: Iterable[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


def loads_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]
