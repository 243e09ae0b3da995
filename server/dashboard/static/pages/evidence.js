// The evidence an alert or a retraining decision carries: the windows its condition
// judged (verdict, value vs threshold, summary) and, for drift, the devices and features
// that drifted. Shared by the alerts and retraining pages.

import { COLORS, chartHolder, empty, facts, fill, fmtTime, h, num, pct, table, badge } from "../ui.js";

function scalar(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return num(value);
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

// Renders into `holder`; draws the per-window chart with `charts` under `key`.
export function renderEvidence(holder, charts, key, evidence) {
  const shown = JSON.stringify(evidence ?? null);
  if (holder.dataset.shown === shown && holder.isConnected) return; // unchanged: keep the charts
  holder.dataset.shown = shown;
  const windows = Array.isArray(evidence?.windows) ? evidence.windows : [];
  const newest = windows[0] || {};
  const devices = Array.isArray(newest.devices) ? newest.devices : [];
  const features = Array.isArray(newest.features) ? newest.features : [];
  const other = Object.entries(evidence || {}).filter(
    ([k, v]) => k !== "windows" && (typeof v !== "object" || v === null),
  );
  const condition = evidence?.condition;
  const chart = chartHolder(`chart-${key}`);
  const deviceChart = chartHolder(`chart-${key}-devices`);
  fill(
    holder,
    facts([
      ...other.map(([k, v]) => [k.replaceAll("_", " "), scalar(v)]),
      ...(condition
        ? [[
            "condition",
            Object.entries(condition)
              .map(([k, v]) => `${k}=${scalar(v)}`)
              .join(", "),
          ]]
        : []),
    ]),
    windows.length
      ? [
          h("h3", {}, "Windows judged (newest first): value against threshold"),
          chart,
          table(
            [
              { label: "Window", value: (w) => `${fmtTime(w.start)} → ${fmtTime(w.end)}` },
              { label: "Verdict", value: (w) => badge(w.verdict) },
              { label: "Value", value: (w) => num(w.value) },
              { label: "Threshold", value: (w) => num(w.threshold) },
              { label: "Devices", value: (w) => (w.evaluated === undefined ? "–" : `${w.drifted ?? 0} of ${w.evaluated}`) },
              { label: "Summary", value: (w) => w.summary },
            ],
            windows,
            { id: `${key}-windows` },
          ),
        ]
      : empty("No windows in the evidence."),
    devices.length
      ? [
          h("h3", {}, "Drifted devices in the newest window"),
          deviceChart,
          table(
            [
              { label: "Device", value: (d) => h("code", {}, d.device_id) },
              { label: "Feature", value: (d) => d.feature },
              { label: "Value", value: (d) => num(d.value) },
              { label: "Features over", value: (d) => d.features_over },
            ],
            devices,
            { id: `${key}-devices` },
          ),
        ]
      : null,
    features.length
      ? [
          h("h3", {}, "Features over the limit in the newest window"),
          table(
            [
              { label: "Feature", value: (f) => f.feature },
              { label: "Devices", value: (f) => f.devices },
              { label: "Share", value: (f) => pct(f.share) },
              { label: "Largest", value: (f) => num(f.max) },
            ],
            features,
            { id: `${key}-features` },
          ),
        ]
      : null,
  );
  if (windows.length) {
    const ordered = [...windows].reverse();
    charts.draw(chart, key, {
      type: "bar",
      data: {
        labels: ordered.map((w) => fmtTime(w.start).slice(5, 16)),
        datasets: [
          {
            type: "bar",
            label: "value",
            data: ordered.map((w) => w.value),
            backgroundColor: ordered.map((w) =>
              w.verdict === "firing" ? COLORS.fail : w.verdict === "ok" ? COLORS.pass : COLORS.remaining,
            ),
          },
          {
            type: "bar",
            label: "threshold",
            data: ordered.map((w) => w.threshold),
            backgroundColor: COLORS.warn,
          },
        ],
      },
      options: { scales: { y: { beginAtZero: true } }, plugins: { legend: { position: "bottom" } } },
    });
  }
  if (devices.length) {
    charts.draw(deviceChart, `${key}-devices`, {
      type: "bar",
      data: {
        labels: devices.map((d) => `${d.device_id} (${d.feature})`),
        datasets: [{ label: "largest value", data: devices.map((d) => d.value), backgroundColor: COLORS.fail }],
      },
      options: { indexAxis: "y", plugins: { legend: { display: false } }, scales: { x: { beginAtZero: true } } },
    });
  }
}
