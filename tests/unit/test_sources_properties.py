"""Property-based checks of the file connectors: whatever the bytes, only SourceError escapes, and
every row of the source comes back exactly once (read = accepted + rejected starts here)."""

from __future__ import annotations

import codecs
import csv
import json
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from services.ingest.sources.base import SourceError
from services.ingest.sources.csv import _MARK, CsvSource
from services.ingest.sources.jsonl import JsonlSource

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Bytes that look a bit like the real thing: JSON/CSV punctuation, newlines, NUL, high bytes.
_alphabet = st.sampled_from([b"{", b"}", b"[", b"]", b'"', b":", b",", b";", b"\t", b"|", b" ", b"\n", b"\r\n", b"\r",
                             b"a", b"1", b"\\", b"\x00", b"\xff", b"\xc3\xa9", b"\xef\xbb\xbf", b"\x0b",
                             b'{"a": 1}', b"text,label", b"99999999999999999999"])
structured_bytes = st.lists(_alphabet, max_size=120).map(b"".join)
any_bytes = st.one_of(st.binary(max_size=600), structured_bytes)
csv_bytes = st.one_of(st.binary(max_size=600), structured_bytes,
                      structured_bytes.map(lambda b: b"text,label\n" + b.replace(b"\x00", b"")))


def _write(data: bytes, suffix: str) -> Path:
    f = tempfile.NamedTemporaryFile(delete=False, suffix=suffix)
    with f:
        f.write(data)
    return Path(f.name)


def _expected_jsonl_rows(data: bytes) -> int:
    body = data[3:] if data.startswith(codecs.BOM_UTF8) else data
    return sum(1 for line in body.split(b"\n") if line.strip())


@SETTINGS
@given(data=any_bytes, max_row_bytes=st.sampled_from([4, 16, 1 << 20]))
def test_jsonl_random_bytes_never_raise_anything_but_source_error_and_count_every_line(data, max_row_bytes):
    p = _write(data, ".jsonl")
    try:
        try:
            records = list(JsonlSource(p, max_row_bytes=max_row_bytes).load())
        except SourceError as exc:
            if exc.reason_code == "ingest.binary_source":
                assert b"\x00" in data[:8192]
            elif exc.reason_code == "ingest.encoding_error":  # UTF-16/32: a BOM, or NULs in UTF-16's pattern
                assert data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) or b"\x00" in data[:8192]
                assert "not UTF-8" in str(exc)
            else:
                assert exc.reason_code == "ingest.empty_source" and _expected_jsonl_rows(data) == 0
            return
        assert len(records) == _expected_jsonl_rows(data)
        event(f"jsonl rows checked: {min(len(records), 3)}+")
        numbers = [r.row_number for r in records]
        assert numbers == sorted(set(numbers))
        for r in records:
            assert (r.fields is None) != (r.error is None)
            r.raw.encode("utf-8")  # always writable
            if r.error:
                assert r.error[0] in ("ingest.unparseable_row", "ingest.encoding_error", "ingest.row_too_long") and r.error[1]
            else:
                assert isinstance(r.fields, dict)
                json.dumps(r.fields, ensure_ascii=False).encode("utf-8")
            assert r.offset == 0 or data[r.offset - 1:r.offset] == b"\n" or (r.offset == 3 and data.startswith(codecs.BOM_UTF8))
    finally:
        p.unlink()


def _reference_csv_count(data: bytes, src: CsvSource) -> int:
    """Records (including bad ones) after the header, by stdlib csv over the same physical lines."""
    lay = src._detect()
    body = data[lay.bom_bytes:]
    if lay.ascii_compatible and (b"\r" not in body or lay.universal_newlines):
        lines = [ln.decode(lay.encoding, _MARK) for ln in body.splitlines(keepends=True) if ln]
    else:
        lines = None
    if lines is None:  # lone CRs after an LF-ended first line: split only on LF, as the connector does
        text = body.decode(lay.encoding, _MARK) if not lay.ascii_compatible else None
        pieces = (text.split("\n") if text is not None else [p.decode(lay.encoding, _MARK) for p in body.split(b"\n")])
        lines = [p + "\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    count, at, header = 0, 0, True
    while at is not None:  # a record rejected with a quote still open: read again after the line it opened on
        fed = [0]

        def feed(start=at):
            for line in lines[start:]:
                fed[0] += 1
                yield line

        reader = csv.reader(feed(), lay.dialect)
        start, at = at, None
        while True:
            first = start + fed[0]
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                count += 1
                continue
            if not row:
                continue
            record = lines[first:start + fed[0]]
            if header:
                header = False
                continue
            count += 1
            opened = _still_open_from(record, lay.dialect)
            bad = any(_MARKED_CHAR.search(x) for x in record)
            rejected = len(row) != len(lay.header) or opened is not None
            if len(record) > 1 and opened is not None and opened < len(record) - 1 and rejected and not bad:
                at = first + opened + 1
                break
    return count


_MARKED_CHAR = re.compile("[\udc00-\udcff]")


def _still_open_from(record: list[str], dialect) -> int | None:
    """The index of the line of `record` on which a quoted field opened that is still open at its end
    (None: none is), by the csv module's states, char by char (doubled quotes, no escape char)."""
    state, opened = "start_field", None
    for i, line in enumerate(record):
        if state != "quoted":
            state = "start_field"
        for c in line:
            if state == "quoted":
                if c == dialect.quotechar:
                    state = "quote_in_quoted"
            elif state == "quote_in_quoted":
                state = "quoted" if c == dialect.quotechar else "start_field" if c == dialect.delimiter else "field"
            elif state == "start_field":
                if c == dialect.quotechar:
                    state, opened = "quoted", i
                elif c == dialect.delimiter or (c == " " and dialect.skipinitialspace):
                    pass
                elif c not in "\r\n":
                    state = "field"
            elif c == dialect.delimiter:
                state = "start_field"
    return opened if state == "quoted" else None


@SETTINGS
@given(data=csv_bytes)
def test_csv_random_bytes_never_raise_anything_but_source_error_and_count_every_record(data):
    p = _write(data, ".csv")
    try:
        src = CsvSource(p)
        try:
            records = list(src.load())
        except SourceError as exc:
            assert exc.reason_code in ("ingest.binary_source", "ingest.empty_source", "ingest.encoding_error") and str(exc)
            return
        assert len(records) == _reference_csv_count(data, src)
        event(f"csv records checked: {min(len(records), 3)}+")
        numbers = [r.row_number for r in records]
        offsets = [r.offset for r in records]
        assert numbers == sorted(set(numbers)) and offsets == sorted(set(offsets))
        for r in records:
            assert (r.fields is None) != (r.error is None)
            r.raw.encode("utf-8")
            if r.fields is not None:
                assert list(r.fields) == src.describe().columns
                "".join(r.fields.values()).encode("utf-8")
    finally:
        p.unlink()


_cell = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\"',;\t|\x00"), max_size=12)


@SETTINGS
@given(rows=st.lists(st.lists(_cell, min_size=3, max_size=3), min_size=1, max_size=30),
       delimiter=st.sampled_from([",", ";", "\t", "|"]), blank_every=st.integers(2, 9))
def test_csv_without_quotes_gives_one_record_per_non_blank_line(rows, delimiter, blank_every):
    header = ["h1", "h2", "h3"]
    lines = [delimiter.join(header)]
    for i, row in enumerate(rows):
        if i % blank_every == 0:
            lines.append("")
        lines.append(delimiter.join(row))
    p = _write(("\n".join(lines) + "\n").encode("utf-8"), ".csv")
    try:
        records = list(CsvSource(p).load())
    except SourceError as exc:  # every row blank: a header and no records
        assert exc.reason_code == "ingest.empty_source" and all(not "".join(r) for r in rows)
        return
    finally:
        p.unlink()
    expected = [row for row in rows if delimiter.join(row)]
    assert len(records) == len(expected)
    for rec, row in zip(records, expected):
        if rec.error is None:
            assert rec.fields == dict(zip(header, row))
        else:  # a sniffer may pick another delimiter on odd text; the row is still counted once
            assert rec.error[0] == "ingest.ragged_row"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=15,
)


@SETTINGS
@given(values=st.lists(json_values, min_size=1, max_size=15), ascii_only=st.booleans())
def test_json_values_come_back_as_the_same_object_or_as_unparseable_non_objects(values, ascii_only):
    p = _write("".join(json.dumps(v, ensure_ascii=ascii_only) + "\n" for v in values).encode("utf-8"), ".jsonl")
    try:
        records = list(JsonlSource(p).load())
    finally:
        p.unlink()
    assert len(records) == len(values)
    for rec, value in zip(records, values):
        if isinstance(value, dict):
            assert rec.error is None and rec.fields == value
        else:
            assert rec.fields is None and rec.error[0] == "ingest.unparseable_row"
