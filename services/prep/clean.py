"""The cleaning stage of prep: normalise, scrub PII, drop duplicates, conflicts, outliers, low-quality
rows and excess synthetic rows. No I/O. Every input row ends up either kept or dropped with a reason
code, and ``len(rows) == len(kept) + len(dropped)`` is asserted.

Order (each step sees only the rows the previous ones kept):

1. normalise: Unicode NFKC (non-ASCII rows only: NFKC leaves ASCII unchanged), CR/CRLF -> LF, control,
   zero-width and bidi-control characters removed, runs of spaces/tabs -> one space, spaces around
   line breaks removed, 3+ line breaks -> one blank line (paragraphs kept), stripped.
   Nothing left -> ``cleaning.empty_after_cleaning``.
2. PII: :class:`services.prep.pii.Scrubber` (placeholders consistent over the dataset). The share of
   rows with PII above ``pii_block_threshold`` raises :class:`CleaningBlocked` (``cleaning.pii_block``).
3. exact duplicates on the casefolded, whitespace-insensitive normalised text: same label -> keep the
   first (``cleaning.exact_duplicate``), several labels -> drop every copy (``cleaning.conflicting_labels``).
4. quality (``cleaning.low_quality``) and length outliers (``cleaning.length_outlier``); the share of
   outliers above ``outlier_block_threshold`` raises ``cleaning.outlier_threshold_exceeded``.
5. near duplicates (:mod:`services.prep.neardup`): keep the first (``cleaning.near_duplicate``).
6. synthetic cap: synthetic rows are dropped in a seeded order until they are at most
   ``synthetic_cap`` of the kept rows (``cleaning.synthetic_cap``).

Quality (0..1) is the product of three factors, each 1 for ordinary prose:
  length = min(1, words / 8)                       (a 2-word text scores 0.25)
  letters = clamp((letters / non-space chars - 0.2) / 0.3)   (>= 50% letters: 1; <= 20%: 0)
  repetition = 1 - clamp((duplicate-line share - 0.3) / 0.7) (over 30% repeated lines costs)
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from services.prep.neardup import DEFAULT_THRESHOLD, NearDupIndex
from services.prep.pii import KINDS, Scrubber

PROVENANCES = ("human", "synthetic", "production_sample")
MIN_LOG_MAD = 0.25


@dataclass(frozen=True)
class CleaningPolicy:
    pii_scrub: bool = True  # False: no detection, no scrubbing, no PII block
    # 25%: the JIRA bug reports (logs with IPs, mailing-list quotes) have 2.9% of rows with PII;
    # a customer-ticket set with an email in every signature would reach 100% and must be looked at.
    pii_block_threshold: float | None = 0.25
    near_dup: bool = True
    near_dup_threshold: float = DEFAULT_THRESHOLD
    quality_threshold: float = 0.2
    outlier_sides: Literal["both", "high", "low", "none"] = "both"
    outlier_z: float = 3.5  # robust z on log(characters): 0.6745 (x - median) / MAD  (Iglewicz & Hoaglin)
    # JIRA: 0.4% outliers. 5% means the length distribution has a second mode (truncated exports,
    # concatenated logs) worth a look before training.
    outlier_block_threshold: float | None = 0.05
    synthetic_cap: float = 0.30
    seed: int = 0


class CleaningBlocked(Exception):
    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message


@dataclass
class CleanResult:
    kept: list[dict]
    dropped: list[dict]  # {row_number, reason_code, detail, duplicate_of}
    stats: dict
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step


# ---------- normalisation ----------

_REMOVE = {c: None for c in list(range(0, 9)) + [11, 12] + list(range(14, 32)) + [127]}
_REMOVE_WIDE = dict(_REMOVE)
_REMOVE_WIDE.update({c: None for c in range(0x80, 0xA0)})  # C1 controls
_REMOVE_WIDE.update({c: None for c in (0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x00AD)})  # zero-width, soft hyphen
_REMOVE_WIDE.update({c: None for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F)})  # bidi
_CTRL_BYTES = bytes(c for c in _REMOVE)
# whitespace other than " \n\t\r" (``[^\S \n\t\r]``, spelled out: a negated class scans ~3x slower);
# every Unicode whitespace character is in the BMP
_ODD_SPACE = re.compile("[%s]" % "".join(re.escape(chr(c)) for c in range(0x10000)
                                         if chr(c).isspace() and chr(c) not in " \n\t\r"))
_WIDE_RE = re.compile("[%s]" % "".join(re.escape(chr(c)) for c in sorted(_REMOVE_WIDE)))
_SPACE_RUN = re.compile("  +")
_BREAK_RUN = re.compile("\n\n\n+")
_WIDE_OR_ODD = re.compile(_WIDE_RE.pattern[:-1] + _ODD_SPACE.pattern[1:])


def normalise(text: str) -> str:
    if text.isascii():
        b = text.encode()
        if len(b.translate(None, _CTRL_BYTES)) != len(b):
            text = text.translate(_REMOVE)
    else:
        text = unicodedata.normalize("NFKC", text)
        if _WIDE_OR_ODD.search(text):  # rare: one C-level scan instead of a per-character translate
            text = _WIDE_RE.sub("", text)
            if not text.isascii() and _ODD_SPACE.search(text):
                text = _ODD_SPACE.sub(lambda m: "\n" if m.group() in "\u2028\u2029\x85" else " ", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # str.replace/`in` run at C speed; a regex is used only where it starts with a literal run
    if "\t" in text:
        text = text.replace("\t", " ")
    if "  " in text:  # one regex pass beats repeated str.replace on space runs (2x on the JIRA rows)
        text = _SPACE_RUN.sub(" ", text)
    if " \n" in text:
        text = text.replace(" \n", "\n")
    if "\n " in text:
        text = text.replace("\n ", "\n")
    if "\n\n\n" in text:
        text = _BREAK_RUN.sub("\n\n", text)
    return text.strip()


def dedup_key(text: str) -> str:
    """Casefolded, whitespace-insensitive key of a normalised text (exact duplicates share it)."""
    t = text.lower() if text.isascii() else text.casefold()
    return t.replace("\n\n", "\n").replace("\n", " ")


# ---------- quality ----------

_LETTERS = bytes(range(ord("a"), ord("z") + 1)) + bytes(range(ord("A"), ord("Z") + 1))
_NON_LETTER_RE = re.compile(r"[\W\d_]+")


def quality(text: str) -> float:
    n = len(text)
    if not n:
        return 0.0
    spaces = text.count(" ") + text.count("\n")
    words = spaces - text.count("\n\n") + 1
    if text.isascii():
        letters = n - len(text.encode().translate(None, _LETTERS))
    else:
        letters = len(_NON_LETTER_RE.sub("", text))
    alpha = letters / max(1, n - spaces)
    q = min(1.0, words / 8) * min(1.0, max(0.0, (alpha - 0.2) / 0.3))
    if "\n" in text:
        lines = text.split("\n")
        n_lines = len(lines) - lines.count("")  # non-empty lines
        if n_lines >= 4:
            distinct = set(lines)
            distinct.discard("")
            dup = 1 - len(distinct) / n_lines
            q *= 1 - min(1.0, max(0.0, (dup - 0.3) / 0.7))
    return round(q, 4)


# ---------- the stage ----------

def _drop(row: dict, code: str, detail: str, duplicate_of: int | None = None) -> dict:
    return {"row_number": row["row_number"], "reason_code": code, "detail": detail, "duplicate_of": duplicate_of}


def clean(rows: list[dict], policy: CleaningPolicy | None = None, *, scrubber: Scrubber | None = None) -> CleanResult:
    """Clean ``rows`` (dicts with row_number, text, label, optional provenance; other keys pass through).

    Pass the same ``scrubber`` to calls whose outputs must share placeholders (train and an explicit
    eval set)."""
    policy = policy or CleaningPolicy()
    scrubber = scrubber if scrubber is not None else Scrubber()
    timings: dict[str, float] = {}
    dropped: list[dict] = []
    by_reason: Counter = Counter()

    def drop(row: dict, code: str, detail: str, duplicate_of: int | None = None) -> None:
        dropped.append(_drop(row, code, detail, duplicate_of))
        by_reason[code] += 1

    t = time.perf_counter()
    live: list[tuple[dict, str]] = []
    for r in rows:
        text = normalise(r.get("text") or "")
        if text:
            live.append((r, text))
        else:
            drop(r, "cleaning.empty_after_cleaning", "no text left after normalisation")
    timings["normalise"] = time.perf_counter() - t

    t = time.perf_counter()
    pii_counts: Counter = Counter()
    rows_with_pii = 0
    if policy.pii_scrub and live:
        for i, res in scrubber.scrub_changed([text for _, text in live]).items():
            rows_with_pii += 1
            pii_counts.update(res.counts)
            live[i] = (live[i][0], res.text)
        share = rows_with_pii / len(live)
        if policy.pii_block_threshold is not None and share > policy.pii_block_threshold:
            raise CleaningBlocked("cleaning.pii_block", (
                f"{share:.1%} of rows ({rows_with_pii} of {len(live)}) carry PII "
                f"({', '.join(f'{k}: {v}' for k, v in sorted(pii_counts.items()))}), above the threshold "
                f"of {policy.pii_block_threshold:.1%}"))
    timings["pii"] = time.perf_counter() - t

    t = time.perf_counter()
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (_, text) in enumerate(live):
        groups[dedup_key(text)].append(i)
    keep_idx = []
    conflicted = set()
    for idxs in groups.values():
        first = live[idxs[0]][0]
        labels = {live[i][0]["label"] for i in idxs}
        if len(labels) > 1:
            shown = ", ".join(sorted(map(str, labels))[:5])
            for i in idxs:
                drop(live[i][0], "cleaning.conflicting_labels",
                     f"the same text appears {len(idxs)} times under labels {shown}",
                     first["row_number"] if i != idxs[0] else None)
                conflicted.add(i)
            continue
        keep_idx.append(idxs[0])
        for i in idxs[1:]:
            drop(live[i][0], "cleaning.exact_duplicate", "same normalised text and label as an earlier row",
                 first["row_number"])
    keep_idx.sort()
    live = [live[i] for i in keep_idx]
    timings["exact_dedup"] = time.perf_counter() - t

    t = time.perf_counter()
    qualities = [quality(text) for _, text in live]
    outlier_share = 0.0
    flags = [False] * len(live)
    if policy.outlier_sides != "none" and len(live) >= 20:
        logs = np.log(np.fromiter((len(text) for _, text in live), dtype=np.float64, count=len(live)))
        med = float(np.median(logs))
        # A floor on the spread: when lengths are nearly uniform (templated data) the MAD collapses and a
        # text 20% longer than the median would count as an outlier. With the floor, z > 3.5 needs at
        # least ~3.7x (or 1/3.7) the median length. (Lead's change while integrating prep.)
        mad = max(float(np.median(np.abs(logs - med))), MIN_LOG_MAD)
        if mad > 0:
            z = 0.6745 * (logs - med) / mad
            hi = z > policy.outlier_z if policy.outlier_sides in ("both", "high") else np.zeros(len(z), bool)
            lo = z < -policy.outlier_z if policy.outlier_sides in ("both", "low") else np.zeros(len(z), bool)
            flags = (hi | lo).tolist()
            outlier_share = float(np.mean(hi | lo))
            bounds = (math.exp(med - policy.outlier_z * mad / 0.6745), math.exp(med + policy.outlier_z * mad / 0.6745))
        if policy.outlier_block_threshold is not None and outlier_share > policy.outlier_block_threshold:
            raise CleaningBlocked("cleaning.outlier_threshold_exceeded", (
                f"{outlier_share:.1%} of rows are length outliers (robust z beyond {policy.outlier_z} on log "
                f"length, sides: {policy.outlier_sides}), above the threshold of {policy.outlier_block_threshold:.1%}"))
    nxt = []
    for (r, text), q, out in zip(live, qualities, flags):
        if out:
            drop(r, "cleaning.length_outlier",
                 f"{len(text)} characters, outside {bounds[0]:.0f}..{bounds[1]:.0f} (robust z > {policy.outlier_z})")
        elif q < policy.quality_threshold:
            drop(r, "cleaning.low_quality", f"quality {q:.2f} below {policy.quality_threshold}")
        else:
            nxt.append((r, text, q))
    timings["quality_outliers"] = time.perf_counter() - t

    t = time.perf_counter()
    if policy.near_dup and nxt:
        index = NearDupIndex(policy.near_dup_threshold, seed=policy.seed)
        matches = index.add_many(list(range(len(nxt))), [text for _, text, _ in nxt])
        survivors = []
        for (r, text, q), m in zip(nxt, matches):
            if m is None:
                survivors.append((r, text, q))
                continue
            other = nxt[m.key][0]
            same = other["label"] == r["label"]
            drop(r, "cleaning.near_duplicate",
                 f"estimated Jaccard {m.similarity:.2f} with row {other['row_number']}"
                 + ("" if same else f" (labelled {other['label']!r}, this row {r['label']!r})"),
                 other["row_number"])
        nxt = survivors
    timings["near_dup"] = time.perf_counter() - t

    t = time.perf_counter()
    synthetic = [i for i, (r, _, _) in enumerate(nxt) if r.get("provenance", "human") == "synthetic"]
    n_other = len(nxt) - len(synthetic)
    allowed = len(synthetic) if policy.synthetic_cap >= 1 else int(policy.synthetic_cap * n_other / (1 - policy.synthetic_cap) + 1e-9)
    if len(synthetic) > allowed:
        def rank(i: int) -> bytes:
            return hashlib.blake2b(f"{policy.seed}:{nxt[i][0]['row_number']}".encode(), digest_size=8).digest()
        cut = set(sorted(synthetic, key=rank)[allowed:])
        for i in sorted(cut):
            drop(nxt[i][0], "cleaning.synthetic_cap",
                 f"{len(synthetic)} synthetic rows over {n_other} others; cap {policy.synthetic_cap:.0%} allows {allowed}")
        nxt = [x for i, x in enumerate(nxt) if i not in cut]
    kept = []
    for r, text, q in nxt:
        row = dict(r)
        row["text"] = text
        row["quality"] = q
        row["text_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        kept.append(row)
    timings["finish"] = time.perf_counter() - t

    assert len(rows) == len(kept) + len(dropped), (len(rows), len(kept), len(dropped))
    hist = np.histogram([r["quality"] for r in kept], bins=10, range=(0.0, 1.0))[0].tolist()
    n_live = len(rows) - by_reason["cleaning.empty_after_cleaning"]
    stats = {
        "rows_in": len(rows),
        "kept": len(kept),
        "dropped": len(dropped),
        "dropped_by_reason": dict(sorted(by_reason.items())),
        "pii_checked": policy.pii_scrub,
        "pii_by_kind": {k: pii_counts.get(k, 0) for k in KINDS},
        "rows_with_pii": rows_with_pii,
        "pii_row_share": round(rows_with_pii / n_live, 5) if n_live else 0.0,
        "outlier_share": round(outlier_share, 5),
        "quality_histogram": {"bins": [round(i / 10, 1) for i in range(11)], "counts": hist},
        "synthetic_kept": sum(1 for r in kept if r.get("provenance") == "synthetic"),
        "policy": asdict(policy),
    }
    return CleanResult(kept, dropped, stats, {k: round(v, 4) for k, v in timings.items()})


def check_eval_overlap(train_rows: list[dict], eval_rows: list[dict], policy: CleaningPolicy | None = None
                       ) -> tuple[list[dict], list[dict]]:
    """Drop train rows that equal (dedup key) or nearly equal (near-dup index) an eval row.

    Both sides should be cleaned already, with one shared scrubber. Returns (train kept, dropped)."""
    policy = policy or CleaningPolicy()
    eval_keys = {dedup_key(r["text"]): r["row_number"] for r in reversed(eval_rows)}
    kept, dropped, rest = [], [], []
    for r in train_rows:
        hit = eval_keys.get(dedup_key(r["text"]))
        if hit is not None:
            dropped.append(_drop(r, "cleaning.eval_overlap", "same normalised text as an eval row", hit))
        else:
            rest.append(r)
    if policy.near_dup and rest and eval_rows:
        index = NearDupIndex(policy.near_dup_threshold, seed=policy.seed)
        # an eval row that nearly duplicates an earlier one is not indexed: its representative is
        index.add_many([r["row_number"] for r in eval_rows], [r["text"] for r in eval_rows])
        matches = index.query_many([r["text"] for r in rest])
        for r, m in zip(rest, matches):
            if m is None:
                kept.append(r)
            else:
                dropped.append(_drop(r, "cleaning.eval_overlap",
                                     f"estimated Jaccard {m.similarity:.2f} with eval row {m.key}", m.key))
    else:
        kept = rest
    assert len(train_rows) == len(kept) + len(dropped)
    return kept, dropped
