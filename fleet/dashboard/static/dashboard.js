// edgefleet dashboard: reads the operator API with a token kept in sessionStorage, draws the
// rollouts, the devices and a rollout's health over time, and refreshes every few seconds.
// No framework and no build step; every value from the API goes in as text, never as HTML.
"use strict";

(() => {
  const REFRESH_MS = 3000;
  const BUCKETS_S = [5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600]; // about 90 points per chart
  const TOKEN_KEY = "edgefleet.token";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
  const state = { token: null, selected: null, picked: false, timer: null };
  const $ = (id) => document.getElementById(id);

  // -- small helpers ---------------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      el.append(c instanceof Node ? c : String(c));
    }
    return el;
  }

  function svg(tag, attrs, text) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    return el;
  }

  const badge = (text, kind) => h("span", { class: `badge ${kind || text}` }, text);
  // A release number with its version label beside it: "r12 (1.2.0)".
  const rel = (release, version) => (release === null || release === undefined ? "–"
    : `r${release}${version ? ` (${version})` : ""}`);
  const NOT_UPDATED = ["failed", "rolled_back", "silent"];
  const pct = (x) => (x === null || x === undefined ? "–" : `${(x * 100).toFixed(x < 0.001 && x > 0 ? 3 : 1)}%`);
  const num = (x, unit, digits = 1) => (x === null || x === undefined ? "–" : `${Number(x).toFixed(digits)}${unit}`);
  const clock = (d) => d.toLocaleTimeString([], { hour12: false });

  function ago(iso) {
    if (!iso) return "never";
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    return `${Math.round(s / 3600)} h ago`;
  }

  // -- token and API -----------------------------------------------------------------------
  class AuthError extends Error {}

  function tokenFromFragment() {
    const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (m) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search); // out of the address bar
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function api(path) {
    const res = await fetch(path, { headers: { Authorization: `Bearer ${state.token}` }, cache: "no-store" });
    let body = null;
    try { body = await res.json(); } catch (e) { body = null; }
    if (res.status === 401 || res.status === 403) throw new AuthError((body && body.detail) || res.statusText);
    if (!res.ok) throw new Error(`${path}: ${res.status} ${(body && body.detail) || res.statusText}`);
    return body;
  }

  function askForToken(message) {
    clearTimeout(state.timer);
    $("main").hidden = true;
    $("change-token").hidden = true;
    $("login").hidden = false;
    $("login-error").hidden = !message;
    $("login-error").textContent = message || "";
    $("status").textContent = "no token";
    $("token-input").focus();
  }

  // -- rollouts ----------------------------------------------------------------------------
  function renderRollouts(rollouts) {
    const body = $("rollouts").tBodies[0];
    body.replaceChildren();
    if (!rollouts.length) body.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "no rollouts yet")));
    for (const r of rollouts) {
      const pick = () => { state.selected = r.id; state.picked = true; refresh(); };
      const stages = r.stages.map((s) => badge(`${s.name} ${s.devices.length}`, s.state));
      body.append(h("tr", { class: `rollout-row${r.id === state.selected ? " selected" : ""}`,
        "data-rollout-id": r.id, "data-state": r.state, onclick: pick },
      h("td", {}, r.id), h("td", {}, r.name), h("td", {}, r.model), h("td", {}, rel(r.release, r.version)),
      h("td", {}, badge(r.state)), h("td", { class: "stage-badges" }, stages), h("td", {}, ago(r.updated))));
      if (r.reason) {
        body.append(h("tr", { class: "reason-row", onclick: pick },
          h("td", {}), h("td", { colspan: 6, class: `reason ${r.state}`, "data-rollout-id": r.id }, r.reason)));
      }
    }
  }

  function latestGates(detail) {
    if (Array.isArray(detail.gates) && detail.gates.length) {
      const g = detail.gates[0];
      const when = g.ts ? `, ${clock(new Date(g.ts))}` : "";
      return { gates: detail.gates, from: `stage ${g.stage_name || detail.current_stage_name}${when}` };
    }
    const events = detail.events || [];
    for (let i = events.length - 1; i >= 0; i--) {
      const ev = events[i];
      if (ev.data && Array.isArray(ev.data.gates) && ev.data.gates.length) {
        return { gates: ev.data.gates, from: `${ev.kind}, ${clock(new Date(ev.ts))}` };
      }
    }
    return { gates: [], from: "" };
  }

  function renderRollout(detail) {
    $("rollout").hidden = false;
    $("rollout-title").replaceChildren(`Rollout ${detail.id}: ${detail.name} → ${detail.model} ${rel(detail.release, detail.version)} `,
      badge(detail.state));
    const reason = $("rollout-reason");
    reason.hidden = !detail.reason;
    reason.className = `reason big ${detail.state}`;
    reason.textContent = detail.reason || "";
    const evaluation = $("rollout-evaluation");
    const active = detail.state === "running" || detail.state === "paused";
    const waiting = detail.awaiting_approval ? `stage ${detail.current_stage_name} waits for an operator's approval. ` : "";
    evaluation.hidden = !(active && (waiting || detail.last_evaluation));
    evaluation.textContent = waiting + (detail.last_evaluation || "");

    $("stages").replaceChildren(...detail.stages.map((s) => h("div", { class: `stage ${s.state}` },
      h("div", { class: "stage-head" }, h("strong", {}, s.name), " ", badge(s.state)),
      h("div", { class: "muted" }, [s.percent !== null && s.percent !== undefined ? `${s.percent}%` : null,
        s.selector ? Object.entries(s.selector).map(([k, v]) => `${k}=${v}`).join(",") : null,
        s.min_devices ? `min ${s.min_devices}` : null, `bake ${s.bake_seconds}s`].filter(Boolean).join(" · ")),
      h("div", {}, `${s.devices.length} device${s.devices.length === 1 ? "" : "s"} added`,
        s.committed !== undefined && (s.state === "active" || s.state === "passed") ? ` · ${s.committed} committed in all` : null),
      h("div", { class: "device-list" }, s.devices.join(" ")),
      // each device that refused or failed the release, in its own words
      ...(detail.devices || []).filter((d) => d.stage === s.index && NOT_UPDATED.includes(d.progress))
        .map((d) => h("div", { class: "reason refusal", "data-device-id": d.device_id },
          `${d.device_id} ${d.progress}: ${d.detail || d.reason || ""}`)))));

    const { gates, from } = latestGates(detail);
    $("gates-caption").textContent = from ? `(${from})` : "";
    const gbody = $("gates").tBodies[0];
    gbody.replaceChildren(...gates.map((g) => h("tr", { title: g.message || "" },
      h("td", {}, g.gate), h("td", {}, badge(g.status)), h("td", {}, fmtGate(g.gate, g.observed)),
      h("td", {}, fmtGate(g.gate, g.threshold)), h("td", {}, `${g.sample} of ${g.min_sample} ${g.unit || ""}`))));
    if (!gates.length) gbody.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "not evaluated yet")));

    $("history").replaceChildren(...(detail.events || []).map((ev) => h("li", { class: `event ev-${ev.kind}` },
      h("time", {}, clock(new Date(ev.ts))), " ", badge(ev.kind, `kind-${ev.kind}`), " ", ev.message)));
  }

  const fmtGate = (gate, x) => (x === null || x === undefined ? "–"
    : /rate/.test(gate) ? pct(x) : Number.isInteger(x) ? String(x) : Number(x).toFixed(3));

  // -- chart: error rate (top) and worst-device p95 (bottom) per bucket, one line per release
  function drawChart(data) {
    const el = $("chart");
    el.replaceChildren();
    const W = 720, L = 56, R = 12, panels = [{ key: "error_rate", label: "error rate", y0: 10, h: 115, fmt: pct },
      { key: "p95_ms", label: "p95 (worst device)", y0: 160, h: 115, fmt: (v) => num(v, " ms", 0) }];
    const seen = [...data.buckets.map((b) => b.t), ...data.markers.map((m) => m.t)];
    const t0 = Math.max(data.from, Math.min(data.to, ...seen) - data.bucket_s);
    const t1 = Math.max(data.to, t0 + 1);
    const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
    $("chart-caption").textContent = `(${data.devices} devices, ${data.bucket_s}s buckets)`;
    if (!data.buckets.length) {
      el.append(svg("text", { x: W / 2, y: 150, "text-anchor": "middle", class: "empty" }, "no health reports yet"));
    }
    for (const p of panels) {
      const values = data.series.flatMap((s) => s.points.map((q) => q[p.key])).filter((v) => v !== null);
      const top = Math.max(p.key === "error_rate" ? 0.01 : 1, ...values) * 1.1;
      const y = (v) => p.y0 + p.h - (v / top) * p.h;
      el.append(svg("rect", { x: L, y: p.y0, width: W - L - R, height: p.h, class: "panel" }));
      for (const f of [0, 0.5, 1]) {
        el.append(svg("line", { x1: L, x2: W - R, y1: y(top * f), y2: y(top * f), class: "grid" }));
        el.append(svg("text", { x: L - 4, y: y(top * f) + 4, "text-anchor": "end", class: "tick" }, p.fmt(top * f)));
      }
      el.append(svg("text", { x: L + 6, y: p.y0 + 14, class: "label" }, p.label));
      data.series.forEach((s, i) => {
        const pts = s.points.filter((q) => q[p.key] !== null).map((q) => [x(q.t + data.bucket_s / 2), y(q[p.key])]);
        const color = COLORS[i % COLORS.length];
        el.append(svg("polyline", { points: pts.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join(" "),
          stroke: color, class: "series", "data-release": s.release }));
        for (const [a, b] of pts) el.append(svg("circle", { cx: a.toFixed(1), cy: b.toFixed(1), r: 2, fill: color }));
      });
    }
    for (const m of data.markers) {
      if (m.t < t0 || m.t > t1) continue;
      const line = svg("line", { x1: x(m.t), x2: x(m.t), y1: 10, y2: 275, class: `marker ${m.kind}` });
      line.append(svg("title", {}, `${clock(new Date(m.t * 1000))} ${m.kind}: ${m.message}`));
      el.append(line);
    }
    for (let i = 0; i <= 4; i++) {
      const t = t0 + ((t1 - t0) * i) / 4;
      el.append(svg("text", { x: x(t), y: 292, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle",
        class: "tick" }, clock(new Date(t * 1000))));
    }
    $("chart-legend").replaceChildren(...data.series.map((s, i) => h("span", { class: "key" },
      h("i", { class: `swatch c${i % COLORS.length}` }), `r${s.release}${s.release === data.release ? " (target)" : ""}`)),
    h("span", { class: "key" }, h("i", { class: "swatch marker-key" }), "gate failed / rolled back"));
  }

  // -- devices -----------------------------------------------------------------------------
  function renderDevices(devices) {
    $("device-count").textContent = `(${devices.filter((d) => d.online).length} of ${devices.length} online)`;
    const body = $("devices").tBodies[0];
    body.replaceChildren();
    if (!devices.length) body.append(h("tr", {}, h("td", { colspan: 11, class: "muted" }, "no devices enrolled")));
    for (const d of devices) {
      const health = d.health || {};
      const windows = health.models || [];
      const names = [...new Set([...Object.keys(d.models || {}), ...Object.keys(d.assigned || {})])].sort();
      const rows = names.length ? names : [null];
      rows.forEach((name, i) => {
        const reported = (name && d.models && d.models[name]) || {};
        const assigned = (name && d.assigned && d.assigned[name]) || null;
        const w = windows.filter((m) => m.name === name);
        const inf = w.reduce((a, m) => a + m.inferences, 0), err = w.reduce((a, m) => a + m.errors, 0);
        const p95 = w.map((m) => m.latency_p95_ms).filter((v) => v !== null && v !== undefined);
        const release = reported.release !== undefined ? rel(reported.release, reported.version) : "–";
        const pending = assigned && assigned.release !== reported.release ? ` → r${assigned.release} assigned` : "";
        const first = i === 0;
        body.append(h("tr", { class: "device-row", "data-device-id": d.device_id, "data-model": name || "" },
          h("td", {}, first ? d.device_id : ""),
          h("td", {}, first ? badge(d.online ? "online" : "offline") : ""),
          h("td", { class: "muted" }, first ? Object.entries(d.labels || {}).map(([k, v]) => `${k}=${v}`).join(" ") : ""),
          h("td", {}, name || "–"), h("td", { class: "release" }, release + pending),
          h("td", {}, reported.state || "–"), h("td", {}, first ? ago(d.last_seen) : ""),
          h("td", {}, inf ? pct(err / inf) : "–"), h("td", {}, p95.length ? num(Math.max(...p95), " ms") : "–"),
          h("td", {}, first ? num(health.cpu_percent, "%", 0) : ""),
          h("td", {}, first ? num(health.mem_rss_mb, " MB", 0) : "")));
      });
    }
  }

  function bucketFor(rollout) {
    const span = (Date.now() - Date.parse(rollout.created)) / 1000 + 60;
    return BUCKETS_S.find((b) => span / b <= 90) || BUCKETS_S[BUCKETS_S.length - 1];
  }

  // -- refresh loop ------------------------------------------------------------------------
  async function refresh() {
    clearTimeout(state.timer);
    try {
      const [rollouts, devices] = await Promise.all([api("/api/v1/rollouts"), api("/api/v1/devices")]);
      if (!state.picked || !rollouts.some((r) => r.id === state.selected)) {
        state.selected = rollouts.length ? rollouts[0].id : null;
      }
      renderRollouts(rollouts);
      renderDevices(devices);
      const selected = rollouts.find((r) => r.id === state.selected);
      if (selected) {
        const [detail, health] = await Promise.all([api(`/api/v1/rollouts/${state.selected}`),
          api(`/api/v1/rollouts/${state.selected}/health?bucket_s=${bucketFor(selected)}`)]);
        renderRollout(detail);
        drawChart(health);
      } else {
        $("rollout").hidden = true;
      }
      $("status").textContent = `updated ${clock(new Date())}`;
      $("status").className = "status ok";
    } catch (e) {
      if (e instanceof AuthError) { askForToken(e.message); return; }
      $("status").textContent = `refresh failed: ${e.message}`;
      $("status").className = "status failed";
    }
    state.timer = setTimeout(refresh, REFRESH_MS);
  }

  function open(token) {
    state.token = token;
    $("login").hidden = true;
    $("main").hidden = false;
    $("change-token").hidden = false;
    refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = $("token-input").value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token-input").value = "";
      open(token);
    });
    $("change-token").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); askForToken(""); });
    window.addEventListener("hashchange", () => { const t = tokenFromFragment(); if (t) open(t); });
    const token = tokenFromFragment();
    if (token) open(token); else askForToken("");
  });
})();
