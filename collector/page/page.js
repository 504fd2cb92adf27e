// capmon's live page: the collector's /api/v1 answers, drawn every REFRESH_MS.
// The read token lives in this tab's sessionStorage and travels only as the Authorization header of
// same-origin /api/v1/* requests (never in a URL or a cookie). Text goes in with textContent only:
// device ids, models, users and labels come from agents and are never parsed as HTML.
"use strict";

(() => {
  const REFRESH_MS = 5000;
  const KEY = "capmon.readToken";
  const STATES = ["free", "allocated_idle", "busy", "unavailable"];
  const STATE_TEXT = { free: "free", allocated_idle: "allocated idle", busy: "busy", unavailable: "unavailable" };
  const $ = (id) => document.getElementById(id);
  let timer = null;
  let generation = 0;

  class Refused extends Error {}

  async function api(path, token) {
    const resp = await fetch(path, {
      headers: { Authorization: "Bearer " + token },
      credentials: "omit",
      cache: "no-store",
      referrerPolicy: "no-referrer",
    });
    if (resp.status === 401 || resp.status === 403) throw new Refused(resp.status === 401 ? "token refused" : "not a read token");
    if (!resp.ok) throw new Error(path.split("?")[0] + ": HTTP " + resp.status);
    return resp.json();
  }

  const num = (v, digits = 0) =>
    v === null || v === undefined || Number.isNaN(v)
      ? "–"
      : Number(v).toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });

  function dur(s) {
    if (s === null || s === undefined) return "–";
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    return m ? m + "m " + (s % 60) + "s" : s + "s";
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function pill(state) {
    return el("span", STATE_TEXT[state] || state, "pill s-" + state);
  }

  // columns: [header, (row) => text or Node, numeric?]
  function fill(table, columns, rows, empty) {
    table.replaceChildren();
    const head = el("tr");
    for (const [h, , n] of columns) head.append(el("th", h, n ? "n" : ""));
    table.append(el("thead"));
    table.firstChild.append(head);
    const body = el("tbody");
    if (!rows.length) {
      const td = el("td", empty, "empty");
      td.colSpan = columns.length;
      body.append(el("tr"));
      body.firstChild.append(td);
    }
    for (const r of rows) {
      const tr = el("tr");
      for (const [, f, n] of columns) {
        const v = f(r);
        const td = el("td", v instanceof Node ? null : v, n ? "n" : "");
        if (v instanceof Node) td.append(v);
        tr.append(td);
      }
      body.append(tr);
    }
    table.append(body);
  }

  function breakdownColumns(first, currency) {
    return [
      [first, (r) => r[0]],
      ...STATES.map((s) => [STATE_TEXT[s], (r) => num(r[1].states[s]), true]),
      ["idle " + currency + "/h", (r) => num(r[1].idle_value_per_hour, 2), true],
      ...(hasPower(null) ? [["idle kW", (r) => kw(r[1]), true]] : []),
    ];
  }

  let powerSeen = false;
  function hasPower(totals) {
    if (totals && totals.idle_power_w !== undefined && totals.idle_power_w !== null) powerSeen = true;
    return powerSeen;
  }
  const kw = (t) => (t.idle_power_w === undefined || t.idle_power_w === null ? "–" : num(t.idle_power_w / 1000, 2));

  function drawFleet(fleet) {
    const t = fleet.totals || {};
    const currency = fleet.currency || "";
    for (const s of STATES) $("n-" + s).textContent = num((t.states || {})[s]);
    $("idle-value").textContent = num(t.idle_value_per_hour, 2) + (currency ? " " + currency : "");
    $("idle-power-card").hidden = !hasPower(t);
    if (hasPower(t)) $("idle-power").textContent = kw(t) + " kW";
    const agents = fleet.agents || {};
    $("n-agents").textContent = num(agents.total);
    $("agents-note").textContent = "agents" + (agents.stale ? ", " + agents.stale + " stale" : "");
    const bar = $("state-bar");
    bar.replaceChildren();
    const total = t.devices || 0;
    for (const s of STATES) {
      const n = (t.states || {})[s] || 0;
      if (!total || !n) continue;
      const i = el("i", null, "s-" + s);
      i.style.width = (100 * n) / total + "%";
      i.title = STATE_TEXT[s] + ": " + n;
      bar.append(i);
    }
    fill($("by-model"), breakdownColumns("model", currency), Object.entries(fleet.by_model || {}), "no devices yet");
    const labels = $("by-label");
    labels.replaceChildren();
    for (const [key, values] of Object.entries(fleet.by_label || {})) {
      const sec = el("section");
      sec.append(el("h2", "By " + key));
      const wrap = el("div", null, "scroll");
      const table = el("table");
      table.id = "by-label-" + key;
      wrap.append(table);
      sec.append(wrap);
      fill(table, breakdownColumns(key, currency), Object.entries(values), "no devices yet");
      labels.append(sec);
    }
  }

  function drawDevices(answer, currency) {
    const label = (d) => Object.values(d.labels || {}).join(" / ");
    fill(
      $("idle-devices"),
      [
        ["device", (d) => d.device_id],
        ["host", (d) => d.host],
        ["model", (d) => d.model || "–"],
        ["where", label],
        ["state", (d) => pill(d.state)],
        ["idle for", (d) => dur(d.idle_for_s), true],
        ["in state", (d) => dur(d.in_state_for_s), true],
        [currency + "/h", (d) => num(d.value_per_hour, 2), true],
      ],
      answer.devices || [],
      "nothing idle now"
    );
  }

  function drawHolders(answer, currency) {
    fill(
      $("holders"),
      [
        ["user", (h) => (h.holder === null ? "(unknown)" : h.holder)],
        ["devices", (h) => num(h.devices), true],
        ["GPU-eq", (h) => num(h.gpu_equivalents, 2), true],
        ["longest", (h) => dur(h.longest_for_s), true],
        ["idle " + currency + "/h", (h) => num(h.allocated_idle_value_per_hour, 2), true],
        ["on", (h) => (h.held || []).slice(0, 3).map((d) => d.host + " " + d.device_id).join(", ")],
      ],
      answer.holders || [],
      "no allocated-idle device is held"
    );
  }

  function drawAgents(answer) {
    const bad = (answer.agents || []).filter((a) => a.stale || Object.keys(a.refusals || {}).length);
    const ago = (ts) => (ts ? dur(Date.now() / 1000 - ts) + " ago" : "never");
    fill(
      $("agents"),
      [
        ["agent", (a) => a.id],
        ["host", (a) => a.host || "–"],
        ["stale", (a) => (a.stale ? "stale" : "")],
        ["last seen", (a) => ago(a.last_seen)],
        ["refused", (a) => Object.entries(a.refusals || {}).map(([k, v]) => k + " ×" + v.count).join(", ")],
        ["last refusal", (a) => Object.values(a.refusals || {}).map((v) => v.last_detail).filter(Boolean)[0] || ""],
      ],
      bad,
      "every agent reports on time"
    );
  }

  function status(text, badState) {
    const s = $("status");
    s.textContent = text;
    s.classList.toggle("bad", !!badState);
  }

  async function refresh() {
    const token = sessionStorage.getItem(KEY);
    if (!token) return showLogin("");
    const mine = ++generation;
    try {
      const [fleet, devices, holders, agents] = await Promise.all([
        api("/api/v1/fleet", token),
        api("/api/v1/devices?state=idle&limit=15", token),
        api("/api/v1/holders?by=user&state=allocated_idle&limit=15", token),
        api("/api/v1/agents", token),
      ]);
      if (mine !== generation) return;
      drawFleet(fleet);
      drawDevices(devices, fleet.currency || "");
      drawHolders(holders, fleet.currency || "");
      drawAgents(agents);
      $("fleet").hidden = false;
      $("login").hidden = true;
      $("logout").hidden = false;
      const at = new Date((fleet.generated_at || Date.now() / 1000) * 1000);
      status("updated " + at.toLocaleTimeString("en-GB"));
      document.body.dataset.updated = String(fleet.generated_at);
    } catch (err) {
      if (err instanceof Refused) {
        sessionStorage.removeItem(KEY);
        return showLogin(err.message);
      }
      status("cannot reach the collector: " + err.message, true);
    }
    schedule();
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, REFRESH_MS);
  }

  function showLogin(error) {
    clearTimeout(timer);
    $("fleet").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    const e = $("login-error");
    e.textContent = error;
    e.hidden = !error;
    status("");
    $("token").focus();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = $("token").value.trim();
      $("token").value = "";
      if (!token) return showLogin("enter a read token");
      sessionStorage.setItem(KEY, token);
      refresh();
    });
    $("logout").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      generation++;
      showLogin("");
    });
    refresh();
  });
})();
