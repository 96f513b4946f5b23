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

Prep then drops train rows overlapping the test set (:func:`check_eval_overlap`) and, with
``min_per_class``, the rows of labels rarer than that (:func:`drop_rare_labels`, ``cleaning.rare_label``).

Speed: what each row needs on its own (normalised text, PII spans, quality, the dedup key's
signature, sha256, near-dup sketch) is computed first, in one pass over the rows, on two processes
when the rows are large enough and two CPUs are there (:mod:`services.common.parallel`: the second
half of the rows in a forked child); placeholders are then numbered in row order, and the steps
above run on those results in one process. The output does not depend on the split.

Quality (0..1) is the product of three factors, each 1 for ordinary prose:
  length = min(1, words / 8)                       (a 2-word text scores 0.25)
  letters = clamp((letters / non-space chars - 0.2) / 0.3)   (>= 50% letters: 1; <= 20%: 0)
  repetition = 1 - clamp((duplicate-line share - 0.3) / 0.7) (over 30% repeated lines costs)
"""

from __future__ import annotations

import hashlib
import math
import mmap
import re
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

import numpy as np

from contracts.errors import ReasonCodedError
from services.common.jsonl import gc_paused
from services.prep.neardup import DEFAULT_THRESHOLD, NearDupIndex, Sketch
from services.common.parallel import split_run, workers
from services.prep.pii import KINDS, Scrubber, find_changed

PROVENANCES = ("human", "synthetic", "production_sample")
# The spread of log(characters) is taken as at least this: with 3.5 for the robust z, a text is an
# outlier only at 8x (or 1/8) the median length or beyond. Short texts have a long right tail even in
# logs: at 0.25 (3.7x), 8 of 300 ordinary banking queries of 200-241 characters (median 47) were dropped.
MIN_LOG_MAD = 0.4


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
    min_per_class: int | None = None  # prep drops labels with fewer rows (drop_rare_labels); None: none
    seed: int = 0


class CleaningBlocked(ReasonCodedError):
    """Cleaning refused the dataset as a whole (the PII policy's block, too many outliers)."""


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
_NON_LETTER_RE = re.compile(r"[\W\d_]+")  # letters: what is left
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
# Letters of scripts written without spaces between words (CJK ideographs, kana, Thai, Lao, Khmer,
# Myanmar): a space count would see a whole sentence as one word.
_UNSPACED_RE = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]")


def quality(text: str) -> float:
    n = len(text)
    if not n:
        return 0.0
    spaces = text.count(" ") + text.count("\n")
    words = spaces - text.count("\n\n") + 1
    if text.isascii():
        letters = n - len(text.encode().translate(None, _LETTERS))
    else:  # ASCII letters by translate, the rest by the regex over the non-ASCII characters only
        ascii_part = text.encode("ascii", "ignore")
        letters = len(ascii_part) - len(ascii_part.translate(None, _LETTERS))
        beyond = "".join(_NON_ASCII_RUN.findall(text))
        letters += len(_NON_LETTER_RE.sub("", beyond))
        words += len(_UNSPACED_RE.findall(beyond)) // 2  # scripts written without spaces: ~2 characters a word
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


_QUALITY_CHUNK = 256 << 10  # characters per vectorised batch (cache-sized: malloc reuses the arrays)


def key_signature(text: str) -> tuple[int, int, int] | str:
    """A function of :func:`dedup_key` (so rows with equal keys have equal signatures) that is cheap
    to get from character counts when the key is ASCII: (length, letters, spaces) of the key. A
    non-ASCII key is its own signature (no ASCII key can equal it)."""
    k = dedup_key(text)
    if not k.isascii():
        return k
    return len(k), len(k) - len(k.encode().translate(None, _LETTERS)), k.count(" ")


def quality_many(texts: Sequence[str]) -> list[float]:
    """``[quality(t) for t in texts]``, with the character counts of ASCII texts taken in numpy batches."""
    return _row_stats(texts)[0]


def _row_stats(texts: Sequence[str], encoded: Sequence[bytes] | None = None) -> tuple[list[float], list]:
    """``([quality(t) ...], [key_signature(t) ...])`` (None for an empty text), the counts of ASCII
    texts taken in numpy batches. Same arithmetic in the same order (float64 either way), the same
    ``round``; a text whose line structure the batch counts do not capture (empty, leading or
    trailing line break, 3+ line breaks in a row: never so after :func:`normalise`) goes through
    :func:`quality` and :func:`key_signature` themselves. ``encoded``: the texts' UTF-8, if at hand."""
    quals: list = [None] * len(texts)
    sigs: list = [None] * len(texts)
    batch: list[int] = []
    size = 0
    for i, t in enumerate(texts):
        if not t or not t.isascii():
            quals[i] = quality(t)
            if t:
                sigs[i] = key_signature(t)
            continue
        batch.append(i)
        size += len(t) + 1
        if size >= _QUALITY_CHUNK:
            _stats_batch(texts, batch, quals, sigs, encoded)
            batch, size = [], 0
    if batch:
        _stats_batch(texts, batch, quals, sigs, encoded)
    return quals, sigs


def _stats_batch(texts: Sequence[str], idx: list[int], quals: list, sigs: list,
                 encoded: Sequence[bytes] | None) -> None:
    enc = [texts[i].encode() for i in idx] if encoded is None else [encoded[i] for i in idx]
    buf = b"\x00".join(enc) + b"\x00"  # separators count as nothing and break every line-break run
    arr = np.frombuffer(buf, dtype=np.uint8)
    n = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
    starts = np.zeros(len(enc), dtype=np.int64)
    np.cumsum(n[:-1] + 1, out=starts[1:])
    ends = starts + n
    lower = arr | 0x20
    lower -= 97
    letters = np.add.reduceat(lower < 26, starts, dtype=np.int64)  # [A-Za-z]
    nl_mask = arr == 10
    n_nl = np.add.reduceat(nl_mask, starts, dtype=np.int64)
    spaces = np.add.reduceat(arr == 32, starts, dtype=np.int64) + n_nl
    pair = np.zeros(len(arr), dtype=bool)
    np.logical_and(nl_mask[:-1], nl_mask[1:], out=pair[:-1])
    pairs = np.add.reduceat(pair, starts, dtype=np.int64)
    odd = nl_mask[starts] | nl_mask[ends - 1]  # a leading or trailing line break: empty lines at the ends
    triple = np.zeros(len(arr), dtype=bool)
    np.logical_and(pair[:-2], nl_mask[2:], out=triple[:-2])
    if triple.any():  # "\n\n\n": str.count("\n\n") does not count overlapping pairs
        odd |= np.add.reduceat(triple, starts, dtype=np.int64) > 0
    words = spaces - pairs + 1
    alpha = letters / np.maximum(1, n - spaces)
    q = np.minimum(1.0, words / 8) * np.minimum(1.0, np.maximum(0.0, (alpha - 0.2) / 0.3))
    n_lines = n_nl + 1 - pairs  # non-empty lines
    # the key (lowercase; "\n\n" and "\n" -> " ") is pairs shorter, has as many letters, and a space
    # for every space and every line-break run
    key_len, key_spaces = (n - pairs).tolist(), (spaces - pairs).tolist()
    for k, (i, qk, lines_k, nl_k, odd_k, let_k) in enumerate(zip(
            idx, q.tolist(), n_lines.tolist(), n_nl.tolist(), odd.tolist(), letters.tolist())):
        if odd_k:
            quals[i] = quality(texts[i])
            sigs[i] = key_signature(texts[i])
            continue
        if nl_k and lines_k >= 4:
            distinct = set(enc[k].split(b"\n"))  # ASCII: the lines' bytes are as distinct as the lines
            distinct.discard(b"")
            dup = 1 - len(distinct) / lines_k
            qk *= 1 - min(1.0, max(0.0, (dup - 0.3) / 0.7))
        quals[i] = round(qk, 4)
        sigs[i] = (key_len[k], let_k, key_spaces[k])


# ---------- the stage ----------

def check_pii_share(rows_with_pii: int, rows: int, pii_counts: Counter, threshold: float | None) -> None:
    """Raise cleaning.pii_block when the share of rows carrying PII is above the threshold."""
    share = rows_with_pii / rows
    if threshold is not None and share > threshold:
        raise CleaningBlocked("cleaning.pii_block", (
            f"{share:.1%} of rows ({rows_with_pii} of {rows}) carry PII "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(pii_counts.items()))}), above the threshold of {threshold:.1%}"))


def _drop(row: dict, code: str, detail: str, duplicate_of: int | None = None) -> dict:
    return {"row_number": row["row_number"], "reason_code": code, "detail": detail, "duplicate_of": duplicate_of}


# A second process takes part in the per-row work above this many characters (the fork, the child's
# copy-on-write faults, passing its results back and merging them cost ~0.1 s on the JIRA rows).
PARALLEL_MIN_CHARS = 4_000_000
# This process's share of the characters: the child has copy-on-write faults and pickles its results.
_PARENT_SHARE = 0.54


def _per_row(texts: Sequence[str], pii: bool, sketcher: NearDupIndex | None,
             sketch_out: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """What each row needs on its own, for one slice of the rows: the normalised text (None where it
    equals the input), the PII spans found in it, and, for rows without PII, its dedup key's
    signature, its quality, its sha256 and its near-dup sketch (a row with PII gets those once its
    placeholders are numbered, in row order, by the caller). Pure: it may run in a forked child.
    With ``sketch_out`` (shared memory), signatures and band keys go there, not into the result."""
    timings = {}
    t = time.perf_counter()
    norm = [normalise(x) for x in texts]
    timings["normalise"] = time.perf_counter() - t
    t = time.perf_counter()
    enc = [x.encode() for x in norm]  # once, for every step below
    spans = find_changed(norm, enc) if pii else {}
    timings["pii_search"] = time.perf_counter() - t
    t = time.perf_counter()
    if spans:
        plain = [("" if i in spans else x) for i, x in enumerate(norm)]
        enc = [(b"" if i in spans else e) for i, e in enumerate(enc)]
    else:
        plain = norm
    sha256 = hashlib.sha256
    digests = [sha256(e).digest() for e in enc]
    timings["sha256"] = time.perf_counter() - t
    t = time.perf_counter()
    qual, keysig = _row_stats(plain, enc)
    timings["quality_keys"] = time.perf_counter() - t
    t = time.perf_counter()
    sketch = None
    if sketcher is not None:
        if sketch_out is None:
            sketch = sketcher.sketch(plain, encoded=enc)
        else:
            sketch = sketcher.sketch(plain, sigs=sketch_out[0], band_keys=sketch_out[1], encoded=enc)._replace(
                sigs=None, band_keys=None)
    timings["sketch"] = time.perf_counter() - t
    return {"norm": [None if a is b else a for a, b in zip(norm, texts)], "spans": spans, "keysig": keysig,
            "qual": qual, "sha": digests, "sketch": sketch, "timings": timings}


def _per_row_all(texts: list[str], pii: bool, sketcher: NearDupIndex | None) -> dict:
    """:func:`_per_row` over all rows; the last ~46% of the characters in a forked child when it pays."""
    total = sum(map(len, texts))
    if total < PARALLEL_MIN_CHARS or len(texts) < 2 or workers() < 2:
        return _per_row(texts, pii, sketcher)
    n = len(texts)
    half, acc, mid = total * _PARENT_SHARE, 0, n - 1
    for i, x in enumerate(texts):
        acc += len(x)
        if acc >= half:
            mid = i + 1
            break
    sigs = keys = None
    if sketcher is not None:  # both processes write their sketches straight into shared memory
        perm, bands = sketcher.num_perm, sketcher.bands
        shm = mmap.mmap(-1, n * (perm + bands) * 8)
        sigs = np.frombuffer(shm, dtype=np.uint64, count=n * perm).reshape(n, perm)
        keys = np.frombuffer(shm, dtype=np.uint64, count=n * bands, offset=n * perm * 8).reshape(n, bands)

    def part(bounds: tuple[int, int]) -> dict:
        lo, hi = bounds
        return _per_row(texts[lo:hi], pii, sketcher, (sigs[lo:hi], keys[lo:hi]) if sigs is not None else None)

    # the child's result (changed texts, spans, signatures, qualities, hashes) in shared memory:
    # room for its texts four times over (pages it does not write are never allocated)
    a, b = split_run(part, (0, mid), (mid, n), True, result_bytes=4 * (total - acc) + 256 * (n - mid) + (1 << 20))
    sketch = None
    if sketcher is not None:
        sketch = Sketch(sigs, np.concatenate([a["sketch"].lens, b["sketch"].lens]),
                        np.concatenate([a["sketch"].has, b["sketch"].has]), keys)
    out = {"norm": a["norm"] + b["norm"], "keysig": a["keysig"] + b["keysig"], "qual": a["qual"] + b["qual"],
           "sha": a["sha"] + b["sha"], "spans": a["spans"] | {i + mid: s for i, s in b["spans"].items()},
           "sketch": sketch, "timings": {k: a["timings"][k] + b["timings"][k] for k in a["timings"]}}
    return out


def clean(rows: list[dict], policy: CleaningPolicy | None = None, *, scrubber: Scrubber | None = None) -> CleanResult:
    """Clean ``rows`` (dicts with row_number, text, label, optional provenance; other keys pass through).

    Pass the same ``scrubber`` to calls whose outputs must share placeholders (train and an explicit
    eval set)."""
    policy = policy or CleaningPolicy()
    scrubber = scrubber if scrubber is not None else Scrubber()
    with gc_paused():
        return _clean(rows, policy, scrubber)


def _clean(rows: list[dict], policy: CleaningPolicy, scrubber: Scrubber) -> CleanResult:
    timings: dict[str, float] = {}
    dropped: list[dict] = []
    by_reason: Counter = Counter()

    def drop(row: dict, code: str, detail: str, duplicate_of: int | None = None) -> None:
        dropped.append(_drop(row, code, detail, duplicate_of))
        by_reason[code] += 1

    # 1. per row (normalisation, PII search, keys, quality, sketches), over two processes when large;
    # the steps below work on row indices into these lists
    t = time.perf_counter()
    texts = [r.get("text") or "" for r in rows]
    sketcher = None
    if policy.near_dup:
        try:
            sketcher = NearDupIndex(policy.near_dup_threshold, seed=policy.seed)
        except ValueError:
            sketcher = None  # an invalid threshold raises where the index is built, below
    pr = _per_row_all(texts, policy.pii_scrub, sketcher)
    norm: list[str] = [x if x is not None else y for x, y in zip(pr["norm"], texts)]
    keysig, qual, digests, sketch, spans = pr["keysig"], pr["qual"], pr["sha"], pr["sketch"], pr["spans"]
    live: list[int] = []
    for i, x in enumerate(norm):
        if x:
            live.append(i)
        else:
            drop(rows[i], "cleaning.empty_after_cleaning", "no text left after normalisation")
    timings["per_row"] = time.perf_counter() - t
    timings.update({f"per_row.{k}": v for k, v in pr["timings"].items()})  # summed over the processes

    # 2. PII: placeholders numbered in row order, as one Scrubber.scrub_changed call would
    t = time.perf_counter()
    pii_counts: Counter = Counter()
    rows_with_pii = 0
    if policy.pii_scrub and live:
        changed = sorted(spans)
        for i in changed:
            res = scrubber.apply(norm[i], spans[i])
            rows_with_pii += 1
            pii_counts.update(res.counts)
            norm[i] = res.text
        check_pii_share(rows_with_pii, len(live), pii_counts, policy.pii_block_threshold)
        if changed:  # what the per-row step left to the scrubbed texts
            scrubbed = [norm[i] for i in changed]
            for i, q, sig, x in zip(changed, *_row_stats(scrubbed), scrubbed):
                qual[i], keysig[i] = q, sig
                digests[i] = hashlib.sha256(x.encode()).digest()
        if changed and sketch is not None:
            sub = sketcher.sketch([norm[i] for i in changed])
            for arr, part in zip(sketch, sub):
                arr[changed] = part
    timings["pii"] = time.perf_counter() - t

    # 3. exact duplicates. Rows are told apart by their key's signature; only rows that share one
    # (equal keys, or a chance) are told apart by the key itself.
    t = time.perf_counter()
    by_sig: dict = {}
    for i in live:
        g = by_sig.get(keysig[i])
        if g is None:
            by_sig[keysig[i]] = i
        elif g.__class__ is int:
            by_sig[keysig[i]] = [g, i]
        else:
            g.append(i)
    need_key = set()
    for g in by_sig.values():
        if g.__class__ is list:
            need_key.update(g)
    groups: dict = {}  # the rows of each distinct key, in order of first appearance (as by key)
    for i in live:
        ident = dedup_key(norm[i]) if i in need_key else (keysig[i],)
        g = groups.get(ident)
        if g is None:
            groups[ident] = [i]
        else:
            g.append(i)
    keep_idx = []
    for idxs in groups.values():
        if len(idxs) == 1:
            keep_idx.append(idxs[0])
            continue
        first = rows[idxs[0]]
        labels = {rows[i]["label"] for i in idxs}
        if len(labels) > 1:
            shown = ", ".join(sorted(map(str, labels))[:5])
            for i in idxs:
                drop(rows[i], "cleaning.conflicting_labels",
                     f"the same text appears {len(idxs)} times under labels {shown}",
                     first["row_number"] if i != idxs[0] else None)
            continue
        keep_idx.append(idxs[0])
        for i in idxs[1:]:
            drop(rows[i], "cleaning.exact_duplicate", "same normalised text and label as an earlier row",
                 first["row_number"])
    keep_idx.sort()
    live = keep_idx
    timings["exact_dedup"] = time.perf_counter() - t

    t = time.perf_counter()
    qualities = [qual[i] for i in live]
    outlier_share = 0.0
    flags = [False] * len(live)
    if policy.outlier_sides != "none" and len(live) >= 20:
        logs = np.log(np.fromiter((len(norm[i]) for i in live), dtype=np.float64, count=len(live)))
        med = float(np.median(logs))
        # A floor on the spread (MIN_LOG_MAD): when lengths are nearly uniform (templated data) or short,
        # the MAD collapses and ordinary variation would count as outliers. With the floor, z > 3.5
        # needs at least 8x (or 1/8) the median length.
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
    nxt: list[tuple[int, float]] = []
    threshold = policy.quality_threshold
    for i, q, out in zip(live, qualities, flags):
        if out:
            drop(rows[i], "cleaning.length_outlier",
                 f"{len(norm[i])} characters, outside {bounds[0]:.0f}..{bounds[1]:.0f} (robust z > {policy.outlier_z})")
        elif q < threshold:
            drop(rows[i], "cleaning.low_quality", f"quality {q:.2f} below {policy.quality_threshold}")
        else:
            nxt.append((i, q))
    timings["quality_outliers"] = time.perf_counter() - t

    t = time.perf_counter()
    if policy.near_dup and nxt:
        index = NearDupIndex(policy.near_dup_threshold, seed=policy.seed)
        matches = index.add_many(list(range(len(nxt))), sketch=sketch.take(np.fromiter(
            (i for i, _ in nxt), dtype=np.int64, count=len(nxt))))
        survivors = []
        for (i, q), m in zip(nxt, matches):
            if m is None:
                survivors.append((i, q))
                continue
            r = rows[i]
            other = rows[nxt[m.key][0]]
            same = other["label"] == r["label"]
            drop(r, "cleaning.near_duplicate",
                 f"estimated Jaccard {m.similarity:.2f} with row {other['row_number']}"
                 + ("" if same else f" (labelled {other['label']!r}, this row {r['label']!r})"),
                 other["row_number"])
        nxt = survivors
    timings["near_dup"] = time.perf_counter() - t

    t = time.perf_counter()
    synthetic = [k for k, (i, _) in enumerate(nxt) if rows[i].get("provenance", "human") == "synthetic"]
    n_other = len(nxt) - len(synthetic)
    allowed = len(synthetic) if policy.synthetic_cap >= 1 else int(policy.synthetic_cap * n_other / (1 - policy.synthetic_cap) + 1e-9)
    if len(synthetic) > allowed:
        def rank(k: int) -> bytes:
            return hashlib.blake2b(f"{policy.seed}:{rows[nxt[k][0]]['row_number']}".encode(), digest_size=8).digest()
        cut = set(sorted(synthetic, key=rank)[allowed:])
        for k in sorted(cut):
            drop(rows[nxt[k][0]], "cleaning.synthetic_cap",
                 f"{len(synthetic)} synthetic rows over {n_other} others; cap {policy.synthetic_cap:.0%} allows {allowed}")
        nxt = [x for k, x in enumerate(nxt) if k not in cut]
    kept = []
    for i, q in nxt:
        row = dict(rows[i])
        row["text"] = norm[i]
        row["quality"] = q
        row["text_sha256"] = digests[i].hex()
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


def drop_rare_labels(rows: list[dict], min_per_class: int, keep: frozenset[str] = frozenset()
                     ) -> tuple[list[dict], list[dict], list[str]]:
    """Drop the rows of every label with fewer than ``min_per_class`` rows, except the labels in
    ``keep``. Returns (kept, dropped, the dropped labels sorted); rows keep their order."""
    counts = Counter(r["label"] for r in rows)
    rare = {label for label, n in counts.items() if n < min_per_class and label not in keep}
    kept, dropped = [], []
    for r in rows:
        if r["label"] in rare:
            dropped.append(_drop(r, "cleaning.rare_label", f"label {r['label']!r} has {counts[r['label']]} rows after "
                                 f"cleaning, fewer than min_per_class {min_per_class}"))
        else:
            kept.append(r)
    assert len(rows) == len(kept) + len(dropped)
    return kept, dropped, sorted(rare)


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
