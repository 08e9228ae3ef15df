// Fleet: every active shipment, its state in colour and in words, updated live without reload.

import { h, fill, setText } from "./dom.js";
import { RANK, WORD, ago, hours, pct, temp, when, humanRule } from "./format.js";

const COLUMNS = [
  { key: "state", label: "State", sort: (f, r) => -stateRank(f, r) },
  { key: "id", label: "Shipment", sort: (f, r) => r.shipment.id },
  { key: "dewar", label: "Dewar", sort: (f, r) => r.shipment.dewar_id },
  { key: "lane", label: "From → to", sort: (f, r) => `${r.shipment.origin} ${r.shipment.destination}`, narrow: true },
  { key: "temp", label: "Temperature", num: true, sort: (f, r) => r.reading?.temp_c ?? -Infinity },
  { key: "ln2", label: "LN2", num: true, sort: (f, r) => r.reading?.ln2_level_pct ?? Infinity },
  { key: "hold", label: "Hold left / to delivery", num: true, sort: (f, r) => margin(r) ?? Infinity },
  { key: "seen", label: "Last seen", sort: (f, r) => -(r.seenAt ?? 0) },
  { key: "next", label: "Next milestone", sort: (f, r) => r.shipment.deliver_by ?? "", narrow: true },
];

function stateRank(fleet, row) {
  const { severity } = fleet.stateOf(row);
  return RANK[severity] * 10 + (fleet.staleness(row).lost ? 5 : 0);
}

function toDeliveryHours(row) {
  if (!row.shipment.deliver_by) return null;
  return (Date.parse(row.shipment.deliver_by) - Date.now()) / 3600000;
}

function margin(row) {
  if (!row.hold || row.hold.hours_left === null || row.hold.hours_left === undefined) return null;
  const left = toDeliveryHours(row);
  return left === null ? row.hold.hours_left : row.hold.hours_left - left;
}

function milestone(row) {
  const s = row.shipment;
  const dest = s.destination;
  switch (s.status) {
    case "created": return `pack at ${s.origin}`;
    case "packed": return s.planned_departure ? `pick-up ${when(s.planned_departure)}` : "pick-up";
    case "customs_hold": return "customs release";
    default: return s.deliver_by ? `deliver to ${dest} by ${when(s.deliver_by)}` : `deliver to ${dest}`;
  }
}

export function fleetScreen(root, { fleet, go }) {
  const prefs = JSON.parse(sessionStorage.getItem("fleet-view") || "{}");
  const view = { sort: prefs.sort || "state", dir: prefs.dir || 1, text: prefs.text || "", state: prefs.state || "all" };
  const save = () => sessionStorage.setItem("fleet-view", JSON.stringify(view));

  const search = h("input", { id: "fleet-search", type: "search", value: view.text, placeholder: "id, dewar, site" });
  const stateFilter = h("select", { id: "fleet-state" },
    [["all", "All states"], ["attention", "Needs attention"], ["critical", "Critical"], ["major", "Major"], ["warning", "Warning"], ["ok", "OK"], ["lost", "Signal lost"]]
      .map(([v, t]) => h("option", { value: v, selected: v === view.state }, t)));
  const summary = h("ul", { class: "summary", "aria-label": "Fleet summary" });
  const caption = h("caption", { class: "visually-hidden" }, "Active shipments");
  const headRow = h("tr");
  const headers = new Map();
  for (const col of COLUMNS) {
    const th = h("th", { scope: "col", class: [col.num ? "num" : "", col.narrow ? "hide-narrow" : ""].join(" ") },
      h("button", { type: "button", class: "sort", onclick: () => sortBy(col.key) }, col.label));
    headers.set(col.key, th);
    headRow.append(th);
  }
  const tbody = h("tbody");
  const count = h("p", { class: "muted", role: "status", id: "fleet-count" });
  fill(root,
    h("h2", {}, "Fleet"),
    summary,
    h("div", { class: "toolbar" },
      h("div", {}, h("label", { for: "fleet-search" }, "Filter"), search),
      h("div", {}, h("label", { for: "fleet-state" }, "State"), stateFilter),
      count),
    h("div", { class: "table-wrap" }, h("table", { id: "fleet-table" }, caption, h("thead", {}, headRow), tbody)));

  search.addEventListener("input", () => { view.text = search.value; save(); arrange(); });
  stateFilter.addEventListener("change", () => { view.state = stateFilter.value; save(); arrange(); });

  const trs = new Map(); // shipment id -> {tr, cells}

  function sortBy(key) {
    view.dir = view.sort === key ? -view.dir : 1;
    view.sort = key;
    save();
    arrange();
  }

  function rowFor(id) {
    let entry = trs.get(id);
    if (entry) return entry;
    const cells = {};
    const tr = h("tr", { dataset: { shipment: id } });
    for (const col of COLUMNS) {
      const td = h(col.key === "id" ? "th" : "td", { class: [col.num ? "num" : "", col.narrow ? "hide-narrow" : ""].join(" ") });
      if (col.key === "id") td.setAttribute("scope", "row");
      cells[col.key] = td;
      tr.append(td);
    }
    const link = h("a", { href: `#/shipment/${encodeURIComponent(id)}` });
    cells.id.append(link);
    cells.link = link;
    cells.badge = h("span", { class: "badge ok" });
    cells.why = h("span", { class: "muted why" });
    cells.state.append(cells.badge, " ", cells.why);
    cells.lost = h("span", { class: "badge stale", hidden: true }, "Signal lost");
    cells.seenText = h("span");
    cells.seen.append(cells.seenText, " ", cells.lost);
    entry = { tr, cells, severity: null };
    trs.set(id, entry);
    return entry;
  }

  let severityChanged = false;
  function draw(id) {
    const row = fleet.rows.get(id);
    if (!row) return;
    const { tr, cells } = rowFor(id);
    const { severity, alarm } = fleet.stateOf(row);
    const stale = fleet.staleness(row);
    if (cells.badge.dataset.severity !== severity) {
      severityChanged = true;
      cells.badge.className = `badge ${severity}`;
      cells.badge.dataset.severity = severity;
      tr.className = `row-${severity}`;
      tr.dataset.state = severity;
    }
    setText(cells.badge, WORD[severity]);
    setText(cells.why, alarm ? humanRule(alarm.rule) : "");
    setText(cells.link, row.shipment.id);
    setText(cells.dewar, row.shipment.dewar_id);
    setText(cells.lane, `${row.shipment.origin} → ${row.shipment.destination}`);
    setText(cells.temp, temp(row.reading?.temp_c));
    setText(cells.ln2, pct(row.reading?.ln2_level_pct));
    const toGo = toDeliveryHours(row);
    const left = row.hold?.hours_left;
    const short = left !== null && left !== undefined && toGo !== null && left < toGo;
    setText(cells.hold, `${hours(left)} / ${hours(toGo)}${short ? " — runs out first" : ""}`);
    cells.hold.classList.toggle("short", short);
    setText(cells.seenText, stale.seconds === null ? "no reading yet" : ago(stale.seconds));
    cells.lost.hidden = !stale.lost;
    setText(cells.next, milestone(row));
  }

  function visible(row) {
    const text = view.text.trim().toLowerCase();
    if (text) {
      const s = row.shipment;
      const hay = `${s.id} ${s.dewar_id} ${s.origin} ${s.destination} ${s.status}`.toLowerCase();
      if (!hay.includes(text)) return false;
    }
    if (view.state === "all") return true;
    const { severity } = fleet.stateOf(row);
    if (view.state === "lost") return fleet.staleness(row).lost;
    if (view.state === "attention") return severity !== "ok" || fleet.staleness(row).lost;
    return severity === view.state;
  }

  let order = [];
  function arrange() {
    const col = COLUMNS.find((c) => c.key === view.sort) || COLUMNS[0];
    for (const [key, th] of headers) th.setAttribute("aria-sort", key === view.sort ? (view.dir > 0 ? "ascending" : "descending") : "none");
    const rows = [...fleet.rows.values()].filter(visible);
    const keyed = rows.map((r) => [col.sort(fleet, r), r.shipment.id]);
    keyed.sort((a, b) => (a[0] < b[0] ? -view.dir : a[0] > b[0] ? view.dir : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0));
    const next = keyed.map((k) => k[1]);
    for (const id of trs.keys()) if (!fleet.rows.has(id)) trs.delete(id);
    if (next.length !== order.length || next.some((id, i) => id !== order[i])) {
      const nodes = next.map((id) => rowFor(id).tr);
      tbody.replaceChildren(...nodes);
      order = next;
    }
    for (const id of order) draw(id);
    drawSummary();
  }

  function drawSummary() {
    const counts = { critical: 0, major: 0, warning: 0, ok: 0, lost: 0 };
    for (const row of fleet.rows.values()) {
      counts[fleet.stateOf(row).severity]++;
      if (fleet.staleness(row).lost) counts.lost++;
    }
    fill(summary, ...["critical", "major", "warning", "ok"].map((s) => h("li", {}, h("span", { class: `badge ${s}` }, `${counts[s]} ${WORD[s]}`))),
      h("li", {}, h("span", { class: "badge stale" }, `${counts.lost} signal lost`)));
    setText(count, `${order.length} of ${fleet.rows.size} active shipments shown`);
  }

  // Re-sort at most once a second (rows jumping under the pointer are hard to read); draw
  // changed rows at once.
  let lastArrange = 0;
  let arrangeTimer = null;
  const unsubscribe = fleet.subscribe((ids) => {
    if (ids === null) return arrange();
    for (const id of ids) if (trs.has(id)) draw(id);
    if (severityChanged) { severityChanged = false; drawSummary(); }
    const wait = 1000 - (performance.now() - lastArrange);
    if (!arrangeTimer) {
      arrangeTimer = setTimeout(() => { arrangeTimer = null; lastArrange = performance.now(); arrange(); }, Math.max(0, wait));
    }
  });
  const tick = setInterval(() => { for (const id of order) draw(id); drawSummary(); }, 5000);
  arrange();
  return () => { unsubscribe(); clearInterval(tick); clearTimeout(arrangeTimer); };
}
