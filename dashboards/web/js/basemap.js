// A world map that needs no internet: Leaflet over the Natural Earth countries (world-atlas,
// converted to GeoJSON by `npm ci` into /ui/vendor/). No tile server, no CDN.

import * as L from "/ui/vendor/leaflet-src.esm.js";

let countries = null;

async function geo() {
  if (!countries) {
    countries = Promise.all(
      ["countries-110m", "borders-110m"].map((name) => fetch(`/ui/vendor/${name}.geojson`).then((r) => r.json())),
    );
  }
  return countries;
}

export const COLOURS = { ok: "#1e7a35", info: "#2b6cb0", warning: "#b08000", major: "#d25a00", critical: "#b3001b", stale: "#555555" };

/** A Leaflet map in `element` with the basemap drawn; resolves once the land is on it. */
export async function worldMap(element, { label = "Map" } = {}) {
  const map = L.map(element, {
    preferCanvas: true,
    worldCopyJump: true,
    minZoom: 1,
    maxZoom: 10,
    zoomSnap: 0.25,
    attributionControl: true,
    keyboard: true,
  });
  element.setAttribute("aria-label", label);
  element.setAttribute("role", "region");
  map.attributionControl.setPrefix(false);
  map.attributionControl.addAttribution("Natural Earth (public domain) via world-atlas");
  map.setView([30, 0], 2);
  const [land, borders] = await geo();
  L.geoJSON(land, {
    interactive: false,
    style: { color: "#8a9a7b", weight: 0.6, fillColor: "#eef0e6", fillOpacity: 1 },
  }).addTo(map);
  L.geoJSON(borders, { interactive: false, style: { color: "#9aa68f", weight: 0.6 } }).addTo(map);
  return map;
}

export { L };
