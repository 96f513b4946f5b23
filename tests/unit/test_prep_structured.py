"""Prep for the shapes without a label (chat_messages, prompt_completion, json_extraction,
preference_pairs): every string normalised and PII-scrubbed with placeholders shared by train and
eval, exact and near-duplicate removal (no near-duplicate on two sides of the split), accounting,
the OpenAI chat JSONL and the cost estimate where the shape has one."""

from __future__ import annotations

import json

import pytest

from contracts.common import CleaningSettings, FieldMapping, RunPlan
from services.common.artifacts import ArtifactStore
from services.common.jsonl import read_jsonl
from services.prep.domain import PrepBlocked, prepare
from services.prep.formats import TRAINING_PRICE_PER_1M
from services.prep.structured import clean_structured

MAPPINGS = {
    "chat_messages": FieldMapping(shape="chat_messages", messages="messages"),
    "prompt_completion": FieldMapping(shape="prompt_completion", prompt="q", completion="a"),
    "json_extraction": FieldMapping(shape="json_extraction", text=["body"], target="out"),
    "preference_pairs": FieldMapping(shape="preference_pairs", prompt="q", chosen="good", rejected="bad"),
}


def words(i: int, tag: str, n: int = 8) -> str:
    return " ".join(f"{tag}{i}x{j}" for j in range(n))


def question(i: int) -> str:
    return f"How do I fix problem {i} with the export? " + words(i, "q")


def answer(i: int) -> str:
    return f"Open settings and reset option {i}, then retry. " + words(i, "a")


def chat_row(n: int, user: str, assistant: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"row_number": n, "messages": msgs, "provenance": "human"}


def chats(n: int, start: int = 1) -> list[dict]:
    return [chat_row(start + i, question(start + i), answer(start + i)) for i in range(n)]


def plan(shape: str, **kw) -> RunPlan:
    return RunPlan(locator="jsonl:/x.jsonl", target="t", mapping=MAPPINGS[shape], **kw)


ALLOW_PII = CleaningSettings(pii_block_threshold=1.0)


@pytest.fixture()
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts")


def test_chat_pii_is_scrubbed_with_placeholders_shared_by_train_and_an_explicit_eval_set(store):
    rows = chats(30)
    key = "sk-proj-abcdefghij1234567890XYZ"
    rows[0]["messages"][0]["content"] += " I am jane.doe@example.com and my key is " + key
    rows[1]["messages"][1]["content"] += " (mail jane.doe@example.com)"
    ev = chats(6, start=500)
    ev[0]["messages"][0]["content"] = "jane.doe@example.com again: the key " + key + " leaked, " + words(1, "e")
    out = prepare(rows, plan("chat_messages", eval_locator="jsonl:/e.jsonl", cleaning=ALLOW_PII), store, eval_rows=ev)
    train, evs = read_jsonl(store, out.train) + read_jsonl(store, out.eval), read_jsonl(store, out.test)
    blob = json.dumps(train + evs) + "".join(store.path(r).read_text() for r in (out.openai_train, out.openai_eval))
    assert "@example.com" not in blob and "sk-proj-" not in blob
    t = {r["row_number"]: r for r in train}
    e = {r["row_number"]: r for r in evs}
    assert t[1]["messages"][0]["content"].endswith("I am <EMAIL_1> and my key is <SECRET_1>")
    assert t[2]["messages"][1]["content"].endswith("(mail <EMAIL_1>)")
    assert e[500]["messages"][0]["content"].startswith("<EMAIL_1> again: the key <SECRET_1> leaked")
    assert [m["role"] for m in t[1]["messages"]] == ["user", "assistant"]
    assert out.cleaning["pii_by_kind"]["email"] == 2 and out.cleaning["pii_by_kind"]["secret"] == 1
    assert out.cleaning["rows_with_pii"] == 2 and out.cleaning["eval"]["rows_in"] == 6


@pytest.mark.parametrize("shape", ["chat_messages", "prompt_completion"])
def test_a_near_duplicate_pair_never_straddles_the_split(store, shape):
    def row(n, q, a):
        return chat_row(n, q, a) if shape == "chat_messages" else {"row_number": n, "prompt": q, "completion": a,
                                                                    "provenance": "human"}
    rows = [row(i, question(i), answer(i)) for i in range(1, 31)]
    rows.append(row(99, question(1) + " thanks", answer(1)))  # near duplicate of row 1
    for seed in range(25):
        out = prepare(rows, plan(shape, seed=seed), store)
        train, val, test = ({r["row_number"] for r in read_jsonl(store, ref)} for ref in (out.train, out.eval, out.test))
        assert not ({1, 99} <= train | val | test)  # never both kept, so never on two sides
        assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)
        assert len(train | val | test) == 30
        assert out.dropped_by_reason == {"cleaning.near_duplicate": 1}


def test_every_row_is_accounted_for_with_a_reason_after_normalisation(store):
    rows = chats(30)
    rows.append(chat_row(40, "  " + question(3).replace(" ", "\u00a0 ") + "\u200b", answer(3)))  # exact after normalising
    rows.append(chat_row(41, question(4).upper(), answer(4).upper()))                          # casefolded duplicate
    rows.append(chat_row(42, question(5) + " please", answer(5)))                              # near duplicate
    rows.append(chat_row(43, question(43), "\u200b \t"))                                     # empty assistant turn
    out = prepare(rows, plan("chat_messages"), store)
    dropped = read_jsonl(store, out.dropped)
    assert out.rows_in == len(rows) == out.train_rows + out.eval_rows + out.test_rows + len(dropped)
    by_row = {d["row_number"]: d for d in dropped}
    assert by_row[40]["reason_code"] == "cleaning.exact_duplicate" and by_row[40]["duplicate_of"] == 3
    assert by_row[41]["reason_code"] == "cleaning.exact_duplicate" and by_row[41]["duplicate_of"] == 4
    assert by_row[42]["reason_code"] == "cleaning.near_duplicate" and by_row[42]["duplicate_of"] == 5
    assert by_row[43]["reason_code"] == "cleaning.empty_after_cleaning" and "assistant" in by_row[43]["detail"]
    m = out.manifest["counts"]
    assert m["train"] + m["validation"] + m["test"] + m["dropped"] == m["rows_in"]
    kept = read_jsonl(store, out.train) + read_jsonl(store, out.eval) + read_jsonl(store, out.test)
    assert all(0 < r["quality"] <= 1 for r in kept)


def test_chat_rows_get_an_openai_file_that_parses_and_a_cost_estimate(store):
    rows = chats(40)
    rows[0]["messages"].insert(0, {"role": "system", "content": "Be brief."})
    out = prepare(rows, plan("chat_messages"), store)
    train = read_jsonl(store, out.train)
    lines = store.path(out.openai_train).read_text().splitlines()
    assert len(lines) == out.train_rows and len(store.path(out.openai_eval).read_text().splitlines()) == out.eval_rows
    for line, row in zip(lines, train):
        ex = json.loads(line)
        assert list(ex) == ["messages"] and ex["messages"] == row["messages"]
        assert ex["messages"][-1]["role"] == "assistant" and all(m["content"] for m in ex["messages"])
    price = TRAINING_PRICE_PER_1M[out.cost.model]["usd_per_1m"]
    assert out.cost.training_tokens > 0
    assert out.cost.usd == pytest.approx(out.cost.training_tokens * out.cost.epochs * price / 1e6 * 1.2, abs=1e-4)
    m = out.manifest
    assert m["token_estimate"]["openai_chat_train_tokens"] == out.cost.training_tokens
    assert m["cost_estimate"]["usd"] == out.cost.usd and m["openai_chat"]["written"] is True
    assert m["files"]["openai_train"]["sha256"] == out.openai_train.sha256


def test_prompt_completion_rows_become_user_and_assistant_turns(store):
    rows = [{"row_number": i, "prompt": question(i), "completion": answer(i), "provenance": "human"} for i in range(1, 31)]
    out = prepare(rows, plan("prompt_completion"), store)
    ex = [json.loads(x) for x in store.path(out.openai_train).read_text().splitlines()]
    assert [[m["role"] for m in e["messages"]] for e in ex] == [["user", "assistant"]] * out.train_rows
    assert ex[0]["messages"][0]["content"] == read_jsonl(store, out.train)[0]["prompt"]
    assert out.cost is not None and out.cost.usd > 0


def test_a_shared_long_system_prompt_does_not_make_conversations_near_duplicates(store):
    system = "You are the support assistant of Example Corp. " + " ".join(f"rule{j} applies here" for j in range(200))
    rows = [chat_row(i, question(i), answer(i), system=system) for i in range(1, 31)]
    out = prepare(rows, plan("chat_messages"), store)
    assert out.dropped_by_reason == {} and out.train_rows + out.eval_rows + out.test_rows == 30


def test_json_extraction_scrubs_target_strings_and_keeps_keys_and_other_values(store):
    rows = []
    for i in range(1, 31):
        email = f"user{i}@example.com" if i <= 3 else None
        rows.append({"row_number": i, "provenance": "human",
                     "text": f"Ticket {i}:  customer {words(i, 'n', 4)} wrote" + (f" from {email}" if email else "") + ".",
                     "target": {"customer": {"name": words(i, "n", 4), "email": email}, "priority": i % 3,
                                "tags": ["billing", " late "]}})
    out = prepare(rows, plan("json_extraction"), store)
    kept = {r["row_number"]: r for ref in (out.train, out.eval, out.test) for r in read_jsonl(store, ref)}
    assert "@example.com" not in json.dumps(kept)
    r1 = {k: v for k, v in kept[1].items() if k != "row_id"}
    assert r1["text"] == f"Ticket 1: customer {words(1, 'n', 4)} wrote from <EMAIL_1>."
    assert r1["target"] == {"customer": {"name": words(1, "n", 4), "email": "<EMAIL_1>"}, "priority": 1,
                            "tags": ["billing", "late"]}
    assert kept[4]["target"]["customer"]["email"] is None
    m = out.manifest
    assert out.openai_train is None and out.cost is None and m["cost_estimate"] is None
    assert m["openai_chat"]["written"] is False and "instruction" in m["openai_chat"]["reason"]
    assert m["token_estimate"]["content_train_tokens"] > 0
    c = m["counts"]
    assert c["train"] + c["validation"] + c["test"] + c["dropped"] == c["rows_in"] == 30


def test_json_extraction_scrubs_target_keys_and_card_numbers_held_as_integers(store):
    """Only the target's string values were scrubbed: a card number stored as a number and an email
    address used as a key went into train.jsonl as they were."""
    rows = [{"row_number": i, "provenance": "human",
             "text": f"Order {i}: {words(i, 'o', 5)} paid by card.",
             "target": {"payer": {f"user{i}@example.com": "owner"} if i == 1 else {}, "card": 4111111111111111 if i == 1
                        else None, "items": i % 4 + 1}} for i in range(1, 31)]
    out = prepare(rows, plan("json_extraction"), store)
    kept = {r["row_number"]: {k: v for k, v in r.items() if k != "row_id"}
            for ref in (out.train, out.eval, out.test) for r in read_jsonl(store, ref)}
    assert "@example.com" not in json.dumps(kept) and "4111111111111111" not in json.dumps(kept)
    assert kept[1]["target"] == {"payer": {"<EMAIL_1>": "owner"}, "card": "<CARD_1>", "items": 2}
    assert kept[2]["target"] == {"payer": {}, "card": None, "items": 3}  # other integers stay integers
    assert out.manifest["cleaning"]["pii_by_kind"]["email"] == 1 and out.manifest["cleaning"]["pii_by_kind"]["card"] == 1


def test_preference_pairs_are_cleaned_and_say_why_there_is_no_openai_file(store):
    rows = [{"row_number": i, "prompt": question(i), "chosen": answer(i), "rejected": f"no idea {i} " + words(i, "r"),
             "provenance": "human"} for i in range(1, 31)]
    rows.append({"row_number": 31, "prompt": question(31), "chosen": "Reset it.", "rejected": "Reset  it.\u200b",
                 "provenance": "human"})
    out = prepare(rows, plan("preference_pairs"), store)
    assert out.dropped_by_reason == {"cleaning.low_quality": 1}
    assert out.openai_train is None and out.cost is None
    assert "rejected" in out.manifest["openai_chat"]["reason"] and out.manifest["openai_chat"]["written"] is False


def test_explicit_eval_overlap_is_checked_on_structured_rows(store):
    rows = chats(30)
    ev = [chat_row(900, question(7) + " ok", answer(7)), chat_row(901, question(8), answer(8))] + chats(4, start=950)
    out = prepare(rows, plan("chat_messages", eval_locator="jsonl:/e.jsonl"), store, eval_rows=ev)
    overlap = [d for d in read_jsonl(store, out.dropped) if d["reason_code"] == "cleaning.eval_overlap"]
    assert sorted(d["row_number"] for d in overlap) == [7, 8]
    assert out.train_rows + out.eval_rows == 28 and out.test_rows == 6 and out.manifest["split"]["method"] == "explicit_eval"


def test_structured_pii_honours_the_block_threshold_and_the_switch(store):
    rows = chats(20)
    for i, r in enumerate(rows):
        r["messages"][0]["content"] += f" call me at +44 20 7946 {i:04d}"
    with pytest.raises(PrepBlocked) as e:
        prepare(rows, plan("chat_messages"), store)
    assert e.value.reason_code == "cleaning.pii_block" and "100.0%" in str(e.value)
    out = prepare(rows, plan("chat_messages", cleaning=CleaningSettings(pii_scrub=False)), store)
    assert "+44 20 7946" in store.path(out.train).read_text() and out.cleaning["rows_with_pii"] == 0


def test_clean_structured_alone_keeps_layout_and_accounting():
    rows = chats(12) + [chat_row(50, question(2), answer(2))]
    res = clean_structured(rows, "chat_messages")
    assert len(res.kept) + len(res.dropped) == len(rows) == res.stats["rows_in"]
    assert set(res.kept[0]) == {"row_number", "messages", "provenance", "quality"}


def test_conversations_that_differ_only_in_their_system_prompt_are_near_not_exact_duplicates():
    from services.prep.structured import clean_structured

    def chat(n, persona, answer="It ships in two days."):
        return {"row_number": n, "messages": [{"role": "system", "content": f"You are {persona}."},
                                              {"role": "user", "content": "When does my parcel ship?"},
                                              {"role": "assistant", "content": answer}]}

    rows = [chat(1, "a pirate"), chat(2, "a poet"), chat(3, "a pirate", "IT SHIPS IN TWO DAYS.")]
    res = clean_structured(rows, "chat_messages")
    reasons = {d["row_number"]: (d["reason_code"], d["duplicate_of"]) for d in res.dropped}
    assert reasons == {2: ("cleaning.near_duplicate", 1), 3: ("cleaning.exact_duplicate", 1)}
