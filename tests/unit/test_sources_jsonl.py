"""JsonlSource: rows in order with byte offsets, bad rows as records (never raised), whole-file
failures as SourceError, bounded memory on a 50 MB line."""

from __future__ import annotations

import json
import resource
import sys
import tracemalloc
from pathlib import Path

import pytest

from contracts.common import FieldMapping
from services.common.artifacts import ArtifactStore
from services.common.jsonl import read_jsonl
from services.ingest.domain import IngestError, run_ingest
from services.ingest.sources.base import MAX_RAW_KEPT, SourceError
from services.ingest.sources.jsonl import JsonlSource

DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def write(tmp_path, data: bytes, name="d.jsonl") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def codes(records):
    return [r.error[0] if r.error else "ok" for r in records]


def test_rows_offsets_and_blank_lines(tmp_path):
    data = b'{"a": 1}\n\n   \n{"b": "x"}\r\n{"c": [1, 2]}'
    p = write(tmp_path, data)
    recs = list(JsonlSource(p).load())
    assert [r.fields for r in recs] == [{"a": 1}, {"b": "x"}, {"c": [1, 2]}]
    assert [r.row_number for r in recs] == [1, 4, 5]
    assert [r.offset for r in recs] == [0, data.index(b'{"b"'), data.index(b'{"c"')]
    assert [r.raw for r in recs] == ['{"a": 1}', '{"b": "x"}', '{"c": [1, 2]}']
    with open(p, "rb") as f:
        for r in recs:
            f.seek(r.offset)
            assert json.loads(f.readline()) == r.fields


def test_utf8_bom_is_stripped_and_offsets_stay_true(tmp_path):
    p = write(tmp_path, b'\xef\xbb\xbf{"t": "caf\xc3\xa9"}\n{"t": 2}\n')
    recs = list(JsonlSource(p).load())
    assert [r.fields for r in recs] == [{"t": "café"}, {"t": 2}]
    assert recs[0].offset == 3
    assert JsonlSource(p).describe().encoding == "utf-8-sig"


def test_malformed_lines_are_records_and_the_good_rows_around_them_survive(tmp_path):
    p = write(tmp_path, b'{"ok": 1}\n{"broken": \n[1, 2]\n"just a string"\n{"ok": 2}\n{"a":1}{"b":2}\n{"ok": 3}\n')
    recs = list(JsonlSource(p).load())
    assert codes(recs) == ["ok", "ingest.unparseable_row", "ingest.unparseable_row", "ingest.unparseable_row",
                           "ok", "ingest.unparseable_row", "ok"]
    assert [r.fields for r in recs if r.fields] == [{"ok": 1}, {"ok": 2}, {"ok": 3}]
    bad = recs[1]
    assert bad.row_number == 2 and bad.raw == '{"broken": ' and "line 2" in bad.error[1] and "not valid JSON" in bad.error[1]
    assert "a JSON array, not an object" in recs[2].error[1]
    assert "a JSON string, not an object" in recs[3].error[1]


def test_latin1_file_read_as_utf8_gives_encoding_errors_per_row(tmp_path):
    p = write(tmp_path, '{"t": "plain"}\n{"t": "café"}\n{"t": "ok"}\n'.encode("latin-1"))
    recs = list(JsonlSource(p).load())
    assert codes(recs) == ["ok", "ingest.encoding_error", "ok"]
    assert "line 2" in recs[1].error[1] and "not valid UTF-8" in recs[1].error[1]
    assert recs[1].raw == '{"t": "caf\ufffd"}'
    recs[1].raw.encode("utf-8")


def test_lone_surrogate_escapes_are_rejected_not_passed_on(tmp_path):
    p = write(tmp_path, b'{"t": "\\ud800 alone"}\n{"t": "\\ud83d\\ude00 pair"}\n')
    recs = list(JsonlSource(p).load())
    assert codes(recs) == ["ingest.encoding_error", "ok"]
    assert "surrogate" in recs[0].error[1]
    assert recs[1].fields == {"t": "\U0001f600 pair"}


def test_what_orjson_refuses_or_would_change_goes_through_json(tmp_path):
    big = 123456789012345678901234567890
    p = write(tmp_path, f'{{"n": {big}, "m": -{big}}}\n{{"f": NaN}}\n{{"id": "00000000000000000000000"}}\n'.encode())
    recs = list(JsonlSource(p).load())
    assert recs[0].fields == {"n": big, "m": -big} and type(recs[0].fields["n"]) is int
    assert recs[1].fields is not None and recs[1].fields["f"] != recs[1].fields["f"]  # NaN, as json.loads gives
    assert recs[2].fields == {"id": "00000000000000000000000"}


def test_deep_nesting_is_a_row_error_not_a_crash(tmp_path):
    p = write(tmp_path, b"[" * 100_000 + b"\n" + b'{"ok": 1}\n')
    recs = list(JsonlSource(p).load())
    assert codes(recs) == ["ingest.unparseable_row", "ok"]


def test_binary_file_is_refused(tmp_path):
    p = write(tmp_path, b'{"a": 1}\n' + bytes(range(256)) * 4)
    for call in (lambda: list(JsonlSource(p).load()), lambda: JsonlSource(p).describe()):
        with pytest.raises(SourceError) as err:
            call()
        assert err.value.reason_code == "ingest.binary_source" and "binary" in str(err.value) and "d.jsonl" in str(err.value)


@pytest.mark.parametrize(("encoding", "name"), [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16"), ("utf-16-be", "UTF-16"),
                                              ("utf-32", "UTF-32")])
def test_utf16_or_utf32_text_is_named_as_such_not_called_binary(tmp_path, encoding, name):
    # a Windows "Unicode" export: text, in an encoding JSON Lines does not allow
    p = write(tmp_path, '{"text": "très bien", "label": "a"}\n'.encode(encoding) * 3)
    for call in (lambda: list(JsonlSource(p).load()), lambda: JsonlSource(p).describe()):
        with pytest.raises(SourceError) as err:
            call()
        assert err.value.reason_code == "ingest.encoding_error"
        assert f"is {name} text, not UTF-8" in str(err.value) and "binary" not in str(err.value)


def test_a_json_error_gives_its_position_within_the_line(tmp_path):
    p = write(tmp_path, b'{"ok": 1}\n{"text": "cut", "label": \n')
    detail = list(JsonlSource(p).load())[1].error[1]
    assert detail.startswith("line 2: not valid JSON:") and "line 1 column 26" in detail, detail


@pytest.mark.parametrize("data", [b"", b"\n\n  \n\t\n", b"\xef\xbb\xbf"])
def test_empty_file_is_refused(tmp_path, data):
    p = write(tmp_path, data)
    with pytest.raises(SourceError) as err:
        list(JsonlSource(p).load())
    assert err.value.reason_code == "ingest.empty_source" and "no rows" in str(err.value)
    with pytest.raises(SourceError) as err:
        JsonlSource(p).describe()
    assert err.value.reason_code == "ingest.empty_source"


def test_a_line_over_the_limit_is_a_row_too_long_record(tmp_path):
    long_line = b'{"t": "' + b"x" * 500 + b'"}'
    p = write(tmp_path, b'{"a": 1}\n' + long_line + b'\n{"a": 2}\n' + b" " * 300 + b"\n" + b'{"a": 3}')
    recs = list(JsonlSource(p, max_row_bytes=100).load())
    assert codes(recs) == ["ok", "ingest.row_too_long", "ok", "ok"]
    assert [r.row_number for r in recs] == [1, 2, 3, 5]
    assert "line 2" in recs[1].error[1] and "longer than the limit of 100 bytes" in recs[1].error[1]
    assert recs[2].offset == 9 + len(long_line) + 1 and recs[1].raw.startswith('{"t": "xxx')
    # exactly at the limit is fine, with either line ending
    row = b'{"t": "' + b"y" * 91 + b'"}'
    assert len(row) == 100
    for ending in (b"\n", b"\r\n"):
        p2 = write(tmp_path, row + ending + b'{"a": 1}\n' + row, "edge.jsonl")
        assert codes(JsonlSource(p2, max_row_bytes=100).load()) == ["ok", "ok", "ok"]
        p3 = write(tmp_path, row[:-1] + b' }' + ending + row, "over.jsonl")  # 101 bytes
        assert codes(JsonlSource(p3, max_row_bytes=100).load()) == ["ingest.row_too_long", "ok"]


def test_a_50_mb_single_line_is_read_in_bounded_memory(tmp_path):
    p = tmp_path / "huge.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"before": 1}\n{"t": "')
        chunk = b"abcdefghij" * 100_000
        for _ in range(50):
            f.write(chunk)
        f.write(b'"}\n{"after": 2}\n')
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    try:
        recs = list(JsonlSource(p).load())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert codes(recs) == ["ok", "ingest.row_too_long", "ok"]
    assert recs[2].fields == {"after": 2}
    assert "50000009 bytes" in recs[1].error[1] and len(recs[1].raw) == MAX_RAW_KEPT
    assert peak < 8 * 2**20, f"peak traced allocation {peak / 2**20:.1f} MiB"
    if sys.platform.startswith("linux"):
        assert rss_growth_mb < 20, f"max RSS grew by {rss_growth_mb:.1f} MB"


def test_describe_reads_a_sample_only(tmp_path):
    lines = [json.dumps({"text": f"row {i}", "label": i % 3}) for i in range(20_000)]
    p = write(tmp_path, ("\n".join(lines) + "\n").encode())
    d = JsonlSource(p).describe()
    assert (d.scheme, d.format, d.encoding, d.location) == ("jsonl", "jsonl", "utf-8", str(p))
    assert d.columns == [] and d.size_bytes == p.stat().st_size  # keys of rows not read are unknown
    assert 15_000 < d.row_estimate < 25_000 and d.details["sampled_rows"] < 20_000


def test_describe_of_a_wholly_read_file_gives_every_key_of_every_row(tmp_path):
    p = write(tmp_path, b'{"text": "a"}\n[1]\n{not json\n{"text": "b", "label": "x"}\n{"n": NaN, "text": "c"}\n')
    assert JsonlSource(p).describe().columns == ["text", "label", "n"]


SINGLE = FieldMapping(text=["text"], label="label")


def _ingest(path, mapping=SINGLE):
    store = ArtifactStore(path.parent / f"artifacts-{path.stem}")
    out = run_ingest(JsonlSource(path), mapping, store, commit=True)
    return out, read_jsonl(store, out.dataset), read_jsonl(store, out.rejected)


@pytest.mark.parametrize("rows", [50, 3000])  # a file describe() reads whole, and one it samples
def test_a_first_row_without_the_label_is_one_rejected_row_not_a_failed_source(tmp_path, rows):
    # the first object's keys were taken for the file's schema: the whole source failed with
    # ingest.mapping_invalid, while the same row second was one ingest.missing_field
    lines = [{"text": "first ticket has no label yet"}] + [
        {"text": f"ticket {i} about my invoice", "label": "ab"[i % 2]} for i in range(1, rows)]
    p = write(tmp_path, "".join(json.dumps(r) + "\n" for r in lines).encode(), name=f"rows{rows}.jsonl")
    out, accepted, rejected = _ingest(p)
    c = out.counts
    assert (c.rows_read, c.rows_accepted, c.rows_rejected) == (rows, rows - 1, 1)
    assert out.rejected_by_reason == {"ingest.missing_field": 1}
    assert [(r["row_number"], r["source_offset"]) for r in rejected] == [(1, 0)]
    assert len(accepted) == rows - 1


def test_an_optional_field_missing_from_the_first_rows_is_left_empty_there(tmp_path):
    lines = [{"text": f"ticket {i} about my invoice", "label": "a", **({"source": "synthetic"} if i > 1 else {})}
             for i in range(1, 51)]
    p = write(tmp_path, "".join(json.dumps(r) + "\n" for r in lines).encode())
    out, accepted, _ = _ingest(p, FieldMapping(text=["text"], label="label", provenance="source"))
    assert (out.counts.rows_read, out.counts.rows_accepted) == (50, 50)
    assert [r["provenance"] for r in accepted] == ["human"] + ["synthetic"] * 49


def test_a_mapped_field_no_row_of_a_wholly_read_file_has_is_a_mapping_error(tmp_path):
    p = write(tmp_path, b'{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(IngestError) as err:
        _ingest(p, FieldMapping(text=["text"], label="lable"))
    assert err.value.reason_code == "ingest.mapping_invalid" and "lable" in str(err.value)


def test_records_are_yielded_lazily(tmp_path):
    p = write(tmp_path, b"".join(b'{"i": %d}\n' % i for i in range(10)))
    it = JsonlSource(p).load()
    assert next(it).fields == {"i": 0}
    it.close()


@pytest.mark.dataset
def test_jira_file_loads_completely():
    p = DATASETS / "apache_jira_bugs" / "bugs_train_val.jsonl"
    if not p.exists():
        pytest.skip(f"{p} is absent (../shared/datasets is not on this machine)")
    n = bad = 0
    for r in JsonlSource(p).load():
        n += 1
        bad += r.error is not None
    assert (n, bad) == (36_526, 0)
