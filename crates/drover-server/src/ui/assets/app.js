// drover's dashboard: plain modern JavaScript, no library, nothing fetched from elsewhere.
// Pages (by the URL's hash): #/fleet, #/group/SERVICE/REGION, #/events, #/history, #/logs.
// Live: one EventSource on /v1/events (server-sent events); each event refreshes the page
// shown (debounced), and the events page appends it. The logs page reads /v1/logs as a
// stream of NDJSON frames (what `drover logs` reads), following it while asked to.
"use strict";

const S = {
  session: null,      // {token, scope, can_act, csrf}
  lastSeq: 0,
  events: [],         // newest last, at most MAX_EVENTS
  source: null,
  refreshTimer: null,
  page: null,         // {name, render, refresh}
};
const MAX_EVENTS = 2000;
const KINDS = ["applied", "plan_changed", "scaled", "launched", "healthy", "unhealthy", "respawned",
  "silent", "lost", "terminating", "terminated", "permit", "drained", "targets", "rollout", "server",
  "provider", "balancer", "schedule"];

// ---------------------------------------------------------------- helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    // Through the CSSOM: the page's policy refuses style attributes.
    else if (k === "style") for (const [p, x] of Object.entries(v)) el.style.setProperty(p, x);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const svgNS = "http://www.w3.org/2000/svg";
function s(tag, attrs) {
  const el = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

function dur(ms) {
  if (ms === null || ms === undefined) return "";
  let t = Math.max(0, Math.round(ms / 1000));
  if (t < 60) return t + "s";
  const m = Math.floor(t / 60); t %= 60;
  if (m < 60) return m + "m" + (t ? t + "s" : "");
  const hr = Math.floor(m / 60);
  return hr + "h" + (m % 60 ? (m % 60) + "m" : "");
}
function clock(ms) {
  const d = new Date(ms);
  return d.toISOString().replace("T", " ").slice(0, 19);
}
function bytes(n) {
  if (!n) return "–";
  const u = ["B", "KiB", "MiB", "GiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}
function stateClass(st) {
  return { healthy: "ok", booting: "warn", launching: "warn", draining: "info", terminating: "info",
    unhealthy: "bad", silent: "bad" }[st] || "info";
}
function groupLink(g) {
  const [svc, region] = g.split("/");
  return "#/group/" + encodeURIComponent(svc) + "/" + encodeURIComponent(region);
}
function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent),
    params: new URLSearchParams(query || "") };
}

function toast(text, bad) {
  const t = h("div", { class: bad ? "bad" : "", text, role: bad ? "alert" : null, title: "click to dismiss" });
  t.addEventListener("click", () => t.remove());
  document.getElementById("toast").append(t);
  setTimeout(() => t.remove(), bad ? 10000 : 5000);
}

class ApiError extends Error {
  constructor(status, body) {
    const errs = (body && body.errors || []).map((e) => (e.field ? e.field + ": " : "") + e.message);
    super([(body && body.message) || ("HTTP " + status), ...errs].join("\n"));
    this.status = status; this.body = body;
  }
}

async function api(path, opts = {}) {
  const init = { credentials: "same-origin", headers: { Accept: "application/json" } };
  if (opts.body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.body);
  }
  if (opts.method) init.method = opts.method;
  if (init.method && init.method !== "GET" && S.session && S.session.csrf) {
    init.headers["X-Drover-CSRF"] = S.session.csrf;
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = { message: text }; }
  if (r.status === 401) { sessionEnded(body && body.message); throw new ApiError(r.status, body); }
  if (!r.ok) throw new ApiError(r.status, body);
  return body;
}

function sessionEnded(message) {
  if (S.source) { S.source.close(); S.source = null; }
  const main = document.getElementById("main");
  main.replaceChildren(h("h1", {}, "Your session has ended"),
    h("p", { id: "session-ended" }, message || "Log in again."),
    h("p", {}, h("a", { href: "/ui/" }, "Log in")));
  setLive(false, "logged out");
}

// ---------------------------------------------------------------- live events

function setLive(on, text) {
  const el = document.getElementById("live");
  el.className = on ? "on" : "off";
  el.textContent = text;
}

function connect() {
  if (S.source) S.source.close();
  const src = new EventSource("/v1/events?follow=true&after=" + S.lastSeq);
  S.source = src;
  src.onopen = () => setLive(true, "live");
  src.onmessage = (m) => {
    let ev; try { ev = JSON.parse(m.data); } catch (_) { return; }
    if (ev.seq <= S.lastSeq) return;
    S.lastSeq = ev.seq;
    S.events.push(ev);
    if (S.events.length > MAX_EVENTS) S.events.splice(0, S.events.length - MAX_EVENTS);
    if (S.page && S.page.onEvent) S.page.onEvent(ev);
    scheduleRefresh();
  };
  src.onerror = async () => {
    setLive(false, "reconnecting");
    // Refused outright (e.g. 429: the token's follow streams are all in use), the browser
    // gives up: try again later; the page still refreshes every 5 s meanwhile.
    if (src.readyState === EventSource.CLOSED) setTimeout(() => { if (S.source === src) connect(); }, 5000);
    // A lost session is not worth retrying: say so (api() shows the page).
    try { await api("/v1/ui/session"); } catch (_) { /* shown */ }
  };
}

function scheduleRefresh() {
  if (S.refreshTimer) return;
  S.refreshTimer = setTimeout(() => {
    S.refreshTimer = null;
    if (S.page && S.page.refresh) S.page.refresh().catch(showError);
  }, 250);
}

function showError(e) {
  if (e && e.status === 401) return;
  toast(e && e.message ? e.message : String(e), true);
}

// ---------------------------------------------------------------- rollout bar and chart

function rolloutBar(g) {
  const r = g.rollout || {};
  if (!g.bar) {
    const label = r.phase === "failed" ? "rollout failed" + (r.failure ? ": " + r.failure : "")
      : "rollout done (generation " + g.generation + ")";
    return h("div", { class: "rollout", "data-phase": r.phase || "done" },
      h("div", { class: "bar-label" }, label));
  }
  const b = g.bar;
  const segs = [];
  for (let i = 0; i < b.batches; i++) {
    segs.push(h("span", { class: i < b.done ? "done" : i === b.done ? "now" : "",
      title: "batch " + (i + 1) + " of " + b.batches }));
  }
  const pct = Math.round(100 * b.done / b.batches);
  return h("div", { class: "rollout", "data-phase": r.phase, "data-done": b.done, "data-batches": b.batches },
    h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": b.batches,
      "aria-valuenow": b.done, "aria-label": "rollout of " + g.group }, segs),
    h("div", { class: "bar-label" },
      (r.paused ? "paused · " : "") + (r.phase || "rolling") + " to generation " + g.generation + ": " +
      (b.done >= b.batches ? "every batch healthy, finishing" : "batch " + (b.done + 1) + " of " + b.batches) + " (" + pct + "%), " +
      r.current_healthy + "/" + g.desired + " new healthy, " + r.stale + " old · ETA " + dur(b.eta_ms)));
}

// A canary analysis as the server words it ("passed: 1 canary against 3 baseline
// instance(s): CHECK; CHECK", each check "NAME: canary C, baseline B (limit L)[ FAILED]"), as
// a table of its checks; a line of another shape is shown as it is.
function canaryAnalysis(text) {
  const m = /^(passed|failed): (.*? baseline instance\(s\)): (.*)$/s.exec(text);
  if (!m) return h("p", { id: "canary" }, h("strong", {}, "canary analysis: "), text);
  const rows = m[3].split("; ").map((line) => {
    const c = /^(.*?): canary ([^,]+), baseline (\S+) \((?:limit|over) (\S+)\)( FAILED)?$/.exec(line);
    if (!c) {
      return h("tr", { class: / FAILED$/.test(line) ? "failed" : "" }, h("td", { colspan: 5 }, line));
    }
    return h("tr", { "data-check": c[1], class: c[5] ? "failed" : "" },
      h("td", {}, c[1]), h("td", { class: "num" }, c[2]), h("td", { class: "num" }, c[3]),
      h("td", { class: "num" }, c[4]),
      h("td", {}, h("span", { class: "pill " + (c[5] ? "bad" : "ok") }, c[5] ? "failed" : "ok")));
  });
  return h("div", { id: "canary", "data-verdict": m[1] },
    h("p", {}, h("strong", {}, "canary analysis "),
      h("span", { class: "pill " + (m[1] === "passed" ? "ok" : "bad") }, m[1]), " " + m[2]),
    h("table", { id: "canary-checks", "aria-label": "canary analysis checks" },
      h("thead", {}, h("tr", {}, ["check", "canary", "baseline", "limit", "result"].map((x, i) =>
        h("th", { scope: "col", class: i >= 1 && i <= 3 ? "num" : "" }, x)))),
      h("tbody", {}, rows)));
}

// The last hour: desired and healthy counts, and for a group that autoscales its metric
// against the target (on a scale of its own, right).
function chart(g) {
  const pts = g.history || [];
  const a = g.autoscale;
  // The last hour, or less while there is less to show (5 minutes at least).
  const W = 300, H = 64, now = Date.now();
  const span = Math.min(3600e3, Math.max(300e3, pts.length ? now - pts[0].at_ms : 0));
  const from = now - span;
  const x = (t) => Math.max(0, ((t - from) / span) * W);
  const maxCount = Math.max(g.max || 1, ...pts.map((p) => Math.max(p.desired, p.healthy))) || 1;
  const metricMax = a ? Math.max(a.target * 2, ...pts.map((p) => p.observed || 0)) || 1 : 1;
  const yC = (v) => H - 4 - (v / maxCount) * (H - 8);
  const yM = (v) => H - 4 - (v / metricMax) * (H - 8);
  const label = `last hour of ${g.group}: desired ${g.desired}, healthy ${g.healthy}` + (a ? `, ${a.metric} ` +
    `${a.observed === undefined ? "not measured" : a.observed.toFixed(2)} against target ${a.target}` : "");
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": label });
  if (a) svg.append(s("line", { class: "target", x1: 0, x2: W, y1: yM(a.target), y2: yM(a.target) }));
  const step = (key, cls) => {
    let d = "";
    pts.forEach((p, i) => {
      const px = x(p.at_ms).toFixed(1), py = yC(p[key]).toFixed(1);
      d += i === 0 ? `M${px},${py}` : `H${px}V${py}`;
    });
    if (d) svg.append(s("path", { class: cls, d: d + `H${W}` }));
  };
  step("healthy", "healthy");
  step("desired", "desired");
  if (a) {
    const obs = pts.filter((p) => p.observed !== undefined);
    if (obs.length) {
      svg.append(s("polyline", { class: "observed",
        points: obs.map((p) => `${x(p.at_ms).toFixed(1)},${yM(p.observed).toFixed(1)}`).join(" ") }));
    }
  }
  return h("div", { class: "chart-box" },
    svg,
    h("div", { class: "legend" },
      h("span", {}, h("i", { class: "d" }), "desired " + g.desired),
      h("span", {}, h("i", { class: "hl" }), "healthy " + g.healthy),
      a ? [h("span", {}, h("i", { class: "o" }), a.metric + " " + (a.observed === undefined ? "–" : a.observed.toFixed(2))),
        h("span", {}, h("i", { class: "t" }), "target " + a.target)] : h("span", {}, "no autoscaling"),
      h("span", {}, span >= 3600e3 ? "last hour" : "last " + Math.round(span / 60e3) + " min")));
}

// ---------------------------------------------------------------- fleet page

function fleetPage() {
  let data = null;
  const root = h("div", {});
  async function refresh() {
    // The first one is the summary the start already fetched.
    data = S.firstSummary || await api("/v1/ui/summary");
    S.firstSummary = null;
    if (data.last_seq > S.lastSeq && !S.source) S.lastSeq = data.last_seq;
    render();
  }
  function cell(g) {
    const healthy = g.healthy + "/" + g.desired;
    const cls = g.healthy >= g.desired ? "ok" : g.healthy === 0 ? "bad" : "warn";
    return h("div", { class: "cell", "data-group": g.group },
      h("h3", {}, h("a", { href: groupLink(g.group) }, g.group),
        h("span", { class: "pill " + cls, "data-health": healthy, title: "healthy / desired" }, healthy)),
      h("dl", { class: "kv" },
        h("dt", {}, "versions"), h("dd", { class: "versions" }, g.versions + " · gen " + g.generation),
        h("dt", {}, "min/desired/max"), h("dd", { class: "capacity" }, g.min + " / " + g.desired + " / " + g.max),
        g.ingress ? [h("dt", {}, "ingress"), h("dd", { class: "mono" }, g.ingress)] : null),
      rolloutBar(g),
      chart(g));
  }
  function render() {
    if (!data) return;
    const services = [...new Set(data.groups.map((g) => g.service))];
    const regions = [...new Set(data.groups.map((g) => g.region))].sort();
    const by = new Map(data.groups.map((g) => [g.service + "/" + g.region, g]));
    const grid = h("div", { class: "grid", style: { "--cols": String(Math.max(1, regions.length)) },
      "aria-label": "services by region" },
      h("div", { class: "head" }, "service \\ region"),
      regions.map((r) => h("div", { class: "head" }, r)),
      services.map((svc) => [
        h("div", { class: "head" }, svc),
        regions.map((r) => by.has(svc + "/" + r) ? cell(by.get(svc + "/" + r))
          : h("div", { class: "cell empty" }, "–")),
      ]));
    const total = data.groups.reduce((n, g) => n + g.instance_count, 0);
    const recent = data.recent.slice(-8).reverse();
    root.replaceChildren(
      h("h1", {}, "Fleet " + (data.fleet || "(nothing applied)"),
        h("span", { class: "muted" }, " · revision " + (data.revision || "–") + " · " +
          data.groups.length + " groups · " + total + " instances")),
      grid,
      h("h2", {}, "Latest events"),
      eventsTable(recent, "recent"));
  }
  return { name: "fleet", el: root, refresh, onEvent: null };
}

// ---------------------------------------------------------------- group page

function groupPage(service, region, params) {
  const group = service + "/" + region;
  let page = Math.max(1, parseInt(params.get("page") || "1", 10));
  let q = params.get("q") || "";
  let data = null;
  const root = h("div", {});
  const PER = 50;
  async function refresh() {
    const u = `/v1/ui/groups/${encodeURIComponent(service)}/${encodeURIComponent(region)}` +
      `?page=${page}&per_page=${PER}` + (q ? "&q=" + encodeURIComponent(q) : "");
    data = await api(u);
    render();
  }
  function instancesTable() {
    const now = data.now_ms;
    return h("table", { id: "instances", "aria-label": "instances of " + group },
      h("thead", {}, h("tr", {}, ["instance", "address", "state", "rotation", "restarts", "CPU", "memory", "age", "generation"]
        .map((c, i) => h("th", { class: i >= 4 && i !== 6 ? "num" : "", scope: "col" }, c)))),
      h("tbody", {}, data.instances.map((i) => h("tr", { "data-instance": i.id, "data-generation": i.generation, "data-state": i.state },
        h("td", { class: "mono" }, h("a", { href: "#/events?instance=" + encodeURIComponent(i.id) }, i.id),
          " ", h("a", { class: "small", href: "#/logs?" + new URLSearchParams({ service, instance: i.id }), "aria-label": "logs of " + i.id }, "logs")),
        h("td", { class: "mono" }, i.addr),
        h("td", {}, h("span", { class: "pill " + stateClass(i.state) }, i.state)),
        h("td", {}, i.in_rotation ? "in" : "out"),
        h("td", { class: "num" }, i.components.reduce((n, c) => n + c.restarts, 0)),
        h("td", { class: "num" }, i.utilization ? (100 * i.utilization.cpu).toFixed(1) + "%" : "–"),
        h("td", { class: "num" }, bytes(i.utilization && i.utilization.memory_bytes)),
        h("td", { class: "num" }, dur(now - i.launched_at_ms)),
        h("td", { class: "num generation" }, i.generation)))));
  }
  function batches() {
    const r = data.rollout;
    if (!data.bar) return null;
    const b = data.bar;
    const items = [];
    for (let i = 0; i < b.batches; i++) {
      const first = i * b.batch_size + 1, last = Math.min((i + 1) * b.batch_size, data.desired);
      const st = i < b.done ? "done" : i === b.done ? "now" : "";
      items.push(h("li", { class: st }, `batch ${i + 1}: instances ${first}–${last} ` +
        (st === "done" ? "✓ done" : st === "now" ? (r.paused ? "paused" : "in progress") : "waiting")));
    }
    return h("ol", { class: "batches", "aria-label": "batches" }, items);
  }
  function actions() {
    if (!S.session || !S.session.can_act) {
      return h("p", { class: "muted", id: "read-only" }, "Read-only session (token " + S.session.token + "): no actions.");
    }
    const comps = (data.plan && data.plan.components || []).map((c) => c.name);
    const r = data.rollout;
    const deploy = h("form", { id: "deploy-form", "aria-label": "deploy" },
      h("label", {}, "component", h("select", { name: "component", id: "deploy-component" },
        comps.map((c) => h("option", { value: c }, c)))),
      h("label", {}, "version", h("input", { name: "version", id: "deploy-version", required: true, size: 12, placeholder: "v2" })),
      h("button", { type: "submit", id: "deploy", class: "primary" }, "Deploy…"));
    deploy.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const body = { service, component: deploy.component.value, version: deploy.version.value.trim() };
      confirmAction(`Deploy ${body.component} ${body.version} to every region of ${service}?`,
        () => api("/v1/deploy", { body: { ...body, dry_run: true } }).then(planText),
        () => api("/v1/deploy", { body }).then((x) => "deployed: revision " + x.revision));
    });
    const scale = h("form", { id: "scale-form", "aria-label": "scale" },
      h("label", {}, "desired", h("input", { name: "count", id: "scale-count", type: "number", min: 0, value: data.desired, class: "count" })),
      h("button", { type: "submit", id: "scale" }, "Scale…"));
    scale.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const n = parseInt(scale.count.value, 10);
      const delta = n - data.desired;
      confirmAction(`Scale ${group} to ${n}?`,
        async () => `scale ${group}: desired ${data.desired} -> ${n} (capacity ${data.min}..${data.max})\n` +
          (delta > 0 ? `${delta} instance(s) launched` : delta < 0 ? `${-delta} instance(s) drained and terminated (stale ones first, then the newest)` : "no change") +
          (data.autoscale ? "\nautoscaling goes on from the new count" : ""),
        () => api("/v1/scale", { body: { service, region, desired: n } })
          .then((x) => x.groups.map((g) => `${g.group}: ${g.from} -> ${g.to}`).join("\n")));
    });
    const rollback = h("button", { type: "button", id: "rollback", onclick: () =>
      confirmAction(`Roll ${service} back to the versions of the revision before?`,
        () => api("/v1/rollback", { body: { service, dry_run: true } }).then(planText),
        () => api("/v1/rollback", { body: { service } }).then((x) => "rolled back: revision " + x.revision)) }, "Roll back…");
    const ro = (action, label, what, cls) => h("button", { type: "button", id: "rollout-" + action, class: cls || "", onclick: () =>
      confirmAction(`${label} the rollout of ${group}?`,
        async () => `rollout ${action} ${group} (generation ${data.generation}): ${what}`,
        () => api("/v1/rollout", { body: { service, region, action } })
          .then((x) => x.groups.map((g) => `${g.group} generation ${g.generation}: ${g.result}`).join("\n"))) }, label + "…");
    const rolling = r.in_progress;
    return h("div", { class: "actions" }, deploy, scale, rollback,
      rolling && !r.paused ? ro("pause", "Pause", "no permit is given and nothing new is launched until it is resumed") : null,
      rolling && r.paused ? ro("resume", "Resume", "the rollout goes on where it stopped") : null,
      rolling ? ro("promote", "Promote", "the rollout goes on at once (past a canary's bake, or a pause)") : null,
      rolling ? ro("abort", "Abort", "the rollout stops and the group goes back to generation " + r.good_generation, "danger") : null);
  }
  function pager() {
    const pages = Math.max(1, Math.ceil(data.matching / PER));
    const go = (p) => { page = p; location.hash = `#/group/${encodeURIComponent(service)}/${encodeURIComponent(region)}?page=${p}` + (q ? "&q=" + encodeURIComponent(q) : ""); };
    const filter = h("input", { type: "search", id: "instance-filter", placeholder: "filter: id, address, state", value: q, "aria-label": "filter instances" });
    filter.addEventListener("change", () => { q = filter.value.trim(); go(1); });
    return h("div", { class: "pager" },
      filter,
      h("button", { type: "button", disabled: page <= 1, onclick: () => go(page - 1) }, "← previous"),
      h("span", { id: "page-of" }, `page ${page} of ${pages} · ${data.matching} instance(s)`),
      h("button", { type: "button", disabled: page >= pages, onclick: () => go(page + 1) }, "next →"));
  }
  function planTable() {
    const p = data.plan;
    if (!p) return h("p", { class: "muted" }, "no plan");
    return h("table", { id: "plan" },
      h("thead", {}, h("tr", {}, ["component", "runtime", "version", "command / image", "ports", "health"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, p.components.map((c) => h("tr", {},
        h("td", {}, c.name), h("td", {}, c.runtime), h("td", { class: "mono" }, c.version),
        h("td", { class: "mono" }, c.docker ? c.docker.image || "" : [c.command, ...(c.args || [])].join(" ")),
        h("td", { class: "mono" }, Object.entries(c.ports || {}).map(([k, v]) => k + "=" + v).join(" ")),
        h("td", { class: "mono" }, c.health ? (c.health.type || "") + " " + (c.health.path || "") : "–")))));
  }
  function render() {
    if (!data) return;
    const r = data.rollout;
    // What the user is typing survives the refresh.
    const focused = document.activeElement && document.activeElement.id;
    const typed = {};
    root.querySelectorAll("input[id], select[id]").forEach((el) => { if (el.dataset.dirty) typed[el.id] = el.value; });
    const cls = data.healthy >= data.desired ? "ok" : data.healthy === 0 ? "bad" : "warn";
    root.replaceChildren(
      h("h1", {}, h("a", { href: "#/fleet" }, "Fleet"), " / " + group + " ",
        h("span", { class: "pill " + cls, id: "group-health" }, data.healthy + "/" + data.desired + " healthy"),
        " ", h("a", { class: "small", id: "group-logs", href: "#/logs?" + new URLSearchParams({ service, region, follow: "1" }) }, "logs")),
      h("dl", { class: "kv" },
        h("dt", {}, "versions"), h("dd", { id: "group-versions" }, data.versions + " · generation " + data.generation),
        h("dt", {}, "min/desired/max"), h("dd", { id: "group-capacity" }, data.min + " / " + data.desired + " / " + data.max +
          (data.desired_reason ? " (desired set by " + data.desired_reason + ")" : "")),
        h("dt", {}, "provider"), h("dd", {}, data.provider),
        data.ingress ? [h("dt", {}, "ingress"), h("dd", { class: "mono" }, "curl " + data.ingress)] : null,
        h("dt", {}, "instances"), h("dd", {}, Object.entries(data.states).map(([k, v]) => h("span", { class: "pill " + stateClass(k) }, v + " " + k + " ")))),
      actions(),
      h("h2", {}, "Rollout"),
      h("section", { id: "rollout-section" },
        rolloutBar(data),
        batches(),
        r.analysis ? canaryAnalysis(r.analysis) : null,
        r.wave ? h("p", {}, "wave " + r.wave + (r.wave_pending ? " (waiting for the waves before it)" : "")) : null,
        data.rollout_events.length ? h("details", { open: true }, h("summary", {}, "rollout and canary events"),
          eventsTable(data.rollout_events.slice().reverse(), "rollout-events")) : null),
      h("h2", {}, "Capacity and autoscaling"), chart(data),
      h("h2", {}, "Instances"), pager(), instancesTable(),
      h("h2", {}, "Current plan (generation " + data.generation + ")"), planTable());
    for (const [id, v] of Object.entries(typed)) {
      const el = document.getElementById(id);
      if (el) { el.value = v; el.dataset.dirty = "1"; }
    }
    if (focused) { const el = document.getElementById(focused); if (el) el.focus(); }
  }
  root.addEventListener("input", (ev) => { if (ev.target.id) ev.target.dataset.dirty = "1"; });
  root.addEventListener("change", (ev) => { if (ev.target.id) ev.target.dataset.dirty = "1"; });
  return { name: "group", el: root, refresh };
}

function planText(r) {
  const out = [];
  for (const d of r.drift || []) out.push(`${d.field}: the file says ${d.file}, live is ${d.live} (set by ${d.set_by})`);
  if (!r.changes || !r.changes.length) { out.push("no changes: revision " + r.revision + " is current"); return out.join("\n"); }
  const show = (v) => v === undefined ? "" : JSON.stringify(v);
  for (const c of r.changes) {
    if (c.kind === "added") out.push(`  + ${c.path} = ${show(c.to)}`);
    else if (c.kind === "removed") out.push(`  - ${c.path} (was ${show(c.from)})`);
    else out.push(`  ~ ${c.path}: ${show(c.from)} -> ${show(c.to)}`);
  }
  for (const p of r.plan_changes || []) out.push("  plan " + p);
  for (const ro of r.rollouts || []) {
    out.push(`  rollout ${ro.group}${ro.wave ? " (wave " + ro.wave + ")" : ""}: generation ${ro.from_generation} -> ${ro.to_generation}: ` +
      `${ro.replaced} instance(s) replaced in ${ro.batches} batch(es), about ${dur(ro.estimated_ms)}${ro.held ? " (held for its wave)" : ""}`);
  }
  out.push("dry run: nothing was stored");
  return out.join("\n");
}

// Show what would happen, ask, then do it; a refusal shows the server's message.
async function confirmAction(title, preview, run) {
  const dlg = document.getElementById("confirm");
  const ok = document.getElementById("confirm-ok");
  const err = document.getElementById("confirm-error");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = "drover plan says:";
  const planEl = document.getElementById("confirm-plan");
  planEl.textContent = "…";
  err.hidden = true; err.textContent = "";
  ok.disabled = true;
  // Listening before it opens: closed while the preview loads (Esc) counts as cancel.
  const closed = new Promise((resolve) => dlg.addEventListener("close", () => resolve(dlg.returnValue), { once: true }));
  dlg.showModal();
  try {
    planEl.textContent = await preview();
    ok.disabled = false;
    ok.focus();
  } catch (e) {
    planEl.textContent = "";
    err.textContent = "refused: " + e.message; err.hidden = false;
    return;
  }
  const choice = await closed;
  if (choice !== "ok") return;
  try {
    toast(await run());
    scheduleRefresh();
  } catch (e) {
    toast("refused: " + e.message, true);
  }
}

// ---------------------------------------------------------------- events page

function eventsTable(evs, id) {
  return h("table", { class: "events", id },
    h("thead", {}, h("tr", {}, ["time", "seq", "kind", "group", "instance", "message"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, evs.map(eventRow)));
}
function eventRow(e) {
  return h("tr", { "data-seq": e.seq, "data-kind": e.kind },
    h("td", { class: "mono" }, clock(e.at_ms)), h("td", { class: "num" }, e.seq),
    h("td", {}, e.kind), h("td", {}, e.group ? h("a", { href: groupLink(e.group) }, e.group) : ""),
    h("td", { class: "mono" }, e.instance || ""), h("td", {}, e.message));
}

function eventsPage(params) {
  const f = { group: params.get("group") || "", instance: params.get("instance") || "", kind: params.get("kind") || "" };
  const root = h("div", {});
  let tbody = null;
  const keep = (e) => (!f.group || e.group === f.group) && (!f.instance || e.instance === f.instance) && (!f.kind || e.kind === f.kind);
  async function load() {
    // The newest 500 that match, however far back.
    const qs = new URLSearchParams({ limit: "500", newest: "true" });
    for (const [k, v] of Object.entries(f)) if (v) qs.set(k, v);
    const evs = await api("/v1/events?" + qs);
    render(evs);
  }
  function render(evs) {
    const form = h("form", { class: "filters", id: "event-filters", "aria-label": "filter events" },
      h("label", {}, "group", h("input", { name: "group", value: f.group, placeholder: "web/local", size: 16 })),
      h("label", {}, "instance", h("input", { name: "instance", value: f.instance, size: 16 })),
      h("label", {}, "kind", h("select", { name: "kind" }, h("option", { value: "" }, "any"),
        KINDS.map((k) => h("option", { value: k, selected: k === f.kind }, k)))),
      h("button", { type: "submit" }, "Filter"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const qs = new URLSearchParams();
      for (const k of ["group", "instance", "kind"]) if (form[k].value.trim()) qs.set(k, form[k].value.trim());
      location.hash = "#/events" + (qs.toString() ? "?" + qs : "");
    });
    const table = eventsTable(evs.slice().reverse(), "events");
    tbody = table.querySelector("tbody");
    // Those that arrived live while the page was loading.
    const top = evs.length ? evs[evs.length - 1].seq : 0;
    for (const e of S.events) if (e.seq > top && keep(e)) tbody.prepend(eventRow(e));
    root.replaceChildren(h("h1", {}, "Events"), form,
      h("p", { class: "muted" }, "Newest first; new ones appear as they happen."), table);
  }
  return { name: "events", el: root, refresh: async () => { if (!tbody) await load(); },
    onEvent: (e) => { if (tbody && keep(e) && !tbody.querySelector(`tr[data-seq="${e.seq}"]`)) { const row = eventRow(e); row.classList.add("fresh"); tbody.prepend(row); } } };
}

// ---------------------------------------------------------------- history page

// Line diff (longest common subsequence), as rows of [left, right] for a side-by-side view.
function diffLines(a, b) {
  const n = a.length, m = b.length;
  // Trim the common head and tail first: fleet files differ in a few lines.
  let p = 0; while (p < n && p < m && a[p] === b[p]) p++;
  let q = 0; while (q < n - p && q < m - p && a[n - 1 - q] === b[m - 1 - q]) q++;
  const A = a.slice(p, n - q), B = b.slice(p, m - q);
  const N = A.length, M = B.length;
  const L = Array.from({ length: N + 1 }, () => new Uint32Array(M + 1));
  for (let i = N - 1; i >= 0; i--) for (let j = M - 1; j >= 0; j--) {
    L[i][j] = A[i] === B[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  }
  const rows = [];
  for (let i = 0; i < p; i++) rows.push({ l: i + 1, r: i + 1, a: a[i], b: b[i], t: "same" });
  let i = 0, j = 0; const dels = [], adds = [];
  const flush = () => {
    const k = Math.max(dels.length, adds.length);
    for (let x = 0; x < k; x++) rows.push({ l: dels[x] ? dels[x][0] : null, a: dels[x] ? dels[x][1] : null,
      r: adds[x] ? adds[x][0] : null, b: adds[x] ? adds[x][1] : null, t: "change" });
    dels.length = 0; adds.length = 0;
  };
  while (i < N || j < M) {
    if (i < N && j < M && A[i] === B[j]) { flush(); rows.push({ l: p + i + 1, r: p + j + 1, a: A[i], b: B[j], t: "same" }); i++; j++; }
    else if (j < M && (i >= N || L[i][j + 1] >= L[i + 1][j])) { adds.push([p + j + 1, B[j]]); j++; }
    else { dels.push([p + i + 1, A[i]]); i++; }
  }
  flush();
  for (let k = 0; k < q; k++) rows.push({ l: n - q + k + 1, r: m - q + k + 1, a: a[n - q + k], b: b[m - q + k], t: "same" });
  return rows;
}

function historyPage(params) {
  const root = h("div", {});
  let revs = null;
  async function refresh() {
    revs = await api("/v1/revisions");
    await render();
  }
  async function render() {
    const newest = revs.length ? revs[revs.length - 1].number : 0;
    let b = parseInt(params.get("b") || String(newest), 10);
    let a = parseInt(params.get("a") || String(Math.max(1, b - 1)), 10);
    const pick = (name, val) => h("select", { name, id: "diff-" + name, "aria-label": "revision " + name },
      revs.slice().reverse().map((r) => h("option", { value: r.number, selected: r.number === val }, "#" + r.number)));
    const form = h("form", { class: "filters", id: "diff-form" },
      h("label", {}, "left", pick("a", a)), h("label", {}, "right", pick("b", b)),
      h("button", { type: "submit" }, "Compare"));
    form.addEventListener("submit", (ev) => { ev.preventDefault(); location.hash = `#/history?a=${form.a.value}&b=${form.b.value}`; });
    const list = h("table", { id: "revisions" },
      h("thead", {}, h("tr", {}, ["revision", "applied", "file", "summary", ""].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, revs.slice().reverse().map((r) => h("tr", { "data-revision": r.number },
        h("td", { class: "num" }, "#" + r.number), h("td", { class: "mono" }, clock(r.applied_at_ms)),
        h("td", { class: "mono" }, r.file), h("td", {}, r.summary),
        h("td", {}, r.number > 1 ? h("a", { href: `#/history?a=${r.number - 1}&b=${r.number}` }, "diff with #" + (r.number - 1)) : "")))));
    const diffBox = h("div", { id: "diff-box" });
    root.replaceChildren(h("h1", {}, "History"), h("p", { class: "muted" }, revs.length + " revision(s); pick any two to compare."),
      form, diffBox, h("h2", {}, "Revisions"), list);
    if (a && b && revs.length) {
      try {
        const [ra, rb] = await Promise.all([api("/v1/revisions/" + a), api("/v1/revisions/" + b)]);
        const rows = diffLines(ra.toml.split("\n"), rb.toml.split("\n"));
        const changed = rows.filter((r) => r.t !== "same").length;
        const grid = h("div", { class: "diff", id: "diff", role: "table", "aria-label": `revision ${a} against ${b}` },
          h("div", { class: "side-head" }, `#${a} · ${ra.file} · ${clock(ra.applied_at_ms)}`),
          h("div", { class: "side-head" }, `#${b} · ${rb.file} · ${clock(rb.applied_at_ms)}`),
          rows.map((r) => [
            h("pre", { class: r.t === "same" ? "" : r.a === null ? "gap" : "del" }, r.l ? h("span", { class: "ln" }, r.l) : "", r.a === null ? "" : r.a),
            h("pre", { class: r.t === "same" ? "" : r.b === null ? "gap" : "add" }, r.r ? h("span", { class: "ln" }, r.r) : "", r.b === null ? "" : r.b),
          ]));
        diffBox.replaceChildren(h("h2", {}, `Revision #${a} against #${b}: ${changed} line(s) differ`), grid);
      } catch (e) { diffBox.replaceChildren(h("p", { class: "error" }, e.message)); }
    }
  }
  return { name: "history", el: root, refresh };
}

// ---------------------------------------------------------------- logs page

// What `drover logs SERVICE [COMPONENT] [--instance I] [--region R] [--tail N] [-f]` shows:
// every instance's lines merged in time order, each as "INSTANCE COMPONENT | line", notes and
// errors beside them; with follow, new lines as they come until the page is left.
const MAX_LOG_LINES = 5000;

function logsPage(params) {
  const f = { service: params.get("service") || "", component: params.get("component") || "",
    instance: params.get("instance") || "", region: params.get("region") || "",
    tail: params.get("tail") || "100", follow: params.get("follow") === "1" };
  const root = h("div", {});
  let services = null;
  let box = null, status = null, ctl = null, started = false;
  const colours = new Map();
  const colourOf = (inst) => { if (!colours.has(inst)) colours.set(inst, colours.size % 6); return colours.get(inst); };
  function line(fr) {
    if (fr.type === "line") {
      return h("div", { class: "log-line", "data-instance": fr.instance, "data-component": fr.component,
        "data-stream": fr.stream, title: clock(fr.at_ms) + " · " + fr.stream },
        h("span", { class: "log-prefix c" + colourOf(fr.instance) }, fr.instance + " " + fr.component),
        " | ", h("span", { class: "log-text" }, fr.line));
    }
    if (fr.type === "note") return h("div", { class: "log-note", role: "note" }, "note: " + fr.message);
    if (fr.type === "error") return h("div", { class: "log-error" }, "error: " + fr.message);
    return null;
  }
  function append(els) {
    if (!els.length) return;
    const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    box.append(...els);
    const extra = box.childElementCount - MAX_LOG_LINES;
    for (let i = 0; i < extra; i++) box.firstElementChild.remove();
    if (atEnd) box.scrollTop = box.scrollHeight;
    box.dataset.lines = String(box.querySelectorAll(".log-line").length);
  }
  async function read() {
    if (!f.service) { status.textContent = "Pick a service."; return; }
    const qs = new URLSearchParams({ service: f.service });
    for (const k of ["component", "instance", "region"]) if (f[k]) qs.set(k, f[k]);
    if (f.tail) qs.set("tail", f.tail);
    if (f.follow) qs.set("follow", "true");
    ctl = new AbortController();
    box.dataset.state = "loading";
    status.textContent = "loading…";
    let r;
    try {
      r = await fetch("/v1/logs?" + qs, { credentials: "same-origin", signal: ctl.signal,
        headers: { Accept: "application/x-ndjson" } });
    } catch (e) { if (e.name !== "AbortError") status.textContent = "cannot read the logs: " + e.message; return; }
    if (!r.ok) {
      let body = null; try { body = await r.json(); } catch (_) { /* not JSON */ }
      if (r.status === 401) { sessionEnded(body && body.message); return; }
      box.dataset.state = "refused";
      status.textContent = "";
      box.replaceChildren(h("div", { class: "log-error", id: "logs-refused" }, (body && body.message) || ("HTTP " + r.status)));
      return;
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let rest = "";
    // The history comes in one go; once it has, the page says so (and, following, "live").
    let first = true;
    const shown = () => {
      if (!first) return;
      first = false;
      box.dataset.state = f.follow ? "following" : "done";
      status.textContent = f.follow ? "following: new lines appear as they come" : "";
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        rest += dec.decode(value, { stream: true });
        const parts = rest.split("\n");
        rest = parts.pop();
        const els = [];
        for (const p of parts) {
          if (!p.trim()) continue;
          let fr; try { fr = JSON.parse(p); } catch (_) { continue; }
          const el = line(fr); if (el) els.push(el);
        }
        append(els);
        if (first) setTimeout(shown, 150);
      }
      shown();
      box.dataset.state = "done";
      status.textContent = f.follow ? "the stream ended (the server or the instances went away)" : "";
    } catch (e) {
      if (e.name !== "AbortError") { box.dataset.state = "done"; status.textContent = "the stream broke: " + e.message; }
    }
  }
  function render() {
    const form = h("form", { class: "filters", id: "logs-form", "aria-label": "which logs" },
      h("label", {}, "service", h("select", { name: "service", id: "logs-service" },
        (services || []).map((sv) => h("option", { value: sv, selected: sv === f.service }, sv)))),
      h("label", {}, "component", h("input", { name: "component", id: "logs-component", value: f.component, placeholder: "all", size: 12 })),
      h("label", {}, "instance", h("input", { name: "instance", id: "logs-instance", value: f.instance, placeholder: "all", size: 12 })),
      h("label", {}, "region", h("input", { name: "region", id: "logs-region", value: f.region, placeholder: "all", size: 10 })),
      h("label", {}, "last lines", h("input", { name: "tail", id: "logs-tail", type: "number", min: 1, value: f.tail, class: "count" })),
      h("label", { class: "check" }, h("input", { type: "checkbox", name: "follow", id: "logs-follow", checked: f.follow }), "follow"),
      h("button", { type: "submit", id: "logs-show", class: "primary" }, "Show"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const qs = new URLSearchParams();
      for (const k of ["service", "component", "instance", "region", "tail"]) if (form[k].value.trim()) qs.set(k, form[k].value.trim());
      if (form.follow.checked) qs.set("follow", "1");
      const to = "#/logs?" + qs;
      // The same filters again: read again.
      if (location.hash === to) route(); else location.hash = to;
    });
    box = h("div", { id: "log-lines", class: "log-lines mono", role: "log", "aria-live": f.follow ? "polite" : "off",
      tabindex: 0, "aria-label": "log lines" });
    status = h("p", { class: "muted", id: "logs-status" });
    root.replaceChildren(h("h1", {}, "Logs" + (f.service ? " of " + f.service : "")), form,
      h("p", { class: "muted" }, "The same view as ", h("code", {}, "drover logs"),
        ": every instance's lines in time order (the last lines of each component), values of secret_env replaced."),
      status, box);
  }
  async function refresh() {
    if (started) return;
    started = true;
    const sum = S.firstSummary || await api("/v1/ui/summary");
    S.firstSummary = null;
    services = [...new Set(sum.groups.map((g) => g.service))];
    if (!f.service && services.length) f.service = services[0];
    render();
    // Streams on by itself; refresh() returns once the page shows its form.
    read();
  }
  function leave() { if (ctl) { ctl.abort(); ctl = null; } }
  return { name: "logs", el: root, refresh, leave };
}

// ---------------------------------------------------------------- routing and start

function route() {
  const { parts, params } = parseHash();
  // A page that streams (logs) stops when left.
  if (S.page && S.page.leave) S.page.leave();
  let page;
  if (parts[0] === "group" && parts.length >= 3) page = groupPage(parts[1], parts[2], params);
  else if (parts[0] === "events") page = eventsPage(params);
  else if (parts[0] === "history") page = historyPage(params);
  else if (parts[0] === "logs") page = logsPage(params);
  else page = fleetPage();
  S.page = page;
  if (page.name !== "fleet" && page.name !== "logs") S.firstSummary = null;
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === (page.name === "group" ? "fleet" : page.name)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.getElementById("main").replaceChildren(page.el);
  document.title = "drover · " + page.name;
  // The mark says when the page first showed its data (bench/ui.sh reads it).
  page.refresh().then(() => performance.mark("drover:" + page.name + ":rendered")).catch(showError);
}

async function start() {
  try {
    S.session = await api("/v1/ui/session");
  } catch (_) { return; }
  document.getElementById("who").textContent = S.session.token + " · " + S.session.scope;
  document.body.dataset.scope = S.session.scope;
  document.getElementById("logout").addEventListener("click", async () => {
    try { await api("/v1/ui/logout", { method: "POST" }); } catch (_) { /* gone already */ }
    location.href = "/ui/";
  });
  try {
    const sum = await api("/v1/ui/summary");
    S.lastSeq = sum.last_seq;
    S.events = sum.recent.slice();
    S.firstSummary = sum;
  } catch (_) { /* the page says */ }
  window.addEventListener("hashchange", route);
  route();
  connect();
  // Utilization and ages change without events.
  setInterval(scheduleRefresh, 5000);
}

document.addEventListener("DOMContentLoaded", start);
