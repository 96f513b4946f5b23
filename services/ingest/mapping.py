"""Apply a field mapping to source records: every record becomes an accepted row or a rejected row
with a registered reason code. read = accepted + rejected, always (asserted where counts are made).

Accepted rows by shape:
- classification: {"row_number", "text", "label", "provenance", ["heads"], ["tags"]}
- chat_messages: {"row_number", "messages", "provenance"}; messages are {role, content} with role
  system, user or assistant; ShareGPT messages ({from, value}, from human/user, gpt/assistant/bot,
  system) are normalised to {role, content}. Tool/function messages reject the row (see _messages).
- prompt_completion: {"row_number", "prompt", "completion", "provenance"}
  The prompt is the mapping's `prompt` field, or, for instruction-tuning (Alpaca-style) sources,
  the mapping's `text` fields joined with a blank line in the order given, empty ones left out:
  `text=["instruction", "input"]` gives "instruction\n\ninput", or just the instruction when the
  input is empty. (FieldMapping.prompt is one field name; `text` is the contract's list of fields
  joined with a blank line, so it carries the multi-field prompt without a contract change.)
- json_extraction: {"row_number", "text", "target", "provenance"}
- preference_pairs: {"row_number", "prompt", "chosen", "rejected", "provenance"}
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from contracts.common import CLASSIFICATION_SHAPES, FieldMapping
from services.ingest.sources.base import MAX_RAW_KEPT, SourceRecord

DEFAULT_MAX_TEXT_CHARS = 200_000
PROVENANCES = ("human", "synthetic", "production_sample")
CHAT_ROLES = ("system", "user", "assistant")
# ShareGPT's `from` values -> the {role, content} role they stand for
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "system": "system"}


class MappingError(ValueError):
    """The mapping itself is wrong for this source (not one row): `ingest.mapping_invalid`."""

    reason_code = "ingest.mapping_invalid"


@dataclass(frozen=True, slots=True)
class RejectedRow:
    row_number: int
    offset: int
    raw: str
    reason_code: str
    detail: str

    def as_json(self) -> dict:
        return {"row_number": self.row_number, "source_offset": self.offset, "raw": self.raw,
                "reason_code": self.reason_code, "detail": self.detail}


@dataclass
class MappingCounts:
    rows_read: int = 0
    rows_accepted: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    def check(self) -> None:
        if self.rows_read != self.rows_accepted + self.rows_rejected:
            raise AssertionError(f"row accounting broken: read {self.rows_read} != accepted {self.rows_accepted}"
                                 f" + rejected {self.rows_rejected}")


def check_mapping(mapping: FieldMapping) -> None:
    """A mapping must name what its shape needs."""
    need = {
        "single_label_classification": ("text", "label"),
        "multi_field_triage": ("text", "label"),
        "chat_messages": ("messages",),
        "prompt_completion": ("prompt", "completion"),
        "json_extraction": ("text", "target"),
        "preference_pairs": ("prompt", "chosen", "rejected"),
    }[mapping.shape]
    if mapping.shape == "prompt_completion":
        if mapping.prompt and mapping.text:
            raise MappingError("a prompt_completion mapping names its prompt either as prompt (one field) or as "
                               "text (fields joined with a blank line), not both")
        if mapping.text:
            need = ("completion",)
    missing = [n for n in need if not getattr(mapping, n)]
    if missing:
        raise MappingError(f"a {mapping.shape} mapping needs {', '.join(missing)}")


def check_fields_present(mapping: FieldMapping, columns: Iterable[str]) -> None:
    """Refuse a mapping that names columns a source with a fixed schema (CSV header, query) lacks."""
    cols = set(columns)
    if not cols:
        return
    absent = [f for f in mapping.source_fields() if f not in cols]
    if absent:
        shown = ", ".join(sorted(cols)[:30]).replace("\x00", "")  # the message goes into an event
        raise MappingError(f"the mapping names field(s) the source does not have: {', '.join(absent)} "
                           f"(columns: {shown})")


def _absent(v: Any) -> bool:
    """No value: None, or a float NaN (how pandas and numpy mark a missing value; json.dumps writes
    it as NaN, and str() would make it the text "nan")."""
    return v is None or (type(v) is float and v != v)


class _Reject(Exception):
    def __init__(self, code: str, detail: str):
        self.code, self.detail = code, detail


def _string(obj: dict, name: str, *, required: bool = True) -> str | None:
    if name not in obj or _absent(obj[name]):
        if required:
            raise _Reject("ingest.missing_field", f"missing field {name!r}")
        return None
    v = obj[name]
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise _Reject("ingest.invalid_value", f"field {name!r} is a {type(v).__name__}, not text")


def _label_value(obj: dict, name: str, label_space: frozenset[str] | None) -> str:
    if name not in obj or _absent(obj[name]):
        raise _Reject("ingest.missing_field", f"missing label field {name!r}")
    v = obj[name]
    if isinstance(v, list):  # a list-valued field used as a single label needs exactly one value
        if not v:
            raise _Reject("ingest.missing_field", f"label field {name!r} is an empty list")
        if len(v) != 1:
            raise _Reject("ingest.invalid_label", f"label field {name!r} holds {len(v)} values; a single label needs one")
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise _Reject("ingest.invalid_label", f"label field {name!r} must be a non-empty string or integer")
    label = str(v).strip()
    if not label:
        raise _Reject("ingest.invalid_label", f"label field {name!r} is empty")
    if "\x00" in label:  # a label travels in events, and PostgreSQL cannot store a NUL character
        raise _Reject("ingest.invalid_label", f"label field {name!r} holds a NUL character")
    if label_space is not None and label not in label_space:
        raise _Reject("ingest.label_outside_space", f"label {label[:80]!r} is not in the label space")
    return label


def _head_value(v: Any) -> str | list[str] | None:
    """A triage head: a scalar, a list of values, or nothing (heads may be empty, e.g. no component)."""
    if _absent(v) or v == "" or v == []:
        return None
    if isinstance(v, list):
        vals = [str(x).strip() for x in v if not _absent(x) and str(x).strip()]
        return vals[0] if len(vals) == 1 else (vals or None)
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        return str(v).strip() or None
    raise _Reject("ingest.invalid_value", f"a triage field holds a {type(v).__name__}")


def _tags(v: Any) -> list[str]:
    if _absent(v):
        return []
    if isinstance(v, str):
        return [t.strip() for t in v.split(",") if t.strip()]
    if isinstance(v, list) and all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in v):
        return [str(t).strip() for t in v if str(t).strip()]
    raise _Reject("ingest.invalid_value", "tags must be a list of strings or a comma-separated string")


def _message(i: int, m: Any) -> dict:
    """One message as {role, content}: the OpenAI form as it stands, or the ShareGPT form normalised."""
    if isinstance(m, dict):
        if "role" in m or "content" in m:
            role, content = m.get("role"), m.get("content")
        elif "from" in m or "value" in m:
            sender, content = m.get("from"), m.get("value")
            role = SHAREGPT_ROLES.get(sender.strip().lower(), sender) if isinstance(sender, str) else sender
        else:
            role = content = None
        if isinstance(role, str) and isinstance(content, str):
            if role in CHAT_ROLES:
                return {"role": role, "content": content}
            raise _Reject("ingest.invalid_value",
                          f"message {i} has role {role[:40]!r}; only system, user and assistant turns are supported")
    raise _Reject("ingest.invalid_value", f"message {i} is not a {{role, content}} (or ShareGPT {{from, value}}) object "
                                          "with a known role")


def _messages(v: Any) -> list[dict]:
    """A conversation as a list of {role, content} with role system, user or assistant.

    A conversation holding any other role (tool, function, ShareGPT's function_call/observation) is
    a rejected row (ingest.invalid_value, the detail names the role), not kept with the turn dropped
    nor kept as it is: ingest keeps only role and content, so a tool message would arrive without its
    tool_call_id and after an assistant turn without tool_calls, which OpenAI's fine-tuning format
    rejects; dropping just the tool turn would teach answers built on results the model never saw.
    Rejecting at ingest (rather than leaving such rows out of prep's OpenAI file only) keeps every
    backend on the same rows and makes the loss visible per row, with its reason, in the ingest
    counts and rejected rows.
    """
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError as exc:
            raise _Reject("ingest.invalid_value", f"messages is a string that is not JSON: {exc}") from None
    if not isinstance(v, list) or not v:
        raise _Reject("ingest.invalid_value", "messages must be a non-empty list of {role, content}")
    out = [_message(i, m) for i, m in enumerate(v)]
    if out[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in out):
        raise _Reject("ingest.invalid_value", "a training conversation needs a user turn and must end with an assistant turn")
    return out


class RowMapper:
    """Maps one parsed source record to a row; built once per mapping so the per-row path is lean."""

    def __init__(self, mapping: FieldMapping, *, default_provenance: str = "human",
                 max_text_chars: int = DEFAULT_MAX_TEXT_CHARS):
        check_mapping(mapping)
        self.mapping = mapping
        self.default_provenance = default_provenance
        self.max_text_chars = max_text_chars
        self.label_space = frozenset(mapping.label_space) if mapping.label_space else None
        self.classification = mapping.shape in CLASSIFICATION_SHAPES
        self._text_fields = tuple(mapping.text or ())
        self._heads = tuple(mapping.heads.items()) if mapping.heads else ()

    def _text(self, obj: dict, what: str = "text") -> str:
        # str values (nearly all) take the short way; anything else goes through _string, which
        # converts numbers and rejects the rest exactly as before
        fields = self._text_fields
        if len(fields) == 1:
            text = obj.get(fields[0])
            if type(text) is not str:
                text = _string(obj, fields[0]) or ""
        else:
            parts = []
            present = False
            for n in fields:
                v = obj.get(n)
                if _absent(v):
                    continue
                present = True
                if type(v) is not str:
                    v = _string(obj, n)
                v = v.strip()
                if v:
                    parts.append(v)
            if not present:
                raise _Reject("ingest.missing_field", f"none of the {what} fields {', '.join(fields)} is present")
            text = "\n\n".join(parts)
        text = text.strip()
        if not text:
            raise _Reject("ingest.empty_text", f"{what} ({'+'.join(fields)}) is empty")
        if len(text) > self.max_text_chars:
            raise _Reject("ingest.text_too_long", f"{what} has {len(text)} characters; the limit is {self.max_text_chars}")
        return text

    def _provenance(self, obj: dict) -> str:
        if not self.mapping.provenance:
            return self.default_provenance
        v = obj.get(self.mapping.provenance)
        if _absent(v) or v == "":
            return self.default_provenance
        v = str(v).strip().lower()
        if v not in PROVENANCES:
            raise _Reject("ingest.invalid_value", f"provenance {v[:40]!r} is not one of {', '.join(PROVENANCES)}")
        return v

    def map(self, obj: dict, row_number: int) -> dict:
        m = self.mapping
        if self.classification:
            label = obj.get(m.label)
            if type(label) is str and self.label_space is None and (label := label.strip()) and "\x00" not in label:
                row = {"row_number": row_number, "text": self._text(obj), "label": label}
            else:
                row = {"row_number": row_number, "text": self._text(obj), "label": _label_value(obj, m.label, self.label_space)}
            if self._heads:
                heads = {}
                for name, src in self._heads:
                    v = obj.get(src)
                    if type(v) is str:
                        heads[name] = v.strip() or None
                    else:
                        heads[name] = _head_value(v)
                row["heads"] = heads
            if m.tags:
                v = obj.get(m.tags)
                row["tags"] = [] if _absent(v) or (type(v) is list and not v) else _tags(v)
        elif m.shape == "chat_messages":
            if _absent(obj.get(m.messages)):
                raise _Reject("ingest.missing_field", f"missing field {m.messages!r}")
            row = {"row_number": row_number, "messages": _messages(obj[m.messages])}
        elif m.shape == "prompt_completion":
            if self._text_fields:  # instruction-tuning: e.g. instruction + input, joined with a blank line
                row = {"row_number": row_number, "prompt": self._text(obj, "prompt"),
                       "completion": _string(obj, m.completion)}
            else:
                row = {"row_number": row_number, "prompt": _string(obj, m.prompt), "completion": _string(obj, m.completion)}
            if not row["prompt"].strip() or not row["completion"].strip():
                raise _Reject("ingest.empty_text", "prompt or completion is empty")
        elif m.shape == "json_extraction":
            target = obj.get(m.target)
            if isinstance(target, str):
                try:
                    target = json.loads(target)
                except ValueError:
                    raise _Reject("ingest.invalid_value", f"field {m.target!r} is not JSON") from None
            if not isinstance(target, dict):
                raise _Reject("ingest.invalid_value" if not _absent(target) else "ingest.missing_field",
                              f"field {m.target!r} must hold a JSON object")
            row = {"row_number": row_number, "text": self._text(obj), "target": target}
        else:  # preference_pairs
            row = {"row_number": row_number, "prompt": _string(obj, m.prompt), "chosen": _string(obj, m.chosen),
                   "rejected": _string(obj, m.rejected)}
            if row["chosen"] == row["rejected"]:
                raise _Reject("ingest.invalid_value", "chosen and rejected answers are identical")
        row["provenance"] = self._provenance(obj)
        return row

    def apply(self, record: SourceRecord) -> dict | RejectedRow:
        if record.error is not None:
            return RejectedRow(record.row_number, record.offset, record.raw, *record.error)
        try:
            return self.map(record.fields, record.row_number)
        except _Reject as r:
            return RejectedRow(record.row_number, record.offset, record.raw[:MAX_RAW_KEPT], r.code, r.detail)


def map_records(records: Iterable[SourceRecord], mapper: RowMapper,
                counts: MappingCounts) -> Iterator[dict | RejectedRow]:
    """Stream mapped rows and rejected rows, counting as it goes (constant memory)."""
    for rec in records:
        counts.rows_read += 1
        out = mapper.apply(rec)
        if type(out) is RejectedRow:
            counts.rejected_by_reason[out.reason_code] += 1
        else:
            counts.rows_accepted += 1
        yield out


def map_lines(lines: Iterable[tuple[int, int, bytes, dict | None, tuple[str, str] | None]], raw_text: Callable[[bytes], str],
              mapper: RowMapper, counts: MappingCounts) -> Iterator[dict | RejectedRow]:
    """:func:`map_records` over a source's ``load_lines()`` (records with the line's bytes in place of
    the raw text): the same rows, rejections and counts; ``raw_text(line)`` is called for rejected
    rows only."""
    map_row = mapper.map
    rejected = counts.rejected_by_reason
    for row_number, offset, line, fields, error in lines:
        counts.rows_read += 1
        if error is None:
            try:
                out = map_row(fields, row_number)
            except _Reject as r:
                out = RejectedRow(row_number, offset, raw_text(line)[:MAX_RAW_KEPT], r.code, r.detail)
                rejected[r.code] += 1
                yield out
                continue
            counts.rows_accepted += 1
            yield out
        else:
            out = RejectedRow(row_number, offset, raw_text(line), *error)
            rejected[out.reason_code] += 1
            yield out
