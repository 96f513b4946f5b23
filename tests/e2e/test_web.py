"""The web page in a real headless Chromium (Debian's `chromium`, driven by playwright through
`executable_path`) against a real stack started by `tuneline up`: the runs list, a run's stepper going
live over SSE to the end, the loss curve, an approver acting on the target's History (the History
projection), a version's lineage and its gate replayed under another margin / alpha, and a viewer who
sees no buttons and whose forged POST is refused. Screenshots go to docs/screenshots/ under
`make screenshots` (TUNELINE_SCREENSHOTS=1), to a temporary folder otherwise."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.cli import stack

pytestmark = [pytest.mark.e2e, pytest.mark.connected]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("chromium is not installed (apt-get install -y chromium): the web page's browser test "
                    "needs it; playwright's own browser downloads are not used")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    if os.environ.get("TUNELINE_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return SCREENSHOTS
    return tmp_path_factory.mktemp("screenshots")


def token(cli, role: str, subject: str) -> str:
    return cli("token", "create", "--role", role, "--subject", subject).stdout.strip()


def login(context, base: str, tok: str, next_path: str = "/"):
    page = context.new_page()
    page.goto(f"{base}/login?next={next_path}")
    page.fill("input[name=token]", tok)
    page.click("button[type=submit]")
    return page


@pytest.mark.timeout(1800)
def test_an_approver_follows_a_run_live_and_acts_on_history_while_a_viewer_cannot(cli, browser, shots):
    base = stack.read_state(cli.data)["api"]["url"]
    approver, viewer = token(cli, "approver", "alice"), token(cli, "viewer", "victor")
    sample = cli.data / "web-sample.jsonl"
    cli("sample-data", str(sample), "--rows-per-label", "40")
    started = cli("run", "--locator", f"jsonl:{sample}", "--target", "web-demo", "--max-steps", "30", "--no-wait")
    run_id = next(w for w in started.stdout.split() if w.startswith("run-"))

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = login(context, base, approver)
    page.wait_for_selector(f"a[href='/runs/{run_id}']", timeout=30_000)
    assert "alice · approver" in page.inner_text("header")
    page.screenshot(path=str(shots / "runs.png"), full_page=True)

    page.click(f"a[href='/runs/{run_id}']")
    page.wait_for_selector("#stepper li[data-stage=ingest]")
    # the stepper follows the run over SSE until the registry registers it; then the page redraws
    try:
        # a 30-step LoRA fine-tune takes a minute or two on a quiet 2-core machine; far longer where it is shared
        page.wait_for_selector("#stepper li[data-stage=registry].succeeded", timeout=1_200_000)
    except Exception:
        page.screenshot(path=str(shots / "run-timeout.png"), full_page=True)
        raise AssertionError(f"run did not finish: {page.inner_text('#stepper')}\n{page.inner_text('#live-line')}\n"
                             f"{cli('timeline', run_id, check=False).stdout[-3000:]}") from None
    page.wait_for_selector("#loss-curve svg polyline.loss", timeout=30_000)
    for stage in ("ingest", "prep", "trainer", "evaluator", "export", "registry"):
        assert "succeeded" in page.get_attribute(f"#stepper li[data-stage={stage}]", "class"), stage
    assert page.locator("table.per-class tbody tr").count() >= 2
    decision = page.inner_text("p.decision")
    assert ("promotable" in decision) and "p = " in decision and "n = " in decision
    page.screenshot(path=str(shots / "run.png"), full_page=True)

    page.goto(f"{base}/events?run_id={run_id}&type=training.progress")
    assert page.locator("table.events tbody tr").count() >= 3
    page.screenshot(path=str(shots / "events.png"), full_page=True)
    page.goto(f"{base}/failures")
    page.screenshot(path=str(shots / "failures.png"), full_page=True)

    page.goto(f"{base}/targets/web-demo")
    row = page.locator("tr[data-version='1']")
    status = row.locator("td.status").inner_text().strip()
    if status in ("candidate", "validated"):
        row.locator("input.reason").fill("labels were stale")
        row.locator("button[data-action=reject]").click()
        expected = "rejected"
    else:  # the gate rejected it already: promote it over the gate, with a reason
        row.locator("input.reason").fill("accepting the risk for the demo")
        row.locator("button[data-action=promote]").click()
        expected = "production"
    page.wait_for_function(
        "s => document.querySelector(\"tr[data-version='1'] td.status\").innerText.trim() === s", arg=expected,
        timeout=180_000)
    assert "alice" in page.inner_text("table#acts")  # the actor is the token's subject
    # History is the History projection's, read past the registry's answer before the page reloaded
    assert "from the History projection" in page.inner_text("#history-position")
    assert page.locator(f"tr[data-version='1'][data-run='{run_id}']").count() == 1
    page.screenshot(path=str(shots / "target-history.png"), full_page=True)

    # the version's page: its lineage, and the gate replayed with a margin no candidate meets
    page.click("tr[data-version='1'] a[href='/targets/web-demo/versions/1']")
    page.wait_for_selector("table#lineage tbody tr")
    hops = page.inner_text("table#lineage")
    assert "training run" in hops and "dataset and manifest" in hops and "training.completed" in hops
    assert page.inner_text("#dataset").startswith("1.0.0") and page.inner_text("#base-model") not in ("", "–")
    assert "promotable" in page.inner_text("#gate-words")
    page.screenshot(path=str(shots / "version-lineage.png"), full_page=True)
    page.fill("#replay-form input[name=min_delta]", "0.99")
    page.fill("#replay-form input[name=alpha]", "0.01")
    page.click("#replay-form button[type=submit]")
    page.wait_for_selector("#replay-result", timeout=120_000)
    replayed = page.inner_text("#replay-result")
    assert replayed.startswith("under margin 0.99 and alpha 0.01") and "promotable" in replayed
    assert page.get_attribute("#replay-result", "data-flipped") in ("yes", "no")
    page.screenshot(path=str(shots / "gate-replay.png"), full_page=True)
    page.goto(f"{base}/targets/web-demo?at={datetime.now(UTC).isoformat().replace('+00:00', 'Z')}")
    assert page.locator("#served").count() == 1
    page.screenshot(path=str(shots / "serving-at.png"), full_page=True)
    context.close()

    seen = browser.new_context()
    vpage = login(seen, base, viewer, f"/targets/web-demo")
    vpage.wait_for_selector("table.versions")
    assert vpage.locator("button[data-action]").count() == 0 and vpage.locator("input.reason").count() == 0
    forged = vpage.evaluate("""async () => {
        const r = await fetch('/api/targets/web-demo/restore', {method: 'POST', headers: {'Content-Type': 'application/json'},
                              body: JSON.stringify({version: '1', reason: 'forged'})});
        return r.status; }""")
    assert forged == 403
    log = json.loads(cli("events", "--run", run_id, "--json").stdout)
    assert not any("forged" in json.dumps(e["payload"]) for e in log)
    seen.close()
