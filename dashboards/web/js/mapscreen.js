// Map: the fleet's current positions and routes (origin → where it is → destination).

import { h, fill } from "./dom.js";
import { WORD, temp, pct } from "./format.js";
import { COLOURS, L, worldMap } from "./basemap.js";

export function mapScreen(root, { fleet, go }) {
  const holder = h("div", { class: "map", id: "fleet-map" });
  const legend = h("ul", { class: "legend", "aria-label": "Legend" },
    ["ok", "warning", "major", "critical", "stale"].map((s) => h("li", {}, h("span", { class: `badge ${s}` }, WORD[s]))),
    h("li", { class: "muted" }, "Grey line: origin → current position; dashed: on to the destination. Squares are sites."));
  const list = h("ul", { class: "muted", id: "map-list" });
  fill(root, h("h2", {}, "Map"), legend, holder,
    h("details", { class: "panel" }, h("summary", {}, "Positions as a list"), list));

  let map = null;
  let stopped = false;
  const markers = new Map();
  const lines = new Map();
  const tracks = new Map(); // shipment id -> recent positions seen in this page

  function position(row) {
    const r = row.reading;
    if (r && r.lat !== null && r.lat !== undefined && r.lon !== null && r.lon !== undefined) return [r.lat, r.lon];
    const origin = fleet.sites.get(row.shipment.origin);
    return origin ? [origin.lat, origin.lon] : null;
  }

  function draw(ids) {
    if (!map) return;
    const targets = ids === null ? [...fleet.rows.keys()] : ids;
    for (const id of targets) {
      const row = fleet.rows.get(id);
      if (!row) continue;
      const at = position(row);
      if (!at) continue;
      const { severity } = fleet.stateOf(row);
      const lost = fleet.staleness(row).lost;
      const colour = COLOURS[severity];
      const label = `${row.shipment.dewar_id} · ${WORD[severity]}${lost ? " · signal lost" : ""} · ${temp(row.reading?.temp_c)} · LN2 ${pct(row.reading?.ln2_level_pct)}`;
      let marker = markers.get(id);
      if (!marker) {
        marker = L.circleMarker(at, { radius: 7, weight: 2, color: "#1b1f24", fillOpacity: 0.95 }).addTo(map);
        marker.bindTooltip(h("span"), { direction: "top" });
        marker.on("click", () => go(`#/shipment/${encodeURIComponent(id)}`));
        markers.set(id, marker);
        const origin = fleet.sites.get(row.shipment.origin);
        const dest = fleet.sites.get(row.shipment.destination);
        const done = L.polyline(origin ? [[origin.lat, origin.lon], at] : [at], { color: "#55606e", weight: 2, interactive: false }).addTo(map);
        const todo = L.polyline(dest ? [at, [dest.lat, dest.lon]] : [at], { color: "#55606e", weight: 1.5, dashArray: "4 6", interactive: false }).addTo(map);
        lines.set(id, { done, todo, origin, dest });
      }
      marker.setLatLng(at);
      marker.setStyle({ fillColor: lost ? COLOURS.stale : colour, radius: severity === "critical" ? 10 : 7 });
      // Leaflet puts string content in as HTML: give it a text node's element instead.
      marker.setTooltipContent(h("span", {}, label));
      const line = lines.get(id);
      const track = tracks.get(id) || [];
      const last = track[track.length - 1];
      if (!last || last[0] !== at[0] || last[1] !== at[1]) track.push(at);
      if (track.length > 500) track.shift();
      tracks.set(id, track);
      line.done.setLatLngs([...(line.origin ? [[line.origin.lat, line.origin.lon]] : []), ...track]);
      if (line.dest) line.todo.setLatLngs([at, [line.dest.lat, line.dest.lon]]);
    }
    drawList();
  }

  function drawList() {
    fill(list, [...fleet.rows.values()].map((row) => {
      const at = position(row);
      return h("li", {}, h("a", { href: `#/shipment/${encodeURIComponent(row.shipment.id)}` }, row.shipment.id), " ",
        h("span", { class: `badge ${fleet.stateOf(row).severity}` }, WORD[fleet.stateOf(row).severity]), " ",
        at ? `${at[0].toFixed(2)}, ${at[1].toFixed(2)}` : "position unknown");
    }));
  }

  let pending = new Set();
  let timer = null;
  const unsubscribe = fleet.subscribe((ids) => {
    if (ids === null) { draw(null); return; }
    for (const id of ids) pending.add(id);
    if (!timer) timer = setTimeout(() => { timer = null; const batch = pending; pending = new Set(); draw([...batch]); }, 1000);
  });

  worldMap(holder, { label: "World map of the fleet's positions" }).then((m) => {
    if (stopped) { m.remove(); return; }
    map = m;
    for (const site of fleet.sites.values()) {
      L.rectangle([[site.lat - 0.25, site.lon - 0.25], [site.lat + 0.25, site.lon + 0.25]], { color: "#10243e", weight: 1, fillOpacity: 0.6, interactive: false }).addTo(map);
    }
    draw(null);
    const points = [...markers.values()].map((mk) => mk.getLatLng());
    if (points.length) map.fitBounds(L.latLngBounds(points).pad(0.3), { maxZoom: 5 });
    holder.dataset.ready = "true";
  });
  return () => { stopped = true; unsubscribe(); clearTimeout(timer); if (map) map.remove(); };
}
