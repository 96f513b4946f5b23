"""Prep logic without I/O: exact dedup, a seeded stratified split with zero overlap, the manifest."""

from __future__ import annotations

import hashlib
import random
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass

MIN_ROWS = 10
MIN_ROWS_PER_CLASS = 2  # one to train on, one to evaluate


class InsufficientData(ValueError):
    reason_code = "prep.insufficient_data"


def normalized(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split()).casefold()


def text_key(text: str) -> str:
    return hashlib.sha256(normalized(text).encode()).hexdigest()


@dataclass(frozen=True)
class Split:
    train: list[dict]
    eval: list[dict]
    duplicates_dropped: int
    conflicting_labels_dropped: int


def dedup(rows: list[dict]) -> tuple[list[dict], int, int]:
    """Keep the first row of each normalised text; a text seen under two labels is dropped entirely,
    since either copy would teach the model a contradiction."""
    by_key: dict[str, list[dict]] = defaultdict(list)
    order = []
    for r in rows:
        k = text_key(r["text"])
        if k not in by_key:
            order.append(k)
        by_key[k].append(r)
    kept, dup, conflict = [], 0, 0
    for k in order:
        group = by_key[k]
        if len({r["label"] for r in group}) > 1:
            conflict += len(group)
            continue
        kept.append(group[0])
        dup += len(group) - 1
    return kept, dup, conflict


def stratified_split(rows: list[dict], eval_fraction: float, seed: int) -> Split:
    """Per label, a seeded shuffle puts round(n * fraction) rows (at least one) into eval.

    Exact duplicates are removed first, so no text is on both sides.
    """
    kept, dup, conflict = dedup(rows)
    if len(kept) < MIN_ROWS:
        raise InsufficientData(f"{len(kept)} distinct rows after dedup; at least {MIN_ROWS} are needed")
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in kept:
        by_label[r["label"]].append(r)
    if len(by_label) < 2:
        raise InsufficientData(f"only one label ({next(iter(by_label))!r}): a classifier needs at least two")
    small = sorted(label for label, rs in by_label.items() if len(rs) < MIN_ROWS_PER_CLASS)
    if small:
        raise InsufficientData(f"labels with fewer than {MIN_ROWS_PER_CLASS} rows: {', '.join(small[:10])}")
    train, eval_ = [], []
    for label in sorted(by_label):
        rs = list(by_label[label])
        random.Random(f"{seed}:{label}").shuffle(rs)
        n_eval = min(len(rs) - 1, max(1, round(len(rs) * eval_fraction)))
        eval_ += rs[:n_eval]
        train += rs[n_eval:]
    train.sort(key=lambda r: r["row_number"])
    eval_.sort(key=lambda r: r["row_number"])
    return Split(train, eval_, dup, conflict)


def manifest(split: Split, *, source_sha256: str, train_sha256: str, eval_sha256: str, rows_in: int) -> dict:
    labels = sorted({r["label"] for r in split.train} | {r["label"] for r in split.eval})
    version = hashlib.sha256(f"{train_sha256}:{eval_sha256}".encode()).hexdigest()[:16]
    return {
        "task_profile": "single_label_classification",
        "label_space": labels,
        "output_schema": {"type": "string", "enum": labels},
        "scoring_mode": "exact_label",
        "dataset_version": version,
        "source_sha256": source_sha256,
        "counts": {
            "rows_in": rows_in,
            "duplicates_dropped": split.duplicates_dropped,
            "conflicting_labels_dropped": split.conflicting_labels_dropped,
            "train": len(split.train),
            "eval": len(split.eval),
        },
        "class_histogram": {
            "train": dict(sorted(Counter(r["label"] for r in split.train).items())),
            "eval": dict(sorted(Counter(r["label"] for r in split.eval).items())),
        },
        # A rough token estimate (words x 1.3) until a tokenizer-backed count lands with prep proper.
        "token_estimate": int(sum(len(r["text"].split()) for r in split.train) * 1.3),
        "files": {"train": {"sha256": train_sha256}, "eval": {"sha256": eval_sha256}},
    }
