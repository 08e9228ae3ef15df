// Alarms: open alarms by severity, acknowledge and close (operators), history with who did what.

import { h, fill, announce } from "./dom.js";
import { RANK, WORD, humanRule, when } from "./format.js";

const STATE_WORDS = {
  open: "Open — not acknowledged",
  acknowledged: "Acknowledged",
  cleared: "Cleared — awaiting close",
  closed: "Closed",
};

export function stateBadge(alarm) {
  const text = alarm.state === "acknowledged" && alarm.acknowledged_by ? `Acknowledged by ${alarm.acknowledged_by}` : STATE_WORDS[alarm.state] || alarm.state;
  return h("span", { class: "badge state", dataset: { state: alarm.state } }, text);
}

/** Ask for a comment and send ack/close; resolves with the updated alarm or null. */
export function commentDialog({ title, action, alarm, submit }) {
  return new Promise((resolve) => {
    const comment = h("textarea", { id: "alarm-comment", rows: 3, "aria-required": "true", "aria-describedby": "alarm-comment-help" });
    const error = h("p", { class: "error", role: "alert" });
    const cancel = h("button", { type: "button", class: "secondary" }, "Cancel");
    const form = h("form", { method: "dialog" },
      h("h2", {}, title),
      h("p", {}, h("span", { class: `badge ${alarm.severity}` }, WORD[alarm.severity]), " ", alarm.dewar_id, " — ", alarm.message || humanRule(alarm.rule)),
      h("label", { for: "alarm-comment" }, "Comment (required)"),
      comment,
      h("p", { id: "alarm-comment-help", class: "muted" }, "Recorded in the audit log with your name and the time."),
      error,
      h("div", { class: "actions" }, h("button", { type: "submit" }, action), cancel));
    const dialog = h("dialog", { "aria-label": title }, form);
    document.body.append(dialog);
    let result = null;
    const done = () => { dialog.close(); };
    dialog.addEventListener("close", () => { dialog.remove(); resolve(result); });
    cancel.addEventListener("click", done);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const text = comment.value.trim();
      if (!text) {
        error.textContent = "Write a comment: it says what you did about the alarm.";
        comment.focus();
        return;
      }
      try {
        result = await submit(text);
        done();
      } catch (err) {
        error.textContent = err.message || String(err);
      }
    });
    dialog.showModal();
    comment.focus();
  });
}

/** The buttons an operator gets for one alarm (none for roles that may not). */
export function alarmActions(alarm, { api, fleet, who, after }) {
  if (!who.ack || alarm.state === "closed") return null;
  const act = (kind) => async () => {
    const updated = await commentDialog({
      title: kind === "ack" ? "Acknowledge alarm" : "Close alarm",
      action: kind === "ack" ? "Acknowledge" : "Close",
      alarm,
      submit: (comment) => api.post(`/alarms/${alarm.id}/${kind}`, { comment }),
    });
    if (updated) {
      if (updated.state === "closed") fleet.alarms.delete(updated.id);
      else fleet.alarms.set(updated.id, updated);
      if (fleet.rows.has(updated.shipment_id)) fleet.mark(updated.shipment_id);
      announce(`Alarm ${updated.id} ${updated.state}.`);
      after?.(updated);
    }
  };
  return h("div", { class: "actions" },
    alarm.state === "open" ? h("button", { type: "button", class: "ack", onclick: act("ack"), "aria-label": `Acknowledge alarm ${alarm.id} on ${alarm.dewar_id}` }, "Acknowledge") : null,
    h("button", { type: "button", class: "secondary close", onclick: act("close"), "aria-label": `Close alarm ${alarm.id} on ${alarm.dewar_id}` }, "Close"));
}

export function alarmsScreen(root, ctx) {
  const { api, fleet } = ctx;
  const open = h("div", { id: "open-alarms" });
  const detail = h("section", { class: "panel", id: "alarm-detail", "aria-live": "polite", hidden: true });
  const history = h("div", { id: "alarm-history" });
  fill(root, h("h2", {}, "Alarms"), detail, h("h3", {}, "Open"), open, h("h3", {}, "History"), history);

  async function showDetail(id) {
    detail.hidden = false;
    fill(detail, h("p", { class: "muted" }, "Loading…"));
    try {
      const d = await api.get(`/alarms/${id}`);
      const a = d.alarm;
      fill(detail,
        h("h3", { tabindex: "-1", id: "alarm-detail-title" }, `Alarm ${a.id}: `, humanRule(a.rule), " on ", a.dewar_id),
        h("p", {}, h("span", { class: `badge ${a.severity}` }, WORD[a.severity]), " ", stateBadge(a), " ", a.message || ""),
        h("p", {}, "Shipment ", h("a", { href: `#/shipment/${encodeURIComponent(a.shipment_id)}` }, a.shipment_id),
          ` · started ${when(a.started_at)} · raised ${when(a.raised_at)}`),
        alarmActions(a, { ...ctx, after: () => { showDetail(id); drawOpen(); loadHistory(); } }),
        h("h4", {}, "Who did what"),
        h("div", { class: "table-wrap" }, h("table", { id: "alarm-changes" },
          h("thead", {}, h("tr", {}, ["When", "State", "Severity", "Who", "Comment", "Escalation"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, d.changes.map((c) => h("tr", {},
            h("td", {}, when(c.at)), h("td", {}, STATE_WORDS[c.state] || c.state), h("td", {}, WORD[c.severity] || c.severity),
            h("td", {}, c.actor || "the service"), h("td", {}, c.comment || ""), h("td", {}, String(c.escalation_level))))))),
        d.deliveries.length ? [h("h4", {}, "Notifications"), h("ul", {}, d.deliveries.map((n) =>
          h("li", {}, `${n.channel} to ${n.recipient}: ${n.state}, ${n.attempts} attempt(s)`, n.last_detail ? ` — ${n.last_detail}` : "")))] : null,
        h("button", { type: "button", class: "secondary", onclick: () => { detail.hidden = true; } }, "Hide details"));
      detail.querySelector("#alarm-detail-title").focus();
    } catch (err) {
      fill(detail, h("p", { class: "error" }, err.message));
    }
  }

  function alarmTable(alarms, { withActions }) {
    return h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, ["Severity", "State", "Dewar", "Shipment", "Alarm", "Started", withActions ? "Actions" : "Closed by", ""].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, alarms.map((a) => h("tr", { class: `row-${a.severity}`, dataset: { alarm: a.id, severity: a.severity, state: a.state } },
        h("td", {}, h("span", { class: `badge ${a.severity}` }, WORD[a.severity])),
        h("td", {}, stateBadge(a)),
        h("td", {}, a.dewar_id),
        h("td", {}, h("a", { href: `#/shipment/${encodeURIComponent(a.shipment_id)}` }, a.shipment_id)),
        h("td", {}, h("strong", {}, humanRule(a.rule)), h("br"), a.message || ""),
        h("td", {}, when(a.started_at)),
        h("td", {}, withActions ? alarmActions(a, { ...ctx, after: () => { drawOpen(); loadHistory(); } }) : (a.closed_by || a.acknowledged_by || "—")),
        h("td", {}, h("button", { type: "button", class: "secondary", onclick: () => showDetail(a.id), "aria-label": `History of alarm ${a.id}` }, "History")))))));
  }

  function drawOpen() {
    const alarms = [...fleet.alarms.values()].sort((a, b) => RANK[b.severity] - RANK[a.severity] || String(b.raised_at).localeCompare(String(a.raised_at)));
    if (!alarms.length) { fill(open, h("p", {}, h("span", { class: "badge ok" }, "OK"), " No open alarms.")); return; }
    const groups = ["critical", "major", "warning", "info"].map((s) => [s, alarms.filter((a) => a.severity === s)]).filter(([, list]) => list.length);
    fill(open, groups.map(([s, list]) => h("section", { "aria-label": `${WORD[s]} alarms` },
      h("h4", {}, h("span", { class: `badge ${s}` }, WORD[s]), ` ${list.length} alarm${list.length === 1 ? "" : "s"}`),
      alarmTable(list, { withActions: true }))));
  }

  async function loadHistory() {
    try {
      const closed = await api.get("/alarms?state=closed&limit=50");
      fill(history, closed.items.length ? alarmTable(closed.items, { withActions: false }) : h("p", { class: "muted" }, "No closed alarms yet."));
    } catch (err) {
      fill(history, h("p", { class: "error" }, err.message));
    }
  }

  let timer = null;
  const redraw = () => { if (!timer) timer = setTimeout(() => { timer = null; if (!document.querySelector("dialog[open]")) drawOpen(); else redraw(); }, 500); };
  const unsubscribe = fleet.onAlarm((change) => { redraw(); if (!change.open) loadHistory(); });
  drawOpen();
  loadHistory();
  return () => { unsubscribe(); clearTimeout(timer); };
}
