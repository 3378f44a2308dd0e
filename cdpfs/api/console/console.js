// The cdpfs console: reads the node API of each node it is given (the page's own
// node, or those `cdpfs console --nodes` proxies under /nodes/N), draws what it
// reads, and sends the actions an operator asks for. Text from the nodes is set as
// text, never as HTML. The token stays in this tab (sessionStorage).
"use strict";

const state = { nodes: [], node: null, tab: "overview", at: "now", path: "" };
const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem("cdpfs-token") || ""; }

async function api(base, path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  // a node that does not answer (stopped, cut off) must not hold the page up
  const signal = options.method === "POST" ? undefined : AbortSignal.timeout(3000);
  const r = await fetch(base + path, { ...options, headers, signal,
    body: options.body === undefined ? undefined : JSON.stringify(options.body) });
  if (r.status === 401) { $("login").hidden = false; throw new Error("a token is needed"); }
  const type = r.headers.get("content-type") || "";
  const body = type.startsWith("application/json") ? await r.json() : await r.text();
  if (!r.ok) throw new Error((body && body.error) || r.statusText);
  return body;
}

function say(text, error = false) {
  const box = $("result");
  box.textContent = text;
  box.className = error ? "error" : "ok";
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

function ago(iso) {
  if (!iso) return "never";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  return duration(s) + " ago";
}

function duration(s) {
  if (s >= 86400) return (s / 86400).toFixed(1) + " d";
  if (s >= 3600) return (s / 3600).toFixed(1) + " h";
  if (s >= 60) return (s / 60).toFixed(1) + " min";
  return s.toFixed(1) + " s";
}

function bytes(n) {
  if (n >= 2 ** 30) return (n / 2 ** 30).toFixed(1) + " GiB";
  if (n >= 2 ** 20) return (n / 2 ** 20).toFixed(1) + " MiB";
  if (n >= 1024) return (n / 1024).toFixed(1) + " KiB";
  return n + " B";
}

function alerts(node, status) {
  const out = [];
  if (node.role === "fenced") out.push("fenced primary");
  if (status) {
    const test = status.drtest.last;
    if (test && !test.passed) out.push("DR test failed");
    if (test && test.overdue) out.push("DR test overdue");
    const backup = status.backups;
    if (backup.last && backup.last.failed) out.push("backup failed");
    if (backup.overdue) out.push("backup overdue");
    for (const r of status.replicas) {
      if (!r.connected) out.push(`replica ${r.name} disconnected`);
    }
  }
  for (const e of node.degraded || []) out.push(`sync replica ${e} degraded`);
  return out;
}

// --- overview ---------------------------------------------------------------------

async function overview() {
  const rows = $("overview-rows");
  const fresh = await Promise.all(state.nodes.map(async (n) => {
    try {
      const node = await api(n.base, "/api/v1/node");
      const status = await api(n.base, "/api/v1/status").catch(() => null);
      const health = await fetch(n.base + "/health", { signal: AbortSignal.timeout(3000) })
        .then((r) => r.ok).catch(() => false);
      return [n, node, status, null, health];
    } catch (e) {
      return [n, null, null, e.name === "TimeoutError" ? "no answer" : e.message, false];
    }
  }));
  rows.replaceChildren();
  for (const [n, node, status, error, health] of fresh) {
    const row = rows.insertRow();
    row.dataset.node = n.name;
    cell(row, n.name);
    if (error) { cell(row, "unreachable", "alert"); cell(row, error, "alert"); continue; }
    cell(row, node.role, "role");
    cell(row, health ? "up" : "down", health ? "ok" : "alert");
    cell(row, status ? duration(status.window.seconds) : "", "window");
    const lags = status ? status.replicas.map((r) => r.lag) : [];
    const worst = lags.reduce((a, l) => (l.seconds > a.seconds ? l : a),
                              { records: 0, seconds: 0 });
    const lag = cell(row, status && status.replicas.length
      ? `${worst.records} records, ${worst.seconds.toFixed(1)} s` : "no replicas", "lag");
    lag.dataset.records = String(lags.reduce((a, l) => Math.max(a, l.records), 0));
    const test = status && status.drtest.last;
    cell(row, test ? `${test.passed ? "passed" : "FAILED"} ${ago(test.time)}` : "none", "drtest");
    const backup = status && status.backups.last;
    cell(row, backup ? `${backup.failed ? "FAILED" : "made"} ${ago(backup.time)}` : "none",
         "backup");
    const found = alerts(node, status);
    cell(row, found.join("; ") || "none", found.length ? "alert alerts" : "ok alerts");
  }
}

// --- timeline ---------------------------------------------------------------------

async function timeline() {
  const n = state.node;
  const span = $("timeline-span").value;
  const t = await api(n.base, `/api/v1/timeline?seconds=${span}&buckets=60`);
  const events = await api(n.base, "/api/v1/events?follow=0");
  const lines = typeof events === "string" ? events.trim().split("\n").map(JSON.parse) : [];
  const marks = t.marks.slice();
  for (const e of lines) {
    if (["role", "switchover", "drtest-started", "drtest-passed", "drtest-failed",
         "backup-done", "backup-failed"].includes(e.kind)) {
      // a test or backup is drawn at its start, as the store records it
      const when = e.started || e.made || e.time;
      if (when >= t.start_ns &&
          !marks.some((m) => m.kind === e.kind && Math.abs(m.time_ns - when) < 1e6)) {
        marks.push({ kind: e.kind, time_ns: when, name: e.role || e.node || "", seq: e.seq });
      }
    }
  }
  const W = 900, H = 180, pad = 30;
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  svg.setAttribute("role", "img");
  const max = Math.max(1, ...t.writes);
  const bw = (W - 2 * pad) / t.writes.length;
  t.writes.forEach((c, i) => {
    const r = document.createElementNS(svgNS, "rect");
    const h = (H - 2 * pad) * c / max;
    r.setAttribute("x", pad + i * bw); r.setAttribute("y", H - pad - h);
    r.setAttribute("width", Math.max(1, bw - 1)); r.setAttribute("height", h);
    r.setAttribute("class", "bar");
    const title = document.createElementNS(svgNS, "title");
    title.textContent = `${c} records`;
    r.appendChild(title);
    svg.appendChild(r);
  });
  const x = (ns) => pad + (W - 2 * pad) * (ns - t.start_ns) / (t.end_ns - t.start_ns);
  const list = $("timeline-marks");
  list.replaceChildren();
  for (const m of marks.sort((a, b) => a.time_ns - b.time_ns)) {
    const g = document.createElementNS(svgNS, "g");
    g.setAttribute("class", "mark"); g.dataset.kind = m.kind;
    const l = document.createElementNS(svgNS, "line");
    l.setAttribute("x1", x(m.time_ns)); l.setAttribute("x2", x(m.time_ns));
    l.setAttribute("y1", pad / 2); l.setAttribute("y2", H - pad);
    const title = document.createElementNS(svgNS, "title");
    title.textContent = `${m.kind} ${m.name || ""}`;
    g.append(l, title);
    svg.appendChild(g);
    const li = document.createElement("li");
    li.dataset.kind = m.kind;
    li.textContent = `${new Date(m.time_ns / 1e6).toISOString()}  ${m.kind} ` +
      `${m.name || ""}${m.seq ? " #" + m.seq : ""}`;
    list.appendChild(li);
  }
  const axis = document.createElementNS(svgNS, "text");
  axis.setAttribute("x", pad); axis.setAttribute("y", H - 8);
  axis.textContent = `writes per ${duration(t.bucket_seconds)}, max ${max}`;
  svg.appendChild(axis);
  $("timeline-chart").replaceChildren(svg);
}

// --- browse -----------------------------------------------------------------------

async function browse() {
  const n = state.node;
  state.at = $("browse-at").value || "now";
  state.path = $("browse-path").value.replace(/^\/+/, "");
  const q = new URLSearchParams({ at: state.at, path: state.path });
  const tree = await api(n.base, "/api/v1/tree?" + q);
  const rows = $("browse-rows");
  rows.replaceChildren();
  if (state.path) {
    const up = rows.insertRow();
    const a = document.createElement("a");
    a.textContent = ".."; a.className = "dir";
    a.onclick = () => { go(state.path.split("/").slice(0, -1).join("/")); };
    up.insertCell().appendChild(a);
  }
  for (const e of tree.entries) {
    const row = rows.insertRow();
    row.dataset.name = e.name;
    const a = document.createElement("a");
    a.textContent = e.name; a.className = "dir";
    const full = state.path ? state.path + "/" + e.name : e.name;
    a.onclick = () => (e.kind === "dir" ? go(full) : versions(full));
    row.insertCell().appendChild(a);
    cell(row, e.kind); cell(row, e.kind === "file" ? bytes(e.size) : "", "num");
    cell(row, e.mtime);
  }
  say(`/${tree.path} at #${tree.seq} (${tree.time})`);
}

function go(path) { $("browse-path").value = "/" + path; browse().catch(fail); }

async function versions(path) {
  const n = state.node;
  const found = await api(n.base, "/api/v1/versions?" + new URLSearchParams({ path }));
  $("file").hidden = false;
  $("file-name").textContent = "/" + path;
  $("diff").textContent = "";
  const rows = $("version-rows");
  rows.replaceChildren();
  for (const v of found.versions) {
    const row = rows.insertRow();
    row.dataset.seq = String(v.seq);
    cell(row, "#" + v.seq); cell(row, v.time); cell(row, v.op);
    cell(row, v.size === null ? "(gone)" : bytes(v.size), "num");
    const td = row.insertCell();
    const diff = document.createElement("button");
    diff.textContent = "diff with now"; diff.className = "diff";
    diff.onclick = () => showDiff(path, "#" + v.seq).catch(fail);
    const restore = document.createElement("button");
    restore.textContent = "restore this version"; restore.className = "restore";
    restore.onclick = () => restoreVersion(path, v.seq).catch(fail);
    td.append(diff, " ", restore);
  }
}

async function showDiff(path, at) {
  const d = await api(state.node.base, "/api/v1/diff?" +
    new URLSearchParams({ path, a: at, b: "now" }));
  $("diff").textContent = d.binary ? "(binary: no text diff)" : (d.diff || "(no difference)");
}

async function restoreVersion(path, seq) {
  if (!confirm(`Restore /${path} to its version #${seq}? What it holds now stays ` +
               "in the history.")) return;
  const r = await api(state.node.base, "/api/v1/restore",
                      { method: "POST", body: { path, at: "#" + seq } });
  say(`restored /${r.path} to #${r.seq}: ${r.files_written} files rewritten`);
}

// --- replicas and cluster -----------------------------------------------------------

async function replicas() {
  const status = await api(state.node.base, "/api/v1/status");
  const rows = $("replica-rows");
  rows.replaceChildren();
  for (const r of status.replicas) {
    const row = rows.insertRow();
    row.dataset.replica = r.name;
    cell(row, r.name); cell(row, r.mode); cell(row, r.link); cell(row, "#" + r.acked, "num");
    cell(row, r.lag.records, "num lag-records"); cell(row, bytes(r.lag.bytes), "num");
    cell(row, r.lag.seconds.toFixed(1), "num");
    cell(row, r.rate_bytes_per_second ? bytes(r.rate_bytes_per_second) + "/s" : "", "num");
    cell(row, r.eta_seconds === null ? "" : duration(r.eta_seconds), "num");
  }
}

async function cluster() {
  const rows = $("cluster-rows");
  rows.replaceChildren();
  for (const n of state.nodes) {
    const row = rows.insertRow();
    try {
      const node = await api(n.base, "/api/v1/node");
      cell(row, n.name); cell(row, node.kind); cell(row, node.role);
      cell(row, node.epoch ?? ""); cell(row, node.lag ?? ""); cell(row, node.promotions ?? "");
    } catch (e) { cell(row, n.name); cell(row, e.message, "alert"); }
  }
  const events = await api(state.node.base, "/api/v1/events?follow=0");
  const list = $("events");
  list.replaceChildren();
  for (const line of events.trim().split("\n").slice(1).reverse().slice(0, 200)) {
    const e = JSON.parse(line);
    const li = document.createElement("li");
    li.dataset.kind = e.kind;
    const { id, time, kind, ...rest } = e;
    li.textContent = `${id} ${new Date(time / 1e6).toISOString()} ${kind} ${JSON.stringify(rest)}`;
    list.appendChild(li);
  }
}

// --- actions ----------------------------------------------------------------------

async function act(path, body, what) {
  const r = await api(state.node.base, path, { method: "POST", body });
  say(`${what}: ${JSON.stringify(r)}`);
}

function fail(e) { say(e.message, true); }

const views = { overview, timeline, browse, replicas, cluster, actions: async () => {} };

async function show(tab) {
  state.tab = views[tab] ? tab : "overview";
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== state.tab;
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.tab === state.tab);
  }
  await views[state.tab]();
}

async function refresh() {
  if (state.busy || !["overview", "timeline", "replicas", "cluster"].includes(state.tab)) return;
  state.busy = true;  // one refresh at a time: a slow node must not pile them up
  try { await views[state.tab](); } catch (e) { fail(e); } finally { state.busy = false; }
}

async function start() {
  state.nodes = await fetch("/console/nodes").then((r) => r.json());
  const select = $("node");
  for (const [i, n] of state.nodes.entries()) select.add(new Option(n.name, String(i)));
  state.node = state.nodes[0];
  select.onchange = () => { state.node = state.nodes[Number(select.value)]; show(state.tab); };
  window.onhashchange = () => show(location.hash.slice(1)).catch(fail);
  $("login-form").onsubmit = (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("cdpfs-token", $("token").value);
    $("login").hidden = true;
    show(state.tab).catch(fail);
  };
  $("browse-form").onsubmit = (ev) => { ev.preventDefault(); browse().catch(fail); };
  $("timeline-span").onchange = () => timeline().catch(fail);
  $("bookmark-form").onsubmit = (ev) => {
    ev.preventDefault();
    act("/api/v1/bookmarks", { name: $("bookmark-name").value }, "bookmarked").catch(fail);
  };
  $("drtest-start").onclick = () => act("/api/v1/drtests", {}, "DR test").catch(fail);
  $("backup-start").onclick = () => act("/api/v1/backups", {}, "backup").catch(fail);
  $("switchover-form").onsubmit = (ev) => {
    ev.preventDefault();
    act("/api/v1/switchover", { node: $("switchover-node").value }, "switchover").catch(fail);
  };
  await show(location.hash.slice(1) || "overview").catch(fail);
  setInterval(refresh, 1000);
}

start().catch(fail);
