// DeepTrace web UI: one script for every page; the server sends the same shell for each
// path and this draws the page from the JSON API. Everything from the store is written
// with textContent or as an attribute value, never parsed as HTML.
"use strict";
(() => {
  const SVGNS = "http://www.w3.org/2000/svg";
  const main = document.getElementById("main");
  const statusEl = document.getElementById("status");
  const PALETTE = ["#2f6db5", "#2e8b57", "#b8860b", "#8b4fb3", "#c25b2a", "#1b8a8f",
                   "#6b7f1f", "#a3416e", "#4a5aa8", "#7a5230"];

  // -- building DOM ------------------------------------------------------------------
  function build(el, attrs, kids) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") el.textContent = String(v);
      else if (k === "style") Object.assign(el.style, v);
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.appendChild(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }
  const h = (tag, attrs, ...kids) => build(document.createElement(tag), attrs, kids);
  const s = (tag, attrs, ...kids) => build(document.createElementNS(SVGNS, tag), attrs, kids);
  const fill = (el, ...kids) => el.replaceChildren(build(document.createDocumentFragment(), {}, kids));

  // -- formatting (as `deeptrace traces` prints them) ----------------------------------
  function fmtDur(ns) {
    if (ns === null || ns === undefined) return "–";
    if (ns < 1e3) return `${Math.round(ns)}ns`;
    if (ns < 1e6) return `${(ns / 1e3).toFixed(1)}us`;
    if (ns < 1e9) return `${(ns / 1e6).toFixed(3)}ms`;
    if (ns < 60e9) return `${(ns / 1e9).toFixed(3)}s`;
    return `${(ns / 1e9).toFixed(1)}s`;
  }
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  function fmtTime(ns) {
    const d = new Date(Number(ns) / 1e6);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }
  const fmtRate = (r) => (r >= 100 ? r.toFixed(0) : r >= 1 ? r.toFixed(2) : r.toFixed(3));
  const pct = (a, b) => (b ? (100 * a / b).toFixed(1) : "0.0") + "%";
  function colour(name) {
    let n = 0;
    for (const ch of String(name)) n = (n * 31 + ch.codePointAt(0)) >>> 0;
    return PALETTE[n % PALETTE.length];
  }
  const traceHref = (id) => "/trace/" + encodeURIComponent(id);
  const serviceHref = (name) => "/service/" + encodeURIComponent(name);

  // -- talking to the server -----------------------------------------------------------
  async function api(path, params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params || {})) if (v !== "" && v != null) q.set(k, v);
    const r = await fetch(`/api/ui/${path}${q.toString() ? "?" + q : ""}`);
    let body;
    try { body = await r.json(); } catch (e) { throw new Error(`${r.status} ${r.statusText}`); }
    if (!r.ok) throw new Error(body && body.error ? body.error : `${r.status} ${r.statusText}`);
    return body;
  }
  function say(text, error) {
    statusEl.textContent = text || "";
    statusEl.classList.toggle("error", !!error);
  }
  function ready(state) {
    window.deeptraceReadyMs = performance.now();
    document.body.dataset.ready = state;
  }
  function field(id, label, input, hint) {
    input.id = id;
    return h("div", { class: "field" }, h("label", { for: id, text: label }), input,
             hint ? h("small", { id: id + "-hint", text: hint }) : null);
  }
  function select(name, options, value) {
    return h("select", { name }, options.map(([v, label]) =>
      h("option", { value: v, selected: v === value, text: label })));
  }
  const WINDOWS = [["5m", "5 minutes"], ["15m", "15 minutes"], ["1h", "1 hour"],
                   ["6h", "6 hours"], ["24h", "24 hours"], ["7d", "7 days"]];

  // -- Search (and the landing page) ---------------------------------------------------
  function localNs(value) {          // a datetime-local value -> ns since the epoch, as text
    const ms = new Date(value).getTime();
    return Number.isFinite(ms) ? String(ms) + "000000" : "";
  }

  async function searchPage(params, landing) {
    const p = (k) => params.get(k) || "";
    document.title = landing ? "Recent traces · DeepTrace" : "Search · DeepTrace";
    const limit = 50;
    const offset = Math.max(0, parseInt(p("offset") || "0", 10) || 0);
    const query = { service: p("service"), operation: p("operation"), text: p("text"),
                    min_duration: p("min_duration"), errors: p("errors") ? "1" : "",
                    since: p("since"), start_ns: p("from") ? localNs(p("from")) : "",
                    end_ns: p("to") ? localNs(p("to")) : "", offset, limit, scatter: "1" };
    const [services, result] = await Promise.all([api("services"), api("search", query)]);

    const svc = select("service", [["", "any service"], ...services.map((x) => [x, x])], p("service"));
    const ops = h("datalist", { id: "ops-list" });
    const opInput = h("input", { name: "operation", value: p("operation"), list: "ops-list",
                                 autocomplete: "off" });
    const fillOps = () => api("operations", { service: svc.value }).then((list) => {
      ops.replaceChildren(...list.map((o) => h("option", { value: o })));
    }).catch(() => {});
    svc.addEventListener("change", fillOps);
    fillOps();
    const form = h("form", { class: "filters", method: "get", action: "/search", role: "search",
                             "aria-label": "Trace search" },
      field("f-service", "Service", svc),
      field("f-operation", "Operation (exact)", opInput), ops,
      field("f-text", "Text in operation", h("input", { name: "text", type: "search", value: p("text") })),
      field("f-min", "Minimum duration", h("input", { name: "min_duration", value: p("min_duration"),
             placeholder: "e.g. 10ms", size: 8, "aria-describedby": "f-min-hint" }), "500us, 10ms, 2s"),
      field("f-since", "Time range", select("since", [["", "any time"], ...WINDOWS.map(
             ([v, l]) => [v, "last " + l])], p("since"))),
      field("f-from", "From", h("input", { name: "from", type: "datetime-local", step: 1, value: p("from") })),
      field("f-to", "To", h("input", { name: "to", type: "datetime-local", step: 1, value: p("to") })),
      h("div", { class: "field check" },
        h("input", { id: "f-errors", name: "errors", type: "checkbox", value: "1", checked: !!p("errors") }),
        h("label", { for: "f-errors", text: "Errors only" })),
      h("div", { class: "field" }, h("button", { type: "submit", text: "Search" })));

    const traces = result.traces;
    const first = traces.length ? offset + 1 : 0;
    const summary = h("p", { id: "result-summary", text: `${result.total} trace${result.total === 1 ? "" : "s"} match` +
      (traces.length ? `; showing ${first}–${offset + traces.length}, newest first` : "") });
    fill(main, [
      h("h1", { text: landing ? "Recent traces" : "Search traces" }), form, summary,
      traces.length ? scatter(result.scatter, result.total) : null,
      traces.length ? resultsTable(traces) : h("p", { class: "empty", text: "No trace matches these filters." }),
      pager(params, offset, limit, traces.length, result.total)]);
  }

  function resultsTable(traces) {
    const longest = Math.max(1, ...traces.map((t) => t.duration_ns));
    return h("table", { id: "results", class: "results" },
      h("caption", { class: "sr-only", text: "Matching traces, newest first" }),
      h("thead", {}, h("tr", {}, ["Start", "Trace", "Root span", "Spans", "Duration", "Errors"]
        .map((x) => h("th", { scope: "col", text: x })))),
      h("tbody", {}, traces.map((t) => {
        const root = t.root || {};
        return h("tr", { class: t.errors ? "has-error" : null, "data-trace-id": t.trace_id },
          h("td", { class: "time", text: fmtTime(t.start_ns) }),
          h("td", {}, h("a", { href: traceHref(t.trace_id), class: "mono", text: t.trace_id })),
          h("td", {}, h("span", { class: "svc", style: { borderColor: colour(root.service) },
                                  text: root.service || "?" }), " ", root.operation || ""),
          h("td", { class: "num", text: t.spans }),
          h("td", { class: "dur" },
            h("span", { class: "bar", "aria-hidden": "true" },
              h("span", { style: { width: `${Math.max(0.5, 100 * t.duration_ns / longest)}%` },
                          class: t.errors ? "err" : null })),
            h("span", { class: "dur-text", text: fmtDur(t.duration_ns) })),
          h("td", {}, t.errors ? h("span", { class: "err-mark", text: `${t.errors} error${t.errors > 1 ? "s" : ""}` }) : ""));
      })));
  }

  function pager(params, offset, limit, shown, total) {
    const link = (off, text, rel) => {
      const q = new URLSearchParams(params);
      q.set("offset", off);
      return h("a", { href: "/search?" + q, rel, text });
    };
    return h("nav", { class: "pager", "aria-label": "Result pages" },
      offset > 0 ? link(Math.max(0, offset - limit), "← Newer", "prev") : null,
      offset + shown < total ? link(offset + limit, "Older →", "next") : null);
  }

  function scatter(points, total) {
    const W = 900, H = 220, L = 70, B = 30, T = 10, R = 10;
    if (!points.length) return null;
    const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y1 = Math.max(1, ...ys);
    const X = (v) => L + (x1 > x0 ? (v - x0) / (x1 - x0) : 0.5) * (W - L - R);
    const Y = (v) => H - B - (v / y1) * (H - B - T);
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "scatter", role: "img",
      "aria-label": `Duration over time of the ${points.length} newest of ${total} matching traces; ` +
                    `longest ${fmtDur(y1)}` },
      s("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
      s("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }),
      [0, 0.5, 1].map((f) => s("text", { x: L - 6, y: Y(f * y1) + 4, class: "tick", "text-anchor": "end",
                                         text: fmtDur(f * y1) })),
      s("text", { x: L, y: H - 8, class: "tick", text: fmtTime(x0) }),
      s("text", { x: W - R, y: H - 8, class: "tick", "text-anchor": "end", text: fmtTime(x1) }),
      points.map(([t, d, err, id]) => s("a", { href: traceHref(id), tabindex: -1 },
        s("circle", { cx: X(t).toFixed(1), cy: Y(d).toFixed(1), r: 3.5, class: err ? "pt err" : "pt" },
          s("title", { text: `${fmtDur(d)} at ${fmtTime(t)}${err ? " (error)" : ""}` })))));
    return h("figure", { class: "chart" }, svg,
             h("figcaption", { text: "Duration over time (each dot a trace; red: with an error)" }));
  }

  // -- Trace ---------------------------------------------------------------------------
  function treeOrder(spans) {  // as `deeptrace traces show`: depth first, siblings by start
    const byId = new Map(spans.map((x) => [x.span_id, x]));
    const kids = new Map(), roots = [];
    for (const x of spans) {
      const p = x.parent_span_id;
      if (p && p !== x.span_id && byId.has(p)) {
        if (!kids.has(p)) kids.set(p, []);
        kids.get(p).push(x);
      } else roots.push(x);
    }
    const key = (a, b) => a.offset_ns - b.offset_ns || b.duration_ns - a.duration_ns ||
      (a.span_id < b.span_id ? -1 : a.span_id > b.span_id ? 1 : 0);
    const out = [], seen = new Set();
    const walk = (x, depth, parent) => {
      seen.add(x.span_id);
      const children = (kids.get(x.span_id) || []).filter((k) => !seen.has(k.span_id)).sort(key);
      out.push({ span: x, depth, parent, children: children.map((k) => k.span_id) });
      for (const k of children) if (!seen.has(k.span_id)) walk(k, depth + 1, x);
    };
    for (const r of roots.sort(key)) walk(r, 0, null);
    for (const x of [...spans].sort(key)) if (!seen.has(x.span_id)) walk(x, 0, null);
    return out;
  }

  async function tracePage(id) {
    document.title = `Trace ${id} · DeepTrace`;
    const t = await api("trace/" + encodeURIComponent(id));
    const spans = t.spans;
    // reduce, not Math.max(...): a trace can hold more spans than a call takes arguments
    const total = spans.reduce((m, x) => Math.max(m, x.offset_ns + x.duration_ns), 1);
    const t0 = spans.reduce((m, x) => Math.min(m, x.start_ns), Infinity);
    const errors = spans.filter((x) => x.error).length;
    const services = [...new Set(spans.map((x) => x.service))];
    document.title = `Trace ${t.trace_id} · DeepTrace`;
    const rows = treeOrder(spans);
    const rowOf = new Map();
    const panel = h("aside", { id: "span-panel", class: "panel", "aria-label": "Span details" },
      h("p", { class: "hint", text: "Choose a span to see all it carries." }));
    const byId = new Map(spans.map((x) => [x.span_id, x]));
    const collapsed = new Set();

    const refresh = () => {
      for (const r of rows) {
        let hidden = false;
        for (let p = r.parent; p; p = rowOf.get(p.span_id).info.parent)
          if (collapsed.has(p.span_id)) { hidden = true; break; }
        rowOf.get(r.span.span_id).el.hidden = hidden;
      }
    };
    const pos = (x) => `${(100 * x / total).toFixed(3)}%`;
    const waterfall = h("div", { id: "waterfall", class: "waterfall" },
      h("div", { class: "wf-row wf-axis", "aria-hidden": "true" }, h("div", { class: "wf-label", text: "Service · operation" }),
        h("div", { class: "wf-area" }, [0, 0.25, 0.5, 0.75, 1].map((f) =>
          h("span", { class: "tick", style: { left: pos(f * total) }, text: fmtDur(f * total) })))));
    for (const r of rows) {
      const x = r.span;
      const parent = r.parent;
      const pairServer = parent && x.role === "server" && parent.role === "client";
      const pairClient = x.role === "client" && r.children.some((c) => byId.get(c).role === "server");
      const label = `${x.service} ${x.operation || x.protocol || ""}`;
      const toggle = r.children.length
        ? h("button", { class: "toggle", type: "button", "aria-expanded": "true",
                        "aria-label": `Collapse ${label}`, text: "▾" })
        : h("span", { class: "toggle-space", "aria-hidden": "true" });
      const pick = h("button", { class: "span-btn", type: "button", "data-span-id": x.span_id },
        h("span", { class: "svc", style: { borderColor: colour(x.service) }, text: x.service }), " ",
        h("span", { class: "op", text: x.operation || x.protocol || "?" }));
      const area = h("div", { class: "wf-area" });
      if (pairServer) {   // the client's extent behind, a tie up to its bar: one request
        area.appendChild(h("span", { class: "ghost", title: `client span ${parent.span_id}`,
          style: { left: pos(parent.offset_ns), width: pos(Math.max(parent.duration_ns, total / 1000)) } }));
        area.appendChild(h("span", { class: "tie", style: { left: pos(x.offset_ns) } }));
      }
      area.appendChild(h("span", { class: "bar" + (x.error ? " err" : ""),
        style: { left: pos(x.offset_ns), width: pos(Math.max(x.duration_ns, total / 1000)),
                 background: x.error ? null : colour(x.service) } }));
      area.appendChild(h("span", { class: "dur", style: { left: pos(x.offset_ns + x.duration_ns) },
                                   text: fmtDur(x.duration_ns) }));
      const row = h("div", { class: "wf-row" + (x.error ? " has-error" : "") + (pairServer ? " pair-server" : "") +
                                    (pairClient ? " pair-client" : ""),
                             "data-span-id": x.span_id, "data-depth": r.depth },
        h("div", { class: "wf-label", style: { paddingLeft: `${r.depth * 16}px` } }, toggle, pick,
          pairServer ? h("span", { class: "join", title: `answers ${parent.service}'s client span`,
                                   text: "⇄", "aria-label": `server side of ${parent.service}'s call` }) : null,
          x.error ? h("span", { class: "err-mark", text: "error" }) : null,
          h("span", { class: "role", text: x.role || "" })),
        area);
      rowOf.set(x.span_id, { el: row, info: r });
      if (r.children.length) {
        toggle.addEventListener("click", () => {
          const open = toggle.getAttribute("aria-expanded") === "true";
          toggle.setAttribute("aria-expanded", String(!open));
          toggle.setAttribute("aria-label", `${open ? "Expand" : "Collapse"} ${label}`);
          toggle.textContent = open ? "▸" : "▾";
          if (open) collapsed.add(x.span_id); else collapsed.delete(x.span_id);
          refresh();
        });
      }
      pick.addEventListener("click", () => {
        for (const b of waterfall.querySelectorAll(".span-btn[aria-pressed]")) b.removeAttribute("aria-pressed");
        pick.setAttribute("aria-pressed", "true");
        showSpan(panel, x, parent, pick);
      });
      waterfall.appendChild(row);
    }
    fill(main,
      h("h1", {}, "Trace ", h("span", { class: "mono", text: t.trace_id })),
      h("dl", { class: "facts" },
        fact("Started", fmtTime(t0)), fact("Duration", fmtDur(total)), fact("Spans", spans.length),
        fact("Services", services.join(", ")), fact("Errors", errors)),
      h("p", { class: "hint", text: "⇄ marks a server span joined to the client span that called it " +
               "(the outlined bar is the client's time). Choose a span for its details." }),
      h("div", { class: "trace-layout" }, waterfall, panel));
  }
  const fact = (k, v) => h("div", {}, h("dt", { text: k }), h("dd", { text: v }));

  function showSpan(panel, x, parent, back) {
    const a = x.attributes || {};
    const addr = (ad, port) => (ad ? `${ad}:${port ?? "?"}` : null);
    const conf = a["deeptrace.link_confidence"];
    const rows = [
      ["service", x.service], ["operation", x.operation], ["protocol", x.protocol],
      ["role", x.role], ["status", x.status], ["error", x.error ? "yes" : "no"],
      ["duration", fmtDur(x.duration_ns)], ["start", `${fmtTime(x.start_ns)} (${x.start_ns} ns)`],
      ["end", `${fmtTime(x.end_ns)} (${x.end_ns} ns)`],
      ["link_source", x.link_source || (x.parent_span_id ? "?" : "none (a root)")],
      ["link confidence", conf !== undefined ? conf : (x.link_source ? "exact (not statistical)" : "–")],
      ["parent", x.parent_span_id ? `${x.parent_span_id}${parent ? ` (${parent.service} ${parent.role})` : " (not stored)"}` : "–"],
      ["host", x.host || "not recorded"], ["process", `${x.comm || "?"} [pid ${x.pid ?? "?"}]`],
      ["thread", x.tid !== null && x.tid !== undefined ? `tid ${x.tid}` : "not recorded"],
      ["command line", x.cmdline], ["local", addr(x.local_addr, x.local_port)],
      ["remote", addr(x.remote_addr, x.remote_port)], ["request bytes", x.request_size],
      ["response bytes", x.response_size], ["trace_id", x.trace_id], ["span_id", x.span_id],
    ].filter(([, v]) => v !== null && v !== undefined && v !== "");
    const table = (caption, pairs, id) => h("table", { class: "kv", id },
      h("caption", { text: caption }),
      h("tbody", {}, pairs.map(([k, v]) => h("tr", { "data-key": k }, h("th", { scope: "row", text: k }),
        h("td", { text: typeof v === "object" ? JSON.stringify(v) : String(v) })))));
    const heading = h("h2", { tabindex: "-1", text: `${x.service} · ${x.operation || x.protocol || "?"}` });
    const close = h("button", { type: "button", text: "Back to the waterfall", class: "link" });
    close.addEventListener("click", () => back.focus());
    fill(panel, [heading,
      h("p", {}, h("a", { href: serviceHref(x.service), text: `${x.service}: RED charts and flame graph` })),
      table("Span", rows, "span-fields"),
      table("Attributes", Object.keys(a).sort().map((k) => [k, a[k]]), "span-attributes"),
      x.resource ? table("Resource", Object.keys(x.resource).sort().map((k) => [k, x.resource[k]]), "span-resource") : null,
      close]);
    panel.onkeydown = (e) => { if (e.key === "Escape") back.focus(); };
    heading.focus();
  }

  // -- Service map ---------------------------------------------------------------------
  async function mapPage(params) {
    document.title = "Service map · DeepTrace";
    const win = params.get("window") || "15m";
    const m = await api("map", { window: win });
    const edges = m.edges;
    const seconds = m.window_ns / 1e9;
    const form = h("form", { class: "filters", method: "get", action: "/map", "aria-label": "Map window" },
      field("m-window", "Window", select("window", WINDOWS, win)),
      h("div", { class: "field" }, h("button", { type: "submit", text: "Show" })));
    const detail = h("section", { id: "edge-traces", "aria-live": "polite" });
    const showEdge = async (e) => {
      fill(detail, h("p", { text: "Loading…" }));
      const list = await api("edge", { source: e.source, target: e.target, window: win });
      fill(detail,
        h("h2", { tabindex: "-1", text: `Slowest calls ${e.source} → ${e.target}` }),
        h("ol", { class: "slowest" }, list.map((c) => h("li", {},
          h("a", { href: traceHref(c.trace_id), text: fmtDur(c.duration_ns) }), " ",
          h("span", { text: c.operation || "" }), " ", h("span", { class: "time", text: fmtTime(c.start_ns) }),
          c.error ? h("span", { class: "err-mark", text: "error" }) : null))));
      detail.querySelector("h2").focus();
    };
    const nodes = [...new Set(edges.flatMap((e) => [e.source, e.target]))];
    fill(main, h("h1", { text: "Service map" }), form,
      edges.length ? graph(nodes, edges, showEdge) : h("p", { class: "empty",
        text: `No calls between services in the last ${win}.` }),
      edges.length ? h("table", { id: "edges", class: "results" },
        h("caption", { text: `Calls over the last ${win} (${seconds} s), as their callers saw them` }),
        h("thead", {}, h("tr", {}, ["From", "To", "Requests/s", "Calls", "Error rate", "p50", "p99", ""]
          .map((x) => h("th", { scope: "col", text: x })))),
        h("tbody", {}, edges.map((e) => h("tr", { "data-edge": `${e.source}→${e.target}` },
          h("td", {}, nodeLink(e.source)), h("td", {}, nodeLink(e.target)),
          h("td", { class: "num rate", text: fmtRate(e.rate) }), h("td", { class: "num", text: e.calls }),
          h("td", { class: "num", text: pct(e.errors, e.calls) }),
          h("td", { class: "num", text: fmtDur(e.p50_ns) }), h("td", { class: "num", text: fmtDur(e.p99_ns) }),
          h("td", {}, h("button", { type: "button", text: "Slowest traces",
            "aria-label": `Slowest traces ${e.source} to ${e.target}`, onclick: () => showEdge(e) })))))) : null,
      detail);
  }
  const isService = (n) => !/^[a-z0-9]*:\/\//i.test(n);
  const nodeLink = (n) => (isService(n) ? h("a", { href: serviceHref(n), text: n }) : h("span", { text: n }));

  function graph(nodes, edges, onEdge) {
    // Layers: a node sits one column right of its furthest caller (cycles cut at |nodes|).
    const depth = new Map(nodes.map((n) => [n, 0]));
    for (let i = 0; i < nodes.length; i++)
      for (const e of edges)
        if (e.source !== e.target && depth.get(e.target) < depth.get(e.source) + 1 && depth.get(e.source) < nodes.length)
          depth.set(e.target, depth.get(e.source) + 1);
    const cols = new Map();
    for (const n of nodes) { const d = depth.get(n); if (!cols.has(d)) cols.set(d, []); cols.get(d).push(n); }
    const NW = 170, NH = 44, CW = 420, RH = 120;
    const at = new Map();
    for (const [d, list] of cols) list.forEach((n, i) => at.set(n, { x: 20 + d * CW, y: 30 + i * RH }));
    const W = 40 + (Math.max(...cols.keys()) + 1) * CW, H = 60 + Math.max(...[...cols.values()].map((l) => l.length)) * RH;
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "map", id: "map",
                           role: "group", "aria-label": "Service map" },
      s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 8,
                                  markerHeight: 8, orient: "auto-start-reverse" },
        s("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }))));
    for (const e of edges) {
      const a = at.get(e.source), b = at.get(e.target);
      const x1 = a.x + NW, y1 = a.y + NH / 2, x2 = b.x, y2 = b.y + NH / 2;
      const back = x2 <= x1;   // a call to an earlier column: bend below
      const d = back ? `M ${a.x + NW / 2} ${a.y + NH} C ${a.x + NW / 2} ${a.y + NH + 60}, ${b.x + NW / 2} ${b.y + NH + 60}, ${b.x + NW / 2} ${b.y + NH}`
                     : `M ${x1} ${y1} C ${(x1 + x2) / 2} ${y1}, ${(x1 + x2) / 2} ${y2}, ${x2} ${y2}`;
      const mx = back ? (a.x + b.x + NW) / 2 : (x1 + x2) / 2, my = back ? Math.max(a.y, b.y) + NH + 50 : (y1 + y2) / 2;
      const errRate = e.calls ? e.errors / e.calls : 0;
      const g = s("g", { class: "edge" + (errRate > 0 ? " has-error" : ""), tabindex: 0, role: "button",
                         "data-edge": `${e.source}→${e.target}`,
                         "aria-label": `${e.source} to ${e.target}: ${fmtRate(e.rate)} requests per second, ` +
                                       `${pct(e.errors, e.calls)} errors, p50 ${fmtDur(e.p50_ns)}, p99 ${fmtDur(e.p99_ns)}. Show slowest traces` },
        s("path", { d, class: "edge-hit" }),   // a wider target for the pointer
        s("path", { d, class: "edge-line", "marker-end": "url(#arrow)", style: { strokeWidth: Math.min(8, 1.5 + Math.log10(1 + e.rate) * 2) } }),
        s("text", { x: mx, y: my - 24, "text-anchor": "middle", class: "edge-label",
                    text: `${fmtRate(e.rate)}/s · ${pct(e.errors, e.calls)} err` }),
        s("text", { x: mx, y: my - 9, "text-anchor": "middle", class: "edge-label",
                    text: `p50 ${fmtDur(e.p50_ns)} · p99 ${fmtDur(e.p99_ns)}` }));
      g.addEventListener("click", () => onEdge(e));
      g.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); onEdge(e); } });
      svg.appendChild(g);
    }
    for (const n of nodes) {
      const p = at.get(n);
      const box = [s("rect", { x: p.x, y: p.y, width: NW, height: NH, rx: 8, class: "node",
                               style: { stroke: colour(n) } }),
                   s("text", { x: p.x + NW / 2, y: p.y + NH / 2 + 5, "text-anchor": "middle", class: "node-label",
                               text: n.length > 24 ? n.slice(0, 23) + "…" : n }),
                   s("title", { text: n })];
      svg.appendChild(isService(n) ? s("a", { href: serviceHref(n), class: "node-link", "data-node": n }, box)
                                   : s("g", { "data-node": n }, box));
    }
    return h("figure", { class: "chart" }, svg,
             h("figcaption", { text: "Arrows point from caller to callee; choose an arrow for its slowest traces." }));
  }

  // -- Service -------------------------------------------------------------------------
  async function servicePage(name, params) {
    document.title = `${name} · DeepTrace`;
    const win = params.get("window") || "1h";
    const step = params.get("step") || "";
    const stepFor = { "5m": "10s", "15m": "30s", "1h": "1m", "6h": "5m", "24h": "20m", "7d": "2h" };
    const [red, prof] = await Promise.all([
      api("service", { name, window: win, step: step || stepFor[win] || "1m" }),
      api("profile", { service: name })]);
    const form = h("form", { class: "filters", method: "get", action: serviceHref(name), "aria-label": "Chart window" },
      field("s-window", "Window", select("window", WINDOWS, win)),
      h("div", { class: "field" }, h("button", { type: "submit", text: "Show" })));
    const q = new URLSearchParams({ service: name });
    fill(main,
      h("h1", {}, "Service ", h("span", { text: name })), form,
      h("p", {}, h("a", { href: "/search?" + q, text: `Traces through ${name}` }), ` · ${red.role} spans, ` +
        `one point per ${fmtDur(red.step_ns)}`),
      red.operations.length ? null : h("p", { class: "empty", text: `No ${name} spans in the last ${win}.` }),
      red.operations.map((o) => h("section", { class: "op-red", "data-operation": o.operation },
        h("h2", {}, h("span", { text: o.operation || "(none)" }), h("small", { text: ` ${o.total} spans` })),
        h("div", { class: "charts" },
          lineChart("Requests/s", [["rate", o.points.map((p) => p.rate)]], fmtRate, red),
          lineChart("Errors/s", [["errors", o.points.map((p) => p.errors / (red.step_ns / 1e9))]], fmtRate, red, true),
          lineChart("Duration", [["p50", o.points.map((p) => p.p50_ns)], ["p99", o.points.map((p) => p.p99_ns)]], fmtDur, red)))),
      h("section", { id: "flame" }, h("h2", { text: "CPU flame graph" }),
        prof.available ? flame(prof.stacks) : h("p", { class: "empty", text: `No flame graph: ${prof.reason}.` })));
  }

  function lineChart(title, series, fmt, red, isError) {
    const W = 320, H = 120, L = 62, B = 18, T = 8, R = 6;
    const all = series.flatMap(([, v]) => v.filter((x) => x !== null));
    const top = Math.max(...all, 0) || 1;
    const n = red.buckets;
    const X = (i) => L + (n > 1 ? i / (n - 1) : 0.5) * (W - L - R);
    const Y = (v) => H - B - (v / top) * (H - B - T);
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "line-chart", role: "img",
                           "aria-label": `${title}: at most ${fmt(Math.max(...all, 0))}` },
      s("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
      s("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }),
      s("text", { x: L - 4, y: T + 8, "text-anchor": "end", class: "tick", text: fmt(top) }),
      s("text", { x: L - 4, y: H - B, "text-anchor": "end", class: "tick", text: "0" }),
      s("text", { x: L, y: H - 4, class: "tick", text: fmtTime(red.start_ns).slice(11, 19) }),
      s("text", { x: W - R, y: H - 4, "text-anchor": "end", class: "tick",
                  text: fmtTime(red.start_ns + red.step_ns * red.buckets).slice(11, 19) }));
    series.forEach(([name, values], k) => {
      const pts = values.map((v, i) => (v === null ? null : `${X(i).toFixed(1)},${Y(v).toFixed(1)}`)).filter(Boolean);
      svg.appendChild(s("polyline", { points: pts.join(" "), class: `series s${k}` + (isError ? " err" : "") }));
      if (pts.length === 1) {
        const [cx, cy] = pts[0].split(",");
        svg.appendChild(s("circle", { cx, cy, r: 2.5, class: `dot s${k}` + (isError ? " err" : "") }));
      }
    });
    return h("figure", { class: "mini" }, h("figcaption", {}, title,
      series.length > 1 ? h("span", { class: "legend" }, series.map(([nm], k) => h("span", { class: `key s${k}`, text: nm }))) : null), svg);
  }

  function flame(stacks) {   // an icicle: the process at the top, callees below
    const root = { name: "all", value: 0, kids: new Map() };
    for (const [stack, count] of Object.entries(stacks)) {
      root.value += count;
      let node = root;
      for (const f of stack.split(";")) {
        if (!node.kids.has(f)) node.kids.set(f, { name: f, value: 0, kids: new Map() });
        node = node.kids.get(f);
        node.value += count;
      }
    }
    const box = h("div", { class: "flame", role: "img", "aria-label": `CPU flame graph, ${root.value} samples` });
    const draw = (node, left, depth) => {
      const w = 100 * node.value / root.value;
      if (w < 0.15 || depth > 80) return;
      box.appendChild(h("div", { class: "frame" + (node.name.endsWith("_[k]") ? " kernel" : ""),
        title: `${node.name}: ${node.value} samples (${w.toFixed(1)}%)`,
        style: { left: `${left}%`, width: `${w}%`, top: `${depth * 18}px` }, text: node.name }));
      let x = left;
      for (const k of [...node.kids.values()].sort((a, b) => (a.name < b.name ? -1 : 1))) {
        draw(k, x, depth + 1);
        x += 100 * k.value / root.value;
      }
    };
    draw(root, 0, 0);
    const deepest = Math.max(0, ...[...box.children].map((c) => parseInt(c.style.top, 10)));
    box.style.height = `${deepest + 20}px`;
    return box;
  }

  // -- routing -------------------------------------------------------------------------
  async function route() {
    const path = location.pathname, params = new URLSearchParams(location.search);
    for (const a of document.querySelectorAll("nav[aria-label=Main] a")) {
      const here = a.getAttribute("href") === path || (path === "/" && a.classList.contains("brand"));
      if (here) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
    }
    say("Loading…");
    try {
      if (path === "/" || path === "/search") await searchPage(params, path === "/");
      else if (path.startsWith("/trace/")) await tracePage(decodeURIComponent(path.slice(7)));
      else if (path === "/map") await mapPage(params);
      else if (path.startsWith("/service/")) await servicePage(decodeURIComponent(path.slice(9)), params);
      else throw new Error("no such page");
      say("");
      ready("ok");
    } catch (e) {
      fill(main, h("h1", { text: "Cannot show this page" }), h("p", { class: "error", text: e.message }));
      say(e.message, true);
      ready("error");
    }
  }
  route();
})();
