"""`embedjob report`'s page: one self-contained HTML file (no server, no CDN, thumbnails as ``data:``
URIs, a Content-Security-Policy that allows nothing outside it), drawn in the browser from the JSON
:mod:`embedjob.report` collects. Torch-free.
"""

from __future__ import annotations

import html
import json
from typing import Any


def render(page: dict[str, Any]) -> str:
    # JSON inside <script>: "</" would end the element.
    payload = json.dumps(page).replace("</", "<\\/")
    title = html.escape(f"embedjob report: {page.get('job') or page['output']}")
    return _TEMPLATE.replace("__TITLE__", title).replace("__DATA__", payload)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>__TITLE__</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#fafbfc}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px} .muted{color:#667}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #dde;border-radius:8px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:20px} table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #dde;padding:3px 8px;text-align:left}
#model table{max-width:100%} #model td{overflow-wrap:anywhere}
.panel{background:#fff;border:1px solid #dde;border-radius:8px;padding:12px 16px;margin:12px 0}
svg rect.bar{fill:#7aa6d8} svg rect.bar.kept{fill:#2b6cb0} svg line.cut{stroke:#c53030;stroke-width:2}
.controls{display:flex;gap:12px;align-items:center;margin:6px 0} input[type=range]{width:420px}
.thumbs{display:flex;gap:18px;flex-wrap:wrap}.group h4{margin:4px 0}.group div{display:flex;gap:6px}
figure{margin:0;width:112px;font-size:11px;overflow:hidden}
figure img{width:112px;height:112px;object-fit:cover;background:#eee;border-radius:4px}
</style></head><body>
<h1 id="title"></h1><div class="muted" id="subtitle"></div>
<h2>Totals</h2><div class="cards" id="totals"></div>
<div id="reasons"></div>
<h2>Model</h2><div id="model"></div>
<div id="panels"></div>
<script type="application/json" id="report-data">__DATA__</script>
<script>
(function(){
"use strict";
const D = JSON.parse(document.getElementById("report-data").textContent);
const el = (tag, attrs, text) => { const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text; return e; };
const SVG = "http://www.w3.org/2000/svg";
const svgEl = (tag, attrs) => { const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };
const fmt = n => n === null || n === undefined ? "-"
  : (Number.isInteger(n) ? n.toLocaleString("en-US") : n.toFixed(3));
document.getElementById("title").textContent = "embedjob report" + (D.job ? ": " + D.job : "");
document.getElementById("subtitle").textContent = D.output;
const T = D.totals, tp = D.throughput;
const cards = [["images", T.images], ["failed samples", T.failedImages],
  ["shards done", T.shardsDone + " / " + T.shards],
  ["shards failed", T.shardsFailed], ["images/s", tp.imagesPerSecond === null ? "-" : fmt(tp.imagesPerSecond)],
  ["job seconds", tp.seconds === null ? "-" : fmt(tp.seconds)]];
const totals = document.getElementById("totals");
for (const [label, value] of cards) {
  const c = el("div", {class: "card", "data-total": label});
  c.appendChild(el("b", {}, typeof value === "number" ? fmt(value) : String(value)));
  c.appendChild(el("span", {}, label)); totals.appendChild(c); }
const reasons = Object.entries(D.failedByReason);
if (reasons.length) { const r = document.getElementById("reasons");
  r.appendChild(el("h2", {}, "Failed samples by reason"));
  const t = el("table", {id: "failed-reasons"});
  t.appendChild(el("tr")).append(el("th", {}, "reason"), el("th", {}, "samples"));
  for (const [k, v] of reasons) {
    const tr = el("tr"); tr.append(el("td", {}, k), el("td", {}, String(v))); t.appendChild(tr); }
  r.appendChild(t); }
// The model (one column per model when shards were embedded by different ones) and the score heads:
// field / value tables, nested values written out as compact JSON.
const cell = v => v === null || v === undefined ? "-" : (typeof v === "object" ? JSON.stringify(v) : String(v));
const fieldTable = (id, columns, names) => {
  const t = el("table", {id: id});
  const head = el("tr"); head.appendChild(el("th", {}, "field"));
  names.forEach(n => head.appendChild(el("th", {}, n))); t.appendChild(head);
  const fields = [...new Set(columns.flatMap(c => Object.keys(c || {})))];
  for (const f of fields) { const tr = el("tr", {"data-field": f}); tr.appendChild(el("th", {}, f));
    columns.forEach(c => tr.appendChild(el("td", {}, cell((c || {})[f])))); t.appendChild(tr); }
  return t; };
const modelBox = document.getElementById("model");
const models = D.model === null || D.model === undefined ? [] : (Array.isArray(D.model) ? D.model : [D.model]);
if (models.length) modelBox.appendChild(fieldTable("model-table", models,
  models.length === 1 ? ["value"] : models.map((_, i) => "model " + (i + 1))));
else modelBox.appendChild(el("div", {class: "muted"}, "no finished shard records its model"));
const heads = Object.entries(D.heads || {});
if (heads.length) { modelBox.appendChild(el("h2", {}, "Score heads"));
  modelBox.appendChild(fieldTable("heads-table", heads.map(([, h]) => h), heads.map(([n]) => n))); }
const panels = document.getElementById("panels");
for (const [name, P] of Object.entries(D.panels)) {
  // as many decimals as the score's own range needs (random-weight heads spread over 0.001)
  const span = P.edges[P.edges.length - 1] - P.edges[0];
  const dec = Math.min(8, Math.max(2, Math.ceil(2 - Math.log10(span || 1))));
  const fmt = n => n === null || n === undefined ? "-"
    : (Number.isInteger(n) ? n.toLocaleString("en-US") : n.toFixed(dec));
  const p = el("div", {class: "panel", id: "panel-" + name});
  p.appendChild(el("h2", {}, name + " (" + fmt(P.count) + " images, mean " + fmt(P.mean) + ")"));
  const q = Object.entries(P.quantiles).map(([k, v]) => k + " " + fmt(v)).join(" · ")
    + (P.quantilesFrom ? " (quantiles of " + P.quantilesFrom + ")" : "");
  p.appendChild(el("div", {class: "muted"}, q));
  const W = 640, H = 160, n = P.counts.length, max = Math.max(1, ...P.counts);
  const svg = svgEl("svg", {width: W, height: H + 18, class: "hist", "data-score": name});
  P.counts.forEach((c, i) => { const h = Math.round(c / max * H);
    svg.appendChild(svgEl("rect", {class: "bar", x: i * W / n + 1, y: H - h, width: W / n - 2, height: h,
      "data-count": c, "data-lo": P.edges[i], "data-hi": P.edges[i + 1]})); });
  const cut = svgEl("line", {class: "cut", x1: 0, x2: 0, y1: 0, y2: H}); svg.appendChild(cut);
  svg.appendChild(svgEl("text", {x: 0, y: H + 14, "font-size": 11})).textContent = fmt(P.edges[0]);
  svg.appendChild(svgEl("text", {x: W, y: H + 14, "font-size": 11, "text-anchor": "end"})).textContent =
    fmt(P.edges[n]);
  p.appendChild(svg);
  const controls = el("div", {class: "controls"});
  const slider = el("input", {type: "range", min: 0, max: P.thresholds.length - 1, step: 1, value: 0,
    id: "slider-" + name, "aria-label": name + " threshold"});
  const dir = el("select", {id: "direction-" + name});
  dir.append(el("option", {value: "above"}, "keep ≥"), el("option", {value: "below"}, "keep <"));
  dir.value = P.keepAbove ? "above" : "below";
  const thr = el("span", {class: "threshold", id: "threshold-" + name});
  const kept = el("b", {class: "kept", id: "kept-" + name});
  controls.append(dir, slider, thr, el("span", {}, "kept:"), kept);
  p.appendChild(controls);
  const update = () => { const i = Number(slider.value), t = P.thresholds[i], above = P.atOrAbove[i];
    const k = dir.value === "above" ? above : P.count - above;
    thr.textContent = (dir.value === "above" ? "≥ " : "< ") + fmt(t);
    kept.textContent = fmt(k); kept.setAttribute("data-kept", k);
    kept.parentElement.setAttribute("data-threshold", t);
    const x = i / (P.thresholds.length - 1) * W; cut.setAttribute("x1", x); cut.setAttribute("x2", x);
    svg.querySelectorAll("rect.bar").forEach(r => { const lo = Number(r.getAttribute("data-lo"));
      r.classList.toggle("kept", dir.value === "above" ? lo >= t : lo < t); }); };
  slider.addEventListener("input", update); dir.addEventListener("change", update);
  slider.value = P.keepAbove ? 0 : P.thresholds.length - 1; update();
  const thumbs = (D.thumbnails || {})[name];
  if (thumbs) { const box = el("div", {class: "thumbs"});
    for (const [group, items] of Object.entries(thumbs)) { const g = el("div", {class: "group", "data-group": group});
      g.appendChild(el("h4", {}, group)); const row = el("div");
      for (const it of items) { const f = el("figure");
        const img = el("img", {alt: it.key, title: it.stem + " / " + it.member, "data-member": it.member});
        img.addEventListener("load", () => img.setAttribute("data-loaded", "1"));
        img.addEventListener("error", () => img.setAttribute("data-loaded", "0"));
        if (it.src) img.src = it.src; else img.setAttribute("data-loaded", "missing");
        f.append(img, el("figcaption", {}, fmt(it.value) + " · " + it.key)); row.appendChild(f); }
      g.appendChild(row); box.appendChild(g); }
    p.appendChild(box); }
  panels.appendChild(p);
}
document.body.setAttribute("data-ready", "1");
})();
</script></body></html>
"""
