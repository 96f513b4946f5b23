"""What every source connector provides: `load()` streams records in source order with constant
memory, `describe()` says what the source is without reading it all.

A record is either parsed (`fields` is a dict of column/key -> value) or not (`error` carries the
reason code and a message); either way it is counted, so read = accepted + rejected holds downstream.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Protocol

from contracts.errors import ReasonCodedError

MAX_RAW_KEPT = 2000  # characters of a row's raw text kept with a rejected row


def open_file(path: Path, kind: str, buffering: int):
    """Open a file source for binary reading; a missing, directory or unreadable path is a SourceError."""
    try:
        return open(path, "rb", buffering=buffering)
    except FileNotFoundError:
        raise SourceError("ingest.source_not_found", f"{path} does not exist") from None
    except IsADirectoryError:
        raise SourceError("ingest.source_not_found", f"{path} is a directory, not a {kind} file") from None
    except OSError as exc:
        raise SourceError("ingest.source_not_found", f"cannot read {path}: {exc.strerror or exc}") from None


class SourceError(ReasonCodedError, ValueError):
    """The source as a whole cannot be read; `reason_code` is a registered code."""


@dataclass(frozen=True, slots=True)
class SourceRecord:
    row_number: int            # 1-based position of the row in the source (line or record number)
    offset: int                # byte offset in a file source; the 0-based row index otherwise
    raw: str                   # the row as read, cut to MAX_RAW_KEPT characters (for rejected rows)
    fields: dict[str, Any] | None = None
    error: tuple[str, str] | None = None  # (reason_code, message) when the row could not be parsed


@dataclass(frozen=True)
class SourceDescription:
    scheme: str
    location: str                          # path, dataset id or query: never a secret
    format: str                            # "jsonl", "csv", "hf", "pg"
    size_bytes: int | None = None
    encoding: str | None = None
    dialect: dict[str, Any] | None = None  # CSV: delimiter, quotechar, header
    # known up front (CSV header, hf features, query columns, every key of a JSONL file small enough
    # for describe() to read whole); a mapping naming a field not in a non-empty list is refused
    columns: list[str] = field(default_factory=list)
    row_estimate: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Source(Protocol):
    def load(self) -> Iterator[SourceRecord]: ...

    def describe(self) -> SourceDescription: ...


def _record_factory():
    """A positional SourceRecord constructor about a third cheaper than the frozen dataclass __init__
    (which sets each field through object.__setattr__); for the connectors' per-row hot loops."""
    from dataclasses import fields

    names = ("row_number", "offset", "raw", "fields", "error")
    assert tuple(f.name for f in fields(SourceRecord)) == names, "update new_record with SourceRecord"
    s0, s1, s2, s3, s4 = (SourceRecord.__dict__[n].__set__ for n in names)
    new = object.__new__

    def new_record(row_number: int, offset: int, raw: str, fields: dict[str, Any] | None,
                   error: tuple[str, str] | None) -> SourceRecord:
        record = new(SourceRecord)
        s0(record, row_number)
        s1(record, offset)
        s2(record, raw)
        s3(record, fields)
        s4(record, error)
        return record

    return new_record


new_record = _record_factory()
