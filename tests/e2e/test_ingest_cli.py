"""`tuneline ingest introspect | dry-run | commit` through the bus, as a user types them: every
question and answer lands in the audit trail, every rejected row is kept with its reason."""

from __future__ import annotations

import csv
import json

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.connected]

LABELS = ["billing", "login", "shipping"]
TEXTS = {
    "billing": "my invoice {i} shows a charge I do not recognise, the amount is wrong",
    "login": "I cannot sign in to account {i}, the reset mail never arrives",
    "shipping": "parcel {i} is stuck in the depot and tracking has not moved",
}


def write_csv(path, n_per_label: int = 40):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["ticket_id", "title", "body", "category"])
        for i in range(n_per_label):
            for label in LABELS:
                w.writerow([f"T{i}{label[:2]}", f"ticket {i}", TEXTS[label].format(i=i) + f" ref {i * 7919 % 1000}", label])
    return path


def write_mixed_jsonl(path):
    good = [json.dumps({"text": TEXTS[lab].format(i=i), "label": lab}) for i in range(30) for lab in LABELS]
    bad = ["{oops", json.dumps({"text": "", "label": "billing"}), json.dumps({"label": "login"}), "[1, 2]",
           json.dumps({"text": "x", "label": "refunds"})]
    path.write_text("\n".join(good[:10] + bad + good[10:]) + "\n")
    return path, len(good), bad


def test_introspect_proposes_a_mapping_with_confidence_and_rationale(cli):
    src = write_csv(cli.data / "tickets.csv")
    proc = cli("ingest", "introspect", f"csv:{src}", "--json")
    p = json.loads(proc.stdout)
    best = p["hypotheses"][0]
    assert best["shape"] == "single_label_classification" and best["confidence"] >= 0.8 and p["auto_pick"]
    assert best["mapping"]["text"] == ["title", "body"] and best["mapping"]["label"] == "category"
    assert "category" in best["rationale"]
    text = cli("ingest", "introspect", f"csv:{src}").stdout
    assert "single_label_classification" in text and "picked automatically" in text


def test_dry_run_shows_every_rejection_by_reason_and_commits_nothing(cli):
    src, n_good, bad = write_mixed_jsonl(cli.data / "mixed.jsonl")
    proc = cli("ingest", "dry-run", f"jsonl:{src}", "--map", "text=text", "--map", "label=label",
               "--map", "label_space=billing,login,shipping", "--json")
    p = json.loads(proc.stdout)
    assert p["rows_read"] == n_good + len(bad) == p["rows_accepted"] + p["rows_rejected"]
    assert p["rejected_by_reason"] == {"ingest.unparseable_row": 2, "ingest.empty_text": 1,
                                       "ingest.missing_field": 1, "ingest.label_outside_space": 1}
    assert len(p["sample_accepted"]) == 5
    human = cli("ingest", "dry-run", f"jsonl:{src}", "--map", "text=text", "--map", "label=label",
                "--map", "label_space=billing,login,shipping").stdout
    assert "ingest.label_outside_space" in human and "row 15" in human  # the 'refunds' row, with its number
    events = json.loads(cli("events", "--run", _run_of(cli, "dryrun"), "--json").stdout)
    assert [e["type"] for e in events] == ["ingest.dry_run", "ingest.dry_run_completed"]
    assert not any(e["type"] == "ingest.committed" for e in events)


def test_a_weak_proposal_is_refused_without_force_with_the_reason(cli):
    src = cli.data / "nolabel.jsonl"
    src.write_text("\n".join(json.dumps({"note": f"free text without a label, number {i}"}) for i in range(30)) + "\n")
    proc = cli("ingest", "dry-run", f"jsonl:{src}", check=False)
    assert proc.returncode == 1 and "ingest.mapping_low_confidence" in proc.stderr and "--force" in proc.stderr


def test_commit_until_prep_writes_the_dataset_version_and_stops_there(cli):
    src = write_csv(cli.data / "tickets2.csv", n_per_label=30)
    proc = cli("ingest", "commit", f"csv:{src}", "--target", "tickets", "--until", "prep", timeout=300)
    assert "status=SUCCEEDED" in proc.stdout, proc.stdout
    run_id = next(w for w in proc.stdout.split() if w.startswith("ingest-"))
    events = json.loads(cli("events", "--run", run_id, "--json").stdout)
    types = [e["type"] for e in events]
    assert types == ["ingest.commit", "ingest.committed", "prep.test_set_frozen", "prep.cleaned", "prep.prepared"]
    committed, frozen, cleaned, prepared = (e["payload"] for e in events[1:])
    assert committed["rows_read"] == committed["rows_accepted"] == 90 and committed["mapping_confidence"] >= 0.8
    assert cleaned["rows_in"] == cleaned["rows_kept"] + sum(cleaned["dropped_by_reason"].values())
    assert prepared["train_rows"] + prepared["eval_rows"] + prepared["test_rows"] == cleaned["rows_kept"]
    assert prepared["test_set"] == frozen["test_set"] and frozen["test_set"]["target"] == "tickets"
    assert {w["reason_code"] for w in prepared["warnings"]} == {"prep.few_rows_total", "prep.few_rows_for_class"}
    assert prepared["cost_estimate"]["usd"] > 0 and prepared["openai_train"]["sha256"]
    timeline = json.loads(cli("timeline", run_id, "--json").stdout)
    assert [s["stage"] for s in timeline["stages"]] == ["ingest", "prep"]


def test_a_locator_outside_the_roots_is_refused_at_introspection(cli):
    proc = cli("ingest", "introspect", "jsonl:/etc/passwd", check=False)
    assert proc.returncode == 1 and "ingest.locator_outside_roots" in proc.stderr


def _run_of(cli, prefix: str) -> str:
    """The latest run whose id starts with prefix, from the timeline projection."""
    import asyncio

    import asyncpg

    from services.cli import stack

    url = stack.read_state(cli.data)["postgres"]["url"]

    async def q():
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval("SELECT run_id FROM run_events WHERE run_id LIKE $1 ORDER BY global_position DESC LIMIT 1",
                                       prefix + "-%")
        finally:
            await conn.close()

    return asyncio.run(q())
