"""Prep: the seeded stratified split, the three-way split (train / validation / test, D14) and the
reuse of a frozen test set, and `prepare` end to end on an artifact store — accounting
(rows_in = train + validation + test + dropped), zero overlap including near-duplicates, consistent PII
placeholders with an explicit eval set, the manifest, the OpenAI JSONL, cost and warnings."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from contracts.common import CleaningSettings, FieldMapping, RunPlan
from services.common.artifacts import ArtifactStore
from services.common.jsonl import read_jsonl
from services.prep.domain import InsufficientData, PrepBlocked, prepare, stratified_split
from services.prep.formats import TRAINING_PRICE_PER_1M

TOPICS = {
    "billing": "my invoice for {i} shows a charge I do not recognise and the amount {i} is wrong",
    "login": "I cannot sign in to account {i} since the password reset mail {i} never arrived",
    "shipping": "parcel {i} is stuck in the depot and the tracking page for order {i} has not moved",
}


def rows_for(per_class: dict[str, int], start: int = 1, first: int = 0) -> list[dict]:
    rows, n = [], start
    for label, k in per_class.items():
        for i in range(first, first + k):
            words = " ".join(f"w{label[:2]}{i}x{j}" for j in range(6))
            rows.append({"row_number": n, "text": TOPICS[label].format(i=i) + " " + words, "label": label,
                         "provenance": "human"})
            n += 1
    return rows


def plan(**kw) -> RunPlan:
    return RunPlan(locator="jsonl:/x.jsonl", target="t", **kw)


@pytest.fixture()
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts")


# --- split ----------------------------------------------------------------------------------------


def test_split_is_stratified_seeded_disjoint_and_in_source_order():
    rows = rows_for({"billing": 30, "login": 20, "shipping": 10})
    train, ev = stratified_split(rows, 0.2, seed=7)
    assert {r["row_number"] for r in train}.isdisjoint(r["row_number"] for r in ev)
    assert len(train) + len(ev) == len(rows)
    assert Counter(r["label"] for r in ev) == {"billing": 6, "login": 4, "shipping": 2}
    assert [r["row_number"] for r in train] == sorted(r["row_number"] for r in train)
    assert stratified_split(rows, 0.2, seed=7) == (train, ev)
    assert stratified_split(rows, 0.2, seed=8)[1] != ev


def test_a_tiny_class_still_has_a_row_on_each_side():
    train, ev = stratified_split(rows_for({"billing": 30, "login": 2}), 0.9, seed=1)
    assert Counter(r["label"] for r in train)["login"] == 1 and Counter(r["label"] for r in ev)["login"] == 1


def _labelled(per_class: dict[str, int]) -> list[dict]:
    rows, n = [], 1
    for label, k in per_class.items():
        for i in range(k):
            rows.append({"row_number": n, "text": f"{label} row {i}", "label": label})
            n += 1
    return rows


@pytest.mark.parametrize("per_class", [
    {f"c{i}": 3 for i in range(40)},                                     # was 33% held out
    {f"c{i}": 2 for i in range(30)},                                     # was 50%
    {"big": 400, "mid": 60, **{f"s{i}": 2 + i % 4 for i in range(25)}},  # skewed
    {"a": 7, "b": 5, "c": 3, "d": 2, "e": 2, "f": 11},
])
@pytest.mark.parametrize("fraction", [0.15, 0.2, 0.3])
def test_many_small_classes_keep_the_eval_share_near_the_fraction(per_class, fraction):
    rows = _labelled(per_class)
    for seed in (1, 2):
        train, ev = stratified_split(rows, fraction, seed=seed)
        assert len(train) + len(ev) == len(rows)
        assert {r["row_number"] for r in train}.isdisjoint(r["row_number"] for r in ev)
        assert len(ev) == max(1, round(len(rows) * fraction))  # the integer nearest the fraction
        train_counts, eval_counts = Counter(r["label"] for r in train), Counter(r["label"] for r in ev)
        assert set(train_counts) == set(per_class)          # every label keeps a train row
        assert set(eval_counts) <= set(train_counts)        # so every eval label is in train
        for label, n in per_class.items():                  # each label within one row of its share
            assert abs(eval_counts[label] - n * fraction) < 1 + 1e-9
        assert stratified_split(rows, fraction, seed=seed) == (train, ev)


def test_which_small_classes_get_the_eval_rows_depends_on_the_seed():
    rows = _labelled({f"c{i}": 2 for i in range(30)})
    picks = {seed: frozenset(r["label"] for r in stratified_split(rows, 0.2, seed=seed)[1]) for seed in range(5)}
    assert all(len(p) == 12 for p in picks.values()) and len(set(picks.values())) > 1


def test_a_fraction_near_one_still_leaves_a_train_row_per_label():
    rows = _labelled({"a": 10, "b": 3, "c": 2})
    train, ev = stratified_split(rows, 0.95, seed=3)
    assert Counter(r["label"] for r in train) == {"a": 1, "b": 1, "c": 1} and len(ev) == 12


@pytest.mark.parametrize("per_class, match", [
    ({"billing": 5}, "at least 10"),
    ({"billing": 12}, "only one label"),
    ({"billing": 12, "login": 1}, "login"),
])
def test_insufficient_data_names_the_problem(per_class, match):
    with pytest.raises(InsufficientData, match=match):
        stratified_split(rows_for(per_class), 0.2, seed=1)


# --- prepare ----------------------------------------------------------------------------------------


def test_every_row_is_accounted_for_and_dropped_rows_say_why(store):
    rows = rows_for({"billing": 40, "login": 40, "shipping": 40})
    dup = dict(rows[0], row_number=500)                                   # exact duplicate
    near = dict(rows[1], row_number=501, text=rows[1]["text"] + " thanks")  # near duplicate
    conflict = [dict(rows[2], row_number=502, label="login")]               # same text, other label
    empty = {"row_number": 503, "text": "\u200b \t", "label": "billing"}
    allrows = rows + [dup, near, empty] + conflict
    out = prepare(allrows, plan(), store)
    dropped = read_jsonl(store, out.dropped)
    assert out.rows_in == len(allrows) == out.train_rows + out.eval_rows + out.test_rows + len(dropped)
    assert out.dropped_by_reason == {"cleaning.conflicting_labels": 2, "cleaning.empty_after_cleaning": 1,
                                     "cleaning.exact_duplicate": 1, "cleaning.near_duplicate": 1}
    by_row = {d["row_number"]: d for d in dropped}
    assert by_row[500]["duplicate_of"] == rows[0]["row_number"] and by_row[501]["reason_code"] == "cleaning.near_duplicate"
    m = out.manifest
    c = m["counts"]
    assert c["train"] + c["validation"] + c["test"] + c["dropped"] == c["rows_in"]


def test_near_duplicates_never_straddle_the_split(store):
    rows = rows_for({"billing": 40, "login": 40, "shipping": 40})
    variants = [dict(r, row_number=1000 + r["row_number"], text=r["text"].upper() + " !!") for r in rows]
    out = prepare(rows + variants, plan(), store)
    norm = lambda r: " ".join(r["text"].casefold().replace("!", "").split())  # noqa: E731
    sides = [{norm(r) for r in read_jsonl(store, ref)} for ref in (out.train, out.eval, out.test)]
    assert sides[0].isdisjoint(sides[1]) and sides[0].isdisjoint(sides[2]) and sides[1].isdisjoint(sides[2])
    assert out.train_rows + out.eval_rows + out.test_rows == len(rows)


def test_pii_is_scrubbed_with_placeholders_shared_by_train_and_an_explicit_eval_set(store):
    rows = rows_for({"billing": 30, "login": 30})
    rows[0]["text"] += " write to jane.doe@example.com"
    ev = rows_for({"billing": 5, "login": 5}, start=900, first=100)
    ev[0]["text"] = "jane.doe@example.com says the invoice total is wrong again for the third month"
    out = prepare(rows, plan(eval_locator="jsonl:/eval.jsonl"), store, eval_rows=ev)
    train, evs = read_jsonl(store, out.train) + read_jsonl(store, out.eval), read_jsonl(store, out.test)
    blob = json.dumps(train + evs)
    assert "jane.doe@example.com" not in blob
    t = next(r for r in train if r["row_number"] == 1)["text"]
    e = next(r for r in evs if r["row_number"] == 900)["text"]
    placeholder = t.rsplit(" ", 1)[-1]
    assert placeholder.startswith("<EMAIL") and placeholder in e
    assert out.manifest["split"]["method"] == "explicit_eval"


def test_train_rows_overlapping_the_explicit_eval_set_are_dropped_from_train(store):
    rows = rows_for({"billing": 30, "login": 30})
    ev = [dict(rows[3], row_number=900), dict(rows[40], row_number=901, text=rows[40]["text"] + " ok")]
    ev += rows_for({"billing": 3, "login": 3}, start=950, first=100)
    out = prepare(rows, plan(eval_locator="jsonl:/eval.jsonl"), store, eval_rows=ev)
    dropped = [d for d in read_jsonl(store, out.dropped) if d["reason_code"] == "cleaning.eval_overlap"]
    assert sorted(d["row_number"] for d in dropped) == [rows[3]["row_number"], rows[40]["row_number"]]
    assert out.train_rows + out.eval_rows == len(rows) - 2 and out.test_rows == len(ev)
    assert out.test_origin == "eval_locator" and out.test_set is None  # made here: the service freezes it
    assert out.rows_in + len(ev) == out.train_rows + out.eval_rows + out.test_rows + len(read_jsonl(store, out.dropped))


def test_manifest_is_the_source_of_truth_and_matches_the_files(store):
    out = prepare(rows_for({"billing": 60, "login": 60, "shipping": 60}), plan(seed=3), store, source_sha256="s" * 64)
    m = json.loads(store.read_bytes(out.manifest_ref))
    assert m == json.loads(json.dumps(out.manifest))
    assert m["task_profile"] == "single_label_classification"
    assert m["label_space"] == ["billing", "login", "shipping"]
    assert m["output_schema"] == {"type": "string", "enum": m["label_space"]} and m["scoring_mode"] == "exact_label"
    assert m["files"]["train"]["sha256"] == out.train.sha256 and m["files"]["validation"]["sha256"] == out.eval.sha256
    assert m["files"]["test"]["sha256"] == out.test.sha256 and m["files"]["test"]["rows"] == out.test_rows
    assert m["test_set"] == {"origin": "first_run", "sha256": out.test.sha256, "rows": out.test_rows,
                             "made_by_this_run": True, "frozen_by_run_id": None}
    assert sum(m["class_histogram"]["test"].values()) == m["counts"]["test"] == out.test_rows
    assert sum(m["class_histogram"]["train"].values()) == m["counts"]["train"] == out.train_rows
    assert m["source_sha256"] == "s" * 64 and len(m["dataset_version"]) == 16
    again = prepare(rows_for({"billing": 60, "login": 60, "shipping": 60}), plan(seed=3), store)
    assert again.manifest["dataset_version"] == m["dataset_version"]
    other = prepare(rows_for({"billing": 60, "login": 60, "shipping": 60}), plan(seed=4), store)
    assert other.manifest["dataset_version"] != m["dataset_version"]


def test_openai_chat_jsonl_follows_the_fine_tuning_format_and_the_cost_has_a_20_percent_buffer(store):
    out = prepare(rows_for({"billing": 60, "login": 60}), plan(), store)
    lines = read_jsonl(store, out.openai_train)
    assert len(lines) == out.train_rows
    for ex in lines:
        assert list(ex) == ["messages"]
        assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
        assert ex["messages"][2]["content"] in ("billing", "login")
    price = TRAINING_PRICE_PER_1M[out.cost.model]["usd_per_1m"]
    assert out.cost.usd == pytest.approx(out.cost.training_tokens * out.cost.epochs * price / 1e6 * 1.2, rel=1e-3)


def test_small_data_gets_sufficiency_warnings_with_reason_codes(store):
    out = prepare(rows_for({"billing": 60, "login": 20, "shipping": 20}), plan(), store)
    codes = {w.reason_code: w.message for w in out.warnings}
    assert set(codes) == {"prep.few_rows_total", "prep.few_rows_for_class"}
    assert "login" in codes["prep.few_rows_for_class"] and "billing" not in codes["prep.few_rows_for_class"]


def test_a_pii_heavy_dataset_is_blocked_with_its_share_and_the_threshold(store):
    rows = rows_for({"billing": 20, "login": 20})
    for i, r in enumerate(rows):
        r["text"] += f" contact me at person{i}@example.org"
    with pytest.raises(PrepBlocked) as e:
        prepare(rows, plan(), store)
    assert e.value.reason_code == "cleaning.pii_block" and "100.0%" in str(e.value)
    out = prepare(rows, plan(cleaning=CleaningSettings(pii_block_threshold=1.0)), store)  # a plan may accept it
    assert out.cleaning["rows_with_pii"] == len(rows)


def test_synthetic_rows_are_capped_to_their_share(store):
    rows = rows_for({"billing": 40, "login": 40, "shipping": 40})
    for r in rows[::2]:
        r["provenance"] = "synthetic"
    out = prepare(rows, plan(), store)
    assert out.dropped_by_reason["cleaning.synthetic_cap"] > 0
    assert out.manifest["provenance"]["synthetic"] / (out.train_rows + out.eval_rows + out.test_rows) <= 0.3 + 1e-9


def test_structured_shapes_get_exact_dedup_and_a_seeded_split(store):
    rows = [{"row_number": i, "prompt": f"q{i % 30}", "completion": f"a{i % 30}", "provenance": "human"} for i in range(1, 41)]
    out = prepare(rows, plan(mapping=FieldMapping(shape="prompt_completion", prompt="q", completion="a")), store)
    assert out.dropped_by_reason == {"cleaning.exact_duplicate": 10}
    assert out.train_rows + out.eval_rows + out.test_rows == 30 and out.openai_train is not None
    assert out.manifest["task_profile"] == "prompt_completion"


def test_the_openai_files_written_by_a_forked_child_are_the_same(store, monkeypatch):
    from services.prep import clean as clean_module, domain

    rows = rows_for({"billing": 40, "login": 40, "shipping": 40})
    outs = []
    for workers in ("1", "2"):
        monkeypatch.setenv("TUNELINE_WORKERS", workers)
        monkeypatch.setattr(domain, "PARALLEL_MIN_CHARS", 1)
        monkeypatch.setattr(clean_module, "PARALLEL_MIN_CHARS", 1)
        out = prepare(rows, plan(), store)
        outs.append((out.openai_train, out.openai_eval, out.cost, {k: v for k, v in out.manifest.items() if k != "cleaning"}))
    assert outs[0] == outs[1]


def test_the_same_input_gives_the_same_manifest_byte_for_byte(tmp_path):
    """It held the cleaning timings, so its sha256 changed from run to run; the timings go in the
    prep.cleaned event instead."""
    from contracts.common import RunPlan
    from services.common.artifacts import ArtifactStore
    from services.prep.domain import prepare

    rows = [{"row_number": i + 1, "text": f"ticket {i} about the {('invoice', 'login', 'parcel')[i % 3]} problem number {i}",
             "label": ("billing", "login", "shipping")[i % 3]} for i in range(90)]
    plan = RunPlan(locator="jsonl:x.jsonl", target="t")
    first = prepare([dict(r) for r in rows], plan, ArtifactStore(tmp_path / "a"))
    second = prepare([dict(r) for r in rows], plan, ArtifactStore(tmp_path / "b"))
    assert first.manifest_ref.sha256 == second.manifest_ref.sha256
    assert "timings_s" not in first.manifest["cleaning"] and "timings_s" in first.cleaning


def test_the_hosted_cost_estimate_is_for_the_runs_own_model_and_epochs():
    from contracts.common import HostedSettings, RunPlan
    from services.prep.app import hosted_cost_basis
    from services.prep.settings import PrepSettings

    s = PrepSettings()
    local = RunPlan(locator="jsonl:x.jsonl", target="t")
    hosted = RunPlan(locator="jsonl:x.jsonl", target="t", backend="openai",
                     hosted=HostedSettings(model="gpt-4o-2024-08-06", n_epochs=5))
    assert hosted_cost_basis(local, s) == (s.hosted_model, s.hosted_epochs)
    assert hosted_cost_basis(hosted, s) == ("gpt-4o-2024-08-06", 5)
    auto = hosted.model_copy(update={"hosted": HostedSettings(model="gpt-4o-2024-08-06")})
    assert hosted_cost_basis(auto, s) == ("gpt-4o-2024-08-06", s.hosted_epochs)


def test_a_model_with_no_known_price_gets_no_cost_estimate_and_prep_goes_on(tmp_path):
    """An OpenAI-compatible host's own model: there is no price to estimate with (it used to raise)."""
    from contracts.common import RunPlan
    from services.common.artifacts import ArtifactStore
    from services.prep.domain import prepare

    rows = [{"row_number": i + 1, "text": f"ticket {i} about the {('invoice', 'login')[i % 2]} problem {i}",
             "label": ("billing", "login")[i % 2]} for i in range(60)]
    out = prepare(rows, RunPlan(locator="jsonl:x.jsonl", target="t"), ArtifactStore(tmp_path / "a"),
                  hosted_model="my-org/custom-model")
    assert out.cost is None and out.manifest["token_estimate"]["openai_chat_train_tokens"] > 0


# --- three splits and the frozen test set (D14) ---------------------------------------------------


def _ids(rows: list[dict]) -> set[int]:
    return {r["row_number"] for r in rows}


@pytest.mark.parametrize("per_class", [
    {"billing": 30, "login": 20, "shipping": 10},
    {"a": 7, "b": 5, "c": 3, "d": 2, "e": 2, "f": 11},
    {f"c{i}": 3 for i in range(20)},
])
@pytest.mark.parametrize("test_fraction, validation_fraction", [(0.2, 0.1), (0.3, 0.25), (0.5, 0.5)])
def test_three_way_split_accounts_for_every_row_keeps_the_shares_and_a_train_row_per_label(
        per_class, test_fraction, validation_fraction):
    from services.prep.domain import three_way_split

    rows = _labelled(per_class)
    train, val, test = three_way_split(rows, test_fraction, validation_fraction, seed=5, classification=True)
    assert len(train) + len(val) + len(test) == len(rows)
    assert _ids(train).isdisjoint(_ids(val)) and _ids(train).isdisjoint(_ids(test)) and _ids(val).isdisjoint(_ids(test))
    assert len(test) == max(1, round(len(rows) * test_fraction))
    rest = len(rows) - len(test)
    spare = rest - len(per_class)  # rows left after one train row per label
    assert len(val) == min(spare, max(1, round(rest * validation_fraction)))
    train_labels = Counter(r["label"] for r in train)
    assert set(train_labels) == set(per_class)  # no label lost its last train row
    assert {r["label"] for r in val} | {r["label"] for r in test} <= set(train_labels)
    assert three_way_split(rows, test_fraction, validation_fraction, seed=5, classification=True) == (train, val, test)


def test_three_way_split_depends_on_the_seed_and_the_test_side_is_the_two_way_holdout():
    from services.prep.domain import three_way_split

    rows = rows_for({"billing": 30, "login": 20, "shipping": 10})
    a = three_way_split(rows, 0.2, 0.1, seed=7, classification=True)
    b = three_way_split(rows, 0.2, 0.1, seed=8, classification=True)
    assert a[2] != b[2] and a[1] != b[1]
    assert a[2] == stratified_split(rows, 0.2, seed=7)[1]  # the test rows are what the two-way split held out


def test_validation_fraction_zero_leaves_validation_empty():
    from services.prep.domain import three_way_split

    for classification in (True, False):
        rows = rows_for({"billing": 30, "login": 20})
        train, val, test = three_way_split(rows, 0.2, 0.0, seed=1, classification=classification)
        assert val == [] and len(train) + len(test) == len(rows) and len(test) == 10


def test_a_tiny_class_gives_no_validation_row_rather_than_its_last_train_row():
    from services.prep.domain import three_way_split

    rows = _labelled({"big": 40, "tiny": 2})
    for seed in range(10):
        train, val, test = three_way_split(rows, 0.2, 0.5, seed=seed, classification=True)
        assert Counter(r["label"] for r in train)["tiny"] >= 1
        assert Counter(r["label"] for r in val + test)["tiny"] <= 1


def test_the_random_three_way_split_of_unlabelled_rows():
    from services.prep.domain import three_way_split

    rows = [{"row_number": i, "prompt": f"q{i}", "completion": f"a{i}"} for i in range(1, 101)]
    train, val, test = three_way_split(rows, 0.2, 0.1, seed=3, classification=False)
    assert (len(train), len(val), len(test)) == (72, 8, 20)
    assert three_way_split(rows, 0.2, 0.1, seed=3, classification=False) == (train, val, test)


def test_row_id_is_a_stable_content_id():
    from services.prep.domain import row_id

    row = {"row_number": 4, "text": "parcel 7 is late", "label": "shipping", "provenance": "human", "quality": 1.0}
    rid = row_id(row)
    assert len(rid) == 16 and int(rid, 16) >= 0
    # bookkeeping and key order do not change it; the content does
    assert row_id({"label": "shipping", "text": "parcel 7 is late", "row_number": 99, "provenance": "synthetic",
                   "row_id": "x"}) == rid
    assert row_id(dict(row, label="billing")) != rid and row_id(dict(row, text="parcel 8 is late")) != rid
    chat = {"row_number": 1, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert row_id(chat) == row_id(dict(chat, row_number=2)) != row_id({**chat, "messages": chat["messages"][:1]})


def test_every_test_row_carries_its_row_id_in_the_test_file(store):
    from services.prep.domain import row_id

    out = prepare(rows_for({"billing": 40, "login": 40, "shipping": 40}), plan(), store)
    test = read_jsonl(store, out.test)
    assert len(test) == out.test_rows == 24 and all(r["row_id"] == row_id(r) for r in test)
    assert len({r["row_id"] for r in test}) == len(test)
    assert out.test_origin == "first_run" and out.test_set is None
    assert "row_id" not in read_jsonl(store, out.train)[0]
    assert prepare(rows_for({"billing": 40, "login": 40, "shipping": 40}), plan(new_test_set=True),
                   store).test_origin == "new_test_set"


def _frozen(out, store, target: str = "t", run_id: str = "run-first"):
    from contracts.events import TestSetRef
    from services.prep.domain import FrozenTestSet

    ref = TestSetRef(target=target, sha256=out.test.sha256, rows=out.test_rows, artifact=out.test, origin="first_run",
                     frozen_by_run_id=run_id)
    return FrozenTestSet(ref, read_jsonl(store, out.test))


def test_a_second_run_reuses_the_frozen_test_set_from_a_different_source_sample(store):
    first = prepare(rows_for({"billing": 40, "login": 40, "shipping": 40}), plan(), store)
    frozen = _frozen(first, store)
    # another sample of the target's data: new rows, and some rows the first run had (a few of them test rows)
    sample = rows_for({"billing": 30, "login": 30, "shipping": 30}, start=2000, first=500)
    test_rows = read_jsonl(store, first.test)
    again = [dict(r, row_number=3000 + i) for i, r in enumerate(test_rows[:3])]
    out = prepare(sample + again, plan(seed=99), store, frozen_test=frozen)
    assert out.test.sha256 == first.test.sha256 and out.test_rows == first.test_rows
    assert out.test_set == frozen.ref and out.test_origin == "first_run"
    dropped = read_jsonl(store, out.dropped)
    overlap = [d for d in dropped if d["reason_code"] == "cleaning.eval_overlap"]
    assert sorted(d["row_number"] for d in overlap) == [3000, 3001, 3002]
    assert out.dropped_by_reason["cleaning.eval_overlap"] == 3
    # accounting without a test set of its own: rows_in = train + validation + dropped
    assert out.rows_in == len(sample) + 3 == out.train_rows + out.eval_rows + len(dropped)
    assert out.rows_kept == out.train_rows + out.eval_rows == len(sample)
    m = out.manifest
    assert m["split"]["method"] == "frozen_test_set" and m["test_set"]["made_by_this_run"] is False
    assert m["test_set"]["frozen_by_run_id"] == "run-first" and m["files"]["test"]["sha256"] == first.test.sha256
    train = {r["text"] for r in read_jsonl(store, out.train) + read_jsonl(store, out.eval)}
    assert train.isdisjoint(r["text"] for r in test_rows)
    assert out.eval_rows == round(len(sample) * 0.1)  # validation from the source rows


def test_near_copies_of_frozen_test_rows_are_dropped_as_overlap(store):
    first = prepare(rows_for({"billing": 40, "login": 40, "shipping": 40}), plan(), store)
    frozen = _frozen(first, store)
    near = [dict(r, row_number=5000 + i, text=r["text"] + " thanks") for i, r in enumerate(frozen.rows[:2])]
    sample = rows_for({"billing": 20, "login": 20, "shipping": 20}, start=2000, first=500)
    out = prepare(sample + near, plan(), store, frozen_test=frozen)
    assert out.dropped_by_reason == {"cleaning.eval_overlap": 2}


def test_a_frozen_test_label_absent_from_train_is_refused(store):
    first = prepare(rows_for({"billing": 40, "login": 40, "shipping": 40}), plan(), store)
    with pytest.raises(InsufficientData, match="shipping"):
        prepare(rows_for({"billing": 30, "login": 30}, start=2000, first=500), plan(), store,
                frozen_test=_frozen(first, store))


def test_a_frozen_test_set_of_another_shape_is_refused_with_a_reason(store):
    from services.prep.domain import UnusableTestSet

    first = prepare(rows_for({"billing": 40, "login": 40}), plan(), store)
    rows = [{"row_number": i, "prompt": f"question {i} about the export " + "w " * i, "completion": f"answer {i}",
             "provenance": "human"} for i in range(1, 41)]
    with pytest.raises(UnusableTestSet, match="--new-test-set") as e:
        prepare(rows, plan(mapping=FieldMapping(shape="prompt_completion", prompt="q", completion="a")), store,
                frozen_test=_frozen(first, store))
    assert e.value.reason_code == "prep.test_set_unreadable"


def test_an_explicit_eval_set_wins_over_the_frozen_test_set(store):
    first = prepare(rows_for({"billing": 40, "login": 40}), plan(), store)
    ev = rows_for({"billing": 5, "login": 5}, start=900, first=100)
    out = prepare(rows_for({"billing": 30, "login": 30}, start=2000, first=500), plan(eval_locator="jsonl:/e.jsonl"),
                  store, eval_rows=ev, frozen_test=_frozen(first, store))
    assert out.test_set is None and out.test_origin == "eval_locator" and out.test_rows == 10
    assert out.test.sha256 != first.test.sha256


# --- rare labels (min_per_class) -----------------------------------------------------------------------


def _rare(labels: list[str], start: int) -> list[dict]:
    """One row for each of `labels`, texts unlike the TOPICS rows and each other."""
    return [{"row_number": start + k, "label": label, "provenance": "human",
             "text": f"question {k} about {label}: " + " ".join(f"r{k}y{j}{label}" for j in range(9))}
            for k, label in enumerate(labels)]


def test_the_insufficient_data_message_counts_every_rare_label_and_names_the_option():
    rows = _labelled({"big": 40, "mid": 30, **{f"r{i:02}": 1 for i in range(13)}})
    with pytest.raises(InsufficientData) as e:
        stratified_split(rows, 0.2, seed=1)
    msg = str(e.value)
    assert msg.startswith("13 labels have fewer than 2 rows after cleaning: r00 (1), r01 (1), ")
    assert "r09 (1), ... (13 in all)" in msg and "r10" not in msg
    assert "pass --min-per-class 2 to drop such labels" in msg and e.value.reason_code == "prep.insufficient_data"


def test_rare_labels_are_dropped_counted_and_named_with_min_per_class(store):
    rows = rows_for({"billing": 40, "login": 40, "shipping": 40})
    rare = _rare([f"rare{i}" for i in range(12)] + ["twice", "twice"], start=1000)
    with pytest.raises(InsufficientData,
                       match="12 labels have fewer than 2 rows .* \\(12 in all\\); pass --min-per-class 2"):
        prepare(rows + rare, plan(), store)
    out = prepare(rows + rare, plan(cleaning=CleaningSettings(min_per_class=3)), store)
    dropped = read_jsonl(store, out.dropped)
    assert out.dropped_by_reason == {"cleaning.rare_label": 14}
    assert sorted(d["row_number"] for d in dropped) == [r["row_number"] for r in rare]
    assert out.rows_in == len(rows) + len(rare) == out.train_rows + out.eval_rows + out.test_rows + len(dropped)
    assert out.label_space == ["billing", "login", "shipping"]
    notice = next(w for w in out.warnings if w.reason_code == "prep.rare_labels_dropped")
    assert notice.message.startswith("--min-per-class 3: 13 labels with fewer than 3 rows after cleaning dropped "
                                     "(14 rows, cleaning.rare_label): rare0 (1), ")
    assert "... (13 in all)" in notice.message
    assert out.manifest["counts"]["dropped_by_reason"] == {"cleaning.rare_label": 14}


def test_min_per_class_never_changes_a_frozen_test_set_and_keeps_the_labels_it_holds(store):
    first = prepare(rows_for({"billing": 40, "login": 40, "shipping": 40}), plan(), store)
    frozen = _frozen(first, store)
    # a later sample: shipping (which the test set holds) is down to one row, and a new label has one row
    sample = rows_for({"billing": 30, "login": 30, "shipping": 1}, start=2000, first=500) + _rare(["refunds"], 3000)
    out = prepare(sample, plan(cleaning=CleaningSettings(min_per_class=2)), store, frozen_test=frozen)
    assert out.test.sha256 == first.test.sha256 and out.test_rows == first.test_rows
    assert out.dropped_by_reason == {"cleaning.rare_label": 1}
    assert [d["row_number"] for d in read_jsonl(store, out.dropped)] == [3000]
    assert "shipping" in out.label_space and "refunds" not in out.label_space
    notice = next(w for w in out.warnings if w.reason_code == "prep.rare_labels_dropped")
    msg = notice.message
    assert "1 label with fewer than 2 rows after cleaning dropped (1 row, cleaning.rare_label): refunds (1)" in msg
    assert "1 label under 2 rows kept: the test set holds it, and a frozen or given test set is never changed: " \
           "shipping (1)" in msg
    assert out.rows_in == out.train_rows + out.eval_rows + len(read_jsonl(store, out.dropped))
