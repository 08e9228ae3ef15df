// Lanes: how each origin-destination lane did over the shipments delivered in a period.

import { h, fill, field, announce } from "./dom.js";
import { pct } from "./format.js";

const DAY = 24 * 3600 * 1000;
// A lane whose smallest LN2 margin at delivery was under this many hours is marked.
const THIN_MARGIN_H = 24;

const percent = (rate) => pct(rate * 100);
const dateValue = (d) => d.toISOString().slice(0, 10);

export function lanesScreen(root, { api, fleet }) {
  const today = new Date();
  const from = h("input", { id: "lanes-from", type: "date", required: true, value: dateValue(new Date(today - 90 * DAY)) });
  const to = h("input", { id: "lanes-to", type: "date", required: true, value: dateValue(today) });
  const form = h("form", { class: "panel form-grid", id: "lanes-form", "aria-label": "Period" },
    field("lanes-from", "Delivered from (UTC)", from),
    field("lanes-to", "to, inclusive (UTC)", to),
    h("div", {}, h("button", { type: "submit" }, "Show")));
  const status = h("p", { role: "status", id: "lanes-status" });
  const rows = h("tbody");
  const heads = ["Lane", "Delivered", "On time", "Excursions", "Transit h (median / max)", "LN2 margin at delivery h (min / median)"];
  const table = h("div", { class: "table-wrap" }, h("table", { id: "lanes-table" },
    h("caption", { class: "visually-hidden" }, "Lane statistics"),
    h("thead", {}, h("tr", {}, heads.map((t, i) => h("th", { scope: "col", class: i ? "num" : null }, t)))),
    rows));
  fill(root, h("h2", {}, "Lanes"),
    h("p", { class: "muted" }, "Per origin and destination, over the shipments delivered in the period: delivered by their deadline, with a major or critical excursion on a limit, and the LN2 left at delivery by the forecast."),
    form, status, table);

  const name = (id) => fleet.sites.get(id)?.name || id;

  function show(page) {
    status.textContent = `${page.delivered} shipment(s) delivered on ${page.lanes.length} lane(s).`;
    if (!page.lanes.length) {
      fill(rows, h("tr", {}, h("td", { colspan: heads.length, class: "muted" }, "No shipment was delivered in this period.")));
      return;
    }
    fill(rows, page.lanes.map((lane) => {
      const thin = lane.hold_margin_hours_min !== null && lane.hold_margin_hours_min < THIN_MARGIN_H;
      return h("tr", { class: thin ? "row-warning" : null, dataset: { lane: `${lane.origin}>${lane.destination}` } },
        h("th", { scope: "row" }, `${name(lane.origin)} → ${name(lane.destination)}`,
          h("div", { class: "muted" }, `${lane.origin} → ${lane.destination}`)),
        h("td", { class: "num" }, String(lane.delivered)),
        h("td", { class: "num" }, lane.on_time_rate === null ? "no deadlines"
          : `${percent(lane.on_time_rate)} (${lane.on_time} of ${lane.with_deadline})`),
        h("td", { class: "num" }, `${percent(lane.excursion_rate)} (${lane.with_excursion})`),
        h("td", { class: "num" }, `${lane.transit_hours_median.toFixed(1)} / ${lane.transit_hours_max.toFixed(1)}`),
        h("td", { class: "num" }, lane.hold_margin_hours_min === null ? "no forecast"
          : [thin ? h("span", { class: "badge warning" }, "thin") : null,
             ` ${lane.hold_margin_hours_min.toFixed(0)} / ${lane.hold_margin_hours_median.toFixed(0)}`]));
    }));
  }

  async function load() {
    const since = new Date(`${from.value}T00:00:00Z`);
    const until = new Date(new Date(`${to.value}T00:00:00Z`).getTime() + DAY);
    if (!(until > since)) {
      status.textContent = "The period must end after it starts.";
      return;
    }
    status.textContent = "Loading…";
    try {
      show(await api.get(`/lanes/stats?from=${encodeURIComponent(since.toISOString())}&to=${encodeURIComponent(until.toISOString())}`));
      announce(status.textContent);
    } catch (err) {
      status.textContent = `Could not load the lanes: ${err.message}`;
    }
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); load(); });
  load();
  return () => {};
}
