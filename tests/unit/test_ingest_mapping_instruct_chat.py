"""Introspection and mapping of the common fine-tuning file forms: ShareGPT chats ({from, value}),
instruction tuning (Alpaca: instruction / input / output) and chats with tool messages, which the
OpenAI fine-tuning file cannot hold as ingest keeps them (role and content only)."""

from __future__ import annotations

import json

import pytest

from contracts.common import FieldMapping
from services.common.artifacts import ArtifactStore
from services.common.jsonl import read_jsonl
from services.ingest.domain import resolve_mapping, run_ingest
from services.ingest.introspect import AUTO_PICK, introspect
from services.ingest.mapping import MappingError, RejectedRow, RowMapper, check_fields_present
from services.ingest.sources.base import SourceRecord
from services.ingest.sources.csv import CsvSource
from services.ingest.sources.jsonl import JsonlSource
from services.prep.formats import openai_messages_example


def apply(mapping: FieldMapping, fields: dict):
    return RowMapper(mapping).apply(SourceRecord(1, 0, json.dumps(fields), fields, None))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------- A: ShareGPT ----------

def sharegpt_rows(n=30):
    rows = []
    for i in range(n):
        conv = [{"from": "human", "value": f"Question {i}: how do I reset my password?"},
                {"from": "gpt", "value": f"Answer {i}: go to settings and click reset."}]
        if i % 3 == 0:
            conv.insert(0, {"from": "system", "value": "You are a helpful support agent."})
        rows.append({"id": f"c{i}", "conversations": conv})
    return rows


def test_sharegpt_conversations_are_proposed_as_chat_messages_with_high_confidence():
    h = introspect(sharegpt_rows(20))[0]
    assert h.shape == "chat_messages" and h.confidence >= AUTO_PICK
    assert h.mapping.messages == "conversations"
    assert "ShareGPT" in h.rationale and "{from, value}" in h.rationale


def test_lists_of_other_from_value_objects_are_not_read_as_chat():
    rows = [{"rates": [{"from": "EUR", "value": 1.1}, {"from": "GBP", "value": 1.3}], "note": "daily rate sheet"}] * 20
    assert next(h for h in introspect(rows) if h.shape == "chat_messages").confidence == 0.0


def test_sharegpt_messages_are_normalised_to_role_and_content():
    m = FieldMapping(shape="chat_messages", messages="conversations")
    row = apply(m, {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                                      {"from": "gpt", "value": "hello"}, {"from": "user", "value": "and?"},
                                      {"from": "bot", "value": "bye"}]})
    assert row["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"},
                               {"role": "assistant", "content": "bye"}]
    # the OpenAI form is unchanged
    row = apply(FieldMapping(shape="chat_messages", messages="m"),
                {"m": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert row["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_a_sharegpt_file_is_ingested_without_a_mapping(tmp_path):
    src = JsonlSource(write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows()))
    mapping, confidence, _ = resolve_mapping(src)
    assert mapping == FieldMapping(shape="chat_messages", messages="conversations") and confidence >= AUTO_PICK
    out = run_ingest(src, mapping, ArtifactStore(tmp_path / "a"), commit=True)
    assert (out.counts.rows_read, out.counts.rows_accepted) == (30, 30)
    rows = read_jsonl(ArtifactStore(tmp_path / "a"), out.dataset)
    assert rows[1]["messages"] == [{"role": "user", "content": "Question 1: how do I reset my password?"},
                                   {"role": "assistant", "content": "Answer 1: go to settings and click reset."}]


# ---------- B: instruction tuning (Alpaca) ----------

def alpaca_rows(n=30, sort_keys=False):
    rows = []
    for i in range(n):
        r = {"instruction": f"Translate sentence {i} to French",
             "input": f"The cat number {i} sleeps on the mat." if i % 2 else "",
             "output": f"Le chat numero {i} dort sur le tapis."}
        rows.append(dict(sorted(r.items())) if sort_keys else r)
    return rows


ALPACA = FieldMapping(shape="prompt_completion", text=["instruction", "input"], completion="output")


@pytest.mark.parametrize("sort_keys", [False, True])
def test_alpaca_fields_are_proposed_as_instruction_plus_input(sort_keys):
    h = introspect(alpaca_rows(20, sort_keys))[0]
    assert h.shape == "prompt_completion" and h.confidence >= AUTO_PICK
    assert h.mapping == ALPACA
    assert "instruction" in h.rationale and "'input'" in h.rationale and "blank line" in h.rationale


def test_instruction_and_output_alone_make_the_instruction_the_prompt():
    rows = [{"output": f"Le chat numero {i} dort sur le tapis.", "instruction": f"Translate sentence {i}"}
            for i in range(20)]
    h = introspect(rows)[0]
    assert h.shape == "prompt_completion" and (h.mapping.prompt, h.mapping.completion) == ("instruction", "output")


def test_the_prompt_is_the_instruction_then_the_input_when_there_is_one():
    assert apply(ALPACA, {"instruction": "Translate", "input": "The cat.", "output": "Le chat."})["prompt"] == \
        "Translate\n\nThe cat."
    assert apply(ALPACA, {"instruction": "Say hi", "input": "", "output": "hi"})["prompt"] == "Say hi"
    assert apply(ALPACA, {"instruction": "Say hi", "output": "hi"})["prompt"] == "Say hi"
    out = apply(ALPACA, {"instruction": " ", "input": "", "output": "hi"})
    assert isinstance(out, RejectedRow) and out.reason_code == "ingest.empty_text" and "prompt" in out.detail
    out = apply(ALPACA, {"output": "hi"})
    assert isinstance(out, RejectedRow) and out.reason_code == "ingest.missing_field"


def test_a_prompt_completion_mapping_names_its_prompt_one_way():
    with pytest.raises(MappingError, match="not both"):
        RowMapper(FieldMapping(shape="prompt_completion", prompt="q", text=["q", "c"], completion="a"))
    with pytest.raises(MappingError, match="completion"):
        RowMapper(FieldMapping(shape="prompt_completion", text=["q"]))
    check_fields_present(ALPACA, ["instruction", "input", "output"])
    with pytest.raises(MappingError, match="input"):
        check_fields_present(ALPACA, ["instruction", "output"])


@pytest.mark.parametrize("sort_keys", [False, True])
def test_an_alpaca_file_is_ingested_without_losing_the_input(tmp_path, sort_keys):
    src = JsonlSource(write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(30, sort_keys)))
    mapping, _, _ = resolve_mapping(src)
    store = ArtifactStore(tmp_path / "a")
    out = run_ingest(src, mapping, store, commit=True)
    assert (out.counts.rows_read, out.counts.rows_accepted) == (30, 30)
    rows = read_jsonl(store, out.dataset)
    assert rows[0]["prompt"] == "Translate sentence 0 to French"
    assert rows[1]["prompt"] == "Translate sentence 1 to French\n\nThe cat number 1 sleeps on the mat."
    assert rows[1]["completion"] == "Le chat numero 1 dort sur le tapis."


def test_an_alpaca_csv_is_ingested_the_same_way(tmp_path):
    path = tmp_path / "alpaca.csv"
    path.write_text("instruction,input,output\nTranslate,The cat.,Le chat.\nSay hi,,hi\n")
    out = run_ingest(CsvSource(path), ALPACA, ArtifactStore(tmp_path / "a"), commit=True)
    assert [r["prompt"] for r in read_jsonl(ArtifactStore(tmp_path / "a"), out.dataset)] == \
        ["Translate\n\nThe cat.", "Say hi"]


# ---------- C: tool messages ----------

TOOL_CHAT = [{"role": "system", "content": "You are a support bot."}, {"role": "user", "content": "Where is order 7?"},
             {"role": "assistant", "content": "Let me look that up."},
             {"role": "tool", "content": json.dumps({"order": 7, "status": "shipped"})},
             {"role": "assistant", "content": "Order 7 has shipped."}]


@pytest.mark.parametrize("messages, role", [
    (TOOL_CHAT, "tool"),
    ([{"role": "user", "content": "hi"}, {"role": "function", "content": "{}"}, {"role": "assistant", "content": "ok"}],
     "function"),
    ([{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{}"}, {"from": "observation", "value": "{}"},
      {"from": "gpt", "value": "ok"}], "function_call"),
])
def test_a_conversation_with_tool_messages_is_rejected_naming_the_role(messages, role):
    out = apply(FieldMapping(shape="chat_messages", messages="messages"), {"messages": messages})
    assert isinstance(out, RejectedRow) and out.reason_code == "ingest.invalid_value"
    assert repr(role) in out.detail


def test_accepted_chat_rows_give_openai_examples_with_only_system_user_and_assistant(tmp_path):
    rows = [{"messages": TOOL_CHAT}] + [{"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]
    src = JsonlSource(write_jsonl(tmp_path / "chat.jsonl", rows))
    store = ArtifactStore(tmp_path / "a")
    out = run_ingest(src, FieldMapping(shape="chat_messages", messages="messages"), store, commit=True)
    assert out.rejected_by_reason == {"ingest.invalid_value": 1} and out.counts.rows_accepted == 3
    for r in read_jsonl(store, out.dataset):
        assert {m["role"] for m in openai_messages_example(r)["messages"]} <= {"system", "user", "assistant"}
