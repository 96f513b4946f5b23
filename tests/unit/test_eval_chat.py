"""Hosted chat scoring and the LLM judge, driven through the real `openai` and `anthropic` SDKs against
fakes of the documented APIs (httpx MockTransport handlers).

OpenAI: `POST /v1/chat/completions` -> a `chat.completion` object (`choices[].message.content`,
`finish_reason`, `usage.prompt_tokens` / `completion_tokens` / `total_tokens`); errors are
`{"error": {"message", "type", "param", "code"}}` (404 `model_not_found`, 429 `rate_limit_exceeded`).
Anthropic: `POST /v1/messages` (`x-api-key`, `anthropic-version`) -> a `message` object (`content[]` of
`{"type": "text", "text"}`, `stop_reason`, `usage.input_tokens` / `output_tokens`); errors are
`{"type": "error", "error": {"type", "message"}}` (404 `not_found_error`, 429 `rate_limit_error`,
529 `overloaded_error`).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import Callable

import pytest

from services.evaluator.adapters.chat import (
    ChatClient,
    ScoringError,
    default_system_prompt,
    parse_answer,
    pick_few_shot,
    price_per_1m,
    retry_after_s,
    score_with_chat,
)
from services.evaluator.adapters.llm_judge import RUBRIC_PROMPT, LLMJudge, parse_verdict
from services.evaluator.scoring import row_id
from services.prep.formats import system_prompt as prep_system_prompt

try:  # both SDKs are built on httpx2; older releases took httpx
    import httpx2 as http
except ImportError:  # pragma: no cover
    import httpx as http

OPENAI_KEY = "sk-tuneline-EVAL-FAKE-KEY-do-not-leak-3b9d21"
ANTHROPIC_KEY = "sk-ant-tuneline-EVAL-FAKE-KEY-do-not-leak-77e0c4"
LABELS = ["neg", "pos"]
Answer = Callable[[dict], str]


def _words(text: str) -> int:
    return len(str(text).split())


def _classify(body: dict) -> str:
    """A 'model' that reads the last user turn: positive words -> pos."""
    last = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    return "pos" if any(w in last for w in ("good", "great", "lovely")) else "neg"


class FakeChatProvider:
    """OpenAI chat completions or Anthropic messages, with scripted failures and a record of bodies."""

    def __init__(self, flavour: str, *, answer: Answer = _classify, models: tuple[str, ...] = (),
                 host: str | None = None) -> None:
        self.flavour = flavour
        self.answer = answer
        self.models = set(models)
        self.host = host or ("api.openai.com" if flavour == "openai" else "api.anthropic.com")
        self.key = OPENAI_KEY if flavour == "openai" else ANTHROPIC_KEY
        self.bodies: list[dict] = []
        self.default_temperature_only: set[str] = set()
        self.headers: list[dict] = []
        self.faults: list[Callable[[http.Request], http.Response]] = []
        self.lock = threading.Lock()
        self._ids = itertools.count(1)

    def transport(self) -> http.MockTransport:
        return http.MockTransport(self.handle)

    def fail_next(self, *responses: Callable[[http.Request], http.Response]) -> None:
        self.faults.extend(responses)

    # --- documented error bodies -------------------------------------------------------------

    def error(self, status: int, message: str, *, headers: dict | None = None) -> http.Response:
        if self.flavour == "openai":
            code = {404: "model_not_found", 429: "rate_limit_exceeded", 401: "invalid_api_key"}.get(status)
            type_ = {429: "requests", 500: "server_error", 503: "server_error"}.get(status, "invalid_request_error")
            body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        else:
            type_ = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                     429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}[status]
            body = {"type": "error", "error": {"type": type_, "message": message}}
        return http.Response(status, json=body, headers=headers)

    # --- HTTP ------------------------------------------------------------------------------------

    def handle(self, request: http.Request) -> http.Response:
        assert request.url.host == self.host, request.url
        with self.lock:
            body = json.loads(request.content)
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
            fault = self.faults.pop(0) if self.faults else None
        # Anthropic SDKs since 2.0 (API version 2026-10-21) send the key as a bearer token, older ones as x-api-key
        presented = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if presented != self.key:
            return self.error(401, f"Incorrect API key provided: {presented}.")
        if fault is not None:
            return fault(request)
        if "temperature" in body and (self.flavour == "anthropic" or body["model"] in self.default_temperature_only):
            if self.flavour == "anthropic":  # removed in API version 2026-10-21: a 400 at any value
                return self.error(400, "temperature: Extra inputs are not permitted")
            return http.Response(400, json={"error": {
                "message": "Unsupported value: 'temperature' does not support 0 with this model. Only the default "
                           "(1) value is supported.", "type": "invalid_request_error", "param": "temperature",
                "code": "unsupported_value"}})
        if self.models and body["model"] not in self.models:
            return self.error(404, f"The model `{body['model']}` does not exist or you do not have access to it.")
        text = self.answer(body)
        n_in = sum(_words(m["content"]) for m in body["messages"]) + _words(body.get("system", ""))
        n_out = _words(text)
        n = next(self._ids)
        if self.flavour == "openai":
            assert request.url.path == "/v1/chat/completions"
            return http.Response(200, json={
                "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1_721_764_800 + n,
                "model": body["model"], "system_fingerprint": "fp_tuneline",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
            })
        assert request.url.path == "/v1/messages"
        assert request.headers.get("anthropic-version")
        return http.Response(200, json={
            "id": f"msg_{n:04d}", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": n_in, "output_tokens": n_out},
        })


def status(fake: FakeChatProvider, code: int, message: str = "boom", headers: dict | None = None):
    return lambda request: fake.error(code, message, headers=headers)


def dropped(request: http.Request) -> http.Response:
    raise http.ConnectError("connection reset by fake provider", request=request)


@pytest.fixture(autouse=True)
def keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)


def client_for(fake: FakeChatProvider, model: str, *, sleeps: list | None = None, **kw) -> ChatClient:
    provider = kw.pop("provider", "openai" if fake.flavour == "openai" else "anthropic")
    sleeps = sleeps if sleeps is not None else []
    return ChatClient(provider, model, http_client=http.Client(transport=fake.transport()), sleep=sleeps.append,
                      **kw)


def rows() -> list[dict]:
    texts = ["the movie was good", "awful plot", "a lovely show", "poor acting", "great film", "bad"]
    return [{"row_id": f"r{i}", "text": t, "label": "pos" if i % 2 == 0 else "neg"} for i, t in enumerate(texts)]


def train_rows() -> list[dict]:
    return [{"row_id": f"t{i}", "text": f"{w} thing {i}", "label": lab}
            for i, (w, lab) in enumerate([("good", "pos"), ("bad", "neg")] * 5)]


# --- scoring ------------------------------------------------------------------------------------


def test_prompt_baseline_scores_rows_in_order_with_tokens_latency_and_cost():
    fake = FakeChatProvider("openai")
    client = client_for(fake, "gpt-4o-mini")
    shots = pick_few_shot(train_rows(), 4, kind="single_label")
    scored = score_with_chat(client, rows(), label_space=LABELS, system_prompt=None, few_shot_rows=shots,
                             kind="single_label", model_name="prompt:gpt-4o-mini", concurrency=1)

    assert scored.model == "prompt:gpt-4o-mini"
    assert scored.outputs == [r["label"] for r in rows()]
    assert len(scored.latency_ms) == 6 and all(ms > 0 for ms in scored.latency_ms)
    assert scored.tokens == [1] * 6  # completion tokens: one label word each
    body = fake.bodies[0]
    assert body["model"] == "gpt-4o-mini" and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": prep_system_prompt(LABELS)}
    # four user/assistant example pairs, then the row
    assert [m["role"] for m in body["messages"][1:]] == ["user", "assistant"] * 4 + ["user"]
    assert body["messages"][2]["content"] in LABELS
    assert body["messages"][-1] == {"role": "user", "content": "the movie was good"}
    prompt_tokens = sum(sum(_words(m["content"]) for m in b["messages"]) for b in fake.bodies)
    assert scored.usd == pytest.approx((prompt_tokens * 0.15 + 6 * 0.60) / 1e6)


def test_hosted_fine_tune_is_asked_with_its_own_system_prompt_and_no_examples():
    fake = FakeChatProvider("openai")
    model = "ft:gpt-4o-mini-2024-07-18:tuneline:sentiment-tl-0a1b2c:AbC123"
    own = "Classify the review as one of: neg, pos."
    scored = score_with_chat(client_for(fake, model), rows(), label_space=LABELS, system_prompt=own,
                             few_shot_rows=[], kind="single_label", model_name="candidate", concurrency=1)
    assert scored.outputs == [r["label"] for r in rows()]
    assert all(b["messages"] == [{"role": "system", "content": own}, {"role": "user", "content": r["text"]}]
               for b, r in zip(fake.bodies, rows()))
    assert price_per_1m("openai", model) == (0.30, 1.20)  # a fine-tune's inference is billed at its own rates
    prompt_tokens = sum(sum(_words(m["content"]) for m in b["messages"]) for b in fake.bodies)
    assert scored.usd == pytest.approx((prompt_tokens * 0.30 + 6 * 1.20) / 1e6)


def test_anthropic_messages_carry_the_system_prompt_apart_and_record_usage():
    fake = FakeChatProvider("anthropic")
    client = client_for(fake, "claude-3-5-haiku-20241022")
    scored = score_with_chat(client, rows()[:3], label_space=LABELS, system_prompt=None,
                             few_shot_rows=train_rows()[:2], kind="single_label", model_name="prompt:claude",
                             concurrency=1)
    assert scored.outputs == ["pos", "neg", "pos"]
    body = fake.bodies[0]
    assert body["system"] == prep_system_prompt(LABELS)
    assert "temperature" not in body and body["max_tokens"] > 0
    assert fake.headers[0]["anthropic-version"]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert scored.tokens == [1, 1, 1]
    n_in = sum(sum(_words(m["content"]) for m in b["messages"]) + _words(b["system"]) for b in fake.bodies)
    assert scored.usd == pytest.approx((n_in * 0.80 + 3 * 4.00) / 1e6)


def test_unparseable_replies_are_none_outputs_not_failures():
    replies = iter(["pos", "  'Pos'. ", "The review is clearly neg.", "I cannot tell.", "", "pos or neg"])
    fake = FakeChatProvider("openai", answer=lambda body: next(replies))
    scored = score_with_chat(client_for(fake, "gpt-4o-mini"), rows(), label_space=LABELS, system_prompt=None,
                             few_shot_rows=[], kind="single_label", model_name="prompt:gpt-4o-mini", concurrency=1)
    assert scored.outputs == ["pos", "pos", "neg", None, None, None]
    assert sum(o is None for o in scored.outputs) == 3  # what the report counts as unparseable


def test_json_and_multi_label_replies_parse_to_fields_and_tags():
    json_rows = [{"row_id": "j1", "text": "Ann, 34", "target": {"name": "Ann", "age": 34}},
                 {"row_id": "j2", "text": "Bob", "target": {"name": "Bob"}}]
    replies = iter(['```json\n{"name": "Ann", "age": 34}\n```', "name: Bob"])
    fake = FakeChatProvider("openai", answer=lambda body: next(replies))
    scored = score_with_chat(client_for(fake, "gpt-4o-mini"), json_rows, label_space=[], system_prompt=None,
                             few_shot_rows=json_rows[:1], kind="json", model_name="prompt:gpt-4o-mini", concurrency=1)
    assert scored.outputs == [{"name": "Ann", "age": 34}, None]
    assert "age, name" in fake.bodies[0]["messages"][0]["content"]
    assert fake.bodies[0]["messages"][2]["content"] == json.dumps({"age": 34, "name": "Ann"})

    tags = ["billing", "bug", "ui"]
    tag_rows = [{"row_id": f"m{i}", "text": f"ticket {i}", "tags": ["bug"]} for i in range(4)]
    replies = iter(['["Bug", "ui", "made-up"]', "billing, bug", "none", "no idea at all"])
    fake = FakeChatProvider("openai", answer=lambda body: next(replies))
    scored = score_with_chat(client_for(fake, "gpt-4o-mini"), tag_rows, label_space=tags, system_prompt=None,
                             few_shot_rows=[], kind="multi_label", model_name="prompt:gpt-4o-mini", concurrency=1)
    assert scored.outputs == [["bug", "ui"], ["billing", "bug"], [], None]


def test_triage_replies_normalise_the_label_into_the_label_space():
    assert parse_answer('{"label": "POS", "severity": "high", "tags": ["b", "a"]}', "triage", LABELS) == {
        "label": "pos", "severity": "high", "tags": ["a", "b"]}
    assert parse_answer("not json", "triage", LABELS) is None
    assert "label is one of: neg, pos" in default_system_prompt("triage", LABELS)


def test_rows_are_answered_in_row_order_when_asked_concurrently():
    fake = FakeChatProvider("openai")
    many = rows() * 5
    scored = score_with_chat(client_for(fake, "gpt-4o-mini"), many, label_space=LABELS, system_prompt=None,
                             few_shot_rows=[], kind="single_label", model_name="prompt:gpt-4o-mini", concurrency=4)
    assert scored.outputs == [r["label"] for r in many]


def test_an_openai_compatible_host_is_reached_at_its_base_url_and_not_priced(monkeypatch):
    monkeypatch.setenv("VLLM_KEY", "vllm-local-key")
    fake = FakeChatProvider("openai", host="llm.internal")
    fake.key = "vllm-local-key"
    client = client_for(fake, "gpt-4o-mini", provider="openai_compatible", base_url="http://llm.internal/v1",
                        api_key_env="VLLM_KEY")
    scored = score_with_chat(client, rows()[:2], label_space=LABELS, system_prompt=None, few_shot_rows=[],
                             kind="single_label", model_name="prompt:local", concurrency=1)
    assert scored.outputs == ["pos", "neg"]
    assert "max_tokens" in fake.bodies[0] and "max_completion_tokens" not in fake.bodies[0]
    assert scored.usd is None  # a compatible host's prices are not OpenAI's


def test_a_model_taking_only_its_default_temperature_is_asked_again_without_one():
    fake = FakeChatProvider("openai")
    fake.default_temperature_only.add("gpt-5-mini")
    client = client_for(fake, "gpt-5-mini")
    scored = score_with_chat(client, rows()[:3], label_space=LABELS, system_prompt=None, few_shot_rows=[],
                             kind="single_label", model_name="prompt:gpt-5-mini", concurrency=1)
    assert scored.outputs == ["pos", "neg", "pos"]
    assert [("temperature" in b) for b in fake.bodies] == [True, False, False, False]  # found out once


def test_few_shot_examples_are_balanced_and_stable():
    shots = pick_few_shot(train_rows(), 4, kind="single_label")
    assert sorted(r["label"] for r in shots) == ["neg", "neg", "pos", "pos"]
    assert shots == pick_few_shot(list(reversed(train_rows())), 4, kind="single_label")
    assert pick_few_shot(train_rows(), 0, kind="single_label") == []


# --- retries and failures -----------------------------------------------------------------------


def test_rate_limit_with_retry_after_is_waited_out_then_succeeds():
    fake = FakeChatProvider("openai")
    fake.fail_next(status(fake, 429, "Rate limit reached for gpt-4o-mini", {"retry-after": "7"}),
                   status(fake, 429, "Rate limit reached", {"retry-after-ms": "250"}))
    sleeps: list[float] = []
    reply = client_for(fake, "gpt-4o-mini", sleeps=sleeps).complete([{"role": "user", "content": "good"}])
    assert reply.text == "pos" and reply.attempts == 3
    assert sleeps == [7.0, 0.25]
    assert reply.input_tokens == 1 and reply.output_tokens == 1 and reply.latency_ms > 0


def test_server_errors_exhausted_are_a_provider_error_after_bounded_backoff():
    fake = FakeChatProvider("anthropic")
    fake.fail_next(*[status(fake, 529, "Overloaded")] * 2, *[status(fake, 500, "Internal server error")] * 10)
    sleeps: list[float] = []
    client = client_for(fake, "claude-haiku-4-5", sleeps=sleeps, max_attempts=4, backoff_s=0.5)
    with pytest.raises(ScoringError) as err:
        score_with_chat(client, rows(), label_space=LABELS, system_prompt=None, few_shot_rows=[],
                        kind="single_label", model_name="prompt:claude", concurrency=1)
    assert err.value.reason_code == "eval.provider_error"
    assert "after 4 attempts" in err.value.message and "HTTP 500" in err.value.message
    assert sleeps == [0.5, 1.0, 2.0]
    assert len(fake.bodies) == 4  # the first row failed for good; no later row was asked


def test_dropped_connections_are_retried():
    fake = FakeChatProvider("openai")
    fake.fail_next(dropped, dropped)
    sleeps: list[float] = []
    reply = client_for(fake, "gpt-4o-mini", sleeps=sleeps).complete([{"role": "user", "content": "bad"}])
    assert reply.text == "neg" and sleeps == [1.0, 2.0]

    fake.fail_next(*[dropped] * 3)
    with pytest.raises(ScoringError) as err:
        client_for(fake, "gpt-4o-mini", max_attempts=3).complete([{"role": "user", "content": "bad"}])
    assert err.value.reason_code == "eval.provider_error" and "connection failed" in err.value.message


@pytest.mark.parametrize(("flavour", "model"), [("openai", "ft:gpt-4o-mini-2024-07-18:tuneline::deleted1"),
                                               ("anthropic", "claude-nonexistent-9")])
def test_unknown_model_is_model_not_found_without_retrying(flavour, model):
    fake = FakeChatProvider(flavour, models=("gpt-4o-mini", "claude-haiku-4-5"))
    sleeps: list[float] = []
    with pytest.raises(ScoringError) as err:
        score_with_chat(client_for(fake, model, sleeps=sleeps), rows(), label_space=LABELS, system_prompt=None,
                        few_shot_rows=[], kind="single_label", model_name="candidate", concurrency=1)
    assert err.value.reason_code == "eval.model_not_found"
    assert model in err.value.message
    assert len(fake.bodies) == 1 and sleeps == []


def test_a_bad_request_is_not_retried():
    fake = FakeChatProvider("openai")
    fake.fail_next(status(fake, 400, "Invalid 'messages[0].content': string too long."))
    with pytest.raises(ScoringError) as err:
        client_for(fake, "gpt-4o-mini").complete([{"role": "user", "content": "x"}])
    assert err.value.reason_code == "eval.provider_error" and "HTTP 400" in err.value.message
    assert len(fake.bodies) == 1


def test_missing_key_variable_is_credentials_missing_naming_the_variable(monkeypatch):
    monkeypatch.delenv("TUNELINE_JUDGE_KEY", raising=False)
    with pytest.raises(ScoringError) as err:
        ChatClient("anthropic", "claude-haiku-4-5", api_key_env="TUNELINE_JUDGE_KEY")
    assert err.value.reason_code == "eval.credentials_missing"
    assert "TUNELINE_JUDGE_KEY" in str(err.value)


def test_retry_after_dates_and_garbage():
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:05 GMT"}, now=lambda: 1445412480.0) == 5.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


def test_api_key_never_leaks(monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)  # the SDKs' and httpx's own debug logs included
    texts: list[str] = []

    def collect(exc: BaseException) -> None:
        texts.extend([str(exc), repr(exc), str(exc.args)])
        assert exc.__cause__ is None and exc.__context__ is None  # no SDK exception (and its request) attached

    for flavour, key in (("openai", OPENAI_KEY), ("anthropic", ANTHROPIC_KEY)):
        fake = FakeChatProvider(flavour)
        # a provider echoing the key in a 500 and in a 404 message, and a connection error quoting it
        fake.fail_next(*[status(fake, 500, f"upstream rejected {key}")] * 2)
        fake.fail_next(status(fake, 404, f"no model for key {key}"))
        with pytest.raises(ScoringError) as err:
            client_for(fake, "m", max_attempts=2).complete([{"role": "user", "content": "x"}])
        collect(err.value)
        with pytest.raises(ScoringError) as err:
            client_for(fake, "m").complete([{"role": "user", "content": "x"}])
        collect(err.value)

        fake.fail_next(dropped)
        with pytest.raises(ScoringError) as err:
            client_for(fake, "m", max_attempts=1).complete([{"role": "user", "content": "x"}])
        collect(err.value)
        # a wrong key, echoed back by the provider's 401
        monkeypatch.setenv("WRONG_KEY", "sk-WRONG-key-must-not-leak-1234")
        with pytest.raises(ScoringError) as err:
            client_for(fake, "m", api_key_env="WRONG_KEY").complete([{"role": "user", "content": "x"}])
        collect(err.value)
        assert "$WRONG_KEY" in err.value.message
        texts.append(repr(client_for(fake, "m")))

    out = capsys.readouterr()
    logged = caplog.text + out.out + out.err
    assert texts and logged
    for secret in (OPENAI_KEY, ANTHROPIC_KEY, "sk-WRONG-key-must-not-leak-1234"):
        assert all(secret not in t for t in texts)
        assert secret not in logged


def test_a_connection_error_quoting_the_key_is_scrubbed():
    fake = FakeChatProvider("openai")

    def leaky_drop(request):
        raise http.ConnectError(f"proxy refused Bearer {OPENAI_KEY}", request=request)

    fake.fail_next(leaky_drop)
    with pytest.raises(ScoringError) as err:
        client_for(fake, "gpt-4o-mini", max_attempts=1).complete([{"role": "user", "content": "x"}])
    assert "proxy refused Bearer ***" in err.value.message and OPENAI_KEY not in repr(err.value)


# --- the LLM judge ------------------------------------------------------------------------------


def judge_reply(body: dict) -> str:
    graded = json.loads(body["messages"][-1]["content"])
    same = graded["output"] == graded["reference"]
    return json.dumps({"score": 1 if same else 0, "reason": "matches" if same else "differs"})


def test_llm_judge_scores_rows_with_its_prompt_and_id():
    fake = FakeChatProvider("anthropic", answer=judge_reply)
    judge = LLMJudge(client_for(fake, "claude-haiku-4-5"), concurrency=1)
    outputs = ["pos", "pos", None, "neg"]
    scores = judge.score_rows(rows()[:4], outputs, kind="single_label")
    assert scores == [1.0, 0.0, 0.0, 1.0]
    assert len(fake.bodies) == 3  # an unparseable output scores 0 without asking
    body = fake.bodies[0]
    assert body["system"] == RUBRIC_PROMPT
    assert json.loads(body["messages"][0]["content"]) == {"input": "the movie was good", "output": "pos",
                                                          "reference": "pos"}
    assert len(judge.prompt_sha256) == 64
    assert judge.judge_id == f"llm:claude-haiku-4-5:{judge.prompt_sha256[:12]}"
    assert LLMJudge(judge.client, rubric="Be strict.").judge_id != judge.judge_id


@pytest.mark.parametrize("reply", ["The answer looks right to me.", '{"score": 1.5, "reason": "great"}',
                                   '{"score": -0.1}', '{"score": true}', '{"score": "0.5"}', '{"reason": "x"}',
                                   '["score", 1]'])
def test_llm_judge_reply_that_is_not_a_score_in_range_is_invalid_output_naming_the_row(reply):
    fake = FakeChatProvider("openai", answer=lambda body: reply)
    judge = LLMJudge(client_for(fake, "gpt-4o-mini"), concurrency=1)
    with pytest.raises(ScoringError) as err:
        judge.score_rows(rows()[:2], ["pos", "neg"], kind="single_label")
    assert err.value.reason_code == "eval.judge_invalid_output"
    assert f"row {row_id(rows()[0])}" in err.value.message


def test_llm_judge_accepts_a_fenced_json_verdict():
    v = parse_verdict('```json\n{"score": 0.5, "reason": "half the fields"}\n```', row="r1")
    assert (v.score, v.reason, v.row_id) == (0.5, "half the fields", "r1")


def test_llm_judge_unreachable_after_retries_is_judge_unavailable():
    fake = FakeChatProvider("openai", answer=judge_reply)
    fake.fail_next(*[status(fake, 503, "Service unavailable")] * 3)
    sleeps: list[float] = []
    judge = LLMJudge(client_for(fake, "gpt-4o-mini", sleeps=sleeps, max_attempts=3), concurrency=1)
    with pytest.raises(ScoringError) as err:
        judge.score_rows(rows()[:1], ["pos"], kind="single_label")
    assert err.value.reason_code == "eval.judge_unavailable"
    assert "row r0" in err.value.message and "HTTP 503" in err.value.message
    assert err.value.__cause__ is None and err.value.__context__ is None
    assert len(sleeps) == 2
