"""A CSV mixing UTF-8 rows with rows in a legacy code page: each line is read as UTF-8 when it is valid
UTF-8, the rest in the detected page, counted and flagged (ingest.mixed_encoding), never the whole
file mis-decoded in one page."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts.common import FieldMapping
from contracts.reason_codes import is_registered
from services.common.artifacts import ArtifactStore
from services.ingest.domain import run_ingest
from services.ingest.sources.csv import CsvSource

MIXED_TEXT = "café naïve – €5 “quoted” déjà vu"


def _mixed_file(tmp_path: Path, rows: int = 300, legacy_every: int = 20, page: str = "cp1252") -> Path:
    body = b"text,label\n"
    for i in range(rows):
        line = f"{MIXED_TEXT} {i},{'ab'[i % 2]}\n"
        body += line.encode(page if i % legacy_every == 0 else "utf-8")
    path = tmp_path / "mixed.csv"
    path.write_bytes(body)
    return path


def test_utf8_rows_of_a_mostly_utf8_file_with_cp1252_rows_are_read_exactly(tmp_path):
    src = CsvSource(_mixed_file(tmp_path))
    recs = list(src.load())
    assert len(recs) == 300 and all(r.error is None for r in recs)
    # every row, UTF-8 or cp1252, reads back as written: nothing became "cafĂ© naĂŻve â€“ â‚¬5"
    assert [r.fields["text"] for r in recs] == [f"{MIXED_TEXT} {i}" for i in range(300)]
    report = src.decoding_report()
    assert report["warning"] == "ingest.mixed_encoding" and is_registered(report["warning"])
    assert (report["rows_decoded_as_utf8"], report["rows_decoded_with_fallback"]) == (285, 15)
    assert report["encoding_fallback"] == "cp1252"
    assert report["fallback_lines"][:3] == [2, 22, 42]


def test_mixed_encoding_is_a_warning_with_counts_in_the_committed_source_details(tmp_path):
    out = run_ingest(CsvSource(_mixed_file(tmp_path)), FieldMapping(text=["text"], label="label"),
                     ArtifactStore(tmp_path / "a"), commit=True)
    assert out.counts.rows_accepted == 300 and out.counts.rows_rejected == 0
    assert out.warning == "ingest.mixed_encoding"
    decoding = out.description.details["decoding"]
    assert decoding["rows_decoded_with_fallback"] == 15 and decoding["rows_decoded_as_utf8"] == 285


def test_a_file_wholly_in_one_legacy_page_or_in_utf8_is_not_flagged(tmp_path):
    legacy = tmp_path / "legacy.csv"
    legacy.write_bytes(("text,label\n" + "".join(f"{MIXED_TEXT} {i},a\n" for i in range(50))).encode("cp1252"))
    src = CsvSource(legacy)
    assert [r.fields["text"] for r in src.load()] == [f"{MIXED_TEXT} {i}" for i in range(50)]
    assert "warning" not in src.decoding_report()
    utf8 = tmp_path / "utf8.csv"
    utf8.write_text("text,label\n" + "".join(f"{MIXED_TEXT} {i},a\n" for i in range(50)), encoding="utf-8")
    src = CsvSource(utf8)
    list(src.load())
    assert src.decoding_report() == {}


def test_utf8_rows_after_the_detection_sample_are_still_read_as_utf8(tmp_path):
    # the first 64 KiB are all cp1252; UTF-8 rows come later and must not be read as cp1252
    body = b"text,label\n" + b"".join(f"{MIXED_TEXT} {i},a\n".encode("cp1252") for i in range(3000))
    body += b"".join(f"{MIXED_TEXT} {i},b\n".encode("utf-8") for i in range(3000, 3010))
    path = tmp_path / "late.csv"
    path.write_bytes(body)
    recs = list(CsvSource(path).load())
    assert [r.fields["text"] for r in recs] == [f"{MIXED_TEXT} {i}" for i in range(3010)]


# code page -> letters of its languages beyond ASCII (all encodable in it)
_PAGES = {
    "cp1252": "éèêàâçîïôûüùœæñßÉÀ€–“”’…",
    "cp1250": "ąćęłńóśźżčďěňřšťůžáéíýÁČŘŠŽ",
    "cp1257": "ąčęėįšųūžāēģīķļņōĀČŠŽ",
    "cp1254": "çğıöşüâîÇĞİÖŞÜ",
    "cp1251": "абвгдеёжзийклмнопрстуфхцчшщыэюяАБВЖЯ",
    "latin-1": "éèêàâçîïôûüùæñßÉÀ",
}
_UTF8_EXTRA = "éüñß€–“”’…ąłřšžабвгдеάέ中文日本語😀✓"
_ASCII = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ 0123456789.!?-"


@st.composite
def _mixed_rows(draw):
    page = draw(st.sampled_from(sorted(_PAGES)))
    letters = _ASCII + _PAGES[page]
    row = st.tuples(st.booleans(), st.text(alphabet=letters, min_size=1, max_size=40),
                    st.text(alphabet=_UTF8_EXTRA, max_size=5))
    # a mix: at least one UTF-8 row (a file wholly in one page is the test above; three short lines of
    # random letters in cp1252 alone can be refused as not text, by design of the Latin-page guess)
    rows = draw(st.lists(row, min_size=1, max_size=60).filter(lambda rs: any(is_utf8 for is_utf8, _, _ in rs)))
    return page, rows


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_mixed_rows())
def test_any_mix_of_utf8_and_one_legacy_page_round_trips_every_utf8_row_exactly(case):
    page, rows = case
    body = b"text,label\n"
    expected_utf8 = {}
    for i, (is_utf8, text, extra) in enumerate(rows):
        text = f"r{i} {text}{extra if is_utf8 else ''}"
        line = f"{text},l\n"
        body += line.encode("utf-8" if is_utf8 else page)
        if is_utf8:
            expected_utf8[i] = text
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mixed.csv"
        path.write_bytes(body)
        recs = list(CsvSource(path).load())
    assert len(recs) == len(rows)
    for i, text in expected_utf8.items():
        assert recs[i].error is None and recs[i].fields["text"] == text
