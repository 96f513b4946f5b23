import random

from services.prep.neardup import NearDupIndex, jaccard_words

BASE = ("The NameNode fails to restart after a crash because the edit log is truncated at the end and the "
        "loader throws an EOFException while replaying the last transaction of the segment, which leaves "
        "the cluster unavailable until an operator removes the partial record by hand and restarts it again. "
        "We saw this twice on a three node test cluster running the current release with default settings.")


def test_constructed_near_duplicates_are_found():
    variants = [
        BASE.replace("twice", "three times"),  # a changed word
        BASE.replace(" ", "  ").replace(",", " ,").replace(".", " ."),  # whitespace / punctuation
        BASE + "\n\nThanks,\nJohn",  # appended signature
        BASE.upper(),  # case
    ]
    for v in variants:
        idx = NearDupIndex()
        assert idx.add("base", BASE) is None
        m = idx.add("v", v)
        assert m is not None and m.key == "base" and m.similarity >= 0.8, (v[:40], m, jaccard_words(BASE, v))


def test_same_template_different_content_is_not_a_duplicate():
    rng = random.Random(0)
    words = ("block replica datanode heartbeat quota lease snapshot checksum balancer token audit metric "
             "scheduler container queue reducer mapper shuffle spill codec").split()
    texts = [f"Component {w} fails: " + " ".join(rng.sample(words, 12)) for w in words]
    idx = NearDupIndex()
    assert idx.add_many(list(range(len(texts))), texts) == [None] * len(texts)


def test_add_many_equals_repeated_add_and_dups_are_not_indexed():
    texts = [BASE, BASE.replace("twice", "thrice"), "something else entirely " * 5, BASE + " Extra words here."]
    one = NearDupIndex()
    seq = [one.add(i, t) for i, t in enumerate(texts)]
    many = NearDupIndex().add_many(list(range(len(texts))), texts)
    assert seq == many
    assert seq[0] is None and seq[1].key == 0 and seq[2] is None and seq[3].key == 0
    assert len(one) == 2


def test_query_does_not_insert():
    idx = NearDupIndex()
    idx.add_many(["e1"], [BASE])
    assert idx.query(BASE.replace("twice", "often")).key == "e1"
    assert idx.query("an unrelated bug report about the web UI layout") is None
    assert len(idx) == 1


def test_deterministic_and_seeded():
    a = NearDupIndex(seed=1).sketch([BASE]).sigs[0]
    b = NearDupIndex(seed=1).sketch([BASE]).sigs[0]
    c = NearDupIndex(seed=2).sketch([BASE]).sigs[0]
    assert (a == b).all() and not (a == c).all()


def test_texts_without_words_never_match():
    idx = NearDupIndex()
    assert idx.add_many([1, 2], ["!!!", "!!!"]) == [None, None]
    assert len(idx) == 0 and idx.query("???") is None


def test_one_or_two_word_texts_are_left_to_exact_dedup():
    # a band needs 2 filled bins to be an LSH key, and 1-2 words fill at most 2 bins of 128: such
    # texts are only caught when identical after normalisation, by the exact dedup step
    idx = NearDupIndex()
    assert idx.add_many([1, 2], ["NPE", "npe"]) == [None, None]


def test_long_texts_cut_must_have_similar_lengths():
    long = BASE * 10
    idx = NearDupIndex(max_chars=512)
    idx.add("long", long)
    assert idx.query(long[:600]) is None  # same first 512 chars, a fifth of the length
    assert idx.query(long + " tail").key == "long"
