"""The web page (D18): server-rendered HTML over the same reads as the JSON API, a few plain scripts
(static/), no build step. The token travels as an HttpOnly, SameSite=Strict cookie set by /login."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from pydantic import TypeAdapter, ValidationError

from services.api import history_views, reads
from services.api.auth import COOKIE, Principal, optional_principal
from services.api.routes_read import utc
from services.common.eval_report import report_of
from services.common import registry_log, tokens

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")
STAGE_NAMES = {"ingest": "Ingest", "prep": "Prepare", "trainer": "Train", "evaluator": "Evaluate",
               "export": "Export", "registry": "Register"}


class LoginRequired(Exception):
    pass


async def viewer(request: Request, principal: Principal | None = Depends(optional_principal)) -> Principal:
    if principal is None:
        raise HTTPException(303, headers={"Location": "/login?" + urlencode({"next": request.url.path})})
    return principal


def page(request: Request, name: str, who: Principal, **context) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"who": who, "stage_names": STAGE_NAMES, **context})


def _time(text: str | None, field: str) -> datetime | None:
    if not text:
        return None
    try:
        return utc(TypeAdapter(datetime).validate_python(text))
    except ValidationError:
        raise HTTPException(422, [{"loc": ["query", field], "msg": f"{text!r} is not a time (ISO 8601)",
                                   "type": "value_error"}]) from None


def _choice(text: str | None, field: str, allowed: tuple[str, ...]) -> str | None:
    if not text:
        return None
    if text not in allowed:
        raise HTTPException(422, [{"loc": ["query", field], "msg": f"one of {', '.join(allowed)}",
                                   "type": "value_error"}])
    return text


# --- login ---------------------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str = "/"):
    return templates.TemplateResponse(request, "login.html", {"who": None, "next": next, "error": None})


@router.post("/login")
async def login(request: Request):
    form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
    token, next_path = form.get("token", "").strip(), form.get("next") or "/"
    async with request.app.state.pool.acquire() as conn:
        found = await tokens.lookup(conn, token)
    if not found:
        return templates.TemplateResponse(request, "login.html", {"who": None, "next": next_path,
                                                                  "error": "that token is not valid"},
                                          status_code=401)
    response = RedirectResponse(next_path if next_path.startswith("/") else "/", status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=8 * 3600)
    return response


@router.get("/logout")
async def logout():
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


# --- pages ---------------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def runs_page(request: Request, target: str | None = None, status: str | None = None,
                    stage: str | None = None, since: str | None = None, until: str | None = None,
                    reason_code: str | None = None, who: Principal = Depends(viewer)):
    filters = {"target": target or None, "status": _choice(status, "status", reads.RUN_STATUSES),
               "stage": _choice(stage, "stage", reads.STAGES), "since": _time(since, "since"),
               "until": _time(until, "until"), "reason_code": reason_code or None}
    async with request.app.state.pool.acquire() as conn:
        runs = await reads.list_runs(conn, **filters, limit=200)
    return page(request, "runs.html", who, runs=runs, filters={k: request.query_params.get(k, "") for k in filters},
                statuses=reads.RUN_STATUSES, stages=reads.STAGES)


def svg_curve(series: list[tuple[str, str, list[tuple[float, float]]]], width=640, height=220) -> str:
    """Lines on shared axes, as inline SVG: (name, css class, [(step, value)])."""
    points = [p for _, _, pts in series for p in pts]
    if not points:
        return ""
    pad = 36
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > min(0.0, min(ys)) else 1.0

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    out = [f'<svg class="curve" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">',
           f'<line class="axis" x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}"/>',
           f'<line class="axis" x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}"/>',
           f'<text x="{pad}" y="{height - 10}">step {x0:g}</text>',
           f'<text x="{width - pad}" y="{height - 10}" text-anchor="end">{x1:g}</text>',
           f'<text x="4" y="{pad}">{y1:.3g}</text><text x="4" y="{height - pad}">{y0:.3g}</text>']
    for i, (name, css, pts) in enumerate(series):
        if not pts:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline class="{css}" data-series="{name}" fill="none" points="{path}"/>')
        for x, y in pts if len(pts) < 40 else []:
            out.append(f'<circle class="{css}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5"/>')
        out.append(f'<text class="{css}" x="{width - pad - 150}" y="{pad + 14 * i}">— {name}</text>')
    out.append("</svg>")
    return "".join(out)


def gate_in_words(report: dict | None) -> str | None:
    """The gate's decision as a sentence: "candidate beats the classical baseline by 0.07, p = 0.003,
    n = 412: promotable"."""
    gate = (report or {}).get("eval.gate_decided")
    if not gate:
        return None
    ev = gate.get("evidence") or {}
    delta, p, n = ev.get("delta"), ev.get("p_value"), ev.get("n")
    baseline = f"the {gate.get('baseline_kind') or gate.get('baseline') or ''} baseline".replace("  ", " ")
    numbers = ", ".join(x for x in (None if p is None else f"p = {p:.3g}", None if n is None else f"n = {n}") if x)
    if gate.get("passed"):
        return f"candidate beats {baseline} by {delta:.3f}, {numbers}: promotable"
    why = "; ".join(f"{f['reason_code']}: {f['message']}" for f in gate.get("failed") or [])
    change = "" if delta is None else (f"beats {baseline} by only {delta:.3f}" if delta > 0
                                       else f"trails {baseline} by {-delta:.3f}")
    return f"candidate {change}, {numbers}: not promotable ({why})"


@router.get("/runs/{run_id}", response_class=HTMLResponse)
async def run_page(request: Request, run_id: str, who: Principal = Depends(viewer)):
    async with request.app.state.pool.acquire() as conn:
        tl = await reads.run_timeline(conn, run_id)
        if tl is None:
            raise HTTPException(404, f"no run {run_id} in the timeline")
        curve = reads.curve(await reads.run_events(conn, run_id, reads.CURVE_TYPES))
        report = report_of(await reads.run_events(conn, run_id, ("eval.completed", "eval.gate_decided",
                                                                 "judge.validated", "eval.failed")))
    stages = {s["stage"]: s for s in tl["stages"]}
    loss_svg = svg_curve([("training loss", "loss", [(p["step"], p["loss"]) for p in curve["loss"]]),
                          ("eval loss", "evalloss", [(p["step"], p["eval_loss"]) for p in curve["eval"]
                                                     if p["eval_loss"] is not None])])
    metric_name = next((p["metric_name"] for p in curve["eval"] if p["metric_name"]), "metric")
    metric_svg = svg_curve([(metric_name, "metric", [(p["step"], p["metric"]) for p in curve["eval"]
                                                     if p["metric"] is not None])])
    done = (report or {}).get("eval.completed") or {}
    per_class = ((done.get("candidate_report") or {}).get("metrics") or {}).get("per_class") or {}
    base_class = ((done.get("baseline_report") or {}).get("metrics") or {}).get("per_class") or {}
    terminal = tl["run"]["status"] in ("succeeded", "failed")
    return page(request, "run.html", who, tl=tl, run=tl["run"], stages=stages, order=reads.STAGES,
                loss_svg=loss_svg, metric_svg=metric_svg, curve=curve, report=report, done=done,
                per_class=per_class, base_class=base_class, gate_words=gate_in_words(report),
                live=not terminal, last_position=max([e["global_position"] for e in tl["entries"]] or [0]))


@router.get("/events", response_class=HTMLResponse)
async def events_page(request: Request, run_id: str | None = None, type: str | None = None,
                      severity: str | None = None, reason_code: str | None = None, after: int = 0,
                      who: Principal = Depends(viewer)):
    filters = {"run_id": run_id or None, "type": type or None,
               "severity": _choice(severity, "severity", reads.SEVERITIES), "reason_code": reason_code or None}
    async with request.app.state.pool.acquire() as conn:
        found = await reads.events(conn, **filters, after=after, limit=100)
    next_after = found[-1]["global_position"] if len(found) == 100 else None
    query = {k: v for k, v in filters.items() if v}
    return page(request, "events.html", who, events=found, filters={k: request.query_params.get(k, "") for k in filters},
                severities=reads.SEVERITIES,
                next_url=f"/events?{urlencode({**query, 'after': next_after})}" if next_after else None)


@router.get("/failures", response_class=HTMLResponse)
async def failures_page(request: Request, who: Principal = Depends(viewer)):
    async with request.app.state.pool.acquire() as conn:
        clusters = await reads.failure_clusters(conn)
    return page(request, "failures.html", who, clusters=clusters)


@router.get("/targets", response_class=HTMLResponse)
async def targets_page(request: Request, who: Principal = Depends(viewer)):
    async with request.app.state.pool.acquire() as conn:
        names = await reads.targets(conn)
    return page(request, "targets.html", who, targets=names)


@router.get("/targets/{target}", response_class=HTMLResponse)
async def target_page(request: Request, target: str, at: str | None = None, who: Principal = Depends(viewer)):
    at_time = _time(at, "at")
    async with request.app.state.pool.acquire() as conn:
        view = await history_views.target_view(conn, target)
        served, served_error = None, None
        if view["versions"]:
            try:
                served = await registry_log.serving_at(conn, target, at_time)
            except registry_log.InvalidTime as exc:
                served_error = str(exc)
    return page(request, "target.html", who, view=view, served=served, served_error=served_error, at=at or "",
                can_approve=who.may("approve"))


def _number(text: str | None, field: str, low: float, high: float) -> float | None:
    if text in (None, ""):
        return None
    try:
        value = float(text)
    except ValueError:
        raise HTTPException(422, [{"loc": ["query", field], "msg": f"{text!r} is not a number",
                                   "type": "value_error"}]) from None
    if not low <= value <= high:
        raise HTTPException(422, [{"loc": ["query", field], "msg": f"{field} must lie in [{low:g}, {high:g}]",
                                   "type": "value_error"}])
    return value


@router.get("/targets/{target}/versions/{version}", response_class=HTMLResponse)
async def version_page(request: Request, target: str, version: str, min_delta: str | None = None,
                       alpha: str | None = None, who: Principal = Depends(viewer)):
    """A version: what it is made of (lineage), what it was measured against, its gate evidence in words,
    and a form that replays the gate with another margin / alpha (`?min_delta=&alpha=`)."""
    changes = {"min_delta": _number(min_delta, "min_delta", 0.0, 0.99),
               "alpha": _number(alpha, "alpha", 1e-9, 1 - 1e-9)}
    async with request.app.state.pool.acquire() as conn:
        view = await history_views.version_view(conn, target, version)
        replay = None
        if view["gate"] is not None and any(v is not None for v in changes.values()):
            replay = await history_views.replay_view(conn, target, version, changes)
    return page(request, "version.html", who, v=view, replay=replay,
                form={k: request.query_params.get(k, "") for k in changes})
