"""`tuneline run` / `tuneline follow RUN` / `tuneline runs`: a run followed live from the bus (a line per stage
transition, one progress bar for training steps, then a short summary) and the runs listed from the timeline."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from contracts import subjects
from services.audit.projections.timeline import STAGES, fold, stage_of, stage_status, summarize

# A run waits between stages on the next stage's durable consumer: the event that triggers a stage, that stage,
# and its durable. While a run's latest event is a trigger the consumer has not delivered yet, the run is QUEUED.
TRIGGERS = {
    "run.start": ("ingest", "ingest-run-start"),
    "ingest.commit": ("ingest", "ingest-commit"),
    "ingest.committed": ("prep", "prep-ingest-committed"),
    "prep.prepared": ("trainer", "trainer-prep-prepared"),
    "training.completed": ("evaluator", "evaluator-training-completed"),
    "eval.completed": ("export", "export-eval-completed"),
    "export.completed": ("registry", "registry-export-completed"),
}
# Events worth a line although they change no stage's status.
_NOTABLE = {"run.start", "ingest.commit", "training.started", "training.restarted", "training.checkpointed",
            "prep.test_set_frozen", "training.trial_completed", "training.tuning_completed"}
FIRST_EVENT_S = 30.0  # how long `follow` waits for a run's first event before saying it found none


def _at(at: datetime) -> str:
    return at.strftime("%H:%M:%S")


def _loss(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def row_of(env: dict, position: int) -> dict:
    """An envelope from the bus as a run_events row (what the timeline's fold and the report readers take)."""
    at = env.get("occurred_at")
    at = datetime.fromisoformat(at) if isinstance(at, str) else at
    return {**env, "global_position": position, "occurred_at": at or datetime.now(timezone.utc),
            "payload": env.get("payload") or {}}


@dataclass
class Queued:
    """Where a run waits: the stage, and how many of that stage's triggers it takes before this run's."""
    stage: str
    ahead: int


@dataclass
class RunFollow:
    """What a follower has seen of one run, and the lines it shows. Pure: the bus and the terminal are elsewhere."""

    run_id: str
    rows: list[dict] = field(default_factory=list)
    max_steps: int | None = None
    step: int | None = None
    loss: float | None = None
    eval_loss: float | None = None        # the last evaluation's loss
    shown_eval_loss: float | None = None  # the last one printed: each evaluation's loss is printed once
    queued: Queued | None = None
    _stages: dict = field(default_factory=dict)
    _run = None

    # --- what the run is --------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """queued, running, paused, succeeded or failed."""
        if self._run is None:
            return "queued" if self.queued else "unknown"
        st = self._run.status or "running"
        if st == "running" and self.queued:
            return "queued"
        if st == "running" and any(s == "paused" for s in self._stages.values()):
            return "paused"
        return st

    def stage(self, name: str) -> str | None:
        return self._stages.get(name)

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed")

    def waiting_on(self) -> tuple[str, str, int] | None:
        """(stage, durable, trigger's stream position) when the run's latest stage event is a trigger whose stage
        has not begun: the run may be queued there. None otherwise."""
        if self.finished:
            return None
        for r in reversed(self.rows):
            if r["type"] in TRIGGERS:
                stage, durable = TRIGGERS[r["type"]]
                later = {stage_of(x["type"]) for x in self.rows if x["global_position"] > r["global_position"]}
                return None if stage in later else (stage, durable, r["global_position"])
            if stage_status(r["type"]) is not None:
                return None
        return None

    # --- what it shows ----------------------------------------------------------------------------

    def see(self, row: dict) -> list[str]:
        """Take the run's next event; the lines it adds (stage transitions and the notable events)."""
        self.rows.append(row)
        batch = fold(self.rows)
        self._run = batch.runs.get(self.run_id)
        before = dict(self._stages)
        self._stages = {stage: s.status for (run, stage), s in batch.stages.items() if run == self.run_id}
        t, p = row["type"], row["payload"]
        stage = stage_of(t)
        if stage in STAGES and self.queued and self.queued.stage == stage:
            self.queued = None  # its stage took it
        if t == "training.started":
            self.max_steps = p.get("max_steps") or self.max_steps
        if t == "training.progress":
            self.step, self.loss = p.get("step"), p.get("loss")
            self.max_steps = p.get("max_steps") or self.max_steps
            if p.get("eval_loss") is not None:
                self.eval_loss = p["eval_loss"]
            return []
        if t == "training.checkpointed":
            self.step = max(self.step or 0, p.get("step") or 0)
            if p.get("eval_loss") is not None:
                self.eval_loss = p["eval_loss"]
            text = self._evaluation(p)
            return [self._line(row, stage, "eval", text)] if text else []
        changed = self._stages.get(stage) != before.get(stage)
        if not changed and t not in _NOTABLE and row["severity"] not in ("warning", "error", "critical"):
            return []
        shown = self._stages.get(stage) if changed else ""
        if t == "run.start" or t == "ingest.commit":
            shown = "requested"
        return [self._line(row, stage, shown or "", self._summary(t, p, row.get("reason_code")))]

    def _line(self, row: dict, stage: str, status: str, text: str) -> str:
        mark = {"error": "x", "critical": "x", "warning": "!"}.get(row.get("severity"), " ")
        return f"  {_at(row['occurred_at'])} {mark} {stage:<9} {status:<10} {text}"

    def _summary(self, event_type: str, payload: dict, reason_code: str | None) -> str:
        if event_type == "training.completed":
            return self.training_done(payload)
        try:
            return summarize(event_type, payload, reason_code)
        except (KeyError, TypeError, ValueError):  # a payload of an older version: its type still says what happened
            return event_type

    def training_done(self, p: dict) -> str:
        """The trainer's last line. The engine flags stopped_early when patience runs out at the schedule's last
        evaluation too: only fewer steps than planned are an early stop."""
        early = bool(p.get("stopped_early")) and (self.max_steps is None or (p.get("steps") or 0) < self.max_steps)
        text = summarize("training.completed", {**p, "stopped_early": False}, None)
        if early:
            of = f" of {self.max_steps}" if self.max_steps else ""
            text += f"; stopped early at step {p.get('steps')}{of} (no better evaluation within its patience)"
        return text

    def _evaluation(self, p: dict) -> str | None:
        parts = []
        if p.get("metric_name") and p.get("metric") is not None:
            parts.append(f"{p['metric_name']} {_loss(p['metric'])}")
        if p.get("eval_loss") is not None and p["eval_loss"] != self.shown_eval_loss:
            # the local engine reports the evaluation's progress first: its loss was shown there
            parts.append(f"eval loss {_loss(p['eval_loss'])}")
            self.shown_eval_loss = p["eval_loss"]
        if not parts:
            return None
        return f"step {p.get('step')}: " + ", ".join(parts) + (" (best so far)" if p.get("is_best") else "")

    def progress_text(self) -> str:
        """The training figures beside the bar; a new evaluation's loss once, not on every line."""
        parts = [f"loss {_loss(self.loss)}"] if self.loss is not None else []
        if self.eval_loss is not None and self.eval_loss != self.shown_eval_loss:
            parts.append(f"eval loss {_loss(self.eval_loss)}")
            self.shown_eval_loss = self.eval_loss
        return "  ".join(parts)

    def progress_line(self, at: datetime) -> str:
        """Training progress as a plain line (no terminal to draw a bar on)."""
        of = f"/{self.max_steps}" if self.max_steps else ""
        return f"  {_at(at)}   {'trainer':<9} {'step':<10} {self.step}{of}  {self.progress_text()}".rstrip()

    def set_queue(self, queued: Queued | None, at: datetime) -> list[str]:
        """Record where the run waits; a line when that changes."""
        if queued == self.queued:
            return []
        self.queued = queued
        if queued is None:
            return []
        return [f"  {_at(at)}   {queued.stage:<9} {'QUEUED':<10} {queue_words(queued)}"]

    def summary(self, now: datetime, followed_for: float | None = None) -> list[str]:
        """The closing lines: the run's status and what it came to (the gate decision and artifacts: see
        closing_lines, which reads them from the same events)."""
        run = self._run
        target = (run.target if run else None) or "?"
        status = self.status.upper()
        if self.queued:
            status += f" ({queue_words(self.queued)})"
        head = f"run {self.run_id}  target={target}  status={status}"
        if run and self.finished:
            head += f"  in {(run.updated_at - run.started_at).total_seconds():.1f}s"
        lines = [head]
        if run and run.failure:
            lines.append(f"  failure {run.failure}")
        if not self.finished:
            running = [s for s, st in self._stages.items() if st in ("running", "paused")]
            where = f" ({', '.join(running)} {self._stages[running[-1]]})" if running else ""
            after = f" after {followed_for:.0f}s" if followed_for is not None else ""
            lines.append(f"  still going{where}: stopped following{after}; the run goes on. "
                         f"`tuneline follow {self.run_id}` re-attaches")
        return lines


def queue_words(q: Queued) -> str:
    ahead = "no run" if q.ahead == 0 else "1 run" if q.ahead == 1 else f"{q.ahead} runs"
    return f"{ahead} ahead of it in the {q.stage}'s queue"


def closing_lines(main, run_id: str, rows: list[dict]) -> list[str]:
    """The gate's decision in words and the artifacts line, from the run's events."""
    from services.cli import eval_cmds

    lines = []
    report = eval_cmds.report_of(rows)
    if report and (words := eval_cmds.decision_in_words(report)):
        lines.append(words + f"  (tuneline eval show {run_id})")
    if artifacts := main.artifacts_line(run_id, rows):
        lines.append(artifacts)
    lines.append(f"`tuneline timeline {run_id}` has every event")
    return lines


# --- the terminal ---------------------------------------------------------------------------------


class PlainOutput:
    """Lines only (pipes, CI, tests): training progress as a line per progress event."""

    def __init__(self, write=None) -> None:
        self.write = write or (lambda line: print(line, flush=True))

    def lines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)

    def progress(self, follow: RunFollow, at: datetime) -> None:
        self.write(follow.progress_line(at))

    def close(self) -> None:
        pass


class BarOutput:
    """A terminal: lines scroll above one rich progress bar for the training steps."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(highlight=False)
        self.bar = None
        self.task = None

    def lines(self, lines: list[str]) -> None:
        for line in lines:
            self.console.print(line, markup=False)

    def progress(self, follow: RunFollow, at: datetime) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self.bar is None:
            self.bar = Progress(TextColumn("  training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[figures]}"), console=self.console, transient=False)
            self.bar.start()
            self.task = self.bar.add_task("training", total=follow.max_steps, figures="")
        self.bar.update(self.task, completed=follow.step or 0, total=follow.max_steps, figures=follow.progress_text())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def show(follow: RunFollow, out, row: dict) -> None:
    """One event of the run onto the output: its lines, or the progress bar's next step."""
    lines = follow.see(row)
    if stage_of(row["type"]) == "trainer" and follow.stage("trainer") in ("succeeded", "failed"):
        out.close()  # the bar ends with the training, above the lines that follow
    out.lines(lines)
    if row["type"] == "training.progress":
        out.progress(follow, row["occurred_at"])


# --- the bus --------------------------------------------------------------------------------------


async def queue_position(js, durable: str, subject: str, trigger_seq: int) -> Queued | None:
    """How many triggers the stage's durable consumer takes before the one at `trigger_seq`: those delivered and
    not yet acknowledged (being worked on) plus those stored before it and not yet delivered. None: it was
    delivered (the stage has it), or the consumer is not there."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    from services.common.commands import drop_consumer

    try:
        info = await js.consumer_info(subjects.STREAM, durable)
    except Exception:  # noqa: BLE001 - no such consumer (the service never started): nothing to say
        return None
    delivered = info.delivered.stream_seq
    if delivered >= trigger_seq:
        return None
    waiting = 0
    if trigger_seq - delivered > 1:
        sub = await js.subscribe(subject, stream=subjects.STREAM, ordered_consumer=True, config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=delivered + 1, headers_only=True))
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=2.0)
                except Exception:  # noqa: BLE001 - a timeout: nothing more before it
                    break
                if msg.metadata.sequence.stream >= trigger_seq:
                    break
                waiting += 1
        finally:
            await drop_consumer(js, sub)
    return Queued(stage="", ahead=info.num_ack_pending + waiting)


async def follow_bus(js, run_id: str, out, *, start_seq: int | None = None, start_time: datetime | None = None,
                     timeout: float = 1800.0, first_event_s: float = FIRST_EVENT_S,
                     queue_every_s: float = 2.0) -> RunFollow:
    """Follow `run_id` on the bus from stream position `start_seq` (else from `start_time`) until it ends or
    `timeout` passes, showing it on `out`. The consumer is ordered and ephemeral, and deleted on the way out."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    from services.common.commands import drop_consumer, subscribe_run

    follow = RunFollow(run_id)
    rows: asyncio.Queue = asyncio.Queue()

    async def on_event(seq: int, env: dict) -> None:
        await rows.put(row_of(env, seq))

    if start_seq is not None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(start_seq, 1))
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                opt_start_time=start_time or datetime.now(timezone.utc) - timedelta(seconds=60))
    sub = await subscribe_run(js, run_id, config, on_event)
    started = time.monotonic()
    last_queue_check = 0.0
    try:
        while not follow.finished:
            now = time.monotonic()
            limit = started + (timeout if follow.rows else min(timeout, first_event_s))
            if now >= limit:
                break
            try:
                row = await asyncio.wait_for(rows.get(), min(queue_every_s, limit - now))
            except TimeoutError:
                row = None
            if row is not None:
                show(follow, out, row)
                if not rows.empty():
                    continue  # catch up before asking where the run waits
            if follow.finished or time.monotonic() - last_queue_check < queue_every_s:
                continue
            last_queue_check = time.monotonic()
            waiting = follow.waiting_on()
            queued = None
            if waiting:
                stage, durable, seq = waiting
                trigger = next(r for r in follow.rows if r["global_position"] == seq)
                subject = subjects.subject_for(trigger["type"], kind="command" if trigger["type"] in (
                    "run.start", "ingest.commit") else "event")
                queued = await queue_position(js, durable, subject, seq)
                if queued is not None:
                    queued.stage = stage
            out.lines(follow.set_queue(queued, datetime.now(timezone.utc)))
    finally:
        out.close()
        await asyncio.shield(drop_consumer(js, sub))
    return follow


# --- the commands ---------------------------------------------------------------------------------


async def _start_position(main, run_id: str) -> int | None:
    """Where the run's first event is in the stream (global_position is the stream sequence), if it is recorded
    yet: one read, not a poll. None: not recorded (just started, or the recorder is behind)."""
    conn = await main._db(main.urls()[1])
    try:
        return await conn.fetchval("SELECT min(global_position) FROM run_events WHERE run_id = $1", run_id)
    finally:
        await conn.close()


async def _follow(main, run_id: str, timeout: float, out) -> RunFollow:
    start_seq = await _start_position(main, run_id)
    nc, js = await main._js(main.urls()[0])
    try:
        return await follow_bus(js, run_id, out, start_seq=start_seq, timeout=timeout)
    finally:
        await nc.close()


def follow_and_print(main, run_id: str, timeout: float, out=None) -> int:
    """Follow a run to its end on the terminal; exit status 0 when it succeeded, 1 when it failed or is still
    going when `timeout` passes, 2 when none of its events showed up, 130 on Ctrl-C (the run goes on)."""
    out = out or (BarOutput() if sys.stdout.isatty() else PlainOutput())
    started = time.monotonic()
    try:
        follow = asyncio.run(_follow(main, run_id, timeout, out))
    except KeyboardInterrupt:
        out.close()
        print(f"\nstopped following {run_id}; the run goes on. `tuneline follow {run_id}` re-attaches, "
              f"`tuneline timeline {run_id}` shows where it is", flush=True)
        return 130
    print()
    if not follow.rows:
        print(f"{run_id}: no event of this run on the bus; is the stack up (`tuneline status`), and is the run id "
              f"right (`tuneline runs`)?")
        return 2
    summary = follow.summary(datetime.now(timezone.utc), time.monotonic() - started)
    for line in summary + closing_lines(main, run_id, follow.rows):
        print(line)
    return {"succeeded": 0}.get(follow.status, 1)


def cmd_follow(main, args) -> int:
    return follow_and_print(main, args.run_id, args.timeout)


async def list_runs(conn, *, target: str | None = None, status: str | None = None, limit: int = 50) -> list[dict]:
    """Runs from the timeline projection, newest first, with their latest event (where a running run may wait)."""
    rows = await conn.fetch(
        """SELECT r.run_id, r.target, r.status, r.locator, r.started_at, r.updated_at, r.reason_code,
                  e.type AS last_type, e.global_position AS last_position
           FROM timeline_runs r
           LEFT JOIN LATERAL (SELECT type, global_position FROM timeline_entries x WHERE x.run_id = r.run_id
                              ORDER BY global_position DESC LIMIT 1) e ON true
           WHERE ($1::text IS NULL OR r.target = $1) AND ($2::text IS NULL OR r.status = $2)
           ORDER BY r.started_at DESC, r.run_id LIMIT $3""",
        target, "running" if status in ("queued", "running") else status, limit)
    return [dict(r) for r in rows]


async def mark_queued(js, runs: list[dict]) -> None:
    """A running run whose latest event is a trigger its stage has not taken yet is queued: status and position."""
    for r in runs:
        r["queued_ahead"] = None
        if r["status"] != "running" or r["last_type"] not in TRIGGERS:
            continue
        stage, durable = TRIGGERS[r["last_type"]]
        kind = "command" if r["last_type"] in ("run.start", "ingest.commit") else "event"
        q = await queue_position(js, durable, subjects.subject_for(r["last_type"], kind=kind), r["last_position"])
        if q is not None:
            r["status"], r["queued_stage"], r["queued_ahead"] = "queued", stage, q.ahead


def runs_text(runs: list[dict]) -> str:
    lines = [f"{'run':<22} {'status':<10} {'target':<20} {'started (UTC)':<19} {'took':>8}  detail"]
    for r in runs:
        took = (f"{(r['updated_at'] - r['started_at']).total_seconds():.1f}s"
                if r["status"] in ("succeeded", "failed") else "-")
        detail = r.get("reason_code") or ""
        if r["status"] == "queued":
            detail = queue_words(Queued(r["queued_stage"], r["queued_ahead"]))
        lines.append(f"{r['run_id']:<22} {r['status'].upper():<10} {(r['target'] or '-'):<20} "
                     f"{r['started_at']:%Y-%m-%d %H:%M:%S} {took:>8}  {detail}")
    return "\n".join(lines)


def cmd_runs(main, args) -> int:
    async def go() -> list[dict]:
        nats_url, db_url = main.urls()
        conn = await main._db(db_url)
        try:
            runs = await list_runs(conn, target=args.target, status=args.status, limit=args.limit)
        finally:
            await conn.close()
        nc, js = await main._js(nats_url)
        try:
            await mark_queued(js, runs)
        finally:
            await nc.close()
        if args.status in ("queued", "running"):
            runs = [r for r in runs if r["status"] == args.status]
        return runs

    runs = asyncio.run(go())
    if args.json:
        print(json.dumps(runs, default=str, indent=2))
    elif not runs:
        print("no runs" + (" matching" if args.target or args.status else "") + " in the timeline", file=sys.stderr)
    else:
        print(runs_text(runs))
    return 0


def add_parser(sub, main) -> None:
    f = sub.add_parser("follow", help="follow a run from the bus to its end (re-attach after Ctrl-C)")
    f.add_argument("run_id")
    f.add_argument("--timeout", type=float, default=1800)
    f.set_defaults(fn=lambda a: cmd_follow(main, a))
    r = sub.add_parser("runs", help="the runs in the timeline, newest first")
    r.add_argument("--target", default=None)
    r.add_argument("--status", choices=("queued", "running", "succeeded", "failed"), default=None)
    r.add_argument("--limit", type=int, default=50)
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=lambda a: cmd_runs(main, a))
