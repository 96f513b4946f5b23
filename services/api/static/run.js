// A run's stepper, live: the run's events over Server-Sent Events (GET /api/runs/{id}/stream), from the
// position the page was rendered at. When the run ends the page reloads to draw the curves and the report.
(function () {
  const stepper = document.getElementById("stepper");
  if (!stepper || stepper.dataset.live !== "yes") return;
  const run = stepper.dataset.run, line = document.getElementById("live-line");
  const source = new EventSource(`/api/runs/${encodeURIComponent(run)}/stream?after=${stepper.dataset.after}`);
  let ending = false;
  source.onmessage = (msg) => {
    const e = JSON.parse(msg.data);
    const step = stepper.querySelector(`[data-stage="${e.stage}"]`);
    if (step && e.status) {
      step.className = `step ${e.status}`;
      step.querySelector(".status").textContent = e.status;
    }
    let text = `${e.type} (position ${e.position})`;
    if (e.progress && e.progress.step != null) {
      text = `training step ${e.progress.step}${e.progress.max_steps ? "/" + e.progress.max_steps : ""}` +
        (e.progress.loss != null ? `, loss ${e.progress.loss.toFixed(3)}` : "");
    }
    line.textContent = "live: " + text;
    if (e.ends_run && !ending) {
      ending = true;
      source.close();
      document.getElementById("run-status").textContent = e.status === "failed" ? "failed" : "succeeded";
      setTimeout(() => location.reload(), 1500);  // the projection has the whole run by then
    }
  };
  source.onerror = () => { line.textContent = "live: reconnecting…"; };
})();
