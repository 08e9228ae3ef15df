// Numbers, times and severities as a person reads them.

export const SEVERITIES = ["ok", "info", "warning", "major", "critical"];
export const RANK = { ok: 0, info: 1, warning: 2, major: 3, critical: 4 };
export const WORD = { ok: "OK", info: "Info", warning: "Warning", major: "Major", critical: "Critical", stale: "Signal lost" };

export function severityBadge(h, severity, text) {
  return h("span", { class: `badge ${severity}` }, text ?? WORD[severity] ?? severity);
}

export function num(value, digits = 1) {
  return value === null || value === undefined || Number.isNaN(value) ? "—" : Number(value).toFixed(digits);
}

export function temp(value) {
  return value === null || value === undefined ? "—" : `${Number(value).toFixed(1)} °C`;
}

export function pct(value) {
  return value === null || value === undefined ? "—" : `${Number(value).toFixed(0)} %`;
}

export function hours(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  const sign = value < 0 ? "−" : "";
  const h = Math.abs(value);
  if (h >= 48) return `${sign}${(h / 24).toFixed(1)} d`;
  if (h >= 1) return `${sign}${h.toFixed(1)} h`;
  return `${sign}${Math.round(h * 60)} min`;
}

export function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  const s = Math.max(0, seconds);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

const dateTime = new Intl.DateTimeFormat(undefined, {
  year: "numeric", month: "short", day: "2-digit", hour: "2-digit", minute: "2-digit", timeZoneName: "short",
});

/** An instant in the browser's local time, with its zone named. */
export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : dateTime.format(d);
}

/** An instant in a site's own time zone (`local` is the API's offset form). */
export function localAt(iso, tz) {
  if (!iso) return "—";
  try {
    return new Intl.DateTimeFormat(undefined, {
      month: "short", day: "2-digit", hour: "2-digit", minute: "2-digit", timeZone: tz, timeZoneName: "short",
    }).format(new Date(iso));
  } catch {
    return when(iso);
  }
}

export function humanRule(rule) {
  return String(rule).replaceAll("_", " ");
}
