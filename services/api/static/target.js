// History's buttons (approver): each posts a registry command through the API, with the log sequence the
// page showed (a stale page is refused with registry.conflict), then shows the answer and reloads.
(function () {
  const table = document.getElementById("versions");
  const result = document.getElementById("action-result");
  const target = table.dataset.target, sequence = Number(table.dataset.sequence);

  async function act(action, body) {
    result.textContent = `${action}: waiting for the registry…`;
    const resp = await fetch(`/api/targets/${encodeURIComponent(target)}/${action}`, {
      method: "POST", headers: {"Content-Type": "application/json"}, credentials: "same-origin",
      body: JSON.stringify({...body, expected_sequence: sequence}),
    });
    const answer = await resp.json().catch(() => ({}));
    if (resp.ok && answer.event) {
      result.textContent = `${answer.event.type}: v${answer.event.payload.version} by ${answer.event.payload.actor}`;
      setTimeout(() => location.reload(), 300);
    } else if (resp.status === 202) {
      result.textContent = `${action} sent (command ${answer.command_id}); no answer yet`;
    } else {
      const detail = typeof answer.detail === "string" ? answer.detail : JSON.stringify(answer.detail);
      result.textContent = `${action} refused (${resp.status}${answer.reason_code ? ", " + answer.reason_code : ""}): ${detail}`;
      result.className = "error";
    }
  }

  table.addEventListener("click", (ev) => {
    const button = ev.target.closest("button[data-action]");
    if (!button) return;
    const row = button.closest("tr");
    const reason = row.querySelector("input.reason").value.trim();
    if (!reason) { result.textContent = "a reason is required"; result.className = "error"; return; }
    const body = {version: row.dataset.version, reason};
    if (button.dataset.action === "promote" && button.dataset.override === "yes") body.override = true;
    act(button.dataset.action, body);
  });
  const rollback = document.getElementById("rollback");
  if (rollback) rollback.addEventListener("click", () => {
    const reason = document.getElementById("rollback-reason").value.trim();
    if (!reason) { result.textContent = "a reason is required"; result.className = "error"; return; }
    act("rollback", {reason});
  });
})();
