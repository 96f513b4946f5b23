import json

import pytest

from services.prep.formats import (TRAINING_PRICE_PER_1M, estimate_cost, estimate_dataset_tokens,
                                   estimate_example_tokens, estimate_text_tokens, openai_chat_example,
                                   openai_chat_jsonl, openai_chat_lines, openai_chat_tokens, system_prompt)

LABELS = ["Blocker", "Major", "Minor"]


def test_chat_example_shape():
    ex = openai_chat_example({"text": "NPE on start", "label": "Major", "row_number": 3}, LABELS)
    assert list(ex) == ["messages"]
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
    assert ex["messages"][1]["content"] == "NPE on start" and ex["messages"][2]["content"] == "Major"
    assert "Blocker, Major, Minor" in ex["messages"][0]["content"]


def test_jsonl_one_object_per_line_and_unknown_label_rejected():
    out = openai_chat_jsonl([{"text": "a\nb", "label": "Minor"}, {"text": "é", "label": "Blocker"}], LABELS)
    lines = out.splitlines()
    assert len(lines) == 2 and all(json.loads(x)["messages"] for x in lines)
    with pytest.raises(ValueError):
        openai_chat_example({"text": "x", "label": "Trivial"}, LABELS)
    with pytest.raises(ValueError):
        system_prompt([])


def test_token_estimate():
    assert estimate_text_tokens("") == 0 and estimate_text_tokens("abcd") == 1 and estimate_text_tokens("abcde") == 2
    ex = openai_chat_example({"text": "x" * 400, "label": "Major"}, LABELS)
    n = estimate_example_tokens(ex)
    sys_tokens = estimate_text_tokens(ex["messages"][0]["content"])
    assert n == 3 + 3 * 4 + sys_tokens + 100 + 2
    assert estimate_dataset_tokens([ex, ex]) == 2 * n


def test_cost():
    c = estimate_cost(1_000_000, 3, "gpt-4o-mini-2024-07-18")
    assert c["base_usd"] == 9.0 and c["estimate_usd"] == 10.8 and c["price_confirmed"]
    c = estimate_cost(500_000, 2, "custom", prices={"custom": 10})
    assert c["estimate_usd"] == pytest.approx(12.0) and c["prices_as_of"] == "caller-supplied"
    assert not estimate_cost(1, 1, "davinci-002")["price_confirmed"]
    with pytest.raises(KeyError):
        estimate_cost(1, 1, "gpt-nope")
    with pytest.raises(ValueError):
        estimate_cost(1, 0, "gpt-4o-2024-08-06")
    assert all(v["usd_per_1m"] > 0 for v in TRAINING_PRICE_PER_1M.values())


def test_chat_lines_and_tokens_equal_the_examples_encoded_one_by_one():
    import orjson

    rows = [{"text": "NPE on start", "label": "Major"}, {"text": "é \"quoted\"\n\ttab", "label": "Minor"},
            {"text": "", "label": "Blocker"}, {"text": "x" * 401, "label": "Major"}]
    examples = [openai_chat_example(r, LABELS) for r in rows]
    assert list(openai_chat_lines(rows, LABELS)) == [orjson.dumps(e) for e in examples]
    assert openai_chat_tokens(rows, LABELS) == estimate_dataset_tokens(examples)
    with pytest.raises(ValueError):
        list(openai_chat_lines([{"text": "x", "label": "Trivial"}], LABELS))
