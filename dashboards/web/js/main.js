// The dashboard: sign in with a token, load the fleet, follow the live stream, show one screen.

import { Api, whoAmI } from "./api.js";
import { h, fill, announce } from "./dom.js";
import { humanRule } from "./format.js";
import { Fleet } from "./model.js";
import { Live } from "./live.js";
import { fleetScreen } from "./fleet.js";
import { mapScreen } from "./mapscreen.js";
import { shipmentScreen } from "./shipment.js";
import { alarmsScreen } from "./alarms.js";
import { routesScreen } from "./routes.js";
import { lanesScreen } from "./lanes.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "coldchain-token";
let ctx = null;
let leave = () => {};

function storedToken() {
  return sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY);
}

function showSignIn(message) {
  $("nav").hidden = true;
  $("who").hidden = true;
  $("sign-in").hidden = false;
  fill($("screen"));
  $("sign-in-error").textContent = message || "";
  $("token").focus();
}

async function signIn(token, remember) {
  const api = new Api(token);
  let who;
  try {
    who = await whoAmI(api);
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(TOKEN_KEY);
    showSignIn(err.status === 401 ? "That token was not accepted (unknown, revoked or expired)." : `Could not reach the service: ${err.message}`);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  if (remember) localStorage.setItem(TOKEN_KEY, token);
  $("sign-in").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("nav-routes").parentElement.hidden = !who.plan;
  $("identity").textContent = `${who.name ? `${who.name}, ` : ""}${who.role}`;
  fill($("screen"), h("p", { class: "muted" }, "Loading the fleet…"));
  const fleet = new Fleet(api);
  ctx = { api, fleet, who, go: (hash) => { location.hash = hash; } };
  try {
    await fleet.load();
  } catch (err) {
    fill($("screen"), h("p", { class: "error" }, `Could not load the fleet: ${err.message}`));
    return;
  }
  fleet.onAlarm(onAlarm);
  fleet.subscribe(() => badge());
  ctx.live = new Live(token, {
    onReadings: (data) => fleet.applyReadings(data),
    onAlarm: (data) => fleet.applyAlarm(data),
    onStatus: (up, text) => {
      const el = $("live-status");
      el.textContent = up ? "Live" : `Offline: ${text}`;
      el.className = `live ${up ? "up" : "down"}`;
    },
    onResync: () => fleet.loadAlarms().then(() => fleet.loadDetails()).then(() => fleet.changed(null)),
  });
  ctx.live.start();
  badge();
  route();
}

// Critical alarms: a banner, a sound and a count in the title; impossible to miss. ---------
let audio = null;
function beep() {
  if ($("sound").getAttribute("aria-pressed") !== "true") return;
  try {
    audio = audio || new AudioContext();
    const t = audio.currentTime;
    for (const [i, freq] of [[0, 880], [1, 660], [2, 880]]) {
      const osc = audio.createOscillator();
      const gain = audio.createGain();
      osc.frequency.value = freq;
      gain.gain.setValueAtTime(0.0001, t + i * 0.25);
      gain.gain.exponentialRampToValueAtTime(0.3, t + i * 0.25 + 0.02);
      gain.gain.exponentialRampToValueAtTime(0.0001, t + i * 0.25 + 0.22);
      osc.connect(gain).connect(audio.destination);
      osc.start(t + i * 0.25);
      osc.stop(t + i * 0.25 + 0.24);
    }
    window.__coldchainBeeps = (window.__coldchainBeeps || 0) + 1;
  } catch { /* no audio device: the banner and title still show it */ }
}

const announced = new Set();
function onAlarm(change, isNew) {
  badge();
  if (change.severity !== "critical" || change.state !== "open" || announced.has(change.alarm_id)) return;
  announced.add(change.alarm_id);
  const banner = $("critical-banner");
  const go = h("a", { href: `#/shipment/${encodeURIComponent(change.shipment_id)}` }, "Open shipment");
  fill(banner,
    h("span", {}, `✖ CRITICAL alarm on ${change.dewar_id}: ${change.message || humanRule(change.rule)}`),
    go, h("a", { href: "#/alarms" }, "All alarms"),
    h("button", { type: "button", onclick: () => { banner.hidden = true; } }, "Dismiss"));
  banner.hidden = false;
  beep();
  announce(`Critical alarm on ${change.dewar_id}`);
}

function badge() {
  if (!ctx) return;
  const critical = ctx.fleet.criticalUnacknowledged();
  const open = ctx.fleet.alarms.size;
  $("alarm-count").textContent = open ? String(open) : "";
  $("alarm-count").setAttribute("aria-label", `${open} open alarms, ${critical} critical not acknowledged`);
  const title = critical ? `(${critical}) ✖ critical — coldchain` : "coldchain";
  if (document.title !== title) document.title = title;
}

// Screens ----------------------------------------------------------------------------------
function route() {
  if (!ctx) return;
  leave();
  const [, screen = "fleet", ...rest] = location.hash.split("/");
  const arg = decodeURIComponent(rest.join("/"));
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.screen === (screen === "shipment" ? "fleet" : screen)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const root = h("div", { dataset: { screen } });
  fill($("screen"), root);
  const screens = { fleet: fleetScreen, map: mapScreen, alarms: alarmsScreen, routes: routesScreen, lanes: lanesScreen };
  if (screen === "shipment" && arg) leave = shipmentScreen(root, ctx, arg);
  else leave = (screens[screen] || fleetScreen)(root, ctx);
  document.title = document.title; // keep the badge
  badge();
}

window.addEventListener("hashchange", () => {
  route();
  $("main").focus({ preventScroll: false });
});

$("sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  $("token").value = "";
  if (token) signIn(token, $("remember").checked);
});

$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(TOKEN_KEY);
  ctx?.live?.stop();
  leave();
  leave = () => {};
  ctx = null;
  document.title = "coldchain";
  showSignIn("Signed out.");
});

$("sound").addEventListener("click", () => {
  const on = $("sound").getAttribute("aria-pressed") !== "true";
  $("sound").setAttribute("aria-pressed", String(on));
  $("sound").textContent = on ? "Sound on" : "Sound off";
  if (on) { audio = audio || new AudioContext(); audio.resume?.(); }
});

const saved = storedToken();
if (saved) signIn(saved, false);
else showSignIn();
