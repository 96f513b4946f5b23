"""The LLM judge: a hosted model grades each (input, output, reference) with a rubric prompt, at
temperature 0 where the provider takes one, answering {"score": number in [0, 1], "reason": short}."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.common.logging import get_logger
from services.evaluator.adapters.chat import (
    PROVIDER_ERROR,
    ChatClient,
    ScoringError,
    map_in_order,
    parse_json_object,
)
from services.evaluator.scoring import gold_of, input_text, row_id

log = get_logger(__name__)

JUDGE_UNAVAILABLE = "eval.judge_unavailable"
JUDGE_INVALID_OUTPUT = "eval.judge_invalid_output"

RUBRIC_PROMPT = (
    "You grade a model's answer against a reference answer. You get a JSON object with the `input` the "
    "model read, the model's `output` and the `reference` (the correct answer). Judge only whether the "
    "output says what the reference says: the same label, the same fields with the same values, the same "
    "meaning; ignore wording, field order and formatting. Score 1 for a fully correct output, 0 for a "
    "wrong or missing one, and in between for the share of it that is correct. Answer with one JSON object "
    "and nothing else: {\"score\": <a number from 0 to 1>, \"reason\": \"<one short sentence>\"}."
)
# How each row is put to the judge; part of the prompt's hash, so changing it changes the judge id.
USER_TEMPLATE = '{{"input": {input}, "output": {output}, "reference": {reference}}}'


@dataclass(frozen=True)
class JudgeVerdict:
    row_id: str
    score: float
    reason: str


def _encode(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def parse_verdict(text: str | None, *, row: str) -> JudgeVerdict:
    """The judge's reply as a verdict; raises ScoringError(eval.judge_invalid_output) naming the row."""
    fields = parse_json_object(text)
    score = fields.get("score") if fields is not None else None
    if (isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score)
            or not 0 <= score <= 1):
        shown = (text or "").strip()
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        raise ScoringError(JUDGE_INVALID_OUTPUT, f"row {row}: the judge answered {shown!r}, "
                                                 "not a JSON object with a score in [0, 1]")
    reason = fields.get("reason")
    return JudgeVerdict(row_id=row, score=float(score), reason=reason if isinstance(reason, str) else "")


class LLMJudge:
    """Grades outputs with a hosted chat model; identified by its model and its prompt's sha256."""

    kind = "llm"

    def __init__(self, client: ChatClient, *, rubric: str = RUBRIC_PROMPT, max_tokens: int = 200,
                 concurrency: int = 4) -> None:
        self.client = client
        self.rubric = rubric
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        self.prompt_sha256 = hashlib.sha256(f"{rubric}\n---\n{USER_TEMPLATE}".encode()).hexdigest()

    @property
    def model(self) -> str:
        return self.client.model

    @property
    def judge_id(self) -> str:
        return f"llm:{self.client.model}:{self.prompt_sha256[:12]}"

    def verdict(self, model_input: str, output: Any, reference: Any, *, row: str) -> JudgeVerdict:
        """One graded row. Raises ScoringError: eval.judge_invalid_output (a reply that is not a score
        in [0, 1]), eval.judge_unavailable (the provider failed after retries), eval.model_not_found,
        eval.credentials_missing."""
        user = USER_TEMPLATE.format(input=_encode(model_input), output=_encode(output), reference=_encode(reference))
        failure: ScoringError | None = None
        try:
            reply = self.client.complete([{"role": "user", "content": user}], system=self.rubric,
                                         max_tokens=self.max_tokens)
        except ScoringError as exc:
            if exc.reason_code != PROVIDER_ERROR:
                raise
            failure = ScoringError(JUDGE_UNAVAILABLE, f"row {row}: the LLM judge {self.judge_id} could not be "
                                                      f"reached: {exc.message}")
        if failure is not None:
            raise failure
        return parse_verdict(reply.text, row=row)

    def score_rows(self, rows: Sequence[Mapping[str, Any]], outputs: Sequence[Any], *, kind: str) -> list[float]:
        """One score per row, in row order, of `outputs` against each row's gold answer. An output that
        could not be parsed (None) scores 0 without asking the judge."""
        if len(rows) != len(outputs):
            raise ValueError(f"{len(rows)} rows but {len(outputs)} outputs")

        def grade(i: int) -> float:
            if outputs[i] is None:
                return 0.0
            row = rows[i]
            return self.verdict(input_text(row), outputs[i], gold_of(row, kind), row=row_id(row)).score

        return map_in_order(grade, list(range(len(rows))), self.concurrency)
