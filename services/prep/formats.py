"""Export formats for cleaned rows, an offline token estimate, and a fine-tuning cost estimate.

OpenAI chat fine-tuning data (supervised): one JSON object per line, ``{"messages": [...]}``, each
message ``{"role": "system"|"user"|"assistant", "content": str}``; the assistant message is the
target (help.openai.com "How do I format my fine-tuning data", and OpenAI's fine-tuning guide's
``{"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}]}`` example).
No other top-level keys: the file is training data only.
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Iterator, Mapping, Sequence

import orjson

from services.common.prompts import DEFAULT_SYSTEM_TEMPLATE, system_prompt  # noqa: F401 (prep's API)


def openai_chat_example(row: Mapping, label_space: Sequence[str], *, system: str | None = None) -> dict:
    label = row["label"]
    if label not in label_space:
        raise ValueError(f"label {label!r} is not in the label space")
    return {"messages": [
        {"role": "system", "content": system if system is not None else system_prompt(label_space)},
        {"role": "user", "content": row["text"]},
        {"role": "assistant", "content": str(label)},
    ]}


def openai_chat_lines(rows: Iterable[Mapping], label_space: Sequence[str], *, system: str | None = None
                      ) -> Iterator[bytes]:
    """``orjson.dumps(openai_chat_example(r, label_space, system=...))`` of each row, byte for byte,
    put together from the constant parts (encoded once) and the row's encoded text."""
    sp = system if system is not None else system_prompt(label_space)
    dumps = orjson.dumps
    head = b'{"messages":[{"role":"system","content":' + dumps(sp) + b'},{"role":"user","content":'
    tails: dict = {}  # (type, label) -> the encoded end of its lines
    for r in rows:
        label = r["label"]
        try:
            tail = tails.get((label.__class__, label))
        except TypeError:  # an unhashable label: the general path says what is wrong
            yield dumps(openai_chat_example(r, label_space, system=sp))
            continue
        if tail is None:
            if label not in label_space:
                raise ValueError(f"label {label!r} is not in the label space")
            tail = tails[(label.__class__, label)] = b'},{"role":"assistant","content":' + dumps(str(label)) + b'}]}'
        yield head + dumps(r["text"]) + tail


def openai_chat_tokens(rows: Iterable[Mapping], label_space: Sequence[str], *, system: str | None = None) -> int:
    """``sum(estimate_example_tokens(openai_chat_example(r, ...)) for r in rows)`` without building
    the examples."""
    sp = system if system is not None else system_prompt(label_space)
    fixed = TOKENS_PER_EXAMPLE + 3 * TOKENS_PER_MESSAGE + estimate_text_tokens(sp)
    label_tokens = {}
    total = 0
    ceil, per_token = math.ceil, CHARS_PER_TOKEN
    for r in rows:
        label = r["label"]
        if label not in label_tokens:
            label_tokens[label] = estimate_text_tokens(str(label))
        text = r["text"]
        total += fixed + label_tokens[label] + (ceil(len(text) / per_token) if text else 0)  # estimate_text_tokens
    return total


def openai_chat_jsonl(rows: Iterable[Mapping], label_space: Sequence[str], *, system: str | None = None) -> str:
    sp = system if system is not None else system_prompt(label_space)
    return "".join(json.dumps(openai_chat_example(r, label_space, system=sp), ensure_ascii=False) + "\n"
                   for r in rows)


# ---------- the shapes without a label ----------

# Shapes whose rows are conversations as they stand: chat rows as given, prompt/completion as one user
# turn and one assistant turn (as the local trainer reads them, services/trainer/local/tasks.py).
OPENAI_CHAT_SHAPES = ("chat_messages", "prompt_completion")
NO_OPENAI_CHAT = {
    "json_extraction": (
        "no OpenAI chat file: an extraction row is an input text and a target object, with no instruction "
        "or output schema to put in the prompt, and no serialisation of the target for hosted training is "
        "specified (only the local trainer's); train this shape with the local backend"),
    "preference_pairs": (
        "no OpenAI chat file: supervised chat fine-tuning has no place for the rejected answer, and OpenAI's "
        "preference (DPO) format is not implemented here; train this shape with the local backend"),
}


def openai_messages_example(row: Mapping) -> dict:
    """The OpenAI chat fine-tuning example of a chat_messages or prompt_completion row."""
    if "messages" in row:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
    if "completion" in row:
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["completion"]}]}
    raise ValueError(f"row {row.get('row_number')} is neither a chat_messages nor a prompt_completion row")


def openai_messages_lines(rows: Iterable[Mapping]) -> Iterator[bytes]:
    for r in rows:
        yield orjson.dumps(openai_messages_example(r))


def openai_messages_tokens(rows: Iterable[Mapping]) -> int:
    return estimate_dataset_tokens(openai_messages_example(r) for r in rows)


# ---------- token estimate (no tokenizer download: tiktoken needs one) ----------

CHARS_PER_TOKEN = 4.0  # OpenAI's rule of thumb for English text with cl100k/o200k-style BPE
TOKENS_PER_MESSAGE = 4  # role and separators, as in OpenAI's cookbook counting for chat models
TOKENS_PER_EXAMPLE = 3  # the assistant reply priming


def estimate_text_tokens(text: str) -> int:
    """ceil(characters / 4); code, logs and non-Latin scripts tokenise denser (often 2-3 chars per
    token), so treat this as a lower-middle estimate and keep the cost buffer."""
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


def estimate_example_tokens(example: Mapping) -> int:
    msgs = example["messages"]
    return TOKENS_PER_EXAMPLE + sum(TOKENS_PER_MESSAGE + estimate_text_tokens(m["content"]) for m in msgs)


def estimate_dataset_tokens(examples: Iterable[Mapping]) -> int:
    return sum(estimate_example_tokens(e) for e in examples)


# ---------- cost ----------

# USD per 1M training tokens (supervised fine-tuning), as of 2026-04.
# Sources: OpenAI's pricing page (platform.openai.com/docs/pricing, "Fine-tuning" table) as last read
# by the author, cross-checked with third-party summaries found on 2026-04: GPT-4o $25.00/M
# (artificial-intelligence-wiki.com, "OpenAI fine-tuning pricing"), GPT-4o mini $3.00/M
# (tokenmix.ai, "OpenAI fine-tuning pricing guide", April 2026). Entries marked "unconfirmed" could
# not be checked against a source readable from this environment: override them before relying on them.
PRICES_AS_OF = "2026-04"
TRAINING_PRICE_PER_1M: dict[str, dict] = {
    "gpt-4o-2024-08-06": {"usd_per_1m": 25.00, "confirmed": True},
    "gpt-4o-mini-2024-07-18": {"usd_per_1m": 3.00, "confirmed": True},
    "gpt-4.1-2025-04-14": {"usd_per_1m": 25.00, "confirmed": False},
    "gpt-4.1-mini-2025-04-14": {"usd_per_1m": 5.00, "confirmed": False},
    "gpt-4.1-nano-2025-04-14": {"usd_per_1m": 1.50, "confirmed": False},
    "gpt-3.5-turbo-0125": {"usd_per_1m": 8.00, "confirmed": False},
    "davinci-002": {"usd_per_1m": 6.00, "confirmed": False},
    "babbage-002": {"usd_per_1m": 0.40, "confirmed": False},
}
BUFFER = 0.20


def estimate_cost(training_tokens: int, epochs: int, model: str,
                  prices: Mapping[str, Mapping | float] | None = None, buffer: float = BUFFER) -> dict:
    """tokens x epochs x price per token x (1 + buffer). ``prices`` maps model -> USD per 1M tokens
    (a number, or ``{"usd_per_1m": ..., "confirmed": ...}``); it replaces the built-in table."""
    if training_tokens < 0 or epochs < 1:
        raise ValueError("training_tokens must be >= 0 and epochs >= 1")
    table = prices if prices is not None else TRAINING_PRICE_PER_1M
    entry = table.get(model)
    if entry is None:
        raise KeyError(f"no training price for {model!r}; known: {', '.join(sorted(table))}")
    per_1m = float(entry["usd_per_1m"]) if isinstance(entry, Mapping) else float(entry)
    confirmed = bool(entry.get("confirmed", True)) if isinstance(entry, Mapping) else True
    billed = training_tokens * epochs
    base = billed * per_1m / 1_000_000
    return {
        "model": model,
        "billed_tokens": billed,
        "usd_per_1m_tokens": per_1m,
        "base_usd": round(base, 4),
        "buffer": buffer,
        "estimate_usd": round(base * (1 + buffer), 4),
        "price_confirmed": confirmed,
        "prices_as_of": PRICES_AS_OF if prices is None else "caller-supplied",
    }
