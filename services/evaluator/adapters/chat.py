"""Scoring with hosted chat models: a client over the OpenAI (or OpenAI-compatible) and Anthropic SDKs,
the prompt that turns a test row into a chat, and the parsing of a reply into a label, tags or fields.

Endpoints: OpenAI `POST /chat/completions` (`choices[0].message.content`, `usage.prompt_tokens` /
`usage.completion_tokens`) and Anthropic `POST /v1/messages` (`content[*].text`, `usage.input_tokens` /
`usage.output_tokens`); errors are `{"error": {...}}` bodies with the HTTP status. Calls ask for
temperature 0 where the provider still takes it (not Anthropic since API version 2026-10-21, not
OpenAI's reasoning models).

Retries are ours, not the SDKs' (their `max_retries` is 0), so the wait is injectable and bounded:
429, 408, 409, 5xx (Anthropic's 529 included) and dropped connections are retried with exponential
backoff, honouring `retry-after-ms` / `retry-after`; a 404 is the model missing and is not retried.

Secrets: the key is read from a named environment variable and handed to the SDK only; provider
messages are scrubbed of it (on 401/403 not repeated at all), and every ScoringError is raised outside
the SDK exception's `except` block, so no SDK exception (its request carries the Authorization
header) hangs off ours as cause or context.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from contracts.reason_codes import REASON_CODES
from services.common.logging import get_logger
from services.evaluator.scoring import LABEL_FIELD, TAGS_FIELD, Scored, gold_of, row_id

log = get_logger(__name__)

CREDENTIALS_MISSING = "eval.credentials_missing"
PROVIDER_ERROR = "eval.provider_error"
MODEL_NOT_FOUND = "eval.model_not_found"

PROVIDERS = ("openai", "openai_compatible", "anthropic")
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "openai_compatible": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
_RETRYABLE_STATUS = frozenset({408, 409, 429})

MULTI_LABEL_TEMPLATE = (
    "You are a text tagger. Read the user's text and answer with every label from this list that applies, "
    "as a JSON list of strings (an empty list when none applies), and nothing else: {labels}."
)
JSON_SYSTEM_PROMPT = "Read the user's text and answer with one JSON object and nothing else."


class ScoringError(Exception):
    """A model could not be scored, with a registered reason code. Messages never contain credentials."""

    def __init__(self, reason_code: str, message: str) -> None:
        if reason_code not in REASON_CODES:
            raise ValueError(f"unregistered evaluator reason code: {reason_code!r}")
        super().__init__(f"{reason_code}: {message}")
        self.reason_code = reason_code
        self.message = message


# --- inference prices ---------------------------------------------------------------------------

# USD per 1M (input, output) tokens, standard (not batch, not cached-input) rates, from
# openai.com/api/pricing and docs.anthropic.com/en/docs/about-claude/pricing as published in
# November 2025. A model missing here (a newer one, any OpenAI-compatible host) is priced None, not 0.
PRICES_PER_1M: dict[tuple[str, str], tuple[float, float]] = {
    ("openai", "gpt-4o"): (2.50, 10.00),
    ("openai", "gpt-4o-mini"): (0.15, 0.60),
    ("openai", "gpt-4.1"): (2.00, 8.00),
    ("openai", "gpt-4.1-mini"): (0.40, 1.60),
    ("openai", "gpt-4.1-nano"): (0.10, 0.40),
    ("openai", "gpt-3.5-turbo"): (0.50, 1.50),
    ("openai", "gpt-5"): (1.25, 10.00),
    ("openai", "gpt-5-mini"): (0.25, 2.00),
    ("openai", "gpt-5-nano"): (0.05, 0.40),
    ("anthropic", "claude-3-haiku"): (0.25, 1.25),
    ("anthropic", "claude-3-5-haiku"): (0.80, 4.00),
    ("anthropic", "claude-haiku-4-5"): (1.00, 5.00),
    ("anthropic", "claude-3-5-sonnet"): (3.00, 15.00),
    ("anthropic", "claude-3-7-sonnet"): (3.00, 15.00),
    ("anthropic", "claude-sonnet-4"): (3.00, 15.00),
    ("anthropic", "claude-sonnet-4-5"): (3.00, 15.00),
    ("anthropic", "claude-opus-4"): (15.00, 75.00),
    ("anthropic", "claude-opus-4-1"): (15.00, 75.00),
    ("anthropic", "claude-opus-4-5"): (5.00, 25.00),
}
# Inference on an OpenAI fine-tune (`ft:<base>:<org>:<suffix>:<id>`) is billed at its base's own rates.
FINE_TUNED_PRICES_PER_1M: dict[str, tuple[float, float]] = {
    "gpt-4o": (3.75, 15.00),
    "gpt-4o-mini": (0.30, 1.20),
    "gpt-4.1": (3.00, 12.00),
    "gpt-4.1-mini": (0.80, 3.20),
    "gpt-4.1-nano": (0.20, 0.80),
    "gpt-3.5-turbo": (3.00, 6.00),
}
_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|latest)$")  # -2024-07-18, -20241022, -0125, -latest


def _model_family(model: str) -> str:
    return _SNAPSHOT.sub("", model.strip().lower())


def price_per_1m(provider: str, model: str) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens of `model` at `provider`, or None when not in the table."""
    if provider == "openai" and model.startswith("ft:"):
        return FINE_TUNED_PRICES_PER_1M.get(_model_family(model.split(":")[1]))
    return PRICES_PER_1M.get((provider, _model_family(model)))


def usd_of(provider: str, model: str, input_tokens: Sequence[int | None], output_tokens: Sequence[int | None]
           ) -> float | None:
    """What the calls cost; None when the model has no price or a call reported no usage."""
    price = price_per_1m(provider, model)
    if price is None or any(t is None for t in (*input_tokens, *output_tokens)):
        return None
    return (sum(input_tokens) * price[0] + sum(output_tokens) * price[1]) / 1_000_000


# --- client -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatReply:
    """One answered call: the reply's text, the tokens the provider billed, and the call's wall time."""

    text: str
    input_tokens: int | None
    output_tokens: int | None
    latency_ms: float
    attempts: int = 1


@dataclass(frozen=True)
class _Failure:
    retry: bool
    reason_code: str
    message: str
    delay_s: float | None = None  # what the provider asked us to wait (retry-after)
    status: int | None = None


def retry_after_s(headers: Mapping[str, str] | None, *, now: Callable[[], float] = time.time) -> float | None:
    """The wait a provider asked for: `retry-after-ms`, else `retry-after` in seconds or as an HTTP date."""
    if not headers:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            delay = float(value) / divisor
        except ValueError:
            if name == "retry-after":
                try:
                    delay = email.utils.parsedate_to_datetime(value).timestamp() - now()
                except (TypeError, ValueError, IndexError, OverflowError):
                    continue
            else:
                continue
        if math.isfinite(delay):
            return max(0.0, delay)
    return None


class ChatClient:
    """Chat calls to one hosted model at temperature 0 (where the provider still takes one), retried
    with backoff, with usage and latency."""

    def __init__(
        self,
        provider: str,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str | None = None,
        max_tokens: int = 256,
        timeout_s: float = 60.0,
        max_attempts: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        http_client: Any = None,
    ) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"unknown chat provider {provider!r}; expected one of {list(PROVIDERS)}")
        if provider == "openai_compatible" and not base_url:
            raise ValueError("an openai_compatible provider needs a base_url")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.provider, self.model = provider, model
        self.key_env = api_key_env or DEFAULT_KEY_ENV[provider]
        key = os.environ.get(self.key_env)
        if not key:
            raise ScoringError(CREDENTIALS_MISSING, f"no API key for {provider} model {model}: environment variable "
                                                    f"{self.key_env} is not set or empty")
        self._secret = key
        self.max_tokens = max_tokens
        self.max_attempts = max_attempts
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._sleep = sleep
        self._temperature_0 = provider != "anthropic"
        kwargs: dict[str, Any] = {"api_key": key, "max_retries": 0, "timeout": timeout_s}
        if base_url:
            kwargs["base_url"] = base_url
        if http_client is not None:
            kwargs["http_client"] = http_client
        if provider == "anthropic":
            import anthropic

            self._sdk, self._sdk_error = anthropic, anthropic.AnthropicError
            self._client = anthropic.Anthropic(**kwargs)
        else:
            import openai

            self._sdk, self._sdk_error = openai, openai.OpenAIError
            self._client = openai.OpenAI(**kwargs)
        self.base_url = str(self._client.base_url)

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> ChatClient:
        """From a PromptBaseline or JudgeSettings (provider, model, base_url, api_key_env)."""
        return cls(settings.provider, settings.model, base_url=settings.base_url, api_key_env=settings.api_key_env,
                   **kwargs)

    def __repr__(self) -> str:
        return (f"ChatClient(provider={self.provider!r}, model={self.model!r}, base_url={self.base_url!r}, "
                f"api_key_env={self.key_env!r})")

    @property
    def price(self) -> tuple[float, float] | None:
        return price_per_1m(self.provider, self.model)

    def complete(self, messages: Sequence[Mapping[str, str]], *, system: str | None = None,
                 max_tokens: int | None = None) -> ChatReply:
        """One reply to `messages` (user/assistant turns) under `system`. Raises ScoringError:
        eval.model_not_found (404, at once), eval.provider_error (retries spent, or a refusal)."""
        max_tokens = max_tokens or self.max_tokens
        call = self._anthropic_call if self.provider == "anthropic" else self._openai_call
        last: _Failure | None = None
        for attempt in range(1, self.max_attempts + 1):
            t0 = time.perf_counter()
            outcome = self._attempt(call, messages, system, max_tokens)
            if not isinstance(outcome, _Failure):
                text, tokens_in, tokens_out = outcome
                return ChatReply(text, tokens_in, tokens_out, (time.perf_counter() - t0) * 1000, attempt)
            last = outcome
            if not outcome.retry or attempt == self.max_attempts:
                break
            delay = self._delay(attempt, outcome.delay_s)
            log.warning("chat_retry", provider=self.provider, model=self.model, status=outcome.status,
                        attempt=attempt, max_attempts=self.max_attempts, delay_s=round(delay, 3))
            self._sleep(delay)
        assert last is not None
        tail = f" after {self.max_attempts} attempts" if last.retry else ""
        failure = ScoringError(last.reason_code, f"{last.message}{tail}")
        log.warning("chat_failed", provider=self.provider, model=self.model, reason_code=failure.reason_code,
                    error=failure.message)
        raise failure

    def _delay(self, attempt: int, asked: float | None) -> float:
        if asked is not None:
            return min(asked, self.max_backoff_s)
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)

    def _attempt(self, call, messages, system, max_tokens) -> tuple[str, int | None, int | None] | _Failure:
        sdk = self._sdk
        try:
            return call(messages, system, max_tokens)
        except sdk.APIStatusError as exc:
            return self._status_failure(exc)
        except sdk.APIConnectionError as exc:  # APITimeoutError included
            kind = "timed out" if isinstance(exc, sdk.APITimeoutError) else "connection failed"
            cause = exc.__cause__
            detail = f" ({type(cause).__name__}: {self._scrub(str(cause))})" if cause is not None else ""
            return _Failure(True, PROVIDER_ERROR,
                            f"{self.provider} model {self.model}: {kind} to {self.base_url}{detail}")
        except self._sdk_error as exc:  # any other SDK error (a response it could not read): not worth retrying
            return _Failure(False, PROVIDER_ERROR,
                            f"{self.provider} model {self.model}: {type(exc).__name__}: {self._scrub(str(exc))}")

    def _status_failure(self, exc: Any) -> _Failure:
        status = exc.status_code
        where = f"{self.provider} model {self.model}"
        if status in (401, 403):
            # Provider messages about keys may quote (part of) the key: say which variable, not what it holds.
            return _Failure(False, PROVIDER_ERROR, f"{where}: the provider refused the credentials from "
                                                   f"${self.key_env} (HTTP {status})", status=status)
        message = self._scrub(str(getattr(exc, "message", "") or ""))
        if status == 404:
            return _Failure(False, MODEL_NOT_FOUND, f"{where} was not found at {self.base_url} (HTTP 404): {message}",
                            status=status)
        retry = status in _RETRYABLE_STATUS or status >= 500
        headers = getattr(getattr(exc, "response", None), "headers", None)
        return _Failure(retry, PROVIDER_ERROR, f"{where}: HTTP {status}: {message}",
                        delay_s=retry_after_s(headers) if retry else None, status=status)

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _openai_call(self, messages, system, max_tokens) -> tuple[str, int | None, int | None]:
        body = ([{"role": "system", "content": system}] if system else []) + [
            {"role": m["role"], "content": m["content"]} for m in messages]
        # OpenAI itself takes max_completion_tokens (max_tokens is deprecated there); compatible hosts
        # (vLLM, TGI, Together ...) all take max_tokens.
        limit = {"max_completion_tokens": max_tokens} if self.provider == "openai" else {"max_tokens": max_tokens}

        def create(**sampling: Any) -> Any:
            return self._client.chat.completions.create(model=self.model, messages=body, n=1, **limit, **sampling)

        if not self._temperature_0:
            completion = create()
        else:
            try:
                completion = create(temperature=0)
            except self._sdk.BadRequestError as exc:
                # Reasoning models (o-series, gpt-5) take only their default temperature: answer at that.
                if not _refuses_temperature(exc):
                    raise
                self._temperature_0 = False
                log.warning("temperature_unsupported", provider=self.provider, model=self.model)
                completion = create()
        text = (completion.choices[0].message.content or "") if completion.choices else ""
        usage = completion.usage
        return text, getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None)

    def _anthropic_call(self, messages, system, max_tokens) -> tuple[str, int | None, int | None]:
        kwargs: dict[str, Any] = {"system": system} if system else {}
        # No temperature: API version 2026-10-21 (the SDK's since 2.0) removed it and answers 400 to any
        # value, so Claude answers at its default sampling; the judge's validation against gold (D16)
        # is what vouches for its verdicts.
        message = self._client.messages.create(
            model=self.model, max_tokens=max_tokens,
            messages=[{"role": m["role"], "content": m["content"]} for m in messages], **kwargs)
        text = "".join(block.text for block in message.content if getattr(block, "type", None) == "text")
        usage = message.usage
        return text, getattr(usage, "input_tokens", None), getattr(usage, "output_tokens", None)


def _refuses_temperature(exc: Any) -> bool:
    if getattr(exc, "param", None) == "temperature":
        return True
    message = str(getattr(exc, "message", "")).lower()
    return "temperature" in message and any(w in message for w in ("unsupported", "not support", "deprecated"))


# --- parsing replies ----------------------------------------------------------------------------

_QUOTES = "\"'`“”‘’*"
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def _clean(text: str) -> str:
    return text.strip().strip(_QUOTES).strip().rstrip(".").strip().strip(_QUOTES).strip()


def parse_label(text: str | None, label_space: Sequence[str]) -> str | None:
    """The label a reply names: an exact match, then ignoring case, quotes and a trailing period
    (or a JSON string / {"label": ...}), then the only label the reply mentions; otherwise None."""
    if text is None:
        return None
    labels = [str(lab) for lab in label_space]
    raw = text.strip()
    if raw in labels:
        return raw
    decoded = _json_value(raw)
    if isinstance(decoded, str):
        raw = decoded.strip()
    elif isinstance(decoded, Mapping) and isinstance(decoded.get(LABEL_FIELD), str):
        raw = decoded[LABEL_FIELD].strip()
    cleaned = _clean(raw)
    folded = {lab.casefold(): lab for lab in labels}
    if cleaned in labels:
        return cleaned
    if cleaned.casefold() in folded:
        return folded[cleaned.casefold()]
    mentioned = [lab for lab in labels
                 if re.search(rf"(?<!\w){re.escape(lab)}(?!\w)", raw, re.IGNORECASE)]
    # "bug report" mentions "bug" too: a label inside another mentioned label does not count
    mentioned = [lab for lab in mentioned
                 if not any(o != lab and lab.casefold() in o.casefold() for o in mentioned)]
    return mentioned[0] if len(mentioned) == 1 else None


def parse_tags(text: str | None, label_space: Sequence[str]) -> list[str] | None:
    """The tags a reply names, sorted, filtered to the label space: a JSON list (or {"tags": [...]}),
    else comma / semicolon / newline separated. An empty answer ("[]", "none") is []; a reply that
    names nothing of the label space is None."""
    if text is None or not text.strip():
        return None
    decoded = _json_value(text.strip())
    if isinstance(decoded, Mapping):
        decoded = decoded.get(TAGS_FIELD, decoded.get("labels"))
    if isinstance(decoded, list):
        items = [str(i) for i in decoded]
    else:
        items = [p for p in re.split(r"[,;\n]|\s+\|\s+", text.strip().strip("[]")) if _clean(p)]
    if not items or all(_clean(i).casefold() in ("none", "n/a", "") for i in items):
        return []
    tags = {lab for lab in (parse_label(_clean(i), label_space) for i in items) if lab is not None}
    return sorted(tags) if tags else None


def parse_json_object(text: str | None) -> dict | None:
    """The JSON object a reply holds: the whole reply, a fenced block, or the first {...}; else None."""
    if text is None:
        return None
    value = _json_value(text.strip())
    return value if isinstance(value, dict) else None


def _json_value(text: str) -> Any:
    candidates = [text, *(m.group(1).strip() for m in _FENCE.finditer(text))]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    start = text.find("{")
    if start >= 0:
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except ValueError:
            pass
    return None


def parse_answer(text: str | None, kind: str, label_space: Sequence[str]) -> Any:
    """A reply in the form scoring expects for `kind` (None when unparseable): a label
    (single_label), sorted tags (multi_label), a dict of fields (triage, json), the text (text)."""
    if kind == "single_label":
        return parse_label(text, label_space)
    if kind == "multi_label":
        return parse_tags(text, label_space)
    if kind in ("triage", "json"):
        fields = parse_json_object(text)
        if fields is not None and kind == "triage":
            if isinstance(fields.get(LABEL_FIELD), str) and label_space:
                fields[LABEL_FIELD] = parse_label(fields[LABEL_FIELD], label_space) or fields[LABEL_FIELD]
            if isinstance(fields.get(TAGS_FIELD), list):
                fields[TAGS_FIELD] = sorted(str(t) for t in fields[TAGS_FIELD])
        return fields
    if kind == "text":
        return text.strip() if text and text.strip() else None
    raise ValueError(f"unknown output kind {kind!r}")


# --- rows as chats ------------------------------------------------------------------------------


def conversation_prompt(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The turns a model answers for a test row: a chat row up to (not including) its last assistant
    turn; any other row as one user turn (its text or prompt)."""
    if "messages" in row:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        return messages[:last]
    if "prompt" in row:
        return [{"role": "user", "content": str(row["prompt"])}]
    if "text" in row:
        return [{"role": "user", "content": str(row["text"])}]
    raise ValueError(f"row {row_id(row)} has no messages, prompt or text to ask a model about")


def reference_answer(row: Mapping[str, Any], kind: str) -> str:
    """A row's gold answer as the model should write it (few-shot examples)."""
    if kind == "single_label":
        return str(row[LABEL_FIELD])
    if kind == "multi_label":
        return json.dumps(sorted(row.get(TAGS_FIELD) or []), ensure_ascii=False)
    if kind in ("triage", "json"):
        return json.dumps(gold_of(row, kind), ensure_ascii=False, sort_keys=True)
    if "completion" in row:
        return str(row["completion"])
    if "messages" in row:
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        if answers:
            return str(answers[-1])
    raise ValueError(f"row {row_id(row)} has no reference answer for kind {kind!r}")


def default_system_prompt(kind: str, label_space: Sequence[str], examples: Sequence[Mapping[str, Any]] = ()
                          ) -> str | None:
    """The instruction for `kind`: prep's classifier prompt (what a hosted fine-tune was trained with)
    for single-label, its multi-label variant, or a JSON instruction naming the fields."""
    from services.common.prompts import system_prompt

    if kind == "single_label":
        return system_prompt(label_space)
    if kind == "multi_label":
        return system_prompt(label_space, template=MULTI_LABEL_TEMPLATE)
    if kind in ("triage", "json"):
        fields = sorted({f for r in examples for f in (gold_of(r, kind) or {})})
        if kind == "triage" and LABEL_FIELD not in fields:
            fields.insert(0, LABEL_FIELD)
        prompt = JSON_SYSTEM_PROMPT
        if fields:
            prompt += " Its fields: " + ", ".join(fields) + "."
        if kind == "triage" and label_space:
            prompt += f" The field {LABEL_FIELD} is one of: " + ", ".join(str(lab) for lab in label_space) + "."
        return prompt
    return None


def few_shot_turns(rows: Sequence[Mapping[str, Any]], kind: str) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for r in rows:
        asked = [m for m in conversation_prompt(r) if m["role"] != "system"]
        turns += [*asked, {"role": "assistant", "content": reference_answer(r, kind)}]
    return turns


def pick_few_shot(train_rows: Sequence[Mapping[str, Any]], n: int, *, kind: str) -> list[Mapping[str, Any]]:
    """`n` train rows to show as examples: round-robin over the labels (single-label), each label's
    rows in a fixed pseudo-random order (by row id hash), so the same train split gives the same shots."""
    if n <= 0:
        return []
    ordered = sorted(train_rows, key=lambda r: hashlib.sha256(row_id(r).encode()).hexdigest())
    if kind != "single_label":
        return ordered[:n]
    by_label: dict[str, list[Mapping[str, Any]]] = {}
    for r in ordered:
        by_label.setdefault(str(r.get(LABEL_FIELD)), []).append(r)
    picked: list[Mapping[str, Any]] = []
    queues = [by_label[k] for k in sorted(by_label)]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def chat_for_row(row: Mapping[str, Any], *, system_prompt: str | None, shots: Sequence[Mapping[str, str]]
                 ) -> tuple[str | None, list[dict[str, str]]]:
    """(system, turns) for one test row; a chat row's own system message wins over `system_prompt`."""
    turns = conversation_prompt(row)
    own = [m["content"] for m in turns if m["role"] == "system"]
    turns = [m for m in turns if m["role"] != "system"]
    return ("\n\n".join(own) if own else system_prompt), [*shots, *turns]


def map_in_order(fn: Callable[[Any], Any], items: Sequence[Any], concurrency: int) -> list[Any]:
    """[fn(item) ...] in item order, `concurrency` calls at a time; the first failure is raised and
    the items not yet started are not started."""
    if concurrency <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    pool = ThreadPoolExecutor(max_workers=min(concurrency, len(items)))
    try:
        futures = [pool.submit(fn, item) for item in items]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def score_with_chat(
    client: ChatClient,
    rows: Sequence[Mapping[str, Any]],
    *,
    label_space: Sequence[str],
    system_prompt: str | None,
    few_shot_rows: Sequence[Mapping[str, Any]],
    kind: str,
    model_name: str,
    concurrency: int = 4,
) -> Scored:
    """A hosted model's answers on `rows`, in row order: a fine-tuned candidate (no shots, its own
    system prompt) or the prompt baseline (few shots). `system_prompt` None: `default_system_prompt`.
    Replies that parse to nothing are None outputs. Raises ScoringError when a call fails for good."""
    if system_prompt is None:
        system_prompt = default_system_prompt(kind, label_space, few_shot_rows)
    shots = few_shot_turns(few_shot_rows, kind)
    chats = [chat_for_row(r, system_prompt=system_prompt, shots=shots) for r in rows]
    t0 = time.perf_counter()

    replies = map_in_order(lambda chat: client.complete(chat[1], system=chat[0]), chats, concurrency)
    compute_s = time.perf_counter() - t0
    outputs = [parse_answer(r.text, kind, label_space) for r in replies]
    unparseable = sum(o is None for o in outputs)
    if unparseable:
        log.info("chat_unparseable", model=model_name, unparseable=unparseable, n=len(outputs))
    return Scored(
        model=model_name,
        outputs=outputs,
        latency_ms=[r.latency_ms for r in replies],
        # what the model wrote per row, comparable with a local model's generated tokens; input tokens are in usd
        tokens=[r.output_tokens for r in replies],
        compute_s=compute_s,
        usd=usd_of(client.provider, client.model, [r.input_tokens for r in replies],
                   [r.output_tokens for r in replies]),
    )
