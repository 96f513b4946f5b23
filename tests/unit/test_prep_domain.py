"""Prep's pure logic: dedup, the seeded stratified split with zero overlap, and the manifest."""

from __future__ import annotations

from collections import Counter

import pytest

from services.prep.domain import (
    InsufficientData,
    Split,
    dedup,
    manifest,
    normalized,
    stratified_split,
)


def rows_from(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"text": t, "label": lab, "row_number": i} for i, (t, lab) in enumerate(pairs, start=1)]


def balanced(per_class: dict[str, int]) -> list[dict]:
    pairs = [(f"{label} example number {i}", label) for label, n in per_class.items() for i in range(n)]
    return rows_from(pairs)


def texts(rs: list[dict]) -> set[str]:
    return {normalized(r["text"]) for r in rs}


def test_no_normalized_text_is_on_both_sides_even_with_variant_duplicates():
    base = balanced({"a": 30, "b": 30, "c": 30})
    variants = [{"text": "  " + r["text"].upper().replace(" ", "   ") + "\t", "label": r["label"],
                 "row_number": 1000 + i} for i, r in enumerate(base)]
    split = stratified_split(base + variants, eval_fraction=0.3, seed=7)
    assert texts(split.train).isdisjoint(texts(split.eval))
    assert split.duplicates_dropped == len(variants)
    assert len(split.train) + len(split.eval) == len(base)


def test_every_class_is_on_both_sides_even_when_tiny():
    rows = balanced({"big": 40, "small": 2, "three": 3})
    split = stratified_split(rows, eval_fraction=0.01, seed=1)
    assert {r["label"] for r in split.train} == {"big", "small", "three"}
    assert {r["label"] for r in split.eval} == {"big", "small", "three"}


def test_a_huge_eval_fraction_still_leaves_one_row_per_class_to_train_on():
    split = stratified_split(balanced({"a": 5, "b": 5}), eval_fraction=0.99, seed=1)
    assert Counter(r["label"] for r in split.train) == {"a": 1, "b": 1}
    assert Counter(r["label"] for r in split.eval) == {"a": 4, "b": 4}


def test_same_seed_gives_the_same_split():
    rows = balanced({"a": 50, "b": 50})
    one, two = stratified_split(rows, 0.2, seed=42), stratified_split(list(rows), 0.2, seed=42)
    assert one == two


def test_another_seed_gives_a_different_split():
    rows = balanced({"a": 50, "b": 50})
    assert texts(stratified_split(rows, 0.2, seed=1).eval) != texts(stratified_split(rows, 0.2, seed=2).eval)


def test_both_sides_are_in_source_row_order():
    split = stratified_split(balanced({"a": 20, "b": 20, "c": 20}), 0.25, seed=3)
    for side in (split.train, split.eval):
        numbers = [r["row_number"] for r in side]
        assert numbers == sorted(numbers)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.5])
def test_eval_share_per_class_is_the_rounded_fraction(fraction):
    per_class = {"a": 40, "b": 17, "c": 100}
    split = stratified_split(balanced(per_class), fraction, seed=11)
    evals = Counter(r["label"] for r in split.eval)
    for label, n in per_class.items():
        assert abs(evals[label] - n * fraction) <= 1, (label, evals[label])
        assert evals[label] == max(1, round(n * fraction))


def test_duplicates_are_dropped_and_counted_keeping_the_first():
    rows = rows_from([("Hello there", "a"), ("hello   THERE", "a"), ("\thello there ", "a"), ("ＨＥＬＬＯ there", "a")]
                     + [(f"a{i}", "a") for i in range(6)] + [(f"b{i}", "b") for i in range(6)])
    split = stratified_split(rows, 0.2, seed=0)
    assert split.duplicates_dropped == 3  # whitespace, case and NFKC (full-width) variants
    assert split.conflicting_labels_dropped == 0
    kept = [r for r in split.train + split.eval if normalized(r["text"]) == "hello there"]
    assert [r["row_number"] for r in kept] == [1]


def test_a_text_under_two_labels_is_dropped_entirely_and_counted():
    rows = rows_from([("ambiguous", "a"), ("AMBIGUOUS ", "b"), ("ambiguous", "a")]
                     + [(f"a{i}", "a") for i in range(6)] + [(f"b{i}", "b") for i in range(6)])
    split = stratified_split(rows, 0.2, seed=0)
    assert split.conflicting_labels_dropped == 3  # every copy of the contradictory text
    assert split.duplicates_dropped == 0
    assert "ambiguous" not in texts(split.train) | texts(split.eval)
    assert len(split.train) + len(split.eval) == 12


def test_dedup_keeps_first_occurrence_order():
    kept, dup, conflict = dedup(rows_from([("b", "x"), ("a", "x"), ("B", "x"), ("c", "y")]))
    assert [r["text"] for r in kept] == ["b", "a", "c"]
    assert (dup, conflict) == (1, 0)


def test_fewer_than_ten_distinct_rows_is_insufficient():
    with pytest.raises(InsufficientData) as exc:
        stratified_split(balanced({"a": 5, "b": 4}), 0.2, seed=0)
    assert exc.value.reason_code == "prep.insufficient_data"


def test_ten_rows_only_after_counting_duplicates_is_insufficient():
    rows = balanced({"a": 4, "b": 4}) + rows_from([("a example number 0", "a"), ("A EXAMPLE NUMBER 1", "a")])
    with pytest.raises(InsufficientData, match="8 distinct rows"):
        stratified_split(rows, 0.2, seed=0)


def test_a_single_label_is_insufficient():
    with pytest.raises(InsufficientData) as exc:
        stratified_split(balanced({"only": 50}), 0.2, seed=0)
    assert exc.value.reason_code == "prep.insufficient_data"
    assert "only" in str(exc.value)


def test_a_class_with_a_single_row_is_insufficient_and_named():
    with pytest.raises(InsufficientData) as exc:
        stratified_split(balanced({"a": 10, "b": 10, "lonely": 1}), 0.2, seed=0)
    assert exc.value.reason_code == "prep.insufficient_data"
    assert "lonely" in str(exc.value)


def test_insufficient_data_is_a_value_error():
    with pytest.raises(ValueError):
        stratified_split([], 0.2, seed=0)


# --- manifest --------------------------------------------------------------------------------


def make_manifest(split: Split, train_sha: str = "t" * 64, eval_sha: str = "e" * 64, rows_in: int = 0) -> dict:
    return manifest(split, source_sha256="s" * 64, train_sha256=train_sha, eval_sha256=eval_sha, rows_in=rows_in)


def test_manifest_counts_labels_and_histograms_describe_the_split():
    rows = balanced({"zeta": 12, "alpha": 9, "mid": 20}) + rows_from([("alpha example number 0", "alpha")])
    split = stratified_split(rows, 0.25, seed=5)
    m = make_manifest(split, rows_in=len(rows))
    assert m["label_space"] == ["alpha", "mid", "zeta"]
    assert m["output_schema"] == {"type": "string", "enum": ["alpha", "mid", "zeta"]}
    assert m["counts"] == {"rows_in": 42, "duplicates_dropped": 1, "conflicting_labels_dropped": 0,
                           "train": len(split.train), "eval": len(split.eval)}
    hist = m["class_histogram"]
    assert sum(hist["train"].values()) == m["counts"]["train"]
    assert sum(hist["eval"].values()) == m["counts"]["eval"]
    assert {k: hist["train"][k] + hist["eval"][k] for k in hist["train"]} == {"alpha": 9, "mid": 20, "zeta": 12}
    assert list(hist["train"]) == sorted(hist["train"])
    assert m["files"] == {"train": {"sha256": "t" * 64}, "eval": {"sha256": "e" * 64}}
    assert m["source_sha256"] == "s" * 64


def test_dataset_version_is_stable_for_the_same_files_and_changes_with_them():
    split = stratified_split(balanced({"a": 10, "b": 10}), 0.2, seed=5)
    v = make_manifest(split)["dataset_version"]
    assert v == make_manifest(split)["dataset_version"]
    assert len(v) == 16 and int(v, 16) >= 0
    assert v != make_manifest(split, train_sha="u" * 64)["dataset_version"]
    assert v != make_manifest(split, eval_sha="f" * 64)["dataset_version"]
    # train and eval are not interchangeable
    assert v != make_manifest(split, train_sha="e" * 64, eval_sha="t" * 64)["dataset_version"]
