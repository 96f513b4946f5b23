"""`tuneline run --tune N --budget MINUTES` through the whole stack (`tuneline up`, all six services), on a
tiny BERT: one `training.trial_completed` per trial (each trained on the train split and scored on the
validation split), `training.tuning_completed` naming the winner, then the final model trained with the
winner's settings (the same seeded training: its best checkpoint scores what the winning trial scored);
the test set is never what tuning read; `follow` shows a line per trial. Slow (`make test-slow`)."""

from __future__ import annotations

import itertools
import json

import pytest

from contracts.common import ArtifactRef
from services.common.artifacts import ArtifactStore
from services.common.jsonl import loads_jsonl
from services.prep.domain import row_id
from tests.tiny_models import NEGATIVE, POSITIVE, build_tiny_bert

pytestmark = [pytest.mark.e2e, pytest.mark.connected, pytest.mark.slow]

TRIALS = 3


def write_rows(path) -> int:
    """Distinct sentiment rows in the tiny BERT's vocabulary (prep drops exact duplicates)."""
    fillers = ["the movie was", "the film was really", "a show", "the plot was very", "acting", "the acting was",
               "a film", "the show was very"]
    rows = []
    for filler, (i, word), order in itertools.product(fillers, enumerate(POSITIVE + NEGATIVE), (0, 1)):
        text = f"{filler} {word}" if order else f"{word} {filler}"
        rows.append({"text": text, "label": "pos" if word in POSITIVE else "neg"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def test_tune_runs_trials_on_validation_and_trains_the_final_model_with_the_winner(cli):
    data = cli.data / "tune-sentiment.jsonl"
    write_rows(data)
    tiny = build_tiny_bert(cli.data / "tiny-bert-tune")
    proc = cli("run", "--locator", f"jsonl:{data}", "--target", "tuned-sentiment", "--base-model", tiny,
               "--text-field", "text", "--label-field", "label",
               "--validation-fraction", "0.25", "--set", "batch_size=32", "--set", "max_length=16",
               "--set", "warmup_ratio=0", "--set", "learning_rate=0.01", "--set", "epochs=3", "--set", "patience=null", "--set", "eval_every_steps=4",
               "--tune", str(TRIALS), "--budget", "10",
               "--tune-space", "learning_rate=[0.01,0.03,0.001]", "--tune-space", "epochs=[3,6]")
    run_id = next(w for w in proc.stdout.split() if w.startswith("run-"))
    assert "status=SUCCEEDED" in proc.stdout, proc.stdout + proc.stderr
    for k in range(1, TRIALS + 1):  # follow: a line per trial, then the winner
        assert f"trial {k}/{TRIALS}: validation macro_f1" in proc.stdout, proc.stdout
    assert "tuning: trial " in proc.stdout and "training the final model with" in proc.stdout

    events = json.loads(cli("events", "--run", run_id, "--json").stdout)
    types = [e["type"] for e in events]
    prepared = next(e for e in events if e["type"] == "prep.prepared")["payload"]
    trials = [e["payload"] for e in events if e["type"] == "training.trial_completed"]
    tuned = next(e for e in events if e["type"] == "training.tuning_completed")["payload"]
    completed = next(e for e in events if e["type"] == "training.completed")["payload"]
    # the order: every trial, the verdict, then the final training
    assert (types.index("preflight.passed") < types.index("training.trial_completed")
            and max(i for i, t in enumerate(types) if t == "training.trial_completed") < types.index("training.tuning_completed")
            < types.index("training.started") < types.index("training.completed"))
    assert [t["trial"] for t in trials] == list(range(1, TRIALS + 1))
    assert all(t["status"] == "completed" and t["metric_name"] == "macro_f1" and t["metric"] is not None for t in trials)
    assert trials[0]["settings"] == {"learning_rate": 0.01, "epochs": 3.0}  # trial 1: the recipe's own settings
    assert len({json.dumps(t["settings"], sort_keys=True) for t in trials}) == TRIALS
    assert all((t["train_rows"], t["validation_rows"]) == (prepared["train_rows"], prepared["eval_rows"]) for t in trials)

    best = max(trials, key=lambda t: (t["metric"], -t["trial"]))
    assert (tuned["best_trial"], tuned["best_settings"], tuned["best_metric"]) == (best["trial"], best["settings"],
                                                                                  best["metric"])
    assert tuned["trials_run"] == TRIALS and not tuned["stopped_by_budget"]
    assert tuned["baseline_metric"] == trials[0]["metric"]
    # the final model is the winner's settings trained again, seeded: the same best checkpoint and score
    assert (completed["best_step"], completed["best_metric"]) == (best["best_step"], pytest.approx(best["metric"]))
    started = next(e for e in events if e["type"] == "training.started")["payload"]
    steps_per_epoch = -(-prepared["train_rows"] // 32)
    assert started["max_steps"] == round(best["settings"]["epochs"] * steps_per_epoch)

    # tuning read the train and validation splits, never the test set (D14)
    test = prepared["test"]
    assert (tuned["train_sha256"], tuned["validation_sha256"]) == (prepared["train"]["sha256"], prepared["eval"]["sha256"])
    assert test["sha256"] not in (tuned["train_sha256"], tuned["validation_sha256"])
    store = ArtifactStore(cli.data / "artifacts")
    ids = {name: {row_id(r) for r in loads_jsonl(store.read_bytes(ArtifactRef(**prepared[name])))}
           for name in ("train", "eval", "test")}
    assert ids["test"] and not ids["test"] & (ids["train"] | ids["eval"])

    timeline = json.loads(cli("timeline", run_id, "--json").stdout)
    assert timeline["run"]["status"] == "succeeded"


def test_bad_tuning_options_are_refused_at_the_prompt_naming_the_option(cli):
    proc = cli("run", "--locator", "jsonl:/nowhere.jsonl", "--target", "t", "--tune", "0", "--budget", "-2",
               "--tune-space", "base_model=[\"x\"]", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert any(line.startswith("tuneline run: --tune:") for line in lines), proc.stderr
    assert any(line.startswith("tuneline run: --budget:") for line in lines), proc.stderr
    assert any(line.startswith("tuneline run: --tune-space base_model: not a tunable field") for line in lines)
