"""Micro-benchmark of ``services.prep.clean.clean`` on the Apache JIRA rows (default policy).

``python -m bench.cleaning [--runs N] [--fingerprint PATH]`` runs ``clean()`` N times (3 by default)
on the 36,526 rows (text = summary + "\\n\\n" + description, label = priority, as in
tests/unit/test_clean_jira.py) and prints the median seconds and microseconds per input row of each
step and of the total. ``--fingerprint`` writes a digest of the result (kept texts, qualities,
dropped rows, stats) so two versions of the code can be checked for identical output.
The dataset is read from ../shared and never copied.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JIRA = ROOT.parent / "shared" / "datasets" / "apache_jira_bugs" / "bugs_train_val.jsonl"


def load_rows(path: Path = JIRA) -> list[dict]:
    rows = []
    with path.open() as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            rows.append({"row_number": i + 1, "text": (r["summary"] or "") + "\n\n" + (r["description"] or ""),
                         "label": r["priority"], "key": r["key"]})
    return rows


def fingerprint(res) -> dict:
    h = hashlib.sha256()
    for r in res.kept:
        h.update(f"{r['row_number']}\x00{r['quality']}\x00{r['text']}\x01".encode())
    kept = h.hexdigest()
    h = hashlib.sha256()
    for d in sorted(res.dropped, key=lambda d: d["row_number"]):
        h.update(json.dumps(d, sort_keys=True).encode())
    return {"kept": kept, "dropped": h.hexdigest(), "stats": res.stats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fingerprint", type=Path)
    args = ap.parse_args(argv)
    from services.prep.clean import clean

    rows = load_rows()
    n = len(rows)
    runs, totals, res = [], [], None
    for _ in range(args.runs):
        t = time.perf_counter()
        res = clean(rows)
        totals.append(time.perf_counter() - t)
        runs.append(res.timings)
    print(f"{n} rows, {args.runs} runs, median per step:")
    for step in runs[0]:
        s = statistics.median(r[step] for r in runs)
        print(f"  {step:<18} {s:7.3f} s  {s / n * 1e6:7.1f} us/row   runs: {', '.join(f'{r[step]:.3f}' for r in runs)}")
    s = statistics.median(totals)
    print(f"  {'total':<18} {s:7.3f} s  {s / n * 1e6:7.1f} us/row   runs: {', '.join(f'{t:.3f}' for t in totals)}")
    print(f"  dropped: {res.stats['dropped_by_reason']}  pii: {res.stats['pii_by_kind']}")
    if args.fingerprint:
        args.fingerprint.write_text(json.dumps(fingerprint(res), indent=1, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
