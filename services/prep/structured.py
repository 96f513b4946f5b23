"""Cleaning for the shapes without a label (chat_messages, prompt_completion, json_extraction,
preference_pairs): the same steps as :func:`services.prep.clean.clean`, on every string a row's
training content holds.

1. normalise (:func:`~services.prep.clean.normalise`) every string value: message contents,
   prompt/completion, chosen/rejected, the extraction input text and the string values of its target
   JSON (at any depth). Roles, JSON keys and non-string values stay as they are here. A row with a required
   string left empty (any message content, prompt, completion, chosen, rejected, the extraction text)
   is dropped (``cleaning.empty_after_cleaning``): OpenAI rejects empty message contents.
2. PII (in the strings above and the target JSON's keys and integers: a card number held as a
   number is scrubbed to its placeholder string): one :class:`~services.prep.pii.Scrubber` (pass the same one for train and an explicit eval set:
   placeholders agree), placeholders numbered in row order, then in the row's string order. The share
   of rows with PII above ``pii_block_threshold`` raises ``cleaning.pii_block``, as for classification.
3. exact duplicates of the whole cleaned content (canonical JSON, roles and keys included):
   ``cleaning.exact_duplicate``. A preference pair whose chosen and rejected answers became equal
   teaches nothing: quality 0, ``cleaning.low_quality``.
4. the rest of :func:`~services.prep.clean.clean` (case-insensitive exact duplicates, quality,
   length outliers, near duplicates, synthetic cap) on a text key of the row: its strings joined, each
   prefixed by its role or field name (target leaves by their JSON path). System messages are left
   out of the key: a fixed system prompt shared by every conversation would otherwise make them all
   near duplicates of each other. So two conversations that differ only in their system prompt
   (the same exchange under two personas) share a key: the later one is dropped as a near duplicate
   (it would teach the same answers, and could sit on the other side of the split). Each kept row
   gets its ``quality``.

Every input row ends up kept or dropped with a reason code (asserted).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import asdict, replace
from typing import Any, Iterator

import orjson

from services.prep.clean import (CleaningPolicy, CleanResult, _drop, check_eval_overlap, check_pii_share, clean,
                                 normalise)
from services.prep.pii import KINDS, Scrubber, string_leaves, with_string_leaves

STRUCTURED_SHAPES = ("chat_messages", "prompt_completion", "json_extraction", "preference_pairs")
_FIELDS = {"prompt_completion": ("prompt", "completion"), "json_extraction": ("text",),
           "preference_pairs": ("prompt", "chosen", "rejected")}
_META = ("row_number", "provenance", "quality")


# ---------- a row's strings ----------

def row_strings(row: dict, shape: str, *, pii: bool = False) -> list[str]:
    """Every string of the row's training content, in a fixed order (roles and keys excluded).

    ``pii``: the strings to scrub, which for json_extraction also takes in the target's keys and
    integers (a card number stored as a number; :func:`~services.prep.pii.string_leaves`)."""
    if shape == "chat_messages":
        return [m["content"] for m in row["messages"]]
    out = [row[f] for f in _FIELDS[shape]]
    if shape == "json_extraction":
        out += list(string_leaves(row["target"], keys_and_integers=pii))
    return out


def with_strings(row: dict, shape: str, strings: list[str], *, pii: bool = False) -> dict:
    """``row`` with its content strings (in :func:`row_strings` order, same ``pii``) replaced by ``strings``."""
    it = iter(strings)
    new = dict(row)
    if shape == "chat_messages":
        new["messages"] = [dict(m, content=next(it)) for m in row["messages"]]
    else:
        for f in _FIELDS[shape]:
            new[f] = next(it)
        if shape == "json_extraction":
            new["target"] = with_string_leaves(row["target"], it, keys_and_integers=pii)
    return new


def _paths(v: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, f"{path}.{k}" if path else str(k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, f"{path}[{i}]")
    else:
        yield path, v


def content_text(row: dict, shape: str) -> str:
    """The text key of a row for dedup, quality, length outliers and near duplicates."""
    if shape == "chat_messages":
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in row["messages"] if m["role"] != "system")
    parts = [f"{f}: {row[f]}" for f in _FIELDS[shape]]
    if shape == "json_extraction":
        parts.append("\n".join(f"{p or '$'}: {v if isinstance(v, str) else orjson.dumps(v).decode()}"
                               for p, v in _paths(row["target"], "")))
    return "\n\n".join(parts)


def _empty_detail(row: dict, shape: str) -> str | None:
    if shape == "chat_messages":
        for i, m in enumerate(row["messages"]):
            if not m["content"]:
                return f"message {i} ({m['role']}) is empty after normalisation"
        return None
    for f in _FIELDS[shape]:
        if not row[f]:
            return f"{f} is empty after normalisation"
    return None


def _content_key(row: dict) -> bytes:
    content = {k: v for k, v in row.items() if k not in _META}
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).digest()


def exact_dedup_structured(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Drop exact repeats of the row's content (canonical JSON of everything but row_number,
    provenance and quality)."""
    seen: dict[bytes, int] = {}
    kept, dropped = [], []
    for r in rows:
        key = _content_key(r)
        if key in seen:
            dropped.append(_drop(r, "cleaning.exact_duplicate", "same content as an earlier row", seen[key]))
        else:
            seen[key] = r["row_number"]
            kept.append(r)
    return kept, dropped


# ---------- the stage ----------

def clean_structured(rows: list[dict], shape: str, policy: CleaningPolicy | None = None, *,
                     scrubber: Scrubber | None = None) -> CleanResult:
    """Clean structured rows (see the module docstring). Kept rows keep their layout, with cleaned
    strings and a ``quality``; dropped rows are ``{row_number, reason_code, detail, duplicate_of}``."""
    if shape not in STRUCTURED_SHAPES:
        raise ValueError(f"not a structured shape: {shape!r}")
    policy = policy or CleaningPolicy()
    scrubber = scrubber if scrubber is not None else Scrubber()
    timings: dict[str, float] = {}
    dropped: list[dict] = []

    def drop(row: dict, code: str, detail: str) -> None:
        dropped.append(_drop(row, code, detail))

    # 1. normalise every string; drop rows with a required string left empty
    t = time.perf_counter()
    live: list[dict] = []
    for r in rows:
        r2 = with_strings(r, shape, [normalise(s) for s in row_strings(r, shape)])
        why = _empty_detail(r2, shape)
        if why:
            drop(r, "cleaning.empty_after_cleaning", why)
        else:
            live.append(r2)
    n_live = len(live)  # rows with content, the base of the PII share
    timings["normalise"] = time.perf_counter() - t

    # 2. PII over all the strings at once, numbered in row order then string order
    t = time.perf_counter()
    pii_counts: Counter = Counter()
    rows_with_pii = 0
    if policy.pii_scrub and live:
        strings = [row_strings(r, shape, pii=True) for r in live]
        flat = [s for ss in strings for s in ss]
        changed = scrubber.scrub_changed(flat)
        if changed:
            pos = 0
            for k, ss in enumerate(strings):
                hits = [changed.get(pos + j) for j in range(len(ss))]
                pos += len(ss)
                if any(hits):
                    rows_with_pii += 1
                    for h in hits:
                        if h:
                            pii_counts.update(h.counts)
                    live[k] = with_strings(live[k], shape, [h.text if h else s for h, s in zip(hits, ss)], pii=True)
        check_pii_share(rows_with_pii, len(live), pii_counts, policy.pii_block_threshold)
    timings["pii"] = time.perf_counter() - t

    # 3. exact duplicates of the cleaned content; preference pairs with nothing left to prefer
    t = time.perf_counter()
    live, d = exact_dedup_structured(live)
    dropped += d
    if shape == "preference_pairs":
        rest = []
        for r in live:
            if r["chosen"] == r["rejected"]:
                drop(r, "cleaning.low_quality", "quality 0.00: chosen and rejected are the same after cleaning")
            else:
                rest.append(r)
        live = rest
    timings["exact_dedup"] = time.perf_counter() - t

    # 4. the classification cleaner on the rows' text keys (PII already done: not again)
    keyed = [{"row_number": r["row_number"], "text": content_text(r, shape), "label": "",
              "provenance": r.get("provenance", "human"), "_i": i} for i, r in enumerate(live)]
    res = clean(keyed, replace(policy, pii_scrub=False, pii_block_threshold=None))
    if shape == "chat_messages":  # equal keys, different system prompts: near duplicates, not exact ones
        system = {r["row_number"]: [m["content"] for m in r["messages"] if m["role"] == "system"] for r in live}
        for d in res.dropped:
            if d["reason_code"] == "cleaning.exact_duplicate" and system[d["row_number"]] != system.get(d["duplicate_of"]):
                d.update(reason_code="cleaning.near_duplicate",
                         detail="the same conversation as an earlier row but for its system prompt")
    dropped += res.dropped
    kept = [dict(live[k["_i"]], quality=k["quality"]) for k in res.kept]
    timings.update({f"clean.{k}": v for k, v in res.timings.items()})

    assert len(rows) == len(kept) + len(dropped), (len(rows), len(kept), len(dropped))
    stats = {k: v for k, v in res.stats.items() if k != "policy"}
    stats.update({
        "rows_in": len(rows),
        "kept": len(kept),
        "dropped": len(dropped),
        "dropped_by_reason": dict(sorted(Counter(x["reason_code"] for x in dropped).items())),
        "pii_checked": policy.pii_scrub,
        "pii_by_kind": {k: pii_counts.get(k, 0) for k in KINDS},
        "rows_with_pii": rows_with_pii,
        "pii_row_share": round(rows_with_pii / n_live, 5) if n_live else 0.0,
        "policy": asdict(policy),
    })
    return CleanResult(kept, dropped, stats, {k: round(v, 4) for k, v in timings.items()})


def check_eval_overlap_structured(train_rows: list[dict], eval_rows: list[dict], shape: str,
                                  policy: CleaningPolicy | None = None) -> tuple[list[dict], list[dict]]:
    """:func:`~services.prep.clean.check_eval_overlap` on the rows' text keys: drop train rows whose
    content equals or nearly equals an eval row's (``cleaning.eval_overlap``). Both sides cleaned
    already, with one scrubber. Returns (train kept, dropped)."""
    keyed = [{"row_number": r["row_number"], "text": content_text(r, shape), "_i": i} for i, r in enumerate(train_rows)]
    ev = [{"row_number": r["row_number"], "text": content_text(r, shape)} for r in eval_rows]
    kept, dropped = check_eval_overlap(keyed, ev, policy)
    return [train_rows[k["_i"]] for k in kept], dropped
