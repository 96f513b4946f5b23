"""`tuneline ingest introspect|dry-run|commit`: each publishes its command on the bus and shows the
event the ingest service answers with, from the audit trail (so every question asked is recorded)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from pydantic import ValidationError

from contracts.commands import CommitIngest, DryRunIngest, IntrospectSource
from contracts.common import FieldMapping, RunPlan
from contracts.reason_codes import REASON_CODES
from services.cli.errors import validation_lines
from services.cli.run_options import with_min_per_class

MAP_HELP = ("field mapping, repeatable KEY=VALUE: shape=multi_field_triage, text=summary,description, "
            "label=priority, heads.component=components, tags=labels, provenance=source, label_space=a,b,c; "
            "or one JSON object")


def parse_map(items: list[str] | None) -> FieldMapping | None:
    """`--map text=title,body --map label=label` (or `--map '{"text": [...], ...}'`) -> FieldMapping."""
    if not items:
        return None
    data: dict = {}
    for item in items:
        item = item.strip()
        if item.startswith("{"):
            try:
                data.update(json.loads(item))
            except ValueError as exc:
                raise SystemExit(f"--map: not a JSON object ({exc}); expected KEY=VALUE or one JSON object") from None
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--map {item!r}: expected KEY=VALUE ({MAP_HELP})")
        if key.startswith("heads."):
            data.setdefault("heads", {})[key.split(".", 1)[1]] = value
        elif key in ("text", "label_space"):
            data[key] = [v.strip() for v in value.split(",") if v.strip()]
        else:
            data[key] = value
    if "heads" in data and "shape" not in data:
        data["shape"] = "multi_field_triage"
    try:
        return FieldMapping.model_validate(data)
    except ValidationError as exc:
        raise SystemExit("\n".join(validation_lines(exc, "--map", whole="mapping"))) from None


# command fields -> the option that sets them, for validation messages (see services.cli.errors)
OPTIONS = {"locator": "LOCATOR", "sample_size": "--sample-size", "mapping": "--map", "force": "--force",
           "target": "--target", "force_mapping": "--force", "eval_locator": "--eval-locator", "until": "--until",
           ("cleaning", "min_per_class"): "--min-per-class"}


def _build(what: str, make):
    """The command `make()` builds; options it refuses are one line each on stderr, exit status 2
    (like `tuneline run`), never a traceback or the value given (a DSN put where DSN_ENV goes)."""
    try:
        return make()
    except ValidationError as exc:
        for line in validation_lines(exc, f"tuneline ingest {what}", OPTIONS):
            print(line, file=sys.stderr)
        raise SystemExit(2) from None  # a usage error, like argparse's


async def _await_event(db_url: str, run_id: str, types: tuple[str, ...], timeout: float) -> dict | None:
    from services.audit.db import connect_as_app

    conn = await connect_as_app(db_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = await conn.fetchrow(
                "SELECT type, reason_code, payload FROM run_events WHERE run_id = $1 AND type = ANY($2::text[]) "
                "ORDER BY global_position LIMIT 1", run_id, list(types))
            if row is not None:
                return {"type": row["type"], "reason_code": row["reason_code"], "payload": json.loads(row["payload"])}
            await asyncio.sleep(0.3)
        return None
    finally:
        await conn.close()


def _ask(main, command, kind_prefix: str, answer: str, args) -> tuple[int, dict | None]:
    """Publish the command and wait for its answer. Returns (exit code, payload to render); the
    payload is None when there is nothing left to render (a failure, or --json already printed)."""
    run_id = asyncio.run(main.publish_command(command, prefix=kind_prefix))
    found = asyncio.run(_await_event(main.urls()[1], run_id, (answer, "ingest.failed", "bus.message_dead_lettered"),
                                     args.timeout))
    if found is None:
        raise SystemExit(f"{run_id}: no answer within {args.timeout:.0f}s; is the stack up? (`tuneline status`)")
    if found["type"] != answer:
        code = found["reason_code"]
        print(f"FAILED [{code}] {found['payload'].get('message') or found['payload'].get('error')}", file=sys.stderr)
        if code in REASON_CODES:
            print(f"  {code}: {REASON_CODES[code].meaning}", file=sys.stderr)
        return 1, None
    if args.json:
        print(json.dumps(found["payload"], indent=2))
        return 0, None
    return 0, found["payload"]


def cmd_introspect(main, args) -> int:
    cmd = _build("introspect", lambda: IntrospectSource(locator=main.absolute_locator(args.locator),
                                                         sample_size=args.sample_size))
    code, p = _ask(main, cmd, "introspect", "ingest.introspected", args)
    if p is None:
        return code
    print(f"{p['locator']}: {p['sample_rows']} sample rows, fields: {', '.join(p['fields'])}")
    for i, h in enumerate(p["hypotheses"], 1):
        m = {k: v for k, v in h["mapping"].items() if v not in (None, [], {}) and k != "shape"}
        print(f"{i}. {h['shape']:<28} confidence {h['confidence']:.2f}  {json.dumps(m) if m else ''}")
        print(f"   {h['rationale']}")
    best = p["hypotheses"][0] if p["hypotheses"] else None
    if best and p["auto_pick"]:
        print(f"\nproposal: {best['shape']} (>= 0.80: picked automatically by dry-run and commit)")
    elif best:
        print(f"\nno automatic pick: the best proposal is {best['confidence']:.2f} < 0.80; "
              f"give --map or --force")
    return 0


def _read_rejected(uri: str, per_code: int = 3) -> dict[str, list[dict]]:
    path = Path(urlparse(uri).path)
    out: dict[str, list[dict]] = {}
    if not path.exists():
        return out
    with open(path, "rb") as f:
        for line in f:
            r = json.loads(line)
            lst = out.setdefault(r["reason_code"], [])
            if len(lst) < per_code:
                lst.append(r)
    return out


def cmd_dry_run(main, args) -> int:
    mapping = parse_map(args.map)
    cmd = _build("dry-run", lambda: DryRunIngest(locator=main.absolute_locator(args.locator), mapping=mapping,
                                                 force=args.force, sample_size=args.sample_size))
    code, p = _ask(main, cmd, "dryrun", "ingest.dry_run_completed", args)
    if p is None:
        return code
    m = {k: v for k, v in p["mapping"].items() if v not in (None, [], {})}
    print(f"{p['locator']} with mapping {json.dumps(m)}")
    print(f"read {p['rows_read']}: accepted {p['rows_accepted']}, rejected {p['rows_rejected']}")
    examples = _read_rejected(p["rejected"]["uri"])
    for code, n in sorted(p["rejected_by_reason"].items(), key=lambda kv: -kv[1]):
        print(f"  {n:>8}  {code}: {REASON_CODES[code].meaning if code in REASON_CODES else ''}")
        for r in examples.get(code, []):
            print(f"            row {r['row_number']} (offset {r['source_offset']}): {r['detail'][:120]}")
    print(f"every rejected row: {p['rejected']['uri']}")
    if p["sample_accepted"]:
        print("sample of accepted rows:")
        for r in p["sample_accepted"]:
            print("  " + json.dumps(r, ensure_ascii=False)[:200])
    return 0


def cmd_commit(main, args) -> int:
    mapping = parse_map(args.map)
    plan = _build("commit", lambda: RunPlan(
        locator=main.absolute_locator(args.locator), target=args.target, mapping=mapping, force_mapping=args.force,
        until=args.until, eval_locator=main.absolute_locator(args.eval_locator) if args.eval_locator else None,
        cleaning=with_min_per_class({}, args.min_per_class)))
    run_id = asyncio.run(main.publish_command(CommitIngest(plan=plan), prefix="ingest"))
    print(f"started {run_id} (ingest commit, until {args.until})", flush=True)
    return main.follow_and_print(run_id, args.timeout)


def add_parser(sub, main) -> None:
    ing = sub.add_parser("ingest", help="introspect a source, dry-run a mapping, commit a dataset")
    isub = ing.add_subparsers(dest="ingest_command", required=True)

    def common(p):
        p.add_argument("locator", help="jsonl:PATH, csv:PATH, hf:ID:SPLIT[:REVISION], pg:DSN_ENV?query=...")
        p.add_argument("--timeout", type=float, default=600)

    i = isub.add_parser("introspect", help="rank shape hypotheses and propose a mapping")
    common(i)
    i.add_argument("--sample-size", type=int, default=20)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=lambda a: cmd_introspect(main, a))
    d = isub.add_parser("dry-run", help="map every row without committing: counts, sample, every rejection")
    common(d)
    d.add_argument("--map", action="append", help=MAP_HELP)
    d.add_argument("--force", action="store_true", help="accept a proposal below 0.80 confidence")
    d.add_argument("--sample-size", type=int, default=5)
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=lambda a: cmd_dry_run(main, a))
    c = isub.add_parser("commit", help="commit accepted and rejected rows as artifacts (and prep them)")
    common(c)
    c.add_argument("--target", default="datasets", help="the target name the run is filed under")
    c.add_argument("--map", action="append", help=MAP_HELP)
    c.add_argument("--force", action="store_true")
    c.add_argument("--eval-locator", default=None, help="an explicit eval dataset (checked for overlap)")
    c.add_argument("--until", default="prep", choices=["ingest", "prep"], help="stop after this stage")
    c.add_argument("--min-per-class", type=int, default=None, metavar="N",
                   help="prep drops labels with fewer than N rows after cleaning (cleaning.rare_label)")
    c.set_defaults(fn=lambda a: cmd_commit(main, a))
