"""The cleaning defaults on real data: the Apache JIRA bug reports (text = summary + description)."""

import json
import time
from pathlib import Path

import pytest

from bench.cleaning import load_rows
from services.prep.clean import clean

DATA = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "apache_jira_bugs" / "bugs_train_val.jsonl"

pytestmark = pytest.mark.dataset


@pytest.fixture(scope="module")
def jira_rows():
    if not DATA.exists():
        pytest.skip(f"dataset absent: {DATA} (../shared/datasets is not mounted here)")
    return load_rows(DATA)


def test_jira_passes_the_default_policy(jira_rows):
    t = time.perf_counter()
    res = clean(jira_rows)
    elapsed = time.perf_counter() - t
    s = res.stats
    print(f"\n{len(jira_rows)} rows in {elapsed:.2f}s; steps {res.timings}; {json.dumps({k: s[k] for k in ('dropped_by_reason', 'pii_by_kind', 'pii_row_share', 'outlier_share')})}")
    assert len(res.kept) + len(res.dropped) == len(jira_rows)
    assert s["pii_row_share"] < 0.1 and s["outlier_share"] < 0.01
    assert 0 < s["dropped"] < 0.05 * len(jira_rows)
    assert all("key" in r for r in res.kept[:10])
