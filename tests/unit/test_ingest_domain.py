"""Ingest's pure logic: locators, line numbering/offsets, and the row mapping with a reason for
every rejected row (read = accepted + rejected, always)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from services.ingest.domain import (
    Locator,
    LocatorError,
    RawRow,
    RejectedRow,
    jsonl_rows,
    map_row,
    map_rows,
    parse_locator,
)


def row(raw: bytes, number: int = 1, offset: int = 0) -> RawRow:
    return RawRow(number, offset, raw)


def mapped(raw: bytes) -> dict | RejectedRow:
    return map_row(row(raw), "text", "label")


def reason_of(raw: bytes) -> str:
    result = mapped(raw)
    assert isinstance(result, RejectedRow), f"{raw!r} was accepted as {result!r}"
    return result.reason_code


# --- locators ----------------------------------------------------------------------------------


def test_jsonl_locator_with_an_absolute_path_parses_to_scheme_and_path():
    loc = parse_locator("jsonl:/data/sample.jsonl")
    assert loc == Locator("jsonl", Path("/data/sample.jsonl"))
    assert loc.path.is_absolute()
    assert str(loc) == "jsonl:/data/sample.jsonl"


def test_jsonl_locator_with_a_relative_path_keeps_it_relative():
    loc = parse_locator("jsonl:data/sub/rows.jsonl")
    assert loc.scheme == "jsonl"
    assert loc.path == Path("data/sub/rows.jsonl")
    assert not loc.path.is_absolute()


def test_only_the_first_colon_separates_scheme_from_path():
    assert parse_locator("jsonl:/a:b/c.jsonl").path == Path("/a:b/c.jsonl")


@pytest.mark.parametrize("text", ["data.jsonl", "jsonl", "", "jsonl:", ":/data/x.jsonl"])
def test_locator_without_scheme_colon_or_path_is_invalid(text):
    with pytest.raises(LocatorError) as exc:
        parse_locator(text)
    assert exc.value.reason_code == "ingest.locator_invalid"


def test_upper_case_scheme_is_invalid_not_silently_lowered():
    with pytest.raises(LocatorError) as exc:
        parse_locator("JSONL:/data/x.jsonl")
    assert exc.value.reason_code == "ingest.locator_invalid"


@pytest.mark.parametrize("text", ["csv:/data/x.csv", "hf:org/dataset", "pg:table"])
def test_known_but_unimplemented_schemes_are_refused_by_name(text):
    with pytest.raises(LocatorError) as exc:
        parse_locator(text)
    assert exc.value.reason_code == "ingest.locator_unsupported"
    assert "jsonl" in str(exc.value)  # the message names what is supported


@pytest.mark.parametrize("text", ["js on:/x", "jsonl!:/x", "../x:y/z", "s-3://bucket/key"])
def test_garbage_scheme_is_invalid(text):
    with pytest.raises(LocatorError) as exc:
        parse_locator(text)
    assert exc.value.reason_code == "ingest.locator_invalid"


def test_locator_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_locator("nope")


# --- line numbering and offsets ------------------------------------------------------------


def test_rows_are_numbered_from_one():
    rows = list(jsonl_rows([b'{"a":1}\n', b'{"a":2}\n']))
    assert [r.row_number for r in rows] == [1, 2]
    assert [r.raw for r in rows] == [b'{"a":1}', b'{"a":2}']


def test_blank_lines_are_skipped_but_numbering_and_offsets_continue():
    lines = [b'{"a":1}\n', b"\n", b"   \t\n", b'{"a":2}\n']
    rows = list(jsonl_rows(lines))
    assert [r.row_number for r in rows] == [1, 4]
    assert [r.offset for r in rows] == [0, 8 + 1 + 5]


def test_offsets_count_bytes_not_characters_for_multibyte_utf8():
    first = '{"text":"héllo ✓ 🙂"}\n'.encode()
    assert len(first) > len(first.decode())  # multi-byte, or the test proves nothing
    second = b'{"text":"x"}\n'
    data = first + second
    rows = list(jsonl_rows(data.splitlines(keepends=True)))
    assert rows[1].offset == len(first)
    assert data[rows[1].offset:].startswith(rows[1].raw)


def test_crlf_is_stripped_from_raw_but_counted_in_offsets():
    data = b'{"a":1}\r\n\r\n{"a":2}\r\n{"a":3}'
    rows = list(jsonl_rows(data.splitlines(keepends=True)))
    assert [r.raw for r in rows] == [b'{"a":1}', b'{"a":2}', b'{"a":3}']
    assert [r.row_number for r in rows] == [1, 3, 4]
    for r in rows:
        assert data[r.offset:r.offset + len(r.raw)] == r.raw


def test_offsets_index_into_the_source_on_a_real_file(tmp_path):
    data = ('{"text":"ä","label":"a"}\n\n{"text":"日本","label":"b"}\r\n  \n{"text":"z","label":"c"}').encode()
    path = tmp_path / "rows.jsonl"
    path.write_bytes(data)
    with open(path, "rb") as f:
        rows = list(jsonl_rows(f))
    assert [r.row_number for r in rows] == [1, 3, 5]
    for r in rows:
        assert data[r.offset:r.offset + len(r.raw)] == r.raw


# --- mapping: acceptance ---------------------------------------------------------------------


def test_accepted_row_has_stripped_text_and_label_and_keeps_its_row_number():
    result = map_row(row(b'{"text": "  hello world \\n", "label": " greet "}', number=7), "text", "label")
    assert result == {"text": "hello world", "label": "greet", "row_number": 7}


def test_integer_labels_become_strings():
    assert mapped(b'{"text": "x", "label": 3}')["label"] == "3"
    assert mapped(b'{"text": "x", "label": 0}')["label"] == "0"


def test_custom_field_names_are_used():
    result = map_row(row(b'{"utterance": "hi", "intent": "greet", "text": 1}'), "utterance", "intent")
    assert result == {"text": "hi", "label": "greet", "row_number": 1}


def test_extra_fields_are_dropped():
    assert set(mapped(b'{"text": "x", "label": "y", "meta": {"k": 1}}')) == {"text", "label", "row_number"}


def test_a_utf8_bom_on_the_first_line_does_not_reject_the_row():
    assert mapped(b'\xef\xbb\xbf{"text": "x", "label": "y"}') == {"text": "x", "label": "y", "row_number": 1}


# --- mapping: every rejection reason ---------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b'{"text": "x", "label": ',       # truncated
    b"not json at all",
    b'{"text": "x" "label": "y"}',     # missing comma
    b"[1, 2, 3]",                      # a JSON array, not an object
    b'"just a string"',
    b"42",
    b"null",
    b'{"text": "caf\xe9", "label": "y"}',  # latin-1 byte: invalid UTF-8
    b"\xff\xfe\xfd",
])
def test_rows_that_are_not_json_objects_are_unparseable(raw):
    assert reason_of(raw) == "ingest.unparseable_row"


@pytest.mark.parametrize("raw", [
    b'{"label": "y"}',
    b'{"text": "x"}',
    b"{}",
    b'{"text": null, "label": "y"}',
    b'{"text": "x", "label": null}',
])
def test_absent_or_null_fields_are_missing_field(raw):
    assert reason_of(raw) == "ingest.missing_field"


def test_missing_field_detail_names_the_fields():
    result = mapped(b"{}")
    assert "text" in result.detail and "label" in result.detail


@pytest.mark.parametrize("raw", [
    b'{"text": "", "label": "y"}',
    b'{"text": "   \\t\\n ", "label": "y"}',
    b'{"text": 5, "label": "y"}',
    b'{"text": ["a"], "label": "y"}',
])
def test_blank_or_non_string_text_is_empty_text(raw):
    assert reason_of(raw) == "ingest.empty_text"


@pytest.mark.parametrize("label", [b"true", b"false", b'["a"]', b'""', b'"   "', b"1.5", b'{"a": 1}'])
def test_bool_list_blank_float_or_object_labels_are_invalid(label):
    assert reason_of(b'{"text": "x", "label": ' + label + b"}") == "ingest.invalid_label"


def test_rejected_rows_keep_their_line_number_offset_and_raw_text():
    raw = '{"text": "", "label": "ü"}'.encode()
    result = map_row(RawRow(12, 345, raw), "text", "label")
    assert isinstance(result, RejectedRow)
    assert (result.row_number, result.offset, result.raw) == (12, 345, raw.decode())
    assert result.as_json() == {"row_number": 12, "source_offset": 345, "raw": raw.decode(),
                                "reason_code": "ingest.empty_text", "detail": result.detail}


def test_rejected_invalid_utf8_keeps_a_replacement_decoded_raw():
    result = mapped(b'{"text": "caf\xe9"}')
    assert result.raw == '{"text": "caf\ufffd"}'
    json.dumps(result.as_json(), ensure_ascii=False).encode()  # must be writable to the rejects file


def test_rejected_raw_text_is_truncated():
    result = mapped(b"x" * 10_000)
    assert result.reason_code == "ingest.unparseable_row"
    assert 0 < len(result.raw) <= 2000


# --- map_rows --------------------------------------------------------------------------------

MIXED = [
    b'{"text": "book a flight", "label": "travel"}\n',
    b"\n",
    b"{broken\n",
    b'{"text": "", "label": "travel"}\n',
    b'{"text": "hi", "label": 1}\n',
    b"[1]\n",
    b'{"label": "x"}\n',
    b'{"text": "x", "label": true}\n',
    b'{"text": "\xc3\xa9t\xc3\xa9", "label": "season"}\r\n',
    b'{"text": "bad \xff", "label": "x"}\n',
]


def test_mixed_input_accounts_for_every_row():
    result = map_rows(jsonl_rows(MIXED), "text", "label")
    assert result.rows_read == 9  # the blank line is not a row
    assert result.rows_read == len(result.accepted) + len(result.rejected)
    assert [r["row_number"] for r in result.accepted] == [1, 5, 9]
    assert [r["text"] for r in result.accepted] == ["book a flight", "hi", "été"]
    assert result.rejected_by_reason == {
        "ingest.unparseable_row": 3,
        "ingest.empty_text": 1,
        "ingest.missing_field": 1,
        "ingest.invalid_label": 1,
    }
    assert [r.row_number for r in result.rejected] == [3, 4, 6, 7, 8, 10]


def test_rejected_offsets_point_at_the_rejected_line():
    data = b"".join(MIXED)
    result = map_rows(jsonl_rows(MIXED), "text", "label")
    for r in result.rejected:
        line = data[r.offset:].split(b"\n", 1)[0].rstrip(b"\r")
        assert line.decode("utf-8", errors="replace") == r.raw


def test_empty_input_reads_nothing():
    result = map_rows(jsonl_rows([]), "text", "label")
    assert (result.rows_read, result.accepted, result.rejected, result.rejected_by_reason) == (0, [], [], {})


# --- rows that break the mapping instead of being rejected (bugs) ---------------------------


def test_a_label_with_more_than_4300_digits_is_rejected_not_raised():
    assert reason_of(b'{"text": "x", "label": ' + b"1" * 5000 + b"}") == "ingest.unparseable_row"


def test_deeply_nested_json_is_rejected_not_raised():
    assert reason_of(b"[" * 100_000) == "ingest.unparseable_row"


def test_accepted_text_and_label_are_always_encodable_as_utf8():
    result = mapped(b'{"text": "hi \\ud800 there", "label": "a"}')
    if isinstance(result, dict):
        (result["text"] + result["label"]).encode("utf-8")
    else:
        assert result.reason_code == "ingest.unparseable_row"


# --- never raises, always accounts (fuzz) ----------------------------------------------------

_FRAGMENTS = [b"{", b"}", b"[", b"]", b'"text"', b'"label"', b":", b",", b'"a"', b'""', b"1", b"true", b"null",
              b" ", b"\xff", b"\xc3\xa9", b"\\u00e9", b"\r", b"\t", b"\x00"]


def _assert_accounts(lines: list[bytes]) -> None:
    result = map_rows(jsonl_rows(lines), "text", "label")
    assert result.rows_read == len(result.accepted) + len(result.rejected)
    assert result.rows_read == sum(1 for line in lines if line.strip())
    for r in result.accepted:
        assert r["text"] == r["text"].strip() and r["text"]
        assert isinstance(r["label"], str) and r["label"]


def test_seeded_random_lines_never_raise_and_always_account():
    rng = random.Random(20240601)
    for _ in range(200):
        lines = []
        for _ in range(rng.randint(0, 8)):
            if rng.random() < 0.5:
                body = b"".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(0, 12)))
            else:
                body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 20)))
            lines.append(body.replace(b"\n", b"") + b"\n")
        _assert_accounts(lines)


def test_hypothesis_random_bytes_lines_never_raise_and_always_account():
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hypothesis.settings(max_examples=200, deadline=None, database=None)
    @hypothesis.given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=10))
    def prop(lines):
        _assert_accounts(lines)

    prop()
