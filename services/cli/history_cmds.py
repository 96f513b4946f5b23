"""`tuneline history TARGET` (the History projection) and `tuneline lineage TARGET VERSION` (from run_events);
the reads are services/common/history.py, shared with the API.

History: every fine-tune run of the target, promoted, rejected or abandoned, with what it was trained on, how it
scored against its baseline, what became of it and who acted, and the command that restores an archived version.
Lineage: a registered version back to its source, one hop at a time, each hop an event in run_events found by
the sha256 the hop before names (or, where an event names no artifact of the previous one, by causation id)."""

from __future__ import annotations

import json

from services.cli.db import read_db
from services.cli.errors import refused
from services.common.history import (Hop, NotFound, lineage_chain, manifest_reader,  # noqa: F401 - the CLI's names
                                     read_history, read_lineage)


# --- history ------------------------------------------------------------------------------------


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _p(x) -> str:
    return "-" if x is None else f"{x:.2g}" if x < 0.001 else f"{x:.3f}"


def _t(at) -> str:
    return "-" if at is None else f"{at:%Y-%m-%d %H:%M}"


def history_text(h: dict) -> str:
    runs = h["runs"]
    counts = {o: sum(r["outcome"] == o for r in runs) for o in ("promoted", "rejected", "abandoned", "pending",
                                                                 "unregistered")}
    lines = [f"{h['target']}: {len(runs)} fine-tune run(s): " + ", ".join(f"{n} {o}" for o, n in counts.items() if n)
             + f"  (History at run_events position {h['position']})"]
    if h.get("stopped"):
        lines.append(f"  [audit.projection_failed] History STOPPED at position {h['stopped']['error_position']}: "
                     f"{h['stopped']['error']}")
    lines.append(f"  {'ver':<5}{'run':<26}{'started':<17}{'ended':<17}{'train':>6} {'dataset':<9}{'acc':>6}"
                 f"{'judge c/b':>13}{'delta':>8}{'p':>8}  {'status':<11}{'outcome'}")
    for r in runs:
        judge = f"{_f(r['candidate_judge_mean'])}/{_f(r['baseline_judge_mean'])}"
        lines.append(f"  {('v' + str(r['version'])) if r['version'] else '-':<5}{r['run_id'][:25]:<26}{_t(r['started_at']):<17}"
                     f"{_t(r['ended_at']):<17}{r['train_rows'] if r['train_rows'] is not None else '-':>6} "
                     f"{r['dataset_semver'] or '-':<9}{_f(r['accuracy']):>6}{judge:>13}{_f(r['delta']):>8}"
                     f"{_p(r['p_value']):>8}  {r['status']:<11}{r['outcome']}")
        if r["status"] in ("failed", "cancelled"):
            lines.append(f"        [{r['reason_code']}] {r['failure']}")
        if r["rejection_reason"] and r["status"] == "rejected":
            lines.append(f"        rejected: {r['rejection_reason']}")
        if r["gate_failed"] and r["status"] != "rejected":
            lines.append(f"        gate failed: {', '.join(r['gate_failed'])}")
        for a in r["acts"]:
            if a.get("demoted"):
                continue
            verb = a["type"].split(".", 1)[1]
            lines.append(f"        {a['at'][:16].replace('T', ' ')} {verb} by {a['actor']}"
                         + (" [override]" if a.get("override") else "") + (f": {a['reason']}" if a.get("reason") else ""))
        if r["restore"]:
            lines.append(f"        archived: {r['restore']}")
    if h["datasets"]:
        lines.append("  datasets:")
        for d in h["datasets"]:
            lines.append(f"    {d['semver']:<8} {d['dataset_version']}  {d['rows']} rows, {len(d['label_space'])} labels, "
                         f"manifest {d['manifest_sha256'][:16]}, first run {d['first_run_id']}")
    return "\n".join(lines)


def cmd_history(main, args) -> int:
    try:
        h = read_db(main, lambda conn: read_history(conn, args.target))
    except NotFound as exc:
        return refused("tuneline history", exc.reason_code, exc)
    print(json.dumps(h, indent=2, default=str) if args.json else history_text(h))
    return 0


# --- lineage ------------------------------------------------------------------------------------


def lineage_text(lin: dict) -> str:
    lines = [f"{lin['target']} v{lin['version']} (run {lin['run_id']}), back to its source:"]
    for h in lin["hops"]:
        sha = (h["sha256"] or "")[:16] or "-"
        where = (f"{h['event_type']} @{h['position']}" if h["event_type"] else "not in run_events")
        lines.append(f"  {h['hop']:<24} {sha:<17} {where:<34} [{h['by']}]")
        lines.append(f"  {'':<24} {h['detail']}")
    if lin["unresolved"]:
        lines.append(f"  [audit.lineage_hop_unresolved] the chain breaks at: {', '.join(lin['unresolved'])}")
    return "\n".join(lines)


def cmd_lineage(main, args) -> int:
    try:
        lin = read_db(main, lambda conn: read_lineage(conn, args.target, args.version))
    except NotFound as exc:
        return refused("tuneline lineage", exc.reason_code, exc)
    print(json.dumps(lin, indent=2, default=str) if args.json else lineage_text(lin))
    return 0


def add_parser(sub, main) -> None:
    from services.cli import replay_cmds

    h = sub.add_parser("history", help="every fine-tune run of a target and what became of it (the History projection)")
    h.add_argument("target")
    h.add_argument("--json", action="store_true")
    h.set_defaults(fn=lambda a: cmd_history(main, a))
    ln = sub.add_parser("lineage", help="a version back to its source: export, adapter, training, dataset, rows")
    ln.add_argument("target")
    ln.add_argument("version", help="a version number, vN, or the run id that produced it")
    ln.add_argument("--json", action="store_true")
    ln.set_defaults(fn=lambda a: cmd_lineage(main, a))
    replay_cmds.add_parser(sub, main)
