"""Introspection: ranked shape hypotheses with a mapping, a confidence and a rationale; automatic
pick only at 0.80 or above; the proposals on the four shared datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.ingest.introspect import AUTO_PICK, choose, introspect, spread_sample

DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def best(rows):
    hyps = introspect(rows)
    assert hyps, "no hypothesis"
    return hyps[0]


def test_every_shape_is_ranked_once_best_first():
    hyps = introspect([{"text": f"the printer on floor {i} is jammed again", "label": "hw" if i % 2 else "sw"}
                       for i in range(20)])
    shapes = [h.shape for h in hyps]
    assert len(shapes) == len(set(shapes)) and len(shapes) >= 5
    assert [h.confidence for h in hyps] == sorted((h.confidence for h in hyps), reverse=True)
    assert all(h.rationale for h in hyps)


def test_single_label_classification_is_proposed_with_high_confidence():
    h = best([{"id": i, "text": f"my card was charged twice for order {i}", "category": ["billing", "card", "refund"][i % 3]}
              for i in range(20)])
    assert h.shape == "single_label_classification" and h.confidence >= AUTO_PICK
    assert (h.mapping.text, h.mapping.label) == (["text"], "category")
    assert "category" in h.rationale


def test_title_and_body_are_both_proposed_as_text():
    h = best([{"title": f"crash {i}", "body": f"the app crashes when I open settings page {i}", "label": "bug"}
              for i in range(20)])
    assert h.mapping.text == ["title", "body"]


def test_triage_fields_make_a_multi_field_proposal_with_heads_and_tags():
    rows = [{"summary": f"NPE in datanode {i}", "description": f"stack trace follows for node {i} ...",
             "priority": ["Major", "Minor", "Critical"][i % 3], "components": [["hdfs"], [], ["yarn", "ui"]][i % 3],
             "labels": [[], ["newbie"]][i % 2], "project": ["HDFS", "YARN"][i % 2]} for i in range(20)]
    h = best(rows)
    assert h.shape == "multi_field_triage" and h.confidence >= AUTO_PICK
    assert h.mapping.heads["severity"] == "priority" and h.mapping.heads["component"] == "components"
    assert h.mapping.tags == "labels" and h.mapping.label == "priority"


def test_chat_preference_prompt_completion_and_extraction_sources_are_recognised():
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}] * 20
    assert best(chat).shape == "chat_messages"
    pref = [{"prompt": f"question {i}", "chosen": "a careful answer", "rejected": "a rude answer"} for i in range(20)]
    assert best(pref).shape == "preference_pairs"
    pc = [{"prompt": f"translate {i}", "completion": f"a rather long translated sentence number {i}"} for i in range(20)]
    h = best(pc)
    assert h.shape == "prompt_completion" and (h.mapping.prompt, h.mapping.completion) == ("prompt", "completion")
    ext = [{"document": f"Invoice {i} from ACME Corp dated 2024-01-0{i % 9 + 1} total 12.50",
            "fields": {"vendor": "ACME", "total": 12.5}} for i in range(20)]
    h = best(ext)
    assert h.shape == "json_extraction" and h.mapping.target == "fields"


def test_a_source_without_a_label_is_not_confident_and_is_not_picked_without_force():
    hyps = introspect([{"body": f"free text number {i} with several words in it"} for i in range(20)])
    assert hyps[0].confidence < AUTO_PICK
    assert choose(hyps) is None


def test_force_picks_the_best_usable_proposal_below_the_threshold():
    hyps = introspect([{"txt": f"words words words {i} more words here", "cls": "ab"[i % 2], "grp": "xy"[i % 2]}
                       for i in range(20)])
    picked = choose(hyps, force=True)
    assert picked is not None and picked is hyps[0]


def test_spread_sample_covers_the_whole_stream_in_order_and_constant_memory():
    sample = spread_sample(iter(range(10_000)), 20)
    assert len(sample) == 20 and sample == sorted(sample)
    assert sample[0] == 0 and sample[-1] > 9_000
    assert spread_sample(iter(range(5)), 20) == [0, 1, 2, 3, 4]


# --- the four shared datasets ---------------------------------------------------------------------


def _sample(name: str, locator_path: str):
    from services.ingest.domain import introspect_source, open_locator

    path = DATASETS / name / locator_path
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/datasets is not on this machine)")
    scheme = "csv" if path.suffix == ".csv" else "jsonl"
    return introspect_source(open_locator(f"{scheme}:{path}", roots=[DATASETS]))


@pytest.mark.dataset
def test_jira_is_proposed_as_triage_on_priority_with_summary_and_description():
    h = _sample("apache_jira_bugs", "bugs_train_val.jsonl").hypotheses[0]
    assert h.shape == "multi_field_triage" and h.confidence >= AUTO_PICK
    assert h.mapping.text == ["summary", "description"] and h.mapping.label == "priority"


@pytest.mark.dataset
def test_nlbse_is_proposed_as_single_label_on_title_and_body():
    h = _sample("nlbse24_issue_report_classification", "issues_train.csv").hypotheses[0]
    assert h.shape == "single_label_classification" and h.confidence >= AUTO_PICK
    assert (h.mapping.text, h.mapping.label) == (["title", "body"], "label")


@pytest.mark.dataset
def test_banking77_is_proposed_as_single_label_on_category():
    h = _sample("banking77", "train.csv").hypotheses[0]
    assert (h.shape, h.mapping.text, h.mapping.label) == ("single_label_classification", ["text"], "category")
    assert h.confidence >= AUTO_PICK


@pytest.mark.dataset
def test_bitext_is_proposed_on_utterance_with_the_finer_intent_label():
    path = next((DATASETS / "bitext_customer_support_20k").glob("*.csv"), None) if DATASETS.exists() else None
    if path is None:
        pytest.skip("bitext dataset absent")
    h = _sample("bitext_customer_support_20k", path.name).hypotheses[0]
    assert (h.mapping.text, h.mapping.label) == (["utterance"], "intent")


def test_a_label_with_as_many_values_as_rows_is_not_proposed_as_a_label():
    rows = [{"text": f"the printer on floor {i} is jammed again", "label": f"ticket-{i}"} for i in range(20)]
    h = next(h for h in introspect(rows) if h.shape == "single_label_classification")
    assert h.confidence < AUTO_PICK and h.confidence <= 0.3
    assert "not a label" in h.rationale and "20 distinct" in h.rationale
    assert choose(introspect(rows)) is None or choose(introspect(rows)).shape != "single_label_classification"


def test_a_source_with_many_classes_keeps_its_label_and_one_with_a_unique_label_loses_it(tmp_path):
    import json

    from services.ingest.domain import introspect_source
    from services.ingest.sources.jsonl import JsonlSource

    def proposal(label_of):
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps({"text": f"my card payment number {i} was declined at the shop",
                                            "label": label_of(i)}) + "\n" for i in range(600)))
        return next(h for h in introspect_source(JsonlSource(path)).hypotheses
                    if h.shape == "single_label_classification")

    # 77 classes: any 20 rows show 20 distinct values, but the wider sample shows them repeat
    assert proposal(lambda i: f"intent_{i % 77}").confidence >= AUTO_PICK
    unique = proposal(lambda i: f"ticket-{i}")
    assert unique.confidence <= 0.3 and "not a label" in unique.rationale
