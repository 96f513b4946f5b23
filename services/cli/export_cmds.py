"""`tuneline export RUN --format onnx-int8 [--format ...]`: export an earlier run's adapter again in other
formats. Publishes `export.run` (a run of its own, `export-...`) and waits for the export service's answer (export.reexported,
or export.failed with its reason code); prints each format's outcome and parity."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from pydantic import ValidationError

from services.cli.errors import refused, validation_lines


def format_lines(formats: list[dict]) -> list[str]:
    lines = [f"  {'format':<12} {'status':<8} {'rows':>5} {'labels':>9} {'max|dlogit|':>12} {'acc':>6} {'drop':>7}"]
    for f in formats:
        p = f.get("parity") or {}
        if f["status"] != "shipped":
            lines.append(f"  {f['format']:<12} {'failed':<8} [{f.get('reason_code')}] {f.get('message')}")
            continue
        if not p:
            lines.append(f"  {f['format']:<12} {'shipped':<8} (the adapter itself)")
            continue
        acc, drop = p.get("accuracy"), p.get("accuracy_drop")
        lines.append(f"  {f['format']:<12} {'shipped':<8} {p['rows']:>5} "
                     f"{'same' if p['labels_identical'] else format(p['label_agreement'], '.1%'):>9} "
                     f"{p['max_abs_logit_diff']:>12.2e} {'-' if acc is None else format(acc, '.3f'):>6} "
                     f"{'-' if drop is None else format(drop, '+.3f'):>7}  {f['path']}/  ({f.get('runtime')})")
    return lines


def cmd_export(main, args) -> int:
    from contracts.commands import ExportRun
    from services.common.commands import envelope_of, publish_and_wait
    from services.common.ids import new_run_id

    prefix = "tuneline export"
    try:
        cmd = ExportRun(run_id=args.run, formats=args.format, requested_by=os.environ.get("USER", "cli"))
    except ValidationError as exc:
        for line in validation_lines(exc, prefix, {"formats": "--format"}):
            print(line, file=sys.stderr)
        return 2
    if not asyncio.run(main._run_recorded(args.run)):
        print(f"{prefix}: no run {args.run} is recorded: nothing sent (`tuneline events --run RUN` lists a run's "
              "events)", file=sys.stderr)
        return 1

    async def go():
        nc, js = await main._js(main.urls()[0])
        try:
            # a run of its own, as registry commands are: a refusal does not fail the run it names
            return await publish_and_wait(js, envelope_of(cmd, f"export-{new_run_id()}", "cli"), args.timeout)
        finally:
            await nc.close()

    got = asyncio.run(go())
    if got is None:
        print(f"{prefix}: no answer from the export service within {args.timeout:.0f}s; is it up? (`tuneline status`)",
              file=sys.stderr)
        return 1
    if got["type"] != "export.reexported":
        return refused(prefix, got.get("reason_code") or "export.smoke_failed",
                       (got.get("payload") or {}).get("message") or got["type"])
    p = got["payload"]
    if args.json:
        print(json.dumps(got, indent=2, default=str))
        return 0
    print(f"run {args.run} exported again as {', '.join(p['requested'])}: artifact {p['export']['sha256'][:12]} "
          f"(`tuneline artifacts {args.run}` lists it)")
    print("\n".join(format_lines([f for f in p["formats"] if f["format"] in p["requested"]])))
    failed = [f for f in p["formats"] if f["format"] in p["requested"] and f["status"] != "shipped"]
    return 2 if failed else 0


def add_parser(sub, main) -> None:
    ex = sub.add_parser("export", help="export an earlier run's adapter again in other formats (onnx, onnx-int8, ...)")
    ex.add_argument("run")
    ex.add_argument("--format", action="append", required=True,
                    help="merged, onnx, onnx-int8 (encoders); merged, gguf, gguf-q8_0, gguf-q4_k_m (chat models); "
                         "repeat for several")
    ex.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the export service's answer")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(fn=lambda a: cmd_export(main, a))
