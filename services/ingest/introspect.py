"""Introspection: from ~20 sample rows, rank shape hypotheses and propose a field mapping with a
confidence and a rationale. A proposal is picked automatically only at 0.80 or above.

The evidence is deliberately simple and stated in each rationale: field names (a `label`, a `title`
and a `body`, a `priority`), value shapes (long free text, short repeated values, lists of
{role, content} or ShareGPT's {from, value}), presence in the sample. Confidences are scores on a fixed scale, not probabilities;
the thresholds below are what makes a proposal auto-pickable, and the tests pin them on real data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from contracts.common import FieldMapping
from contracts.events import ShapeHypothesis
from services.ingest.mapping import SHAREGPT_ROLES

AUTO_PICK = 0.80
SAMPLE_SIZE = 20
WIDER_SAMPLE_SIZE = 400  # rows for telling a label (values repeat) from an id (one value per row)

LABEL_NAMES = ("label", "labels_id", "class", "category", "intent", "target", "y", "tag", "topic", "sentiment", "type")
SEVERITY_NAMES = ("priority", "severity", "urgency", "impact")
CATEGORY_NAMES = ("category", "project", "type", "issue_type", "kind", "queue", "team", "intent", "repo", "product")
COMPONENT_NAMES = ("component", "components", "module", "area", "subsystem")
TAG_NAMES = ("tags", "labels", "keywords")
TITLE_NAMES = ("title", "summary", "subject", "headline", "question_title")
BODY_NAMES = ("body", "description", "text", "content", "message", "utterance", "query", "question", "comment",
              "sentence", "review", "document", "input")
PROMPT_NAMES = ("prompt", "instruction", "input", "question", "query")  # in order of preference
INSTRUCTION_NAMES = ("instruction",)
CONTEXT_NAMES = ("input", "context")  # the optional input that follows an instruction (Alpaca, Dolly)
SHAREGPT_FROM = frozenset(SHAREGPT_ROLES)
COMPLETION_NAMES = ("completion", "response", "output", "answer", "target_text")
ID_LIKE = re.compile(r"(^id$|_id$|^key$|^uuid$|^created|^updated|_at$|^date|^timestamp|^url$|^split$)")


@dataclass
class FieldStats:
    name: str
    present: int = 0
    strings: int = 0
    numbers: int = 0
    lists: int = 0
    dicts: int = 0
    list_of_str: int = 0
    chat_like: int = 0        # a list of {role, content} or of ShareGPT {from, value}
    sharegpt_like: int = 0    # of which a list of ShareGPT {from, value} with from human/gpt/...
    json_object_strings: int = 0
    total_len: int = 0
    max_words: int = 0
    values: list[str] = field(default_factory=list)

    @property
    def mean_len(self) -> float:
        return self.total_len / self.strings if self.strings else 0.0

    @property
    def distinct(self) -> int:
        return len(set(self.values))

    def is_const(self) -> bool:
        return self.present > 1 and self.distinct == 1


def field_stats(rows: list[dict]) -> dict[str, FieldStats]:
    stats: dict[str, FieldStats] = {}
    for row in rows:
        for name, v in row.items():
            s = stats.setdefault(name, FieldStats(name))
            if v is None or v == "":
                continue
            s.present += 1
            if isinstance(v, str):
                s.strings += 1
                s.total_len += len(v)
                s.max_words = max(s.max_words, len(v.split()))
                s.values.append(v[:200])
                if v[:1] == "{" and v.rstrip()[-1:] == "}":
                    try:
                        s.json_object_strings += isinstance(json.loads(v), dict)
                    except ValueError:
                        pass
            elif isinstance(v, bool):
                s.values.append(str(v))
            elif isinstance(v, (int, float)):
                s.numbers += 1
                s.values.append(str(v))
            elif isinstance(v, list):
                s.lists += 1
                if all(isinstance(x, str) for x in v):
                    s.list_of_str += 1
                    s.values.append("|".join(sorted(v))[:200])
                if v and all(isinstance(x, dict) and "role" in x and "content" in x for x in v):
                    s.chat_like += 1
                elif v and all(isinstance(x, dict) and isinstance(x.get("from"), str) and "value" in x
                               and x["from"].strip().lower() in SHAREGPT_FROM for x in v):
                    s.chat_like += 1
                    s.sharegpt_like += 1
            elif isinstance(v, dict):
                s.dicts += 1
    return stats


def _named(name: str, names: Iterable[str]) -> bool:
    n = name.lower().strip()
    return n in names or n.rstrip("s") in names


def _is_free_text(s: FieldStats, n: int) -> bool:
    return s.strings >= max(1, 0.6 * n) and (s.mean_len >= 25 or s.max_words >= 6)


def _is_label_like(s: FieldStats, n: int) -> bool:
    """Short values that repeat, or a name that says label; not free text, not an id or a date."""
    named = _named(s.name, LABEL_NAMES + SEVERITY_NAMES + CATEGORY_NAMES)
    if ID_LIKE.search(s.name.lower()) or s.present < max(1, 0.6 * n) or s.dicts:
        return False
    if s.is_const() and not named:  # a constant is no label, unless the sample is just unlucky
        return False
    if s.lists and not s.list_of_str:
        return False
    short = s.mean_len <= 40 and s.max_words <= 6
    repeats = s.distinct <= max(2, int(0.75 * s.present))
    return (s.strings or s.numbers or s.list_of_str) > 0 and short and (repeats or named)


def _all_distinct(s: FieldStats, wider: list[dict] | None) -> bool:
    """(Nearly) one value per row: a label repeats. Judged on `wider`, a bigger sample of the same
    source, when there is one (20 rows of a 77-class label are 20 distinct values too)."""
    if wider and len(wider) > s.present:
        values = [repr(r[s.name]) for r in wider if r.get(s.name) is not None]
        present, distinct = len(values), len(set(values))
    else:
        present, distinct = s.present, s.distinct
    return present >= 10 and distinct >= 0.9 * present


def _pick_text(stats: dict[str, FieldStats], n: int) -> tuple[list[str], str]:
    free = [s for s in stats.values() if _is_free_text(s, n) and not ID_LIKE.search(s.name.lower())]
    if not free:
        return [], "no field holds free text"
    # A title is short by nature: named like one and mostly present is enough.
    titles = [s for s in stats.values() if _named(s.name, TITLE_NAMES) and s.strings >= max(1, 0.6 * n)]
    bodies = [s for s in free if _named(s.name, BODY_NAMES) and s not in titles]
    if titles and bodies:
        return [titles[0].name, bodies[0].name], f"{titles[0].name!r} reads as a title and {bodies[0].name!r} as its body"
    best = bodies[0] if bodies else max(free, key=lambda s: s.mean_len)
    why = "named like text" if bodies else "the longest free text"
    return [best.name], f"{best.name!r} is {why} (mean {best.mean_len:.0f} chars)"


def _find(stats, n, names, pred) -> FieldStats | None:
    """The first field, in the order of `names` (not of the file's columns), named like one of them."""
    for name in names:
        for s in stats.values():
            if _named(s.name, (name,)) and pred(s, n):
                return s
    return None


def _classification(stats: dict[str, FieldStats], n: int, wider: list[dict] | None = None) -> list[ShapeHypothesis]:
    text, text_why = _pick_text(stats, n)
    if not text:
        return [ShapeHypothesis(shape="single_label_classification", confidence=0.05,
                                mapping=FieldMapping(), rationale=text_why)]
    labels = [s for s in stats.values() if s.name not in text and _is_label_like(s, n)]
    if not labels:
        return [ShapeHypothesis(shape="single_label_classification", confidence=0.2,
                                mapping=FieldMapping(text=text), rationale=f"{text_why}; but no field looks like a label")]
    severity = next((s for s in labels if _named(s.name, SEVERITY_NAMES)), None)
    category = next((s for s in labels if _named(s.name, CATEGORY_NAMES) and not s.lists), None)
    component = next((s for s in labels if _named(s.name, COMPONENT_NAMES)), None)
    tags = _find(stats, n, TAG_NAMES, lambda s, n: s.list_of_str > 0 and s.name not in text) \
        or next((s for s in labels if _named(s.name, TAG_NAMES) and s.lists), None)
    # Among fields named like a label: `label` itself, else the one with the most distinct values
    # (bitext has `category` and the finer `intent`).
    named = [s for s in labels if _named(s.name, LABEL_NAMES) and not s.lists]
    named_label = next((s for s in named if s.name.lower() == "label"), None) or \
        max(named, key=lambda s: s.distinct, default=None)
    scalar = [s for s in labels if not s.lists]
    out = []

    # Single label: the field named like a label, else the only scalar label-like field.
    primary = named_label or severity or category or min(scalar, key=lambda s: s.distinct, default=None)
    if primary is not None:
        conf = 0.55 + 0.15 * (len(text) > 0) + 0.2 * (primary is named_label) + 0.1 * (len(scalar) == 1)
        others = [s.name for s in scalar if s is not primary]
        if others:
            conf -= 0.05 * min(len(others), 2)
        if primary.is_const():
            conf -= 0.2
        unique = _all_distinct(primary, wider)
        if unique:
            conf = min(conf, 0.3)
        why = (f"{text_why}; {primary.name!r} has {primary.distinct} distinct short values in {primary.present} rows"
               + (" and is named like a label" if primary is named_label else "")
               + (" (about one value per row: an id or free text, not a label, which repeats across rows)" if unique else "")
               + (f"; other label-like fields: {', '.join(others)}" if others else ""))
        out.append(ShapeHypothesis(shape="single_label_classification", confidence=round(min(conf, 0.95), 2),
                                   mapping=FieldMapping(shape="single_label_classification", text=text, label=primary.name),
                                   rationale=why))

    # Triage: at least two of category / severity / component / tags.
    heads = {}
    if category is not None:
        heads["category"] = category.name
    if severity is not None:
        heads["severity"] = severity.name
    if component is not None:
        heads["component"] = component.name
    roles = len(heads) + (tags is not None)
    if roles >= 2:
        lead = severity or category or component
        conf = 0.6 + 0.08 * roles + (0.05 if len(text) == 2 else 0)
        why = (f"{text_why}; triage fields: " + ", ".join(f"{k}={v!r}" for k, v in heads.items())
               + (f", tags={tags.name!r}" if tags else "") + f"; {lead.name!r} is the primary label")
        out.append(ShapeHypothesis(
            shape="multi_field_triage", confidence=round(min(conf, 0.95), 2),
            mapping=FieldMapping(shape="multi_field_triage", text=text, label=lead.name, heads=heads,
                                 tags=tags.name if tags else None),
            rationale=why))
    return out


def _other_shapes(stats: dict[str, FieldStats], n: int) -> list[ShapeHypothesis]:
    out = []
    chat = next((s for s in stats.values() if s.chat_like >= max(1, 0.6 * n)), None)
    if chat and chat.sharegpt_like * 2 > chat.chat_like:
        chat_why = (f"{chat.name!r} holds ShareGPT-style lists of {{from, value}} (from human/gpt/system), "
                    "read as chat messages with from normalised to role (human -> user, gpt -> assistant)")
    elif chat:
        chat_why = f"{chat.name!r} holds lists of {{role, content}}"
    else:
        chat_why = "no field holds lists of {role, content} or ShareGPT {from, value}"
    out.append(ShapeHypothesis(
        shape="chat_messages", confidence=0.95 if chat else 0.0,
        mapping=FieldMapping(shape="chat_messages", messages=chat.name) if chat else FieldMapping(shape="chat_messages"),
        rationale=chat_why))

    chosen = _find(stats, n, ("chosen",), lambda s, n: s.strings > 0)
    rejected = _find(stats, n, ("rejected",), lambda s, n: s.strings > 0)
    prompt = _find(stats, n, PROMPT_NAMES, lambda s, n: s.strings > 0)
    if chosen and rejected:
        out.append(ShapeHypothesis(
            shape="preference_pairs", confidence=0.9 if prompt else 0.6,
            mapping=FieldMapping(shape="preference_pairs", prompt=prompt.name if prompt else None,
                                 chosen=chosen.name, rejected=rejected.name),
            rationale=f"fields {chosen.name!r} and {rejected.name!r}" + (f" with prompt {prompt.name!r}" if prompt else ", but no prompt field")))
    else:
        out.append(ShapeHypothesis(shape="preference_pairs", confidence=0.0, mapping=FieldMapping(shape="preference_pairs"),
                                   rationale="no chosen/rejected fields"))

    completion = _find(stats, n, COMPLETION_NAMES, lambda s, n: s.strings >= max(1, 0.6 * n))
    instruction = _find(stats, n, INSTRUCTION_NAMES, lambda s, n: s.strings >= max(1, 0.6 * n))
    # the input is often empty: being a text field in the sample at all is enough
    context = _find(stats, n, CONTEXT_NAMES, lambda s, n: s.strings or not (s.present or s.lists or s.dicts))
    if instruction and context and completion and len({instruction.name, context.name, completion.name}) == 3:
        # Instruction tuning (Alpaca-style): the prompt is the instruction and its input, so the input
        # is not lost; FieldMapping.text carries the prompt's fields (see services/ingest/mapping.py).
        conf = 0.9 if completion.mean_len >= 20 else 0.6
        out.append(ShapeHypothesis(
            shape="prompt_completion", confidence=conf,
            mapping=FieldMapping(shape="prompt_completion", text=[instruction.name, context.name],
                                 completion=completion.name),
            rationale=f"{instruction.name!r}, {context.name!r} and {completion.name!r} read as instruction tuning: "
                      f"the prompt is {instruction.name!r} followed by {context.name!r} after a blank line "
                      f"(left out when empty), the completion is {completion.name!r} "
                      f"(mean {completion.mean_len:.0f} chars)"))
    elif prompt and completion and prompt.name != completion.name:
        conf = 0.88 if (completion.mean_len >= 20) else 0.6
        out.append(ShapeHypothesis(
            shape="prompt_completion", confidence=conf,
            mapping=FieldMapping(shape="prompt_completion", prompt=prompt.name, completion=completion.name),
            rationale=f"{prompt.name!r} reads as a prompt and {completion.name!r} as its completion "
                      f"(mean {completion.mean_len:.0f} chars)"
                      + (" (instruction tuning with no input field)" if prompt is instruction else "")))
    else:
        out.append(ShapeHypothesis(shape="prompt_completion", confidence=0.0, mapping=FieldMapping(shape="prompt_completion"),
                                   rationale="no prompt/completion pair of fields"))

    target = next((s for s in stats.values() if (s.dicts + s.json_object_strings) >= max(1, 0.6 * n)), None)
    text, text_why = _pick_text({k: v for k, v in stats.items() if not target or k != target.name}, n)
    if target and text:
        out.append(ShapeHypothesis(
            shape="json_extraction", confidence=0.82,
            mapping=FieldMapping(shape="json_extraction", text=text, target=target.name),
            rationale=f"{text_why}; {target.name!r} holds JSON objects to extract"))
    else:
        out.append(ShapeHypothesis(shape="json_extraction", confidence=0.0, mapping=FieldMapping(shape="json_extraction"),
                                   rationale="no field holds JSON objects next to a text"))
    return out


def spread_sample(records: Iterable, size: int = SAMPLE_SIZE, scan: int = 100_000) -> list:
    """About `size` items spread evenly over the first `scan` items, in constant memory.

    Files are often sorted by label (the first 2,000 rows of the bitext file share one category), so
    the head of a file is a poor sample. Systematic sampling with a doubling stride: keep every
    stride-th item; when 2 x size are kept, drop every other one and double the stride.
    """
    kept: list = []
    stride = 1
    for i, r in enumerate(records):
        if i >= scan:
            break
        if i % stride == 0:
            kept.append(r)
            if len(kept) >= 2 * size:
                kept = kept[::2]
                stride *= 2
    if len(kept) <= size:
        return kept
    step = len(kept) / size
    return [kept[int(i * step)] for i in range(size)]


def introspect(rows: list[dict[str, Any]], wider: list[dict[str, Any]] | None = None) -> list[ShapeHypothesis]:
    """Ranked hypotheses for a sample of parsed rows, best first (every shape appears once at least).
    `wider`, a bigger sample of the same source, tells a label from a field with one value per row."""
    n = len(rows)
    if n == 0:
        return []
    stats = field_stats(rows)
    hyps = _classification(stats, n, wider) + _other_shapes(stats, n)
    # A chat or preference source is not a classification source even if it has a label-like field.
    strong_other = max((h.confidence for h in hyps if h.shape not in ("single_label_classification", "multi_field_triage")),
                       default=0.0)
    if strong_other >= 0.9:
        hyps = [h if h.shape not in ("single_label_classification", "multi_field_triage")
                else h.model_copy(update={"confidence": round(min(h.confidence, 0.5), 2)}) for h in hyps]
    seen, ranked = set(), []
    for h in sorted(hyps, key=lambda h: -h.confidence):
        if h.shape not in seen:
            seen.add(h.shape)
            ranked.append(h)
    return ranked


def choose(hypotheses: list[ShapeHypothesis], *, force: bool = False) -> ShapeHypothesis | None:
    """The best hypothesis if it may be picked: at least AUTO_PICK, or any usable one with force."""
    if not hypotheses:
        return None
    best = hypotheses[0]
    if best.confidence >= AUTO_PICK or (force and best.confidence > 0):
        return best
    return None
