// The fleet as the browser knows it: active shipments, their last reading, hold forecast and open
// alarms, kept current from the live stream. Screens subscribe and redraw what changed.

import { RANK } from "./format.js";

export const ACTIVE = new Set(["created", "packed", "in_transit", "customs_hold"]);
const LAG_SAMPLES = 50000;

export class Fleet {
  constructor(api) {
    this.api = api;
    this.rows = new Map(); // shipment id -> row
    this.byDewar = new Map(); // dewar id -> shipment id (active shipments)
    this.alarms = new Map(); // alarm id -> alarm (open, acknowledged or cleared: not closed)
    this.profiles = new Map();
    this.sites = new Map();
    this.listeners = new Set();
    this.alarmListeners = new Set();
    this.readingListeners = new Set();
    this.dirty = new Set();
    this.scheduled = false;
    // Update lag: device time of a reading to the moment the page drew it (ms), for measurement.
    this.lag = new Float64Array(LAG_SAMPLES);
    this.lagCount = 0;
    this.pendingLag = [];
    window.__coldchain = { fleet: this, lagSamples: () => Array.from(this.lag.subarray(0, Math.min(this.lagCount, LAG_SAMPLES))), resetLag: () => { this.lagCount = 0; } };
  }

  async load() {
    const [shipments, profiles, sites] = await Promise.all([
      this.api.all("/shipments?limit=500"),
      this.api.get("/profiles"),
      this.api.get("/sites"),
    ]);
    for (const p of profiles.items) this.profiles.set(p.profile.name, p.profile);
    for (const s of sites.items) this.sites.set(s.id, s);
    this.rows.clear();
    this.byDewar.clear();
    for (const shipment of shipments) {
      if (!ACTIVE.has(shipment.status)) continue;
      this.rows.set(shipment.id, this.newRow(shipment));
      this.byDewar.set(shipment.dewar_id, shipment.id);
    }
    await this.loadAlarms();
    this.changed(null);
    this.loadDetails(); // in the background: last reading and hold forecast per shipment
  }

  newRow(shipment) {
    return { shipment, reading: null, seenAt: null, hold: null, events: [], detailAt: 0 };
  }

  async loadAlarms() {
    const lists = await Promise.all(["open", "acknowledged", "cleared"].map((s) => this.api.all(`/alarms?state=${s}&limit=500`)));
    this.alarms.clear();
    for (const alarm of lists.flat()) this.alarms.set(alarm.id, alarm);
  }

  async loadDetails(ids = [...this.rows.keys()]) {
    const queue = [...ids];
    const worker = async () => {
      while (queue.length) {
        const id = queue.shift();
        try {
          this.applyDetail(await this.api.get(`/shipments/${encodeURIComponent(id)}`));
        } catch { /* shown as unknown; the stream fills it in */ }
      }
    };
    await Promise.all(Array.from({ length: 6 }, worker));
  }

  applyDetail(detail) {
    const row = this.rows.get(detail.shipment.id);
    if (!row) return;
    row.shipment = detail.shipment;
    row.hold = detail.hold;
    row.events = detail.events;
    row.detailAt = Date.now();
    if (detail.last_reading && (!row.reading || detail.last_reading.ts >= row.reading.ts)) {
      row.reading = detail.last_reading;
    }
    if (detail.last_seen_s !== null && detail.last_seen_s !== undefined) {
      const seen = Date.now() - detail.last_seen_s * 1000;
      row.seenAt = Math.max(row.seenAt ?? 0, seen);
    }
    for (const alarm of detail.open_alarms) this.alarms.set(alarm.id, alarm);
    this.mark(row.shipment.id);
  }

  /** A batch of readings from the stream. */
  applyReadings(readings) {
    const now = Date.now();
    for (const r of readings) {
      const id = this.byDewar.get(r.dewar_id);
      if (!id) {
        this.refreshSoon();
        continue;
      }
      const row = this.rows.get(id);
      row.seenAt = now;
      if (!row.reading || r.ts >= row.reading.ts) row.reading = r;
      this.pendingLag.push(r.ts);
      this.mark(id);
    }
    for (const fn of this.readingListeners) fn(readings);
  }

  /** An alarm change from the stream (the alert object). */
  applyAlarm(change) {
    const id = change.alarm_id;
    const known = this.alarms.get(id);
    const isNew = !known;
    if (!change.open) {
      this.alarms.delete(id);
    } else {
      this.alarms.set(id, {
        ...(known || {}),
        id,
        shipment_id: change.shipment_id,
        dewar_id: change.dewar_id,
        rule: change.rule,
        severity: change.severity,
        state: change.state,
        condition_active: change.condition_active,
        started_at: change.started_at,
        raised_at: known?.raised_at ?? change.raised_at ?? new Date().toISOString(),
        cleared_at: change.cleared_at,
        acknowledged_by: change.acknowledged_by,
        value: change.value,
        limit: change.limit,
        message: change.message,
        escalation_level: change.escalation_level,
      });
    }
    if (change.shipment_id && this.rows.has(change.shipment_id)) this.mark(change.shipment_id);
    else if (change.shipment_id) this.refreshSoon();
    for (const fn of this.alarmListeners) fn(change, isNew);
  }

  /** A dewar or shipment we do not know: fetch the list again (at most every 10 s). */
  refreshSoon() {
    if (this.refreshTimer) return;
    const wait = Math.max(0, 10000 - (Date.now() - (this.refreshedAt || 0)));
    this.refreshTimer = setTimeout(async () => {
      this.refreshedAt = Date.now();
      try {
        const shipments = await this.api.all("/shipments?limit=500");
        const fresh = [];
        for (const shipment of shipments) {
          const known = this.rows.get(shipment.id);
          if (!ACTIVE.has(shipment.status)) {
            if (known) {
              this.rows.delete(shipment.id);
              if (this.byDewar.get(shipment.dewar_id) === shipment.id) this.byDewar.delete(shipment.dewar_id);
            }
            continue;
          }
          if (known) {
            known.shipment = shipment;
          } else {
            this.rows.set(shipment.id, this.newRow(shipment));
            fresh.push(shipment.id);
          }
          this.byDewar.set(shipment.dewar_id, shipment.id);
        }
        this.changed(null);
        await this.loadDetails(fresh);
      } finally {
        this.refreshTimer = null;
      }
    }, wait);
  }

  /** The state a person reads: worst active alarm, or ok. */
  stateOf(row) {
    let worst = "ok";
    let top = null;
    for (const alarm of this.alarmsOf(row.shipment.id)) {
      if (alarm.state === "cleared") continue;
      if (RANK[alarm.severity] > RANK[worst]) {
        worst = alarm.severity;
        top = alarm;
      }
    }
    return { severity: worst === "info" ? "ok" : worst, alarm: top };
  }

  alarmsOf(shipmentId) {
    const out = [];
    for (const alarm of this.alarms.values()) if (alarm.shipment_id === shipmentId) out.push(alarm);
    return out;
  }

  /** Seconds since a reading arrived, and whether that is longer than the profile allows. */
  staleness(row, now = Date.now()) {
    if (row.seenAt === null) return { seconds: null, lost: true };
    const profile = this.profiles.get(row.shipment.profile);
    const allowed = (profile?.expected_interval_s ?? 300) * (profile?.signal_lost_factor ?? 3);
    const seconds = (now - row.seenAt) / 1000;
    const signalAlarm = this.alarmsOf(row.shipment.id).some((a) => a.rule === "signal_lost" && a.state !== "cleared");
    return { seconds, lost: seconds > allowed || (signalAlarm && seconds > 60) };
  }

  criticalUnacknowledged() {
    let n = 0;
    for (const alarm of this.alarms.values()) if (alarm.severity === "critical" && alarm.state === "open") n++;
    return n;
  }

  mark(id) {
    this.dirty.add(id);
    if (!this.scheduled) {
      this.scheduled = true;
      requestAnimationFrame(() => this.flush());
    }
  }

  changed(ids) {
    for (const fn of this.listeners) fn(ids);
  }

  flush() {
    this.scheduled = false;
    const ids = this.dirty;
    this.dirty = new Set();
    this.changed(ids);
    // The listeners have drawn: record how late each reading reached the screen.
    const drawn = Date.now();
    for (const ts of this.pendingLag) {
      this.lag[this.lagCount % LAG_SAMPLES] = drawn - Date.parse(ts);
      this.lagCount++;
    }
    this.pendingLag = [];
  }

  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  onAlarm(fn) {
    this.alarmListeners.add(fn);
    return () => this.alarmListeners.delete(fn);
  }

  onReadings(fn) {
    this.readingListeners.add(fn);
    return () => this.readingListeners.delete(fn);
  }
}
