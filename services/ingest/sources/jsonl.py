"""JSON Lines files: one JSON object per line.

Rows and offsets
    `row_number` is the 1-based physical line number (blank lines count as lines but are not rows);
    `offset` is the byte offset of the line's first byte in the file (after a leading UTF-8 BOM, so
    `f.seek(offset)` lands on the row).

Bad rows never raise; they come back as records with `error`:
    ingest.encoding_error   the line is not valid UTF-8, or a string in it holds a lone surrogate
                            escape (``"\\ud800"``) that no UTF-8 artifact can hold;
    ingest.unparseable_row  not valid JSON, or a JSON value that is not an object;
    ingest.row_too_long     the line is longer than `max_row_bytes` (read in bounded chunks, never
                            held whole; the record keeps the first MAX_RAW_KEPT characters).
Whole-source failures raise SourceError: ingest.source_not_found, ingest.encoding_error (UTF-16 or
UTF-32 text, by its byte-order mark or, for UTF-16 without one, its NUL pattern: JSON Lines is UTF-8),
ingest.binary_source (other NUL bytes in the first 8 KiB), ingest.empty_source (no rows at all; raised
by load() once it has seen the end).

Parsing uses orjson. json.loads is used only for lines orjson refuses (or would change): integers
beyond 64 bits (orjson turns them into floats silently, so lines with a run of 20+ digits go to
json.loads), NaN/Infinity, nesting deeper than orjson's limit, lone surrogate escapes (rejected).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import orjson

from services.ingest.sources.base import (
    MAX_RAW_KEPT,
    SourceDescription,
    SourceError,
    SourceRecord,
    new_record,
    open_file,
)

DEFAULT_MAX_ROW_BYTES = 1 << 20
BINARY_SNIFF_BYTES = 8192
BOM = b"\xef\xbb\xbf"
_DESCRIBE_SAMPLE_BYTES = 64 * 1024
_CHUNK = 64 * 1024

# Maps ASCII digits to b"0" and every other byte to b"x": `_DIGIT_RUN in line.translate(_DIGITS)` finds
# a run of 20 digits (a possible integer beyond 64 bits) at C speed.
_DIGITS = bytes(0x30 if 0x30 <= i <= 0x39 else 0x78 for i in range(256))
_DIGIT_RUN = b"0" * 20
_FAILED = object()
_JSON_TYPE_NAMES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _raw(line: bytes) -> str:
    if len(line) <= MAX_RAW_KEPT:
        return line.decode("utf-8", "replace").rstrip("\r\n")
    return line[: MAX_RAW_KEPT * 4].decode("utf-8", "replace")[:MAX_RAW_KEPT].rstrip("\r\n")


def _slow_parse(line: bytes, row_number: int) -> tuple[object, tuple[str, str] | None]:
    """json.loads for what orjson refused or could alter; returns (value, error)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, ("ingest.encoding_error",
                      f"line {row_number}: not valid UTF-8 ({exc.reason} at byte {exc.start} of the line)")
    try:
        value = json.loads(text.rstrip("\r\n"))  # positions in the message are then within this line
    except RecursionError:
        return None, ("ingest.unparseable_row", f"line {row_number}: not valid JSON: nested too deeply")
    except ValueError as exc:
        return None, ("ingest.unparseable_row", f"line {row_number}: not valid JSON: {str(exc)[:200]}")
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return None, ("ingest.encoding_error",
                      f"line {row_number}: a string holds a lone surrogate escape (e.g. \\ud800) that cannot be written as UTF-8")
    except (RecursionError, ValueError):
        pass  # nesting deeper than json.dumps recurses; let the type check below decide
    return value, None


def check_binary(head: bytes, path: Path | str) -> None:
    """Refuse a file that is not UTF-8 text as a whole: UTF-16/32 text (a Windows "Unicode" export)
    is named as such, other NUL bytes make a binary file."""
    from services.ingest.sources.csv import wide_encoding

    wide = wide_encoding(head[:BINARY_SNIFF_BYTES])
    if wide is not None:
        raise SourceError("ingest.encoding_error", f"{path} is {wide[:6].upper()} text, not UTF-8: JSON Lines must "
                                                   f"be UTF-8 (save it again as UTF-8)")
    if b"\x00" in head[:BINARY_SNIFF_BYTES]:
        raise SourceError("ingest.binary_source",
                          f"{path} is a binary file (NUL bytes in its first {BINARY_SNIFF_BYTES} bytes), not JSON Lines")


class JsonlSource:
    format = "jsonl"

    def __init__(self, path: str | os.PathLike, *, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES, **_ignored):
        if max_row_bytes < 1:
            raise ValueError("max_row_bytes must be positive")
        self.path = Path(path)
        self.max_row_bytes = max_row_bytes

    def _open(self):
        return open_file(self.path, "JSON Lines", _CHUNK * 16)

    def load(self) -> Iterator[SourceRecord]:
        record, raw_of = new_record, _raw
        for row_number, start, line, value, error in self.load_lines():
            yield record(row_number, start, raw_of(line), value, error)

    @staticmethod
    def raw_text(line: bytes) -> str:
        """The ``raw`` that :meth:`load` gives the record of ``line`` (from :meth:`load_lines`)."""
        return _raw(line)

    def load_lines(self) -> Iterator[tuple[int, int, bytes, dict | None, tuple[str, str] | None]]:
        """:meth:`load` as ``(row_number, offset, line, fields, error)`` with the line's bytes instead
        of its decoded raw text (:meth:`raw_text`): a consumer that keeps raw text only for rejected
        rows does not decode every line."""
        return self.load_range()

    def load_range(self, start: int = 0, end: int | None = None, row_base: int = 0
                   ) -> Iterator[tuple[int, int, bytes, dict | None, tuple[str, str] | None]]:
        """:meth:`load_lines` of the lines that start in ``[start, end)``, numbered from ``row_base + 1``;
        ``start`` and ``end`` must be line starts (:meth:`split_point`). Only the whole file
        (``start == 0``, ``end is None``) raises ``ingest.empty_source`` when it holds no row."""
        f = self._open()
        with f:
            offset = start
            if start == 0:
                head = f.read(BINARY_SNIFF_BYTES)
                check_binary(head, self.path)
                offset = len(BOM) if head.startswith(BOM) else 0
            f.seek(offset)
            yield from self._lines(f, offset, end, row_base, start == 0 and end is None)

    def split_point(self, min_bytes: int) -> int | None:
        """A line start near the middle of a file of at least ``min_bytes`` (None for a smaller file
        or one whose second half holds no line start), where two workers may divide it."""
        try:
            size = os.stat(self.path).st_size
        except OSError:
            return None
        if size < max(min_bytes, 2):
            return None
        with self._open() as f:
            pos = size // 2
            f.seek(pos)
            while chunk := f.read(_CHUNK):
                nl = chunk.find(b"\n")
                if nl >= 0:
                    point = pos + nl + 1
                    return point if point < size else None
                pos += len(chunk)
        return None

    def lines_before(self, point: int) -> int:
        """How many lines start before ``point`` (a line start): the row number base of the lines
        from there on."""
        n = 0
        with self._open() as f:
            left = point
            while left > 0 and (chunk := f.read(min(_CHUNK * 16, left))):
                n += chunk.count(b"\n")
                left -= len(chunk)
        return n

    def empty_error(self) -> SourceError:
        return SourceError("ingest.empty_source", f"{self.path} holds no rows (the file is empty or has only blank lines)")

    def _lines(self, f, offset: int, end: int | None = None, row_number: int = 0, check_empty: bool = True
               ) -> Iterator[tuple[int, int, bytes, dict | None, tuple[str, str] | None]]:
        # Hot loop: locals only, one readline per line, orjson on the bytes, the slow path on failure.
        limit = self.max_row_bytes + 2  # content + "\r\n"
        near_limit = self.max_row_bytes + 1
        readline = f.readline
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        digits, digit_run = _DIGITS, _DIGIT_RUN
        stop = end if end is not None else float("inf")
        rows = 0
        while offset < stop:
            line = readline(limit)
            if not line:
                break
            row_number += 1
            start = offset
            offset += len(line)
            if len(line) > near_limit and (line[-1] != 0x0A or len(line.rstrip(b"\r\n")) > near_limit - 1):
                # Longer than the limit: drain the rest in bounded chunks, never holding it whole.
                rest, blank, ending = self._drain(readline, line) if line[-1] != 0x0A else (0, not line.strip(), line[-2:])
                offset += rest
                if blank:
                    continue
                rows += 1
                size = len(line) + rest - (2 if ending == b"\r\n" else 1 if ending[-1:] == b"\n" else 0)
                yield (row_number, start, line, None,
                       ("ingest.row_too_long", f"line {row_number}: {size} bytes, longer than the limit of {self.max_row_bytes} bytes"))
                continue
            value = _FAILED
            if digit_run not in line.translate(digits):  # else a possible integer beyond 64 bits: json.loads
                try:
                    value = loads(line)
                except decode_error:
                    pass
            if value is _FAILED:
                if not line.strip():
                    continue  # a blank line is not a row
                value, error = _slow_parse(line, row_number)
                if error is not None:
                    rows += 1
                    yield (row_number, start, line, None, error)
                    continue
            rows += 1
            if type(value) is dict:
                yield (row_number, start, line, value, None)
            else:
                kind = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
                yield (row_number, start, line, None,
                       ("ingest.unparseable_row", f"line {row_number}: a JSON {kind}, not an object"))
        if rows == 0 and check_empty:
            raise self.empty_error()

    def _drain(self, readline, first: bytes) -> tuple[int, bool, bytes]:
        """Skip to the end of an over-long line; returns (bytes skipped, whether the whole line was
        blank, its last two bytes)."""
        blank = not first.strip()
        skipped = 0
        tail = first[-2:]
        while True:
            chunk = readline(_CHUNK)
            if not chunk:
                return skipped, blank, tail
            skipped += len(chunk)
            tail = (tail + chunk)[-2:]
            if blank and chunk.strip():
                blank = False
            if chunk[-1] == 0x0A:
                return skipped, blank, tail

    def describe(self) -> SourceDescription:
        """Reads at most the first 64 KiB: size, BOM, a row estimate and, when that is the whole file,
        `columns`: every key of every object. JSON Lines has no fixed schema, so a key that the first
        rows lack may still come later (a row without a required field is rejected on its own); only
        a key that no row of a wholly read file has is one the source does not have. A larger file's
        `columns` stay empty: no mapped field can be refused before all its rows are read."""
        f = self._open()
        with f:
            sample = f.read(_DESCRIBE_SAMPLE_BYTES)
            size = os.fstat(f.fileno()).st_size
        check_binary(sample, self.path)
        bom = sample.startswith(BOM)
        body = sample[len(BOM):] if bom else sample
        if not body.strip() and size <= len(sample):
            raise SourceError("ingest.empty_source", f"{self.path} holds no rows (the file is empty or has only blank lines)")
        complete = body.split(b"\n")
        if size > len(sample):
            complete = complete[:-1]  # the last piece may be cut
        lines = [ln for ln in complete if ln.strip()]
        keys: dict[str, None] = {}
        if size <= len(sample):
            for ln in lines:
                try:
                    value = orjson.loads(ln)
                except orjson.JSONDecodeError:
                    value, _ = _slow_parse(ln, 0)  # what load() parses too (NaN, integers beyond 64 bits)
                if isinstance(value, dict):
                    keys.update(dict.fromkeys(map(str, value)))
        estimate = None
        if lines:
            sampled_bytes = sum(len(ln) + 1 for ln in complete) or 1
            estimate = len(lines) if size <= len(sample) else round(len(lines) * (size - len(BOM) * bom) / sampled_bytes)
        return SourceDescription(
            scheme="jsonl", location=str(self.path), format="jsonl", size_bytes=size,
            encoding="utf-8-sig" if bom else "utf-8", columns=list(keys), row_estimate=estimate,
            details={"bom": bom, "sampled_rows": len(lines), "max_row_bytes": self.max_row_bytes},
        )
