// Shipment: live temperature with the profile's limits, excursions and alarms; LN2 with its
// forecast to depletion against deliver-by; tilt, shock and lid; custody; route; report.

import uPlot from "/ui/vendor/uPlot.esm.js";
import { h, fill, announce } from "./dom.js";
import { WORD, ago, hours, humanRule, pct, temp, when } from "./format.js";
import { COLOURS, L, worldMap } from "./basemap.js";
import { alarmActions, stateBadge } from "./alarms.js";

const EVENT_TYPES = ["packed", "picked_up", "handoff", "customs_hold", "customs_released", "delivered", "cancelled"];

function series(readings, key) {
  return readings.map((r) => (r[key] === null || r[key] === undefined ? null : Number(r[key])));
}

function chartWidth(el) {
  return Math.max(300, Math.floor(el.getBoundingClientRect().width || 600) - 4);
}

/** A canvas label with a light backing so it stays legible over lines. */
function label(ctx, text, x, y, colour) {
  ctx.font = `${Math.round(12 * devicePixelRatio)}px system-ui, sans-serif`;
  const w = ctx.measureText(text).width;
  ctx.fillStyle = "rgba(255,255,255,0.85)";
  ctx.fillRect(x - 2, y - 12 * devicePixelRatio, w + 4, 15 * devicePixelRatio);
  ctx.fillStyle = colour;
  ctx.fillText(text, x, y);
}

export function shipmentScreen(root, ctx, id) {
  const { api, fleet, who } = ctx;
  let stopped = false;
  const cleanups = [];
  fill(root, h("p", { class: "muted" }, "Loading shipment…"));

  (async () => {
    let detail;
    try {
      detail = await api.get(`/shipments/${encodeURIComponent(id)}`);
    } catch (err) {
      fill(root, h("h2", {}, "Shipment"), h("p", { class: "error" }, err.status === 404 ? `No shipment ${id}.` : err.message));
      return;
    }
    if (stopped) return;
    fleet.applyDetail(detail);
    const s = detail.shipment;
    const profile = fleet.profiles.get(s.profile);
    const base = `/shipments/${encodeURIComponent(id)}/telemetry`;
    const telemetry = await api.get(`${base}?limit=10000`).catch(() => null);
    if (stopped) return;
    let readings = (telemetry?.readings || []).slice();
    let summarised = false;
    if (telemetry?.truncated) {
      // Too many readings for one page: 5-minute buckets, plotting each bucket's warmest value.
      const b = await api.get(`${base}?every=5m&limit=10000`).catch(() => null);
      if (b?.buckets) {
        summarised = true;
        readings = b.buckets.map((k) => ({ ts: k.start, temp_c: k.temp_c_max, ln2_level_pct: k.ln2_level_pct_mean, tilt_deg: null, shock_g: null, lid_open: null, lat: null, lon: null }));
        const last = readings.length ? Date.parse(readings[readings.length - 1].ts) : 0;
        const tail = await api.get(`${base}?from=${encodeURIComponent(new Date(last).toISOString())}&limit=10000`).catch(() => null);
        readings.push(...(tail?.readings || []));
      }
    }
    const alarmsAll = await api.all(`/alarms?shipment_id=${encodeURIComponent(id)}&limit=500`).catch(() => []);
    if (stopped) return;

    const state = h("span", { id: "shipment-state" });
    const facts = h("dl", { class: "facts" });
    const tempChart = h("div", { class: "chart", id: "temp-chart", role: "img" });
    const ln2Chart = h("div", { class: "chart", id: "ln2-chart", role: "img" });
    const motionChart = h("div", { class: "chart", id: "motion-chart", role: "img" });
    const ln2Text = h("p", { id: "ln2-forecast" });
    const handling = h("div", { id: "handling" });
    const alarmList = h("div", { id: "shipment-alarms" });
    const timeline = h("ol", { class: "timeline", id: "custody" });
    const mapEl = h("div", { class: "map small", id: "shipment-map" });
    const reportMsg = h("span", { role: "status", class: "muted" });
    const reportButton = h("button", { type: "button", class: "secondary", id: "report" }, "Excursion report (PDF)");
    reportButton.addEventListener("click", async () => {
      reportMsg.textContent = "Preparing…";
      try {
        const blob = await api.blob(`/shipments/${encodeURIComponent(id)}/report?format=pdf`);
        const url = URL.createObjectURL(blob);
        const a = h("a", { href: url, download: `${s.id}-report.pdf` });
        document.body.append(a); a.click(); a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 60000);
        reportMsg.textContent = "Report downloaded.";
      } catch (err) {
        reportMsg.textContent = err.status === 404 ? "The service has no report for this shipment yet." : `Report failed: ${err.message}`;
      }
    });

    fill(root,
      h("p", {}, h("a", { href: "#/fleet" }, "← Fleet")),
      h("h2", {}, "Shipment ", h("span", { id: "shipment-id" }, s.id), " ", state),
      h("div", { class: "grid2" },
        h("section", { class: "panel", "aria-labelledby": "facts-h" }, h("h3", { id: "facts-h" }, "Summary"), facts,
          h("p", { class: "actions" }, reportButton, reportMsg)),
        h("section", { class: "panel", "aria-labelledby": "alarms-h" }, h("h3", { id: "alarms-h" }, "Alarms"), alarmList)),
      h("section", { class: "panel", "aria-labelledby": "temp-h" },
        h("h3", { id: "temp-h" }, "Temperature (device time)"),
        summarised ? h("p", { class: "muted" }, "A long shipment: earlier history shows each 5 minutes' warmest reading.") : null,
        h("p", { class: "muted" }, "Dashed lines: the profile's limits, named. Shaded: readings beyond a limit. Vertical lines: alarms, named by severity."),
        tempChart),
      h("div", { class: "grid2" },
        h("section", { class: "panel", "aria-labelledby": "ln2-h" }, h("h3", { id: "ln2-h" }, "LN2 level and hold time"), ln2Text, ln2Chart),
        h("section", { class: "panel", "aria-labelledby": "motion-h" }, h("h3", { id: "motion-h" }, "Tilt, shock and lid"), motionChart, handling)),
      h("div", { class: "grid2" },
        h("section", { class: "panel", "aria-labelledby": "custody-h" }, h("h3", { id: "custody-h" }, "Custody"), timeline, custodyForm()),
        h("section", { class: "panel", "aria-labelledby": "route-h" }, h("h3", { id: "route-h" }, "Route and position"), mapEl)));

    function drawFacts() {
      const row = fleet.rows.get(id);
      const st = row ? fleet.stateOf(row) : { severity: "ok" };
      const stale = row ? fleet.staleness(row) : { seconds: detail.last_seen_s, lost: false };
      fill(state, h("span", { class: `badge ${st.severity}`, id: "shipment-badge", dataset: { severity: st.severity } }, WORD[st.severity]),
        stale.lost ? [" ", h("span", { class: "badge stale" }, "Signal lost")] : null);
      const last = row?.reading || detail.last_reading;
      const hold = row?.hold || detail.hold;
      const pairs = [
        ["Status", s.status.replaceAll("_", " ")], ["Dewar", s.dewar_id], ["Profile", `${s.profile}${profile ? ` — ${profile.description}` : ""}`],
        ["From → to", `${siteName(s.origin)} → ${siteName(s.destination)}`], ["Deliver by", when(s.deliver_by)],
        ["Planned route", routeText(detail.route)],
        ["Chain of identity", s.chain_of_identity || "—"], ["Temperature", temp(last?.temp_c)], ["LN2", pct(last?.ln2_level_pct)],
        ["Hold time left", hold ? `${hours(hold.hours_left)} (margin at delivery ${hours(hold.margin_h)})${hold.tipped ? " — tipped: hold falling fast" : ""}` : "—"],
        ["Last reading", last ? `${when(last.ts)} (device), received ${ago(stale.seconds)}` : "none yet"],
      ];
      fill(facts, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    }

    // The stored route (POST /shipments/{id}/route): its stops, the ETA, who planned it.
    function routeText(route) {
      if (!route) return "none planned";
      const stops = [route.legs[0]?.from, ...route.legs.map((l) => l.to)].filter(Boolean);
      const flights = route.legs.filter((l) => l.flight).map((l) => `${l.carrier || ""}${l.flight}`);
      return `${stops.join(" → ")}${flights.length ? ` (${flights.join(", ")})` : ""}; ETA ${when(route.eta)}, `
        + `hold margin ${hours(route.hold_margin_hours)}; planned ${when(route.planned_at)} by ${route.planned_by}`;
    }

    function siteName(code) {
      const site = fleet.sites.get(code);
      return site ? `${site.name} (${code})` : code;
    }

    function drawAlarms() {
      const open = fleet.alarmsOf(id);
      const closed = alarmsAll.filter((a) => a.state === "closed");
      fill(alarmList,
        open.length ? h("ul", {}, open.map((a) => h("li", { dataset: { alarm: a.id } },
          h("span", { class: `badge ${a.severity}` }, WORD[a.severity]), " ", stateBadge(a), " ", h("strong", {}, humanRule(a.rule)), ": ", a.message || "",
          h("br"), h("span", { class: "muted" }, `since ${when(a.started_at)} `), h("a", { href: "#/alarms" }, "history"),
          alarmActions(a, { ...ctx, after: () => { drawAlarms(); drawFacts(); } }))))
          : h("p", {}, h("span", { class: "badge ok" }, "OK"), " No open alarms."),
        closed.length ? h("p", { class: "muted" }, `${closed.length} closed alarm(s) in this shipment.`) : null);
    }

    function custodyForm() {
      if (!who.custody) return null;
      const type = h("select", { id: "event-type" }, EVENT_TYPES.map((t) => h("option", { value: t }, t.replaceAll("_", " "))));
      const location = h("input", { id: "event-location", maxlength: 200 });
      const note = h("input", { id: "event-note", maxlength: 2000 });
      const msg = h("p", { role: "status" });
      const form = h("form", { class: "form-grid", "aria-label": "Record a custody event" },
        h("div", {}, h("label", { for: "event-type" }, "Event"), type),
        h("div", {}, h("label", { for: "event-location" }, "Location"), location),
        h("div", {}, h("label", { for: "event-note" }, "Note"), note),
        h("div", {}, h("button", { type: "submit" }, "Record event")), msg);
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        try {
          const body = { type: type.value };
          if (location.value.trim()) body.location = location.value.trim();
          if (note.value.trim()) body.note = note.value.trim();
          const out = await api.post(`/shipments/${encodeURIComponent(id)}/events`, body);
          detail.events.push(out.event);
          Object.assign(s, out.shipment);
          drawTimeline(); drawFacts();
          msg.textContent = "Recorded.";
          note.value = "";
        } catch (err) {
          msg.textContent = err.message;
        }
      });
      return [h("h4", {}, "Record an event"), form];
    }

    function drawTimeline() {
      fill(timeline, detail.events.map((e) => h("li", {},
        h("strong", {}, e.type.replaceAll("_", " ")), ` — ${when(e.at)}`, e.location ? ` at ${e.location}` : "",
        h("br"), h("span", { class: "muted" }, `by ${e.actor}`), e.note ? [h("br"), h("q", {}, e.note)] : null)));
      if (!detail.events.length) fill(timeline, h("li", {}, "No custody events yet."));
    }

    // Charts ------------------------------------------------------------------------------
    const tempLimits = (profile?.limits || []).filter((l) => l.metric === "temp_c");
    const xs = () => readings.map((r) => Date.parse(r.ts) / 1000);
    // The lines a limit draws: its threshold, and the lower bound of an "outside" range.
    const lines = (l) => [l.threshold, l.low].filter((v) => v !== null && v !== undefined);

    function tempRange(u, min, max) {
      const values = [min, max, ...tempLimits.flatMap(lines)].filter((v) => v !== null && Number.isFinite(v));
      const lo = Math.min(...values), hi = Math.max(...values);
      const pad = Math.max(2, (hi - lo) * 0.08);
      return [lo - pad, hi + pad];
    }

    function breached(value) {
      let worst = null;
      for (const l of tempLimits) {
        if (value === null) continue;
        if ((l.direction === "above" && value > l.threshold) || (l.direction === "below" && value < l.threshold)
          || (l.direction === "outside" && (value > l.threshold || value < l.low))) {
          if (!worst || (l.severity === "critical")) worst = l;
        }
      }
      return worst;
    }

    const tempOpts = {
      width: chartWidth(tempChart), height: 280,
      scales: { x: { time: true }, y: { range: tempRange } },
      axes: [{}, { label: "°C", size: 60 }],
      series: [{}, { label: "Temperature °C", stroke: "#0b5cad", width: 2, spanGaps: false }],
      hooks: {
        drawSeries: [],
        draw: [(u) => {
          const c = u.ctx;
          const { left, top, width, height } = u.bbox;
          c.save();
          c.beginPath(); c.rect(left, top, width, height); c.clip();
          // Excursions: shade each stretch beyond a limit.
          const [x, y] = u.data;
          for (let i = 0; i < x.length; i++) {
            const lim = breached(y[i]);
            if (!lim) continue;
            const x0 = u.valToPos(x[i], "x", true);
            const x1 = u.valToPos(i + 1 < x.length ? x[i + 1] : x[i] + 60, "x", true);
            c.fillStyle = lim.severity === "critical" ? "rgba(179,0,27,0.18)" : "rgba(210,90,0,0.16)";
            c.fillRect(x0, top, Math.max(1, x1 - x0), height);
          }
          // Limits.
          c.setLineDash([6, 4]);
          for (const l of tempLimits) {
            for (const v of lines(l)) {
              const py = u.valToPos(v, "y", true);
              c.strokeStyle = COLOURS[l.severity] || "#333"; c.lineWidth = 1.5 * devicePixelRatio;
              c.beginPath(); c.moveTo(left, py); c.lineTo(left + width, py); c.stroke();
            }
          }
          c.setLineDash([]);
          for (const l of tempLimits) {
            for (const v of lines(l)) {
              const py = u.valToPos(v, "y", true);
              label(c, `${v} °C ${WORD[l.severity]}: ${humanRule(l.rule)}`, left + 6, py - 4, COLOURS[l.severity] || "#333");
            }
          }
          // Alarms.
          const alarms = [...alarmsAll, ...fleet.alarmsOf(id)];
          const seen = new Set();
          for (const a of alarms) {
            if (seen.has(a.id) || !a.started_at) continue;
            seen.add(a.id);
            const px = u.valToPos(Date.parse(a.started_at) / 1000, "x", true);
            if (px < left || px > left + width) continue;
            c.strokeStyle = COLOURS[a.severity] || "#333"; c.lineWidth = 2 * devicePixelRatio;
            c.beginPath(); c.moveTo(px, top); c.lineTo(px, top + height); c.stroke();
            label(c, `${WORD[a.severity]}: ${humanRule(a.rule)}`, px + 4, top + 14 * devicePixelRatio * (1 + (seen.size % 3)), COLOURS[a.severity]);
          }
          c.restore();
        }],
      },
    };
    tempChart.setAttribute("aria-label", `Temperature over time with ${tempLimits.length} limits; the alarms are listed in the Alarms section.`);
    const temps = new uPlot(tempOpts, [xs(), series(readings, "temp_c")], tempChart);
    cleanups.push(() => temps.destroy());

    const hold = () => fleet.rows.get(id)?.hold || detail.hold;
    const deliverBy = s.deliver_by ? Date.parse(s.deliver_by) / 1000 : null;
    function ln2Data() {
      const x = xs();
      const level = series(readings, "ln2_level_pct");
      const forecast = level.map(() => null);
      const hd = hold();
      if (x.length && hd && hd.depletion_at) {
        const end = Date.parse(hd.depletion_at) / 1000;
        const lastX = x[x.length - 1];
        const cap = Math.max(deliverBy ?? lastX, lastX) + 48 * 3600;
        const to = Math.min(end, cap);
        const at = hd.level_pct ?? level[level.length - 1];
        const slope = end > lastX ? at / (end - lastX) : 0;
        forecast[forecast.length - 1] = at;
        x.push(to); level.push(null); forecast.push(Math.max(0, at - slope * (to - lastX)));
      }
      if (deliverBy && (!x.length || deliverBy > x[x.length - 1])) { x.push(deliverBy); level.push(null); forecast.push(null); }
      return [x, level, forecast];
    }
    const ln2 = new uPlot({
      width: chartWidth(ln2Chart), height: 220,
      scales: { x: { time: true }, y: { range: [0, 100] } },
      axes: [{}, { label: "LN2 %", size: 50 }],
      series: [{}, { label: "LN2 %", stroke: "#2b6cb0", width: 2 }, { label: "Forecast %", stroke: "#7a2e00", dash: [6, 4], width: 2, spanGaps: true }],
      hooks: { draw: [(u) => {
        if (!deliverBy) return;
        const c = u.ctx; const { top, height } = u.bbox;
        const px = u.valToPos(deliverBy, "x", true);
        c.save(); c.strokeStyle = "#1b1f24"; c.lineWidth = 2 * devicePixelRatio; c.setLineDash([2, 3]);
        c.beginPath(); c.moveTo(px, top); c.lineTo(px, top + height); c.stroke();
        label(c, "deliver by", px + 4, top + 14 * devicePixelRatio, "#1b1f24"); c.restore();
      }] },
    }, ln2Data(), ln2Chart);
    ln2Chart.setAttribute("aria-label", "LN2 level over time, its forecast to depletion, and the deliver-by time");
    cleanups.push(() => ln2.destroy());

    function drawLn2Text() {
      const hd = hold();
      if (!hd) { fill(ln2Text, "No hold-time forecast yet (needs LN2 readings)."); return; }
      const short = hd.margin_h !== null && hd.margin_h !== undefined && hd.margin_h < 0;
      fill(ln2Text, h("span", { class: `badge ${short ? "critical" : "ok"}` }, short ? "Runs out before delivery" : "Lasts past delivery"), " ",
        `LN2 ${pct(hd.level_pct)}, losing ${hd.loss_pct_per_h?.toFixed(2) ?? "—"} %/h; depletion forecast ${when(hd.depletion_at)} (earliest ${when(hd.earliest_at)}), `,
        `deliver by ${when(s.deliver_by)}: margin ${hours(hd.margin_h)}.`);
    }

    const motion = new uPlot({
      width: chartWidth(motionChart), height: 200,
      scales: { x: { time: true }, deg: { range: [0, 180] }, g: { range: (u, mn, mx) => [0, Math.max(12, mx ?? 0)] } },
      axes: [{}, { scale: "deg", label: "tilt °", size: 50 }, { scale: "g", side: 1, label: "shock g", grid: { show: false }, size: 50 }],
      series: [{}, { label: "Tilt °", scale: "deg", stroke: "#5a3d99", width: 2 }, { label: "Shock g", scale: "g", stroke: "#d25a00", width: 1, dash: [3, 2] }],
    }, [xs(), series(readings, "tilt_deg"), series(readings, "shock_g")], motionChart);
    motionChart.setAttribute("aria-label", "Tilt and shock over time; the episodes are listed below");
    cleanups.push(() => motion.destroy());

    function drawHandling() {
      const limits = Object.fromEntries((profile?.limits || []).map((l) => [l.metric, l.threshold]));
      const tiltMax = limits.tilt_deg ?? 45, shockMax = limits.shock_g ?? 10;
      const episodes = [];
      const open = {};
      const check = (kind, on, r, value) => {
        if (on && !open[kind]) open[kind] = { kind, from: r.ts, to: r.ts, peak: value };
        else if (on) { open[kind].to = r.ts; if (value > open[kind].peak) open[kind].peak = value; }
        else if (open[kind]) { episodes.push(open[kind]); open[kind] = null; }
      };
      for (const r of readings) {
        check("tilt", r.tilt_deg !== null && r.tilt_deg > tiltMax, r, r.tilt_deg);
        check("shock", r.shock_g !== null && r.shock_g > shockMax, r, r.shock_g);
        check("lid open", r.lid_open === true, r, 1);
      }
      episodes.push(...Object.values(open).filter(Boolean));
      episodes.sort((a, b) => a.from.localeCompare(b.from));
      const peak = (e) => (e.kind === "tilt" ? `${e.peak.toFixed(0)}°` : e.kind === "shock" ? `${e.peak.toFixed(1)} g` : "—");
      fill(handling, episodes.length
        ? h("table", {}, h("caption", { class: "visually-hidden" }, "Handling events"),
          h("thead", {}, h("tr", {}, ["Event", "From", "To", "Peak"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, episodes.slice(-50).map((e) => h("tr", {}, h("td", {}, e.kind), h("td", {}, when(e.from)), h("td", {}, when(e.to)), h("td", {}, peak(e))))))
        : h("p", {}, h("span", { class: "badge ok" }, "OK"), ` No tilt over ${tiltMax}°, shock over ${shockMax} g or open lid.`));
    }

    // Map ---------------------------------------------------------------------------------
    let map = null, track = null, here = null;
    worldMap(mapEl, { label: `Route of ${s.id}` }).then((m) => {
      if (stopped) { m.remove(); return; }
      map = m;
      const origin = fleet.sites.get(s.origin), dest = fleet.sites.get(s.destination);
      const pts = readings.filter((r) => r.lat !== null && r.lon !== null).map((r) => [r.lat, r.lon]);
      const bounds = [];
      for (const [site, word] of [[origin, "origin"], [dest, "destination"]]) {
        if (!site) continue;
        L.circleMarker([site.lat, site.lon], { radius: 6, color: "#10243e", fillColor: "#fff", fillOpacity: 1, weight: 3 })
          .bindTooltip(h("span", {}, `${word}: ${site.name}`), { permanent: true, direction: "right" }).addTo(map);
        bounds.push([site.lat, site.lon]);
      }
      track = L.polyline(origin ? [[origin.lat, origin.lon], ...pts] : pts, { color: "#0b5cad", weight: 3 }).addTo(map);
      const now = pts[pts.length - 1];
      if (now) {
        here = L.circleMarker(now, { radius: 8, color: "#1b1f24", weight: 2, fillColor: "#0b5cad", fillOpacity: 1 })
          .bindTooltip(h("span", {}, "now"), { permanent: true, direction: "left" }).addTo(map);
        bounds.push(now);
      }
      // The planned route through its stops, where the service has one; else a straight line on.
      const stops = detail.route
        ? [detail.route.legs[0]?.from, ...detail.route.legs.map((l) => l.to)].map((c) => fleet.sites.get(c)).filter(Boolean)
        : [];
      if (stops.length > 1) {
        L.polyline(stops.map((x) => [x.lat, x.lon]), { color: "#6b3fa0", dashArray: "8 6", weight: 3 })
          .bindTooltip(h("span", {}, `planned route, ETA ${when(detail.route.eta)}`)).addTo(map);
        for (const x of stops.slice(1, -1)) {
          L.circleMarker([x.lat, x.lon], { radius: 4, color: "#6b3fa0", fillColor: "#fff", fillOpacity: 1, weight: 2 })
            .bindTooltip(h("span", {}, x.name)).addTo(map);
          bounds.push([x.lat, x.lon]);
        }
        mapEl.dataset.route = "true";
      } else if (dest && now) {
        L.polyline([now, [dest.lat, dest.lon]], { color: "#55606e", dashArray: "4 6", weight: 2 }).addTo(map);
      }
      if (bounds.length) map.fitBounds(L.latLngBounds(bounds).pad(0.4), { maxZoom: 7 });
      mapEl.dataset.ready = "true";
    });
    cleanups.push(() => { if (map) map.remove(); });

    // Live --------------------------------------------------------------------------------
    let redraw = null;
    const scheduleCharts = () => {
      if (redraw) return;
      redraw = setTimeout(() => {
        redraw = null;
        temps.setData([xs(), series(readings, "temp_c")]);
        ln2.setData(ln2Data());
        motion.setData([xs(), series(readings, "tilt_deg"), series(readings, "shock_g")]);
        drawHandling(); drawLn2Text();
        const last = readings[readings.length - 1];
        if (map && last && last.lat !== null) {
          track.addLatLng([last.lat, last.lon]);
          here?.setLatLng([last.lat, last.lon]);
        }
      }, 1000);
    };
    cleanups.push(fleet.onReadings((batch) => {
      let added = false;
      for (const r of batch) {
        if (r.dewar_id !== s.dewar_id) continue;
        if (readings.length && r.ts <= readings[readings.length - 1].ts) {
          if (readings.some((x) => x.seq === r.seq)) continue;
          readings.push(r);
          readings.sort((a, b) => a.ts.localeCompare(b.ts));
        } else {
          readings.push(r);
        }
        added = true;
      }
      if (added) scheduleCharts();
    }));
    cleanups.push(fleet.subscribe((ids) => {
      if (ids === null || ids.has(id)) { drawFacts(); }
    }));
    cleanups.push(fleet.onAlarm((change) => {
      if (change.shipment_id !== id) return;
      drawAlarms(); drawFacts(); temps.redraw(false, false);
      if (change.severity === "critical" && change.state === "open") announce(`Critical alarm on ${s.dewar_id}: ${change.message}`);
    }));
    const resize = () => { for (const [u, el] of [[temps, tempChart], [ln2, ln2Chart], [motion, motionChart]]) u.setSize({ width: chartWidth(el), height: u.height }); };
    window.addEventListener("resize", resize);
    cleanups.push(() => window.removeEventListener("resize", resize));
    cleanups.push(() => clearTimeout(redraw));

    drawFacts(); drawAlarms(); drawTimeline(); drawHandling(); drawLn2Text();
    root.dataset.ready = "true";
  })();

  return () => { stopped = true; for (const fn of cleanups) fn(); };
}
