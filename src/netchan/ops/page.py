"""The dashboard's page: one HTML document, its script and style inline (no
request leaves for anywhere but the node that serves it)."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>netchan node</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
  h1 { font-size: 1.2em; } h2 { font-size: 1.05em; margin-top: 1.5em; }
  table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; }
  th { border-bottom: 1px solid #999; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
  tr.down td { color: #b00; } .id { font-family: monospace; }
  .plots { display: flex; flex-wrap: wrap; gap: 1em; }
  figure { margin: 0; } figcaption { font-size: 12px; color: #555; }
  canvas { border: 1px solid #ccc; }
  #state { color: #555; }
</style>
</head>
<body>
<h1>node <span id="node" class="id">…</span></h1>
<div id="state">connecting…</div>
<h2>peers and paths</h2>
<table id="peers"><thead><tr><th>peer</th><th>state</th><th>path</th><th>carrier</th><th>path state</th>
<th>rtt ms</th><th>loss</th><th>active</th><th>sent</th><th>received</th></tr></thead><tbody></tbody></table>
<h2>throughput and round trip, last 5 minutes</h2>
<div id="plots" class="plots"></div>
<h2>pipelines</h2>
<table id="pipelines"><thead><tr><th>name</th><th>left</th><th>listening</th><th>through</th><th>right</th>
<th>open</th><th>total</th><th>failed</th><th>out</th><th>in</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
const KEEP = 300;  // samples (one a second)
const history = new Map();  // "peer path" -> [{t, bps, rtt}]
const last = new Map();     // "peer path" -> {t, bytes}

function size(n) {
  for (const unit of ["B", "kB", "MB", "GB"]) {
    if (n < 1000 || unit === "GB") return (unit === "B" ? n.toFixed(0) : n.toFixed(1)) + " " + unit;
    n /= 1000;
  }
}
function cell(row, text, cls) {
  const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td;
}
function fill(tbody, rows) {
  tbody.replaceChildren();
  for (const r of rows) {
    const tr = tbody.insertRow();
    if (r.cls) tr.className = r.cls;
    for (const [k, v] of Object.entries(r.data || {})) tr.dataset[k] = v;
    for (const [text, cls] of r.cells) cell(tr, text, cls);
  }
}
function record(s) {
  const now = s.time;
  for (const peer of s.peers) {
    for (const p of peer.paths) {
      const key = peer.node_id + " " + p.url;
      const bytes = p.bytes_sent + p.bytes_received;
      const before = last.get(key);
      last.set(key, {t: now, bytes});
      if (!before || now <= before.t) continue;
      const list = history.get(key) || [];
      list.push({t: now, bps: (bytes - before.bytes) / (now - before.t), rtt: p.rtt});
      while (list.length > KEEP) list.shift();
      history.set(key, list);
    }
  }
}
function plot(canvas, list, now) {
  const g = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
  g.clearRect(0, 0, w, h);
  const x = t => w - (now - t) / KEEP * w;
  const line = (values, max, colour) => {
    g.strokeStyle = colour; g.beginPath();
    list.forEach((s, i) => {
      const v = values(s); if (v == null) return;
      const y = h - 2 - (max > 0 ? v / max : 0) * (h - 4);
      if (i === 0) g.moveTo(x(s.t), y); else g.lineTo(x(s.t), y);
    });
    g.stroke();
  };
  const maxBps = Math.max(1, ...list.map(s => s.bps));
  const maxRtt = Math.max(1e-6, ...list.map(s => s.rtt || 0));
  line(s => s.bps, maxBps, "#1565c0");
  line(s => s.rtt, maxRtt, "#e65100");
  return [maxBps, maxRtt];
}
function update(s) {
  document.getElementById("node").textContent = s.node_id;
  document.getElementById("state").textContent =
    "listening on " + (s.addresses.join(", ") || "nothing") + " · updated " + new Date(s.time * 1000).toLocaleTimeString();
  record(s);
  const rows = [];
  for (const peer of s.peers) {
    peer.paths.forEach((p, i) => rows.push({
      cls: p.state === "up" ? "" : "down",
      data: {peer: peer.node_id, path: p.url},
      cells: [[i ? "" : peer.node_id, "id"], [i ? "" : peer.state], [p.url], [p.carrier], [p.state],
              [p.rtt == null ? "-" : (p.rtt * 1000).toFixed(2), "n"], [(p.loss * 100).toFixed(0) + "%", "n"],
              [p.active ? "yes" : ""], [size(p.bytes_sent), "n"], [size(p.bytes_received), "n"]]}));
  }
  fill(document.querySelector("#peers tbody"), rows);
  const plots = document.getElementById("plots");
  for (const [key, list] of history) {
    let fig = plots.querySelector(`figure[data-key="${CSS.escape(key)}"]`);
    if (!fig) {
      fig = document.createElement("figure"); fig.dataset.key = key;
      const canvas = document.createElement("canvas"); canvas.width = 360; canvas.height = 90;
      fig.append(canvas, document.createElement("figcaption"));
      plots.append(fig);
    }
    const [maxBps, maxRtt] = plot(fig.querySelector("canvas"), list, s.time);
    const [peer, url] = key.split(" ");
    fig.querySelector("figcaption").textContent =
      `${peer.slice(0, 8)} ${url}: throughput (blue, top ${size(maxBps)}/s), rtt (orange, top ${(maxRtt * 1000).toFixed(2)} ms)`;
  }
  fill(document.querySelector("#pipelines tbody"), (s.pipelines || []).map(p => ({
    data: {pipeline: p.name},
    cells: [[p.name], [p.left], [p.address], [p.through.join(" → ")], [p.right], [String(p.open), "n"],
            [String(p.opened), "n"], [String(p.failed), "n"], [size(p.bytes_out), "n"], [size(p.bytes_in), "n"]]})));
}
fetch("status").then(r => r.json()).then(s => {
  update(s);
  const events = new EventSource("events");
  events.onmessage = e => update(JSON.parse(e.data));
  events.onerror = () => { document.getElementById("state").textContent = "the node does not answer; trying again…"; };
}).catch(e => { document.getElementById("state").textContent = "cannot read the node's status: " + e; });
</script>
</body>
</html>
"""
