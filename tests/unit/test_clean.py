import pytest

from services.prep.clean import (CleaningBlocked, CleaningPolicy, check_eval_overlap, clean, key_signature, normalise,
                                 quality, quality_many)
from services.prep.pii import Scrubber

PROSE = [
    "The scheduler drops container requests when the queue is full and never retries them later on.",
    "Datanode heartbeat times out under heavy load because the lock is held during the block report.",
    "The web UI shows a wrong number of live nodes after a restart of the resource manager process.",
    "Snapshot diff reports deleted files twice when the directory was renamed between two snapshots.",
    "Balancer moves blocks to a node that is being decommissioned and the move fails every time.",
    "Audit log misses the client address for rename operations issued through the HTTP gateway.",
    "Checksum verification is skipped on short-circuit reads when the block is opened by mmap here.",
    "Lease recovery hangs forever when the last block has no replicas reported by any datanode.",
    "The shuffle handler leaks file descriptors when a reducer disconnects in the middle of a fetch.",
    "Quota usage is not updated after truncate, so users hit the limit with an almost empty folder.",
]


def rows_of(texts, label="Major", **extra):
    return [{"row_number": i + 1, "text": t, "label": label, **extra} for i, t in enumerate(texts)]


def policy(**kw):
    kw.setdefault("outlier_block_threshold", None)
    return CleaningPolicy(**kw)


def check(res, n):
    assert len(res.kept) + len(res.dropped) == n


def test_normalise():
    assert normalise("  a\t\tb  \r\n\r\n\r\n\r\nc \x00d\u200b  ") == "a b\n\nc d"
    assert normalise("ﬁne　text\u00a0here") == "fine text here"
    assert normalise("line1\nline2") == "line1\nline2"
    assert normalise(" \x01\x02 ") == ""


def test_kept_rows_carry_keys_quality_and_sha():
    rows = rows_of(PROSE, extra_key={"a": 1})
    res = clean(rows, policy())
    check(res, len(rows))
    assert len(res.kept) == len(PROSE) and not res.dropped
    r = res.kept[0]
    assert r["extra_key"] == {"a": 1} and 0.9 <= r["quality"] <= 1 and len(r["text_sha256"]) == 64


def test_empty_exact_duplicate_and_conflicts():
    rows = rows_of(PROSE) + [
        {"row_number": 11, "text": "  \x00 ", "label": "Major"},
        {"row_number": 12, "text": PROSE[0].upper() + "  ", "label": "Major"},
        {"row_number": 13, "text": PROSE[1], "label": "Minor"},
    ]
    res = clean(rows, policy(near_dup=False))
    check(res, len(rows))
    by = {d["row_number"]: d for d in res.dropped}
    assert by[11]["reason_code"] == "cleaning.empty_after_cleaning"
    assert by[12]["reason_code"] == "cleaning.exact_duplicate" and by[12]["duplicate_of"] == 1
    assert by[2]["reason_code"] == by[13]["reason_code"] == "cleaning.conflicting_labels"
    assert res.stats["dropped_by_reason"]["cleaning.conflicting_labels"] == 2


def test_near_duplicate_keeps_the_first():
    rows = rows_of(PROSE + [PROSE[3] + " Thanks!"])
    res = clean(rows, policy())
    check(res, len(rows))
    assert [(d["row_number"], d["reason_code"], d["duplicate_of"]) for d in res.dropped] == [
        (11, "cleaning.near_duplicate", 4)]


def test_low_quality_and_outliers():
    rows = rows_of(PROSE * 3 + ["$$$ ### %%% 123 456 ... !!! ??? ((( ))) 789 *** &&& ^^^ 1.0 2.0 3.0 +++ === --- 42 17 99 ~~~ ||| 0x1f 0x2e ///", "x " * 20000])
    for i, r in enumerate(rows[:30]):
        r["text"] = f"{r['text']} Case {i} differs."
    res = clean(rows, policy(near_dup=False))
    check(res, len(rows))
    codes = {d["row_number"]: d["reason_code"] for d in res.dropped}
    assert codes == {31: "cleaning.low_quality", 32: "cleaning.length_outlier"}
    with pytest.raises(CleaningBlocked) as e:
        clean(rows, CleaningPolicy(near_dup=False, outlier_block_threshold=0.01))
    assert e.value.reason_code == "cleaning.outlier_threshold_exceeded" and "1.0%" in e.value.message


def test_quality_heuristics():
    assert quality(PROSE[0]) == 1.0
    assert quality("NPE") < 0.2
    assert quality("1 2 3 4 5 6 7 8 9 10 11 12") == 0
    assert quality("\n".join(["same line here"] * 20)) < 0.2


def test_pii_is_scrubbed_and_a_pii_dump_blocks():
    rows = rows_of([f"{t} Reported by user{i}@example.com" for i, t in enumerate(PROSE)])
    with pytest.raises(CleaningBlocked) as e:
        clean(rows, policy())
    assert e.value.reason_code == "cleaning.pii_block" and "100.0%" in e.value.message and "25.0%" in e.value.message
    res = clean(rows, policy(pii_block_threshold=None))
    assert all("<EMAIL_" in r["text"] and "@" not in r["text"] for r in res.kept)
    assert res.stats["pii_by_kind"]["email"] == 10 and res.stats["rows_with_pii"] == 10
    res = clean(rows, policy(pii_scrub=False))
    assert res.kept[0]["text"].endswith("user0@example.com") and res.stats["rows_with_pii"] == 0


def test_synthetic_cap_is_seeded_and_respected():
    texts = [f"{t} Variant number {i}." for i in range(4) for t in PROSE]
    rows = rows_of(texts)
    for r in rows[10:]:
        r["provenance"] = "synthetic"
    res = clean(rows, policy(near_dup=False))
    check(res, len(rows))
    syn = sum(1 for r in res.kept if r.get("provenance") == "synthetic")
    assert syn <= 0.30 * len(res.kept) and syn == 4
    again = clean(rows, policy(near_dup=False))
    assert [d["row_number"] for d in again.dropped] == [d["row_number"] for d in res.dropped]
    other = clean(rows, policy(near_dup=False, seed=7))
    assert {d["row_number"] for d in other.dropped} != {d["row_number"] for d in res.dropped}


def test_eval_overlap_with_a_shared_scrubber():
    sc = Scrubber()
    train = clean(rows_of(PROSE[:6] + ["Contact admin@corp.com about " + PROSE[6]]), policy(), scrubber=sc).kept
    ev = clean([{"row_number": 1, "text": PROSE[0], "label": "Major"},
                {"row_number": 2, "text": PROSE[2] + " Again.", "label": "Major"},
                {"row_number": 3, "text": "Contact admin@corp.com about " + PROSE[6], "label": "Major"}],
               policy(pii_block_threshold=None), scrubber=sc).kept
    kept, dropped = check_eval_overlap(train, ev, policy())
    assert len(kept) + len(dropped) == len(train)
    assert {(d["row_number"], d["duplicate_of"]) for d in dropped} == {(1, 1), (3, 2), (7, 3)}
    assert all(d["reason_code"] == "cleaning.eval_overlap" for d in dropped)


def test_batched_quality_and_key_signatures_equal_the_plain_functions():
    texts = PROSE + ["", "a", "\n\nx\n", "line\n\n\nline", "é letters ß and 日本", "x\ny\nx\ny\nx\ny",
                     "\n".join(["same line here"] * 20), "1 2 3 4 5 6 7 8 9 10 11 12", "Ｋelvin K k"]
    texts += [normalise(t) for t in texts]
    assert quality_many(texts) == [quality(t) for t in texts]
    # rows with equal dedup keys have equal signatures (the exact-dup step only tells apart rows that share one)
    assert key_signature("Crash at Start\n\nNPE") == key_signature("crash at start npe")
    assert key_signature("crash at start") != key_signature("crash at stop")


def test_two_processes_give_the_same_result_as_one(monkeypatch):
    from services.prep import clean as clean_module

    texts = [f"{t} Variant {i} with ip 10.0.{i}.7 and mail user{i % 7}@example.com." for i in range(6) for t in PROSE]
    texts += [PROSE[0].upper() + "  ", PROSE[1] + " Thanks!", "Ünïcode ﬁne café row about the scheduler queue", "\x00 "]
    rows = rows_of(texts)
    rows[-2]["label"] = "Minor"
    monkeypatch.setattr(clean_module, "PARALLEL_MIN_CHARS", 1)
    forked = []
    split_run = clean_module.split_run
    monkeypatch.setattr(clean_module, "split_run", lambda *a, **kw: forked.append(a) or split_run(*a, **kw))
    results = []
    for workers in ("1", "2"):
        monkeypatch.setenv("TUNELINE_WORKERS", workers)
        sc = Scrubber()
        res = clean(rows, policy(pii_block_threshold=None), scrubber=sc)
        results.append((res.kept, res.dropped, res.stats, dict(sc.distinct_values)))
        assert len(forked) == int(workers) - 1
    assert results[0] == results[1]


def test_a_failed_worker_slice_is_computed_by_the_parent():
    import os

    from services.common.parallel import split_run

    parent = os.getpid()
    assert split_run(lambda x: x * 2, 3, 4, True) == (6, 8)
    # a child that dies without answering, or whose function raises: the parent computes that slice
    assert split_run(lambda x: os._exit(3) if os.getpid() != parent else x, 3, 4, True) == (3, 4)
    assert split_run(lambda x: x if os.getpid() == parent else 1 / 0, 3, 4, True) == (3, 4)
    # a result in shared memory, and one larger than the shared memory offered (through the pipe)
    def child_said(x):
        return os.getpid() != parent, "y" * x

    assert split_run(child_said, 10, 100, True, result_bytes=1000) == ((False, "y" * 10), (True, "y" * 100))
    assert split_run(child_said, 10, 100_000, True, result_bytes=1000) == ((False, "y" * 10), (True, "y" * 100_000))


def test_text_in_scripts_written_without_spaces_is_not_low_quality():
    """Words were counted by spaces, so every Chinese, Japanese or Thai sentence scored as one word
    and was dropped as cleaning.low_quality."""
    texts = ["我的订单还没有到，请帮我查一下物流信息", "注文した商品がまだ届いていません。配送状況を確認してください。",
             "สวัสดีครับ ผมมีปัญหาเรื่องการชำระเงิน"]
    assert all(quality(t) >= 0.75 for t in texts)
    rows = [{"row_number": i + 1, "text": f"{t}（工单{i}号）", "label": "x"} for i, t in enumerate(texts * 10)]
    assert "cleaning.low_quality" not in clean(rows).stats["dropped_by_reason"]
    assert quality("好") < 0.2  # one character is still one word


def _sentences(lengths, seed=7):
    """Distinct prose-like rows of about the given lengths in characters."""
    import random

    words = ("card payment transfer account balance refund fee declined pending charge cash atm pin "
             "exchange rate top up verify identity limit statement withdrawal app phone").split()
    rnd = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        text = f"Row {i} asks"
        while len(text) < n:
            text += " " + rnd.choice(words)
        out.append(text + ".")
    return out


def test_the_top_of_a_normal_length_distribution_is_not_cut_for_short_texts():
    from statistics import NormalDist

    # 300 short queries, lengths normally distributed (mean 60, sd 25): the longest are ~130 characters
    dist = NormalDist(60, 25)
    lengths = [max(12, round(dist.inv_cdf((i + 0.5) / 300))) for i in range(300)]
    res = clean(rows_of(_sentences(lengths)), CleaningPolicy(near_dup=False))
    assert res.stats["dropped_by_reason"].get("cleaning.length_outlier", 0) == 0


def test_banking_queries_of_200_to_241_characters_are_not_length_outliers():
    # the shape of banking77: median 47 characters, a long tail of ordinary queries to ~240
    lengths = [47] * 150 + [30] * 60 + [90] * 60 + [120] * 22 + [200, 210, 215, 220, 225, 230, 235, 241]
    res = clean(rows_of(_sentences(lengths)), CleaningPolicy(near_dup=False))
    assert res.stats["dropped_by_reason"].get("cleaning.length_outlier", 0) == 0


def test_a_pasted_log_many_times_the_median_is_still_a_length_outlier():
    lengths = [60] * 100 + [60 * 12]
    res = clean(rows_of(_sentences(lengths)), policy(near_dup=False))
    assert [d["row_number"] for d in res.dropped if d["reason_code"] == "cleaning.length_outlier"] == [101]


def test_length_outliers_off_in_the_plan_keeps_the_long_rows():
    from contracts.common import CleaningSettings, RunPlan
    from services.prep.domain import policy_for

    rows = rows_of(_sentences([60] * 100 + [60 * 12]))
    plan = RunPlan(locator="jsonl:/x.jsonl", target="t", cleaning=CleaningSettings(length_outliers="off"))
    off = policy_for(plan, policy(near_dup=False))
    assert off.outlier_sides == "none"
    res = clean(rows, off)
    assert res.stats["dropped_by_reason"] == {} and len(res.kept) == 101
    on = policy_for(plan.model_copy(update={"cleaning": CleaningSettings(length_outliers=True)}),
                    policy(near_dup=False, outlier_sides="none"))
    assert on.outlier_sides == "both"
    default = policy_for(plan.model_copy(update={"cleaning": CleaningSettings()}), policy(near_dup=False))
    assert clean(rows, default).stats["dropped_by_reason"] == {"cleaning.length_outlier": 1}  # the rule's default


def test_rare_labels_are_dropped_with_their_reason_and_every_row_is_accounted_for():
    from services.prep.clean import drop_rare_labels

    rows = [{"row_number": i, "text": f"t{i}", "label": label}
            for i, label in enumerate(["a"] * 5 + ["b"] + ["c"] * 2 + ["d"] * 3 + ["b"], 1)]
    kept, dropped, labels = drop_rare_labels(rows, 3, keep=frozenset({"c"}))
    assert labels == ["b"]  # b has 2 rows; c (2 rows) is kept as asked
    assert [d["row_number"] for d in dropped] == [6, 12]
    assert {d["reason_code"] for d in dropped} == {"cleaning.rare_label"} and "2 rows" in dropped[0]["detail"]
    assert [r["row_number"] for r in kept] == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]
    assert len(kept) + len(dropped) == len(rows)
