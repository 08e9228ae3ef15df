// Routes: planners ask for alternatives and see them as a table and on the map, or why none fits.

import { h, fill, field, announce } from "./dom.js";
import { hours, localAt, when } from "./format.js";
import { L, worldMap } from "./basemap.js";

// Colour, dash and a letter: each alternative is told apart without colour too.
const STYLES = [
  { colour: "#0b5cad", dash: null }, { colour: "#b3001b", dash: "8 6" }, { colour: "#1e7a35", dash: "2 5" },
  { colour: "#5a3d99", dash: "12 4 2 4" }, { colour: "#7a2e00", dash: "4 4" },
];
const letter = (i) => String.fromCharCode(65 + i);

function localInput(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getUTCFullYear()}-${pad(date.getUTCMonth() + 1)}-${pad(date.getUTCDate())}T${pad(date.getUTCHours())}:${pad(date.getUTCMinutes())}`;
}

export function routesScreen(root, { api, fleet, who }) {
  if (!who.plan) {
    fill(root, h("h2", {}, "Routes"), h("p", {}, "Planning routes needs a planner or administrator token."));
    return () => {};
  }
  const sites = [...fleet.sites.values()].sort((a, b) => a.name.localeCompare(b.name));
  const siteOptions = (kindFirst) => sites
    .slice().sort((a, b) => (a.kind === kindFirst ? -1 : 0) - (b.kind === kindFirst ? -1 : 0))
    .map((s) => h("option", { value: s.id }, `${s.name} (${s.id}, ${s.kind})`));
  const origin = h("select", { id: "route-origin", required: true }, siteOptions("manufacturing"));
  const destination = h("select", { id: "route-destination", required: true }, siteOptions("treatment_center"));
  // The bundled example network's flights are dated (its week); start there by default.
  const depart = h("input", { id: "route-depart", type: "datetime-local", required: true, value: "2026-10-19T08:00" });
  const hold = h("input", { id: "route-hold", type: "number", min: 1, max: 2000, step: 1, value: 120, required: true });
  const deliver = h("input", { id: "route-deliver", type: "datetime-local" });
  const objective = h("select", { id: "route-objective" }, ["fastest", "safest", "cheapest"].map((o) => h("option", { value: o }, o)));
  const alternatives = h("input", { id: "route-alternatives", type: "number", min: 1, max: 5, value: 3 });
  const handoffs = h("input", { id: "route-handoffs", type: "number", min: 0, max: 20 });
  const status = h("p", { role: "status", id: "route-status" });
  const form = h("form", { class: "panel form-grid", id: "route-form", "aria-label": "Plan a route" },
    field("route-origin", "Origin", origin),
    field("route-destination", "Destination", destination),
    field("route-depart", "Departure (UTC)", depart),
    field("route-hold", "Usable hold time (h)", hold),
    field("route-deliver", "Deliver by (UTC, optional)", deliver),
    field("route-objective", "Objective", objective),
    field("route-alternatives", "Alternatives", alternatives),
    field("route-handoffs", "Most handoffs (optional)", handoffs),
    h("div", {}, h("button", { type: "submit" }, "Plan routes")));
  const results = h("div", { id: "route-results" });
  const mapEl = h("div", { class: "map", id: "route-map" });
  fill(root, h("h2", {}, "Routes"), form, status, results, mapEl);

  let map = null;
  let layers = null;
  const ready = worldMap(mapEl, { label: "Map of the planned routes" }).then((m) => { map = m; layers = L.layerGroup().addTo(m); return m; });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {
      origin: origin.value, destination: destination.value,
      depart_at: new Date(`${depart.value}:00Z`).toISOString(),
      hold_hours: Number(hold.value), objective: objective.value, alternatives: Number(alternatives.value || 3),
    };
    if (deliver.value) body.deliver_by = new Date(`${deliver.value}:00Z`).toISOString();
    if (handoffs.value !== "") body.max_handoffs = Number(handoffs.value);
    status.textContent = "Planning…";
    fill(results);
    try {
      const plan = await api.post("/routes/plan", body);
      await ready;
      show(plan);
    } catch (err) {
      status.textContent = `Could not plan: ${err.message}`;
    }
  });

  function site(id) {
    return fleet.sites.get(id);
  }

  function show(plan) {
    layers.clearLayers();
    if (!plan.feasible) {
      const why = plan.infeasible || {};
      status.textContent = "No feasible route.";
      fill(results, h("section", { class: "panel", id: "infeasible", role: "alert" },
        h("h3", {}, h("span", { class: "badge critical" }, "Infeasible"), ` — ${String(why.constraint || "").replaceAll("_", " ")}`),
        h("p", {}, why.message || "No route satisfies the request."),
        h("ul", {},
          why.needed_hold_hours !== null && why.needed_hold_hours !== undefined ? h("li", {}, `Needs ${hours(why.needed_hold_hours)} more hold time (or a recharge stop).`) : null,
          why.earliest_delivery ? h("li", {}, `Earliest possible delivery: ${when(why.earliest_delivery)}.`) : null,
          why.needed_handoffs !== null && why.needed_handoffs !== undefined ? h("li", {}, `Needs at least ${why.needed_handoffs} handoffs.`) : null)));
      const a = site(plan.request.origin), b = site(plan.request.destination);
      if (a && b) {
        L.polyline([[a.lat, a.lon], [b.lat, b.lon]], { color: "#b3001b", dashArray: "2 8", weight: 2 }).addTo(layers);
        map.fitBounds(L.latLngBounds([[a.lat, a.lon], [b.lat, b.lon]]).pad(0.3));
      }
      announce("No feasible route.");
      return;
    }
    status.textContent = `${plan.routes.length} alternative${plan.routes.length === 1 ? "" : "s"}.`;
    const destTz = site(plan.request.destination)?.tz;
    const table = h("table", { id: "route-table" },
      h("caption", { class: "visually-hidden" }, "Route alternatives"),
      h("thead", {}, h("tr", {}, ["Option", "Departs", "Arrives (destination time)", "Duration", "Hold margin", "Handoffs", "Recharges", "Cost", "Risk", "Legs"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, plan.routes.map((r, i) => h("tr", { dataset: { option: letter(i) } },
        h("th", { scope: "row" }, h("span", { class: "route-label", style: `background:${STYLES[i % STYLES.length].colour}` }, letter(i)), " ",
          h("span", { class: "swatch", style: `border-top-color:${STYLES[i % STYLES.length].colour};border-top-style:${STYLES[i % STYLES.length].dash ? "dashed" : "solid"}` })),
        h("td", {}, when(r.depart_at)),
        h("td", {}, destTz ? localAt(r.arrival, destTz) : when(r.arrival)),
        h("td", { class: "num" }, hours(r.duration_hours)),
        h("td", { class: "num" }, hours(r.hold_margin_hours)),
        h("td", { class: "num" }, String(r.handoffs)),
        h("td", { class: "num" }, String(r.recharges)),
        h("td", { class: "num" }, r.cost.toFixed(2)),
        h("td", { class: "num" }, `${(r.risk * 100).toFixed(2)} %`),
        h("td", {}, h("ol", {}, r.legs.map((leg) => h("li", {},
          `${leg.mode}${leg.flight ? ` ${leg.carrier || ""}${leg.flight}` : ""} ${leg.from} → ${leg.to}, `,
          `${localAt(leg.departs_at, site(leg.from)?.tz)} → ${localAt(leg.arrives_at, site(leg.to)?.tz)}`,
          leg.customs_minutes ? `, customs ${leg.customs_minutes} min` : "", leg.recharged ? ", LN2 recharged" : ""))))))));
    fill(results, h("div", { class: "table-wrap" }, table));
    const bounds = [];
    plan.routes.forEach((r, i) => {
      const style = STYLES[i % STYLES.length];
      const pts = [];
      for (const leg of r.legs) {
        for (const code of [leg.from, leg.to]) {
          const s = site(code);
          if (s) pts.push([s.lat, s.lon + i * 0.15]);
        }
      }
      const line = L.polyline(pts, { color: style.colour, weight: 4, opacity: 0.85, dashArray: style.dash }).addTo(layers);
      line.bindTooltip(h("span", {}, `Option ${letter(i)}`), { permanent: true, className: "route-tag", direction: "center" });
      bounds.push(...pts);
      for (const leg of r.legs) {
        const s = site(leg.to);
        if (s) L.circleMarker([s.lat, s.lon], { radius: 4, color: "#10243e", fillColor: "#fff", fillOpacity: 1 }).bindTooltip(h("span", {}, `${s.name} (${s.id})`)).addTo(layers);
      }
    });
    if (bounds.length) map.fitBounds(L.latLngBounds(bounds).pad(0.2));
    mapEl.dataset.routes = String(plan.routes.length);
    announce(`${plan.routes.length} route alternatives.`);
  }

  return () => { ready.then((m) => m.remove()); };
}
