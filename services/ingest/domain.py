"""Ingest logic without I/O: locators, and mapping raw rows to (text, label) with a reason for
every row that is rejected. read = accepted + rejected, always."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_SCHEMES = ("jsonl",)


class LocatorError(ValueError):
    def __init__(self, reason_code: str, message: str):
        super().__init__(message)
        self.reason_code = reason_code


@dataclass(frozen=True)
class Locator:
    scheme: str
    path: Path

    def __str__(self) -> str:
        return f"{self.scheme}:{self.path}"


def parse_locator(text: str) -> Locator:
    """`jsonl:PATH`. Other schemes of the architecture (csv, hf, pg) are refused by name."""
    scheme, sep, rest = text.partition(":")
    if not sep or not scheme or not rest:
        raise LocatorError("ingest.locator_invalid", f"locator {text!r} does not parse: expected SCHEME:PATH, e.g. jsonl:data.jsonl")
    if not scheme.isalnum() or scheme.lower() != scheme:
        raise LocatorError("ingest.locator_invalid", f"locator {text!r}: scheme {scheme!r} must be lower-case letters")
    if scheme not in SUPPORTED_SCHEMES:
        raise LocatorError("ingest.locator_unsupported",
                           f"locator {text!r}: scheme {scheme!r} is not supported yet (supported: {', '.join(SUPPORTED_SCHEMES)})")
    return Locator(scheme, Path(rest))


@dataclass(frozen=True)
class RawRow:
    row_number: int  # 1-based line number
    offset: int      # byte offset of the line in the source
    raw: bytes


@dataclass(frozen=True)
class RejectedRow:
    row_number: int
    offset: int
    raw: str
    reason_code: str
    detail: str

    def as_json(self) -> dict:
        return {"row_number": self.row_number, "source_offset": self.offset, "raw": self.raw,
                "reason_code": self.reason_code, "detail": self.detail}


@dataclass
class MappingResult:
    accepted: list[dict] = field(default_factory=list)
    rejected: list[RejectedRow] = field(default_factory=list)
    rows_read: int = 0

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        return dict(Counter(r.reason_code for r in self.rejected))


def jsonl_rows(lines: Iterable[bytes]) -> Iterator[RawRow]:
    """Number lines and track byte offsets; blank lines are not rows."""
    offset = 0
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield RawRow(number, offset, line.rstrip(b"\r\n"))
        offset += len(line)


_MAX_RAW_KEPT = 2000  # a rejected row keeps this much of its raw text


def map_row(row: RawRow, text_field: str, label_field: str) -> dict | RejectedRow:
    def reject(code: str, detail: str) -> RejectedRow:
        raw = row.raw.decode("utf-8", errors="replace")[:_MAX_RAW_KEPT]
        return RejectedRow(row.row_number, row.offset, raw, code, detail)

    try:
        obj = json.loads(row.raw)
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, huge ints, absurd nesting
        return reject("ingest.unparseable_row", f"not valid JSON: {str(exc)[:200]}")
    if not isinstance(obj, dict):
        return reject("ingest.unparseable_row", f"a JSON {type(obj).__name__}, not an object")
    missing = [f for f in (text_field, label_field) if f not in obj or obj[f] is None]
    if missing:
        return reject("ingest.missing_field", f"missing field(s): {', '.join(missing)}")
    text, label = obj[text_field], obj[label_field]
    if not isinstance(text, str) or not text.strip():
        return reject("ingest.empty_text", f"field {text_field!r} is empty or not a string")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        return reject("ingest.invalid_label", f"field {label_field!r} must be a non-empty string or integer")
    text, label = text.strip(), str(label).strip()
    try:
        # JSON can carry lone surrogates that no UTF-8 artifact can hold.
        text.encode("utf-8"), label.encode("utf-8")
    except UnicodeEncodeError as exc:
        return reject("ingest.unparseable_row", f"text or label is not encodable as UTF-8: {exc.reason}")
    return {"text": text, "label": label, "row_number": row.row_number}


def map_rows(rows: Iterable[RawRow], text_field: str, label_field: str) -> MappingResult:
    result = MappingResult()
    for row in rows:
        result.rows_read += 1
        mapped = map_row(row, text_field, label_field)
        if isinstance(mapped, RejectedRow):
            result.rejected.append(mapped)
        else:
            result.accepted.append(mapped)
    assert result.rows_read == len(result.accepted) + len(result.rejected)
    return result
