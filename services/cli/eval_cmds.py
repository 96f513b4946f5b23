"""`tuneline eval show RUN [--json]`: a run's evaluation report from its recorded events — the
candidate against its baseline per class, the buckets, the regressions and the gate's decision."""

from __future__ import annotations

import asyncio
import json
import sys

from services.common.eval_report import decision_in_words, render, report_of  # noqa: F401 (the CLI's API)


def load_evaluation_file(path: str) -> dict:
    """A run's evaluation settings from a YAML or JSON file (validated as the plan's EvaluationSettings
    when the run command is built). Raises ValueError naming the problem."""
    from pathlib import Path

    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} does not parse as YAML or JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping (judge, gate, prompt_baseline, local_usd_per_hour), "
                         f"not {type(data).__name__}")
    return data


def cmd_eval_show(main, args) -> int:
    events = asyncio.run(main._events(args.run))
    report = report_of(events)
    if report is None:
        print(f"no evaluation recorded for run {args.run}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, default=str, indent=2))
    else:
        print(render(report), end="")
    return 0


def add_parser(sub, main) -> None:
    ev = sub.add_parser("eval", help="a run's evaluation: per-class table, buckets, regressions, gate decision")
    esub = ev.add_subparsers(dest="eval_command", required=True)
    show = esub.add_parser("show", help="print a run's evaluation report")
    show.add_argument("run")
    show.add_argument("--json", action="store_true")
    show.set_defaults(fn=lambda a: cmd_eval_show(main, a))
