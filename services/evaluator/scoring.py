"""Per-row evidence (D16): what a model answered on each test row, how correct each field is, and the
rubric judge's score; pure functions over rows and outputs, no models and no I/O.

A row's output is what the model answered, parsed: a label (single-label), a list of tags
(multi-label), a dict of fields (triage, JSON extraction), or None when the answer could not be
parsed (it scores 0 everywhere). Field scores are in [0, 1]: 1/0 for a label or a head, the Jaccard
overlap for a tag set. A triage row's field with no gold value (no component) is not scored.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Rows of these shapes are scored field by field; `label` is the lead field of every classification row.
LABEL_FIELD = "label"
TAGS_FIELD = "tags"


@dataclass(frozen=True)
class Scored:
    """One model's answers on the test rows, in row order, with what each cost."""

    model: str                       # "candidate", "classical:tfidf-logreg", "prompt:gpt-4o-mini", "production:v3"
    outputs: list[Any]
    latency_ms: list[float]
    tokens: list[int | None] = field(default_factory=list)
    compute_s: float = 0.0           # wall seconds the scoring took (local models: priced per hour)
    usd: float | None = None         # hosted: what the calls cost, from the provider's price table

    def __post_init__(self):
        if len(self.latency_ms) != len(self.outputs):
            raise ValueError(f"{self.model}: {len(self.outputs)} outputs but {len(self.latency_ms)} latencies")
        if self.tokens and len(self.tokens) != len(self.outputs):
            raise ValueError(f"{self.model}: {len(self.outputs)} outputs but {len(self.tokens)} token counts")


def row_id(row: Mapping[str, Any]) -> str:
    """The row's stable id: prep's `row_id` when it gave one, else a hash of its content."""
    rid = row.get("row_id")
    if isinstance(rid, str) and rid:
        return rid
    return hashlib.sha256(input_text(row).encode()).hexdigest()[:16]


def input_text(row: Mapping[str, Any]) -> str:
    """What the model reads: the text of a classification row, the rendered prompt of the others."""
    if "text" in row:
        return str(row["text"])
    if "prompt" in row:
        return str(row["prompt"])
    if "messages" in row:
        return json.dumps([m for m in row["messages"] if m.get("role") != "assistant"], sort_keys=True)
    return json.dumps(row, sort_keys=True)


def input_sha256(row: Mapping[str, Any]) -> str:
    return hashlib.sha256(input_text(row).encode()).hexdigest()


def gold_of(row: Mapping[str, Any], kind: str) -> Any:
    """The reference answer in the same form as a model's output."""
    if kind == "multi_label":
        return sorted(row.get(TAGS_FIELD) or [])
    if kind == "triage":
        return {LABEL_FIELD: row.get(LABEL_FIELD), **(row.get("heads") or {}),
                **({TAGS_FIELD: sorted(row.get(TAGS_FIELD) or [])} if TAGS_FIELD in row else {})}
    if kind == "json":
        return row.get("target")
    if kind == "text":
        if "completion" in row:
            return str(row["completion"])
        answers = [m.get("content") for m in row.get("messages") or [] if m.get("role") == "assistant"]
        return str(answers[-1]) if answers else None
    return row.get(LABEL_FIELD)


def _normalised(text: Any) -> str:
    return " ".join(str(text).split()).casefold()


def _jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    sa, sb = set(a), set(b)
    return 1.0 if not sa and not sb else len(sa & sb) / len(sa | sb)


def field_scores(gold: Any, output: Any, kind: str) -> dict[str, float]:
    """Per-field correctness of `output` against `gold`, each in [0, 1]."""
    if kind == "single_label":
        return {LABEL_FIELD: float(output is not None and output == gold)}
    if kind == "multi_label":
        return {TAGS_FIELD: _jaccard(gold, output) if isinstance(output, list) else 0.0}
    if kind == "text":  # free text: the rubric can only check an exact answer (an LLM judge grades meaning)
        return {"answer": float(output is not None and gold is not None and _normalised(output) == _normalised(gold))}
    # triage heads and JSON extraction: every gold field, compared one by one
    gold = gold if isinstance(gold, Mapping) else {}
    out = output if isinstance(output, Mapping) else {}
    scores = {}
    for name, want in gold.items():
        if want is None and kind == "triage":
            continue  # an unlabelled field (no component) is no class: nothing judges it, as in triage_report
        got = out.get(name)
        if isinstance(want, list):
            scores[name] = _jaccard(want, got) if isinstance(got, list) else 0.0
        else:
            scores[name] = float(name in out and got == want)
    return scores


def rubric_score(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The rubric judge: the weighted mean of the field scores (a field without a weight weighs 1;
    a weighted field the row lacks is not counted)."""
    if not scores:
        return 0.0
    total = sum(weights.get(f, 1.0) for f in scores)
    if total <= 0:
        raise ValueError(f"rubric weights {dict(weights)} give the fields {sorted(scores)} no weight")
    return sum(weights.get(f, 1.0) * s for f, s in scores.items()) / total


def rubric_judge_id(weights: Mapping[str, float]) -> str:
    blob = json.dumps(dict(sorted(weights.items())), sort_keys=True).encode()
    return f"rubric:{hashlib.sha256(blob).hexdigest()[:12]}"


def buckets_of(row: Mapping[str, Any], kind: str, bucket_fields: Sequence[str]) -> dict[str, str]:
    """The buckets a row belongs to: its class (single-label), and each declared field's value."""
    out: dict[str, str] = {}
    if kind in ("single_label", "triage") and row.get(LABEL_FIELD) is not None:
        out["class"] = str(row[LABEL_FIELD])
    heads = row.get("heads") or {}
    for f in bucket_fields:
        v = heads.get(f, row.get(f))
        if v is not None and not isinstance(v, (list, dict)):
            out[f] = str(v)
    return out


def wrong_output(gold: Any, kind: str, label_space: Sequence[str], values: Mapping[str, Sequence[Any]] | None = None) -> Any:
    """A known-wrong answer for `gold` (the judge's validation): another label, a tag set sharing no
    tag, every field changed; free text gets another row's answer (`values["answer"]`)."""
    if kind == "text":
        others = [v for v in (values or {}).get("answer", []) if v != gold]
        return others[0] if others else ""
    if kind == "single_label":
        others = [lab for lab in label_space if lab != gold]
        return others[0] if others else None
    if kind == "multi_label":
        return [lab for lab in label_space if lab not in set(gold)][:1]
    gold = gold if isinstance(gold, Mapping) else {}
    wrong = {}
    for name, want in gold.items():
        choices = [v for v in (values or {}).get(name, []) if v != want]
        if isinstance(want, list):
            wrong[name] = ["(none)"] if want else ["(wrong)"]
        else:
            wrong[name] = choices[0] if choices else f"(not {want})"
    return wrong


def percentile(values: Sequence[float], q: float) -> float | None:
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    if not finite:
        return None
    # nearest-rank on the sorted values: a latency that was measured, not interpolated
    k = max(0, min(len(finite) - 1, math.ceil(q / 100 * len(finite)) - 1))
    return finite[k]
