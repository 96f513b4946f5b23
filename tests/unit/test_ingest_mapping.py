"""Ingest's mapping (every record accepted or rejected with a reason) and the streaming commit that
writes accepted and rejected rows as artifacts with read = accepted + rejected."""

from __future__ import annotations

import json

import pytest

from contracts.common import FieldMapping
from services.common.artifacts import ArtifactStore
from services.common.jsonl import read_jsonl
from services.ingest.domain import IngestError, resolve_mapping, run_ingest
from services.ingest.mapping import MappingError, RejectedRow, RowMapper, check_fields_present
from services.ingest.sources.base import SourceRecord
from services.ingest.sources.jsonl import JsonlSource

SINGLE = FieldMapping(text=["text"], label="label")


def rec(fields: dict | None, n: int = 1, error=None) -> SourceRecord:
    return SourceRecord(n, n * 10, json.dumps(fields) if fields is not None else "<bad>", fields, error)


def apply(mapping: FieldMapping, fields: dict, **kw):
    return RowMapper(mapping, **kw).apply(rec(fields))


def code(mapping: FieldMapping, fields: dict, **kw) -> str:
    out = apply(mapping, fields, **kw)
    assert isinstance(out, RejectedRow), f"{fields} was accepted as {out}"
    return out.reason_code


# --- classification -------------------------------------------------------------------------------


def test_accepted_row_has_trimmed_text_label_row_number_and_default_provenance():
    assert apply(SINGLE, {"text": "  hello  ", "label": " a "}) == {
        "row_number": 1, "text": "hello", "label": "a", "provenance": "human"}


def test_integer_labels_become_strings_and_other_fields_are_dropped():
    out = apply(SINGLE, {"text": "x", "label": 3, "noise": [1]})
    assert out["label"] == "3" and "noise" not in out


def test_text_from_two_fields_is_joined_with_a_blank_line_and_one_may_be_absent():
    m = FieldMapping(text=["summary", "description"], label="priority")
    assert apply(m, {"summary": "Crash", "description": "NPE at start", "priority": "Major"})["text"] == "Crash\n\nNPE at start"
    assert apply(m, {"summary": "Crash", "description": None, "priority": "Major"})["text"] == "Crash"
    assert code(m, {"priority": "Major"}) == "ingest.missing_field"


@pytest.mark.parametrize("fields, expected", [
    ({"label": "a"}, "ingest.missing_field"),
    ({"text": None, "label": "a"}, "ingest.missing_field"),
    ({"text": "x"}, "ingest.missing_field"),
    ({"text": "   ", "label": "a"}, "ingest.empty_text"),
    ({"text": {"a": 1}, "label": "a"}, "ingest.invalid_value"),
    ({"text": "x", "label": True}, "ingest.invalid_label"),
    ({"text": "x", "label": 1.5}, "ingest.invalid_label"),
    ({"text": "x", "label": "  "}, "ingest.invalid_label"),
    ({"text": "x", "label": ["a", "b"]}, "ingest.invalid_label"),
    ({"text": "x", "label": []}, "ingest.missing_field"),
    ({"text": "x", "label": {"a": 1}}, "ingest.invalid_label"),
])
def test_bad_rows_are_rejected_with_their_reason(fields, expected):
    assert code(SINGLE, fields) == expected


def test_a_one_element_list_is_a_single_label():
    assert apply(SINGLE, {"text": "x", "label": ["a"]})["label"] == "a"


def test_a_nan_value_is_a_missing_one_not_the_text_nan():
    # pandas marks missing values with NaN, and json.dumps of such a row writes NaN, which parses back
    # as a float: a missing body must not become "title\n\nnan", a missing text or label not "nan"
    nan = float("nan")
    two = FieldMapping(text=["title", "body"], label="label")
    assert apply(two, {"title": "crash on save", "body": nan, "label": "bug"})["text"] == "crash on save"
    assert code(two, {"title": nan, "body": nan, "label": "bug"}) == "ingest.missing_field"
    assert code(SINGLE, {"text": nan, "label": "a"}) == "ingest.missing_field"
    assert code(SINGLE, {"text": "x", "label": nan}) == "ingest.missing_field"
    m = FieldMapping(shape="multi_field_triage", text=["summary"], label="priority",
                     heads={"component": "components"}, tags="labels", provenance="origin")
    out = apply(m, {"summary": "s", "priority": "Major", "components": nan, "labels": nan, "origin": nan})
    assert out["heads"] == {"component": None} and out["tags"] == [] and out["provenance"] == "human"


def test_a_label_holding_a_nul_character_is_rejected():
    # labels travel in events (the label space, prep's messages) and PostgreSQL cannot store a NUL:
    # the recorder dead-lettered prep's answer and the run's timeline showed audit.unstorable_value
    assert code(SINGLE, {"text": "x", "label": "bi\x00lling"}) == "ingest.invalid_label"
    assert code(FieldMapping(text=["text"], label="label", label_space=["a"]), {"text": "x", "label": "a\x00"}) \
        == "ingest.invalid_label"


def test_the_dry_run_sample_holds_no_nul_character():
    from services.ingest.domain import scrubbed_sample

    sample = scrubbed_sample([{"row_number": 1, "text": "hello\x00world mail me at a.b@example.com", "label": "a",
                               "heads": {"x\x00": ["v\x00"]}}])
    assert "\\u0000" not in json.dumps(sample)
    assert sample[0]["text"] == "helloworld mail me at <EMAIL_1>" and sample[0]["heads"] == {"x": ["v"]}


def test_labels_outside_the_declared_space_are_rejected():
    m = FieldMapping(text=["text"], label="label", label_space=["bug", "feature"])
    assert apply(m, {"text": "x", "label": "bug"})["label"] == "bug"
    assert code(m, {"text": "x", "label": "question"}) == "ingest.label_outside_space"


def test_too_long_text_is_rejected_not_truncated():
    assert code(SINGLE, {"text": "x" * 101, "label": "a"}, max_text_chars=100) == "ingest.text_too_long"


def test_triage_heads_and_tags_are_carried_with_lists_kept_and_empties_as_none():
    m = FieldMapping(shape="multi_field_triage", text=["summary"], label="priority",
                     heads={"severity": "priority", "component": "components", "category": "project"}, tags="labels")
    out = apply(m, {"summary": "s", "priority": "Major", "components": ["ui", "core"], "project": "HDFS", "labels": ["x"]})
    assert out["heads"] == {"severity": "Major", "component": ["ui", "core"], "category": "HDFS"}
    assert out["tags"] == ["x"]
    out = apply(m, {"summary": "s", "priority": "Minor", "components": [], "project": "HDFS", "labels": None})
    assert out["heads"]["component"] is None and out["tags"] == []
    assert apply(m, {"summary": "s", "priority": "Minor", "components": ["ui"], "project": "Y",
                     "labels": "a, b"})["tags"] == ["a", "b"]


def test_provenance_comes_from_its_field_or_the_default_and_must_be_known():
    m = FieldMapping(text=["text"], label="label", provenance="origin")
    assert apply(m, {"text": "x", "label": "a", "origin": "Synthetic"})["provenance"] == "synthetic"
    assert apply(m, {"text": "x", "label": "a"}, default_provenance="production_sample")["provenance"] == "production_sample"
    assert code(m, {"text": "x", "label": "a", "origin": "llm"}) == "ingest.invalid_value"


def test_unparseable_records_stay_rejected_with_the_source_reason():
    out = RowMapper(SINGLE).apply(rec(None, error=("ingest.unparseable_row", "not JSON")))
    assert isinstance(out, RejectedRow) and out.reason_code == "ingest.unparseable_row" and out.offset == 10


# --- other shapes ------------------------------------------------------------------------------------


def test_chat_messages_need_a_user_turn_and_must_end_with_the_assistant():
    m = FieldMapping(shape="chat_messages", messages="messages")
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert apply(m, {"messages": good})["messages"] == good
    assert apply(m, {"messages": json.dumps(good)})["messages"] == good
    assert code(m, {"messages": good[:1]}) == "ingest.invalid_value"
    assert code(m, {"messages": [{"role": "wizard", "content": "x"}]}) == "ingest.invalid_value"
    assert code(m, {"messages": "not json"}) == "ingest.invalid_value"
    assert code(m, {}) == "ingest.missing_field"


def test_prompt_completion_json_extraction_and_preference_pairs():
    pc = FieldMapping(shape="prompt_completion", prompt="q", completion="a")
    assert apply(pc, {"q": "2+2?", "a": "4"})["completion"] == "4"
    assert code(pc, {"q": "2+2?", "a": " "}) == "ingest.empty_text"
    je = FieldMapping(shape="json_extraction", text=["doc"], target="out")
    assert apply(je, {"doc": "Ann, 31", "out": '{"name": "Ann"}'})["target"] == {"name": "Ann"}
    assert code(je, {"doc": "Ann", "out": "[1]"}) == "ingest.invalid_value"
    pp = FieldMapping(shape="preference_pairs", prompt="p", chosen="c", rejected="r")
    assert apply(pp, {"p": "q", "c": "good", "r": "bad"})["chosen"] == "good"
    assert code(pp, {"p": "q", "c": "same", "r": "same"}) == "ingest.invalid_value"


def test_a_mapping_missing_what_its_shape_needs_is_refused():
    with pytest.raises(MappingError, match="needs completion"):
        RowMapper(FieldMapping(shape="prompt_completion", prompt="q"))
    with pytest.raises(MappingError, match="needs text, label"):
        RowMapper(FieldMapping())


def test_a_mapping_naming_absent_columns_is_refused_for_fixed_schema_sources():
    with pytest.raises(MappingError, match="body"):
        check_fields_present(FieldMapping(text=["body"], label="label"), ["title", "label"])
    check_fields_present(FieldMapping(text=["body"], label="label"), [])  # JSONL: no fixed columns


# --- the streaming commit --------------------------------------------------------------------------


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


MIXED = [
    b'{"text": "good one", "label": "a"}',
    b'{"text": "good two", "label": "b"}',
    b"{not json",
    b'{"text": "", "label": "a"}',
    b"[1, 2]",
    b'{"label": "a"}',
    b'{"text": "good three", "label": 7}',
]


def test_commit_accounts_for_every_row_and_keeps_rejected_rows_with_offsets(tmp_path):
    src = write_lines(tmp_path / "mixed.jsonl", MIXED)
    store = ArtifactStore(tmp_path / "artifacts")
    out = run_ingest(JsonlSource(src), SINGLE, store, commit=True, sample_size=2)
    c = out.counts
    assert (c.rows_read, c.rows_accepted, c.rows_rejected) == (7, 3, 4)
    assert c.rows_read == c.rows_accepted + c.rows_rejected
    assert out.rejected_by_reason == {"ingest.empty_text": 1, "ingest.missing_field": 1, "ingest.unparseable_row": 2}
    accepted = read_jsonl(store, out.dataset)
    assert [r["text"] for r in accepted] == ["good one", "good two", "good three"]
    assert [r["row_number"] for r in accepted] == [1, 2, 7]
    rejected = read_jsonl(store, out.rejected)
    assert [r["row_number"] for r in rejected] == [3, 4, 5, 6]
    data = src.read_bytes()
    for r in rejected:  # each offset points at the rejected line in the source
        assert data[r["source_offset"]:].split(b"\n", 1)[0].decode() == r["raw"]
    assert [r["text"] for r in out.sample_accepted] == ["good one", "good two"]


def test_a_dry_run_keeps_the_rejections_but_no_dataset(tmp_path):
    src = write_lines(tmp_path / "mixed.jsonl", MIXED)
    out = run_ingest(JsonlSource(src), SINGLE, ArtifactStore(tmp_path / "a"), commit=False, sample_size=5)
    assert out.dataset is None and out.counts.rows_rejected == 4 and len(out.sample_accepted) == 3


def test_an_empty_source_fails_as_a_whole(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_bytes(b"")
    with pytest.raises(IngestError) as e:
        run_ingest(JsonlSource(src), SINGLE, ArtifactStore(tmp_path / "a"), commit=True)
    assert e.value.reason_code == "ingest.empty_source"


def test_no_mapping_uses_a_confident_proposal_and_refuses_a_weak_one_without_force(tmp_path):
    good = write_lines(tmp_path / "good.jsonl", [json.dumps({"text": f"some ticket text number {i}", "label": "ab"[i % 2]}).encode()
                                                 for i in range(30)])
    mapping, confidence, _ = resolve_mapping(JsonlSource(good))
    assert (mapping.text, mapping.label) == (["text"], "label") and confidence >= 0.8
    weak = write_lines(tmp_path / "weak.jsonl", [json.dumps({"body": f"free text without any label {i}", "n": i}).encode()
                                                 for i in range(30)])
    with pytest.raises(IngestError) as e:
        resolve_mapping(JsonlSource(weak))
    assert e.value.reason_code == "ingest.mapping_low_confidence" and "--force" in str(e.value)
    assert "--map text=FIELD" in str(e.value)  # what `ingest dry-run` and `commit` take (they have no --text-field)


def test_text_and_label_fields_make_a_mapping_without_introspection(tmp_path):
    src = write_lines(tmp_path / "x.jsonl", [b'{"t": "x", "l": "a"}'])
    mapping, confidence, found = resolve_mapping(JsonlSource(src), text_field="t", label_field="l")
    assert (mapping.text, mapping.label, confidence, found) == (["t"], "l", None, None)


@pytest.mark.parametrize("commit", [True, False])
def test_a_file_split_between_two_processes_gives_the_same_artifacts_counts_and_sample(tmp_path, monkeypatch, commit):
    from services.ingest import domain

    lines = [b"", b"\xef\xbb\xbf" + MIXED[0]] + MIXED[1:] * 40 + [b"   ", json.dumps({"text": "x" * 500, "label": "a"}).encode()]
    src = write_lines(tmp_path / "big.jsonl", [line for line in lines if line] + [b""])

    def ingest(workers: str, min_bytes: int, store: str):
        monkeypatch.setenv("TUNELINE_WORKERS", workers)
        monkeypatch.setattr(domain, "PARALLEL_MIN_BYTES", min_bytes)
        st = ArtifactStore(tmp_path / store)
        out = run_ingest(JsonlSource(src, max_row_bytes=300), SINGLE, st, commit=commit, sample_size=100)
        return (st.read_bytes(out.dataset) if commit else None, st.read_bytes(out.rejected), out.counts.rows_read,
                out.counts.rows_accepted, list(out.counts.rejected_by_reason.items()), out.sample_accepted)

    one = ingest("1", 1, "one")
    assert ingest("2", 1, "two") == one
    assert one[2] == len([line for line in lines if line.strip()])


def test_the_dry_run_sample_that_goes_into_an_event_holds_no_pii_or_secret():
    from services.ingest.domain import scrubbed_sample

    rows = [{"row_number": 1, "text": "mail bob@example.com, key sk-proj-abcDEF1234567890abcdef123", "label": "bug",
             "messages": [{"role": "user", "content": "call 555-123-4567"}]}]
    out = scrubbed_sample(rows)
    assert out[0]["text"] == "mail <EMAIL_1>, key <SECRET_1>" and out[0]["label"] == "bug"
    assert out[0]["messages"] == [{"role": "user", "content": "call <PHONE_1>"}] and out[0]["row_number"] == 1


def test_the_dry_run_sample_scrubs_keys_and_card_numbers_held_as_integers():
    """A JSON target used an email address as a key and a card number as a number: both went into
    the ingest.dry_run_completed event as they were."""
    from services.ingest.domain import scrubbed_sample

    rows = [{"row_number": 7, "label": "bug", "target": {"bob@example.com": {"card": 4111111111111111, "qty": 3},
                                                          "flag": True, "ratio": 0.5}}]
    out = scrubbed_sample(rows)
    assert out[0]["target"] == {"<EMAIL_1>": {"card": "<CARD_1>", "qty": 3}, "flag": True, "ratio": 0.5}
    assert out[0]["row_number"] == 7 and out[0]["label"] == "bug"


def test_a_source_failing_as_a_whole_in_any_ingest_command_is_a_stage_failure_not_a_retried_crash():
    """introspect called describe() outside the conversion: an empty or unreachable source was retried
    until bus.delivery_exhausted (51 s) instead of failing at once with its reason code."""
    import asyncio

    from services.common.delivery import StageError
    from services.ingest.app import _in_thread
    from services.ingest.sources.base import SourceError

    def describe():
        raise SourceError("ingest.empty_source", "x.csv is empty")

    with pytest.raises(StageError) as err:
        asyncio.run(_in_thread(describe))
    assert err.value.reason_code == "ingest.empty_source"


def test_a_field_name_holding_a_nul_never_reaches_an_event(tmp_path):
    # {"x\u0000y": 1} in every row, not even mapped: the committed and introspected events listed it
    # among the source's columns and the recorder dead-lettered them (the run showed as failed)
    from services.ingest.app import _describe
    from services.ingest.domain import introspect_source

    src = write_lines(tmp_path / "k.jsonl", [json.dumps({"text": f"ticket text number {i}", "label": "ab"[i % 2],
                                                         "x\u0000y": i}).encode() for i in range(30)])
    source = JsonlSource(src)
    assert "x\x00y" in source.describe().columns  # the source itself is left as it is
    described = json.dumps(_describe(source.describe()))
    assert "\\u0000" not in described and '"xy"' in described
    found = introspect_source(source)
    assert found.fields == ["text", "label"]
    assert "\\u0000" not in json.dumps([h.model_dump(mode="json") for h in found.hypotheses])
    with pytest.raises(MappingError) as e:
        check_fields_present(FieldMapping(text=["body"], label="label"), source.describe().columns)
    assert "\x00" not in str(e.value) and "xy" in str(e.value)
