// Small DOM, formatting and chart helpers shared by the pages (no framework).

export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2).toLowerCase(), value);
    } else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

// ------------------------------------------------------------------ formatting

export function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toISOString().replace("T", " ").slice(0, 19) + "Z";
}

export function ago(iso) {
  if (!iso) return "never";
  const seconds = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (seconds < 0) return "just now";
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h ago`;
  return `${(seconds / 86400).toFixed(1)} d ago`;
}

export function num(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  return Number(value.toPrecision(digits)).toString();
}

export function pct(value) {
  if (value === null || value === undefined) return "–";
  return `${(value * 100).toFixed(1)} %`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 ** 2).toFixed(2)} MiB`;
}

export function badge(text, kind) {
  return h("span", { class: `badge ${kind || String(text).toLowerCase()}` }, text);
}

// ------------------------------------------------------------------ blocks

export function section(title, ...children) {
  return h("section", { class: "card" }, h("h2", {}, title), ...children);
}

export function empty(text) {
  return h("p", { class: "empty muted" }, text);
}

// columns: [{label, value: row => text|Node, class?}]
export function table(columns, rows, { id, rowAttrs } = {}) {
  return h(
    "table",
    { class: "grid", id },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.class }, c.label)))),
    h(
      "tbody",
      {},
      rows.map((row) =>
        h(
          "tr",
          rowAttrs ? rowAttrs(row) : {},
          columns.map((c) => h("td", { class: c.class }, c.value(row))),
        ),
      ),
    ),
  );
}

// A definition list from [label, value] pairs.
export function facts(pairs) {
  return h(
    "dl",
    { class: "facts" },
    pairs.map(([label, value]) => [h("dt", {}, label), h("dd", {}, value)]),
  );
}

// ------------------------------------------------------------------ filters

export const RANGES = [
  ["1h", "last hour"],
  ["6h", "last 6 h"],
  ["24h", "last 24 h"],
  ["7d", "last 7 days"],
  ["30d", "last 30 days"],
];

// A labelled <select> bound to one query parameter; keeps the chosen value across refreshes.
export function select(ctx, name, label, options, fallback = "") {
  const node = h("select", { id: `filter-${name}`, name });
  node.addEventListener("change", () => ctx.setParams({ [name]: node.value }));
  const wrapper = h("label", { class: "filter" }, h("span", {}, label), node);
  wrapper.update = (newOptions) => setOptions(node, newOptions, ctx.params.get(name) ?? fallback);
  wrapper.update(options);
  return wrapper;
}

function setOptions(node, options, chosen) {
  const wanted = options.map(([value, text]) => `${value}\u0000${text}`).join("\u0001");
  if (node.dataset.options !== wanted) {
    node.replaceChildren(...options.map(([value, text]) => h("option", { value }, text)));
    node.dataset.options = wanted;
  }
  const values = options.map(([value]) => value);
  if (chosen && !values.includes(chosen)) {
    node.append(h("option", { value: chosen }, chosen));
    node.dataset.options = "";
  }
  node.value = chosen;
}

export function filterBar(...filters) {
  return h("form", { class: "filters", onsubmit: (e) => e.preventDefault() }, filters);
}

// ------------------------------------------------------------------ charts

// Series colours: no red or green, which mean failure and health here.
export const PALETTE = [
  "#2563eb", "#7c3aed", "#0891b2", "#d97706", "#db2777",
  "#4f46e5", "#0f766e", "#9333ea", "#ea580c", "#64748b",
];

export const COLORS = {
  online: "#16a34a",
  offline: "#9ca3af",
  reference: "#94a3b8",
  live: "#2563eb",
  activated: "#16a34a",
  failed: "#dc2626",
  timed_out: "#ea580c",
  rolled_back: "#7c3aed",
  in_progress: "#2563eb",
  remaining: "#e5e7eb",
  pass: "#16a34a",
  warn: "#d97706",
  fail: "#dc2626",
};

// Bars stay bars when a chart has one or two categories.
if (window.Chart) window.Chart.defaults.datasets.bar.maxBarThickness = 72;

// One Chart.js chart per key, kept across refreshes: data and options are replaced and the
// chart is updated without animation, so a refresh does not flicker or reset the view.
export class Charts {
  constructor() {
    this.byKey = new Map();
  }

  draw(holder, key, config) {
    let entry = this.byKey.get(key);
    if (entry && (!entry.canvas.isConnected || entry.type !== config.type)) {
      entry.chart.destroy();
      this.byKey.delete(key);
      entry = null;
    }
    if (!entry) {
      const canvas = h("canvas", { "data-chart": key, role: "img", "aria-label": key });
      fill(holder, h("div", { class: "chart-box" }, canvas));
      const chart = new window.Chart(canvas, {
        ...config,
        options: { animation: false, responsive: true, maintainAspectRatio: false, ...config.options },
      });
      entry = { chart, canvas, type: config.type };
      this.byKey.set(key, entry);
    } else {
      entry.chart.data = config.data;
      entry.chart.options = {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        ...config.options,
      };
      entry.chart.update("none");
    }
    entry.canvas.dataset.points = String(
      config.data.datasets.reduce((n, d) => n + d.data.filter((v) => v !== null && v !== 0).length, 0),
    );
    return entry.chart;
  }

  destroyAll() {
    for (const entry of this.byKey.values()) entry.chart.destroy();
    this.byKey.clear();
  }
}

export function chartHolder(id) {
  return h("div", { class: "chart-holder", id });
}

// ------------------------------------------------------------------ heatmap

function heatColor(value, warn, act) {
  if (value === null || value === undefined) return "#f3f4f6";
  // green below warn, amber to act, red beyond; lightness follows the value
  const clamp = (x) => Math.max(0, Math.min(1, x));
  if (value < warn) return `hsl(142, 55%, ${92 - 30 * clamp(value / warn)}%)`;
  if (value < act) return `hsl(38, 90%, ${70 - 15 * clamp((value - warn) / (act - warn))}%)`;
  return `hsl(0, 75%, ${58 - 18 * clamp((value - act) / act)}%)`;
}

// rows: [{label, values: [number|null]}]; starts: ISO start of each column (UTC hours or
// days). Draws on a canvas of its own and shows the cell under the pointer in a line below.
export function heatmap(holder, { rows, starts, bucket, warn, act, metric }) {
  const columns = starts.map((iso) => {
    const d = new Date(iso);
    const day = `${String(d.getUTCMonth() + 1).padStart(2, "0")}-${String(d.getUTCDate()).padStart(2, "0")}`;
    return { day, hour: bucket === "day" ? "" : `${String(d.getUTCHours()).padStart(2, "0")}h` };
  });
  const cell = { w: Math.max(14, Math.min(40, Math.floor(1000 / Math.max(columns.length, 1)))), h: 18 };
  const left = Math.min(260, 12 + 7 * Math.max(6, ...rows.map((r) => r.label.length)));
  const top = 8;
  const bottom = 40;
  const width = left + cell.w * columns.length + 24;
  const height = top + cell.h * rows.length + bottom;
  const scale = window.devicePixelRatio || 1;
  const canvas = h("canvas", {
    class: "heatmap",
    "data-chart": "heatmap",
    role: "img",
    "aria-label": `${metric} per group and feature over time`,
  });
  canvas.width = width * scale;
  canvas.height = height * scale;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const g = canvas.getContext("2d");
  g.scale(scale, scale);
  g.font = "12px system-ui, sans-serif";
  g.textBaseline = "middle";
  let painted = 0;
  rows.forEach((row, i) => {
    const y = top + i * cell.h;
    g.fillStyle = "#111827";
    g.textAlign = "right";
    g.fillText(row.label, left - 6, y + cell.h / 2);
    row.values.forEach((value, j) => {
      g.fillStyle = heatColor(value, warn, act);
      g.fillRect(left + j * cell.w, y, cell.w - 1, cell.h - 1);
      if (value !== null && value !== undefined) painted += 1;
    });
  });
  // time labels: the hour under every few columns (as many as fit), the date where it changes
  g.fillStyle = "#374151";
  g.textAlign = "center";
  const base = top + rows.length * cell.h;
  const widest = Math.max(...columns.map((c) => g.measureText(c.hour || c.day).width), 1);
  const every = Math.max(1, Math.ceil((widest + 8) / cell.w));
  columns.forEach((c, j) => {
    const x = left + j * cell.w + cell.w / 2;
    if (j % every === 0) g.fillText(c.hour || c.day, x, base + 11);
    if (c.hour && (j === 0 || columns[j - 1].day !== c.day)) {
      g.textAlign = "left";
      g.fillText(c.day, left + j * cell.w, base + 28);
      g.textAlign = "center";
    }
  });
  const tip = h("div", { class: "heat-tip muted" }, "Point at a cell for its value.");
  canvas.addEventListener("mousemove", (event) => {
    const box = canvas.getBoundingClientRect();
    const x = event.clientX - box.left - left;
    const y = event.clientY - box.top - top;
    const i = Math.floor(y / cell.h);
    const j = Math.floor(x / cell.w);
    if (x < 0 || y < 0 || i >= rows.length || j >= columns.length) return;
    const value = rows[i].values[j];
    const when = `${columns[j].day} ${columns[j].hour}`.trim();
    tip.textContent = `${rows[i].label} · ${when} UTC: ${value === null ? "no data" : num(value)}`;
  });
  const legend = h(
    "div",
    { class: "legend" },
    h("span", { class: "swatch", style: `background:${heatColor(0, warn, act)}` }),
    ` ${metric} < ${warn}  `,
    h("span", { class: "swatch", style: `background:${heatColor(warn, warn, act)}` }),
    ` warn ≥ ${warn}  `,
    h("span", { class: "swatch", style: `background:${heatColor(act, warn, act)}` }),
    ` act ≥ ${act}  `,
    h("span", { class: "swatch", style: `background:${heatColor(null, warn, act)}` }),
    " no data",
  );
  canvas.dataset.points = String(painted);
  fill(holder, h("div", { class: "heat-scroll" }, canvas), legend, tip);
  return canvas;
}
