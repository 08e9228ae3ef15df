// Copies the dashboard's front-end libraries from node_modules into web/vendor/ (git-ignored),
// which the service serves under /ui/vendor/. Run by `npm ci` (postinstall) or `npm run vendor`.
// The Natural Earth basemap (world-atlas TopoJSON) is converted to GeoJSON here, once.
import { cpSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const modules = join(here, "node_modules");
const out = join(here, "web", "vendor");
const require = createRequire(import.meta.url);
const topojson = require("topojson-client");

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });

const copies = [
  ["uplot/dist/uPlot.esm.js", "uPlot.esm.js"],
  ["uplot/dist/uPlot.min.css", "uPlot.min.css"],
  ["uplot/LICENSE", "LICENSE.uplot"],
  ["leaflet/dist/leaflet-src.esm.js", "leaflet-src.esm.js"],
  ["leaflet/dist/leaflet.css", "leaflet.css"],
  ["leaflet/dist/images", "images"],
  ["leaflet/LICENSE", "LICENSE.leaflet"],
  ["world-atlas/LICENSE", "LICENSE.world-atlas"],
];
for (const [from, to] of copies) {
  cpSync(join(modules, from), join(out, to), { recursive: true });
}

for (const scale of ["110m"]) {
  const topo = JSON.parse(readFileSync(join(modules, "world-atlas", `countries-${scale}.json`), "utf8"));
  const land = topojson.feature(topo, topo.objects.countries);
  const borders = topojson.mesh(topo, topo.objects.countries, (a, b) => a !== b);
  writeFileSync(join(out, `countries-${scale}.geojson`), JSON.stringify(land));
  writeFileSync(join(out, `borders-${scale}.geojson`), JSON.stringify(borders));
}
console.log(`vendored front-end libraries into ${out}`);
