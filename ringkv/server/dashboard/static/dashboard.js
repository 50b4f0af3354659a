// The ringkv dashboard: polls this node's JSON every POLL_MS and redraws.
// /v1/status: the node table (gossip's view); /v1/ring: the tokens;
// /v1/dashboard/cluster: every node's metrics history, hints, repair and
// transactional state (this node asks its peers). Plain DOM and inline SVG.
"use strict";

const POLL_MS = 2000;
const WINDOW_MS = 5 * 60 * 1000; // the longest time span charted: the history nodes keep
const MIN_SPAN_MS = 60 * 1000; // a young history is drawn across a minute, not squeezed right
const NODE_COLORS = ["#1a73e8", "#e8710a", "#188038", "#a142f4", "#d01884", "#12b5cb",
                     "#f9ab00", "#5f6368"];
const LEVEL_COLORS = {all: "#202124", ONE: "#1a73e8", TWO: "#12b5cb", THREE: "#a142f4",
                      QUORUM: "#188038", ALL: "#e8710a", ANY: "#f9ab00", SERIAL: "#d01884",
                      default: "#5f6368", invalid: "#c5221f"};
const SVG_NS = "http://www.w3.org/2000/svg";
const TOKEN_SPAN = 2 ** 64; // murmur3 tokens: -2^63 .. 2^63-1

// -- small helpers: elements are built with textContent, never from HTML text --

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function getJSON(path) {
  const response = await fetch(path, {cache: "no-store"});
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON: reported below */ }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.statusText;
    throw new Error(`${path}: ${response.status} ${message}`);
  }
  return body;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function ago(ms) {
  if (ms === null || ms === undefined) return "never";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 90) return `${s.toFixed(0)} s ago`;
  if (s < 5400) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

// A colour per node, stable across polls (sorted node ids).
function nodeColors(ids) {
  const colors = {};
  [...ids].sort().forEach((id, i) => { colors[id] = NODE_COLORS[i % NODE_COLORS.length]; });
  return colors;
}

// -- the ring: each token owns the range from the previous token up to it --

function drawRing(ring, status, colors) {
  const box = document.getElementById("ring");
  box.replaceChildren();
  const owners = [];
  for (const n of ring.nodes) for (const t of n.tokens) owners.push([Number(t), n.node_id]);
  owners.sort((a, b) => a[0] - b[0]);
  const cx = 120, cy = 120, r = 95;
  const point = (token) => {
    const angle = ((token + TOKEN_SPAN / 2) / TOKEN_SPAN) * 2 * Math.PI - Math.PI / 2;
    return [cx + r * Math.cos(angle), cy + r * Math.sin(angle)];
  };
  const down = new Set(status.nodes.filter((n) => n.liveness !== "UP").map((n) => n.node_id));
  box.append(svg("circle", {cx, cy, r, fill: "none", stroke: "#eee", "stroke-width": 28}));
  for (let i = 0; i < owners.length; i++) {
    const [token, owner] = owners[i];
    const start = i ? owners[i - 1][0] : owners[owners.length - 1][0] - TOKEN_SPAN;
    const [x0, y0] = point(start), [x1, y1] = point(token);
    const large = token - start > TOKEN_SPAN / 2 ? 1 : 0;
    box.append(svg("path", {
      d: `M ${x0} ${y0} A ${r} ${r} 0 ${large} 1 ${x1} ${y1}`, fill: "none",
      stroke: colors[owner] || "#999", "stroke-width": 28,
      "stroke-opacity": down.has(owner) ? 0.3 : 1, "data-node": owner,
    }));
  }
  box.append(svg("text", {x: cx, y: cy - 4, "text-anchor": "middle", "font-size": 16},
                 `${ring.nodes.length} nodes`));
  box.append(svg("text", {x: cx, y: cy + 14, "text-anchor": "middle", "font-size": 11,
                          fill: "#777"}, `${owners.length} tokens`));
  const legend = document.getElementById("ring-legend");
  legend.replaceChildren();
  for (const row of status.nodes) {
    legend.append(el("li", {},
      el("span", {class: "swatch", style: `background:${colors[row.node_id] || "#999"}`}),
      `${row.node_id}: ${(row.owns * 100).toFixed(1)}%`,
      row.liveness === "UP" ? "" : " (DOWN)"));
  }
}

// -- the node table: gossip's view, plus what each node says of itself --

function drawNodes(status, summaries) {
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren();
  for (const row of status.nodes) {
    const mine = summaries ? summaries[row.node_id] : undefined;
    const reachable = mine !== undefined && !mine.error;
    const hints = reachable ? `${mine.hints.pending}${mine.hints.pending_capped ? "+" : ""}` : "?";
    let repair = "?";
    if (reachable) {
      repair = mine.repair.running ? "running" : ago(mine.repair.last_finished_ms);
      if (!mine.repair.running && mine.repair.last_trigger) repair += ` (${mine.repair.last_trigger})`;
    }
    const live = row.liveness === "UP";
    body.append(el("tr", {"data-node": row.node_id, "data-liveness": row.liveness,
                          "data-reachable": String(reachable), class: live ? "" : "is-down"},
      el("td", {}, row.node_id + (row.node_id === status.node_id ? " (this node)" : "")),
      el("td", {}, row.address || "?"),
      el("td", {}, row.status),
      el("td", {class: live ? "up" : "down"}, row.liveness),
      el("td", {class: "num"}, row.phi === null ? "–" : row.phi.toFixed(2)),
      el("td", {class: "num"}, bytes(row.load_bytes)),
      el("td", {class: "num"}, row.tokens),
      el("td", {class: "num"}, `${(row.owns * 100).toFixed(1)}%`),
      el("td", {class: "num"}, hints),
      el("td", {}, repair),
      el("td", {class: reachable ? "up" : "down", title: mine && mine.error ? mine.error : ""},
         reachable ? "reachable" : (mine ? "unreachable" : "not asked"))));
  }
}

// -- charts: one line per series, drawn as an SVG polyline --

// A line per series. ``log``: a logarithmic y axis (latency: one slow election
// must not flatten every millisecond after it), from LOG_FLOOR up.
const LOG_FLOOR = 0.1;

function lineChart(title, unit, series, nowMs, spanMs, log) {
  const width = 290, height = 130, left = 40, right = 6, top = 16, bottom = 18;
  const chart = svg("svg", {class: "chart", width, height, viewBox: `0 0 ${width} ${height}`});
  let max = 0, points = 0;
  for (const s of series) for (const [, v] of s.points) max = Math.max(max, v);
  const topValue = log ? Math.max(max, LOG_FLOOR * 10) : (max > 0 ? max * 1.1 : 1);
  const bottomValue = log ? LOG_FLOOR : 0;
  const scale = (v) => (log ? Math.log10(Math.max(v, LOG_FLOOR) / LOG_FLOOR) /
                              Math.log10(topValue / LOG_FLOOR) : v / topValue);
  const x = (t) => left + ((t - (nowMs - spanMs)) / spanMs) * (width - left - right);
  const y = (v) => top + (1 - scale(v)) * (height - top - bottom);
  const label = (v) => (v >= 100 ? v.toFixed(0) : String(Number(v.toPrecision(2))));
  chart.append(svg("text", {x: left, y: 11}, `${title} (${unit}${log ? ", log scale" : ""})`));
  chart.append(svg("line", {class: "axis", x1: left, y1: y(bottomValue), x2: width - right,
                            y2: y(bottomValue)}));
  chart.append(svg("line", {class: "axis", x1: left, y1: top, x2: left, y2: y(bottomValue)}));
  chart.append(svg("text", {x: left - 3, y: top + 4, "text-anchor": "end"}, label(topValue)));
  chart.append(svg("text", {x: left - 3, y: y(bottomValue), "text-anchor": "end"},
                   label(bottomValue)));
  chart.append(svg("text", {x: left, y: height - 4},
                   spanMs >= 120000 ? `−${Math.round(spanMs / 60000)} min` : `−${Math.round(spanMs / 1000)} s`));
  chart.append(svg("text", {x: width - right, y: height - 4, "text-anchor": "end"}, "now"));
  for (const s of series) {
    const visible = s.points.filter(([t]) => t >= nowMs - spanMs);
    if (!visible.length) continue;
    points += visible.length;
    const line = svg("polyline", {
      fill: "none", stroke: s.color, "stroke-width": 1.5, "stroke-dasharray": s.dash || "",
      points: visible.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" "),
      "data-series": s.name,
    });
    line.append(svg("title", {}, s.name)); // the series' name on hover
    chart.append(line);
  }
  chart.setAttribute("data-points", String(points));
  chart.setAttribute("data-max", String(max));
  return chart;
}

function drawCharts(summaries, colors) {
  const box = document.getElementById("charts");
  box.replaceChildren();
  for (const id of Object.keys(summaries).sort()) {
    const mine = summaries[id];
    const card = el("div", {class: "node-charts", "data-node": id},
      el("h3", {}, el("span", {class: "swatch", style: `background:${colors[id] || "#999"}`}), id));
    box.append(card);
    if (mine.error) {
      card.append(el("div", {class: "down"}, "unreachable"), el("div", {class: "muted error-text"}, mine.error));
      continue;
    }
    const samples = mine.history.samples;
    // The levels that saw traffic in the window; "all" always.
    const levels = new Set(["all"]);
    for (const s of samples) {
      for (const [level, v] of Object.entries(s.levels)) if (v.ops_per_s > 0) levels.add(level);
    }
    const order = [...levels].sort((a, b) => (a === "all" ? -1 : b === "all" ? 1 : a < b ? -1 : 1));
    const ops = [], latency = [];
    for (const level of order) {
      const color = LEVEL_COLORS[level] || "#999";
      const at = (key) => samples.filter((s) => s.levels[level] && s.levels[level][key] !== null)
                                 .map((s) => [s.t_ms, s.levels[level][key]]);
      ops.push({name: level, color, points: at("ops_per_s")});
      latency.push({name: `${level} p50`, color, points: at("p50_ms")});
      latency.push({name: `${level} p99`, color, dash: "4 3", points: at("p99_ms")});
    }
    const nowMs = samples.length ? samples[samples.length - 1].t_ms : mine.wall_ms;
    const firstMs = samples.length ? samples[0].t_ms : nowMs;
    const spanMs = Math.min(WINDOW_MS, Math.max(MIN_SPAN_MS, nowMs - firstMs));
    card.append(lineChart("ops/s", "per s", ops, nowMs, spanMs, false));
    card.append(lineChart("latency p50 — / p99 - -", "ms", latency, nowMs, spanMs, true));
    const legend = el("div", {class: "muted"});
    for (const level of order) {
      legend.append(el("span", {class: "swatch", style: `background:${LEVEL_COLORS[level] || "#999"}`}),
                    `${level} `);
    }
    card.append(legend);
  }
}

// -- the transactional tier: TrueTime and commit wait per node, groups and leases --

function drawTxn(summaries) {
  const clocks = document.querySelector("#clocks tbody");
  const groups = document.querySelector("#groups tbody");
  clocks.replaceChildren();
  groups.replaceChildren();
  const byGroup = {};
  let any = false;
  for (const id of Object.keys(summaries).sort()) {
    const txn = summaries[id].transactional;
    if (!txn) continue;
    any = true;
    const tt = txn.truetime;
    const samples = summaries[id].history.samples;
    const lastWait = [...samples].reverse().find((s) => s.commit_wait_ms !== null);
    clocks.append(el("tr", {"data-node": id},
      el("td", {}, id),
      el("td", {class: "num"}, tt.epsilon_us === null ? "unmeasured" : `${(tt.epsilon_us / 1000).toFixed(3)} ms`),
      el("td", {class: tt.fenced ? "down" : "up"}, tt.fenced ? `yes: ${tt.why || ""}` : "no"),
      el("td", {class: "num"}, txn.commits),
      el("td", {class: "num"}, txn.commit_wait_mean_ms === null ? "–" : `${txn.commit_wait_mean_ms} ms`),
      el("td", {class: "num"}, lastWait ? `${lastWait.commit_wait_ms} ms` : "–")));
    for (const g of txn.groups) {
      const seen = byGroup[g.group] || (byGroup[g.group] = {replicas: g.replicas, leader: null, lease: null, hints: {}});
      if (g.leads) { seen.leader = id; seen.lease = g.lease_remaining_ms; }
      else if (g.leader) seen.hints[g.leader] = (seen.hints[g.leader] || 0) + 1;
    }
  }
  for (const name of Object.keys(byGroup).sort()) {
    const g = byGroup[name];
    const hinted = Object.keys(g.hints).sort((a, b) => g.hints[b] - g.hints[a])[0];
    groups.append(el("tr", {"data-group": name},
      el("td", {}, name),
      el("td", {}, g.replicas.join(", ")),
      el("td", {}, g.leader || (hinted ? `${hinted} (as its peers last heard)` : "none")),
      el("td", {class: "num"}, g.lease === null ? "–" : `${g.lease.toFixed(0)} ms`)));
  }
  document.getElementById("txn-section").hidden = !any;
}

// -- the loop --

async function poll() {
  const [status, ring, cluster] = await Promise.allSettled(
    [getJSON("/v1/status"), getJSON("/v1/ring"), getJSON("/v1/dashboard/cluster")]);
  const errors = document.getElementById("errors");
  errors.replaceChildren();
  for (const r of [status, ring, cluster]) {
    if (r.status === "rejected") errors.append(el("div", {}, r.reason.message));
  }
  try {
    const summaries = cluster.status === "fulfilled" ? cluster.value.nodes : null;
    if (status.status === "fulfilled") {
      const s = status.value;
      document.getElementById("cluster").textContent = `cluster ${s.cluster}, served by ${s.node_id}`;
      const colors = nodeColors(s.nodes.map((n) => n.node_id));
      if (ring.status === "fulfilled") drawRing(ring.value, s, colors);
      drawNodes(s, summaries);
      if (summaries) { drawCharts(summaries, colors); drawTxn(summaries); }
    }
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.setAttribute("data-polls", String(Number(document.body.dataset.polls || 0) + 1));
  } catch (e) {
    errors.append(el("div", {}, `drawing failed: ${e}`));
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
