// Drift: a heatmap of group x feature over time, reference vs live histogram for a chosen
// feature, the drifted devices, per-feature PSI and the prediction-distribution shift.
// Filters: model, version, group (default the fleet), time range, feature, metric.

import { get } from "../api.js";
import {
  COLORS,
  Charts,
  RANGES,
  badge,
  chartHolder,
  empty,
  facts,
  fill,
  filterBar,
  h,
  heatmap,
  num,
  pct,
  section,
  select,
  table,
} from "../ui.js";

let charts;
let parts;

const LEVEL_COLOR = { ok: COLORS.pass, warn: COLORS.warn, act: COLORS.fail };

export default {
  title: "Drift",

  mount(root, ctx) {
    charts = new Charts();
    parts = {
      model: select(ctx, "model", "Model", []),
      version: select(ctx, "version", "Version", [["", "newest with data"]]),
      group: select(ctx, "group", "Group", [["", "whole fleet"]]),
      since: select(ctx, "since", "Range", RANGES, "24h"),
      feature: select(ctx, "feature", "Feature", [["", "most drifted"]]),
      metric: select(ctx, "metric", "Heatmap metric", [["psi", "PSI"], ["js", "JS distance"]], "psi"),
      summary: h("div", { id: "drift-summary" }),
      heatmap: h("div", { id: "drift-heatmap", class: "heat-holder" }),
      histogram: chartHolder("chart-drift-histogram"),
      features: chartHolder("chart-drift-features"),
      classes: chartHolder("chart-drift-classes"),
      confidence: chartHolder("chart-drift-confidence"),
      devices: h("div", { id: "drift-devices" }),
      histogramTitle: h("h2", {}, "Reference vs live"),
    };
    fill(
      root,
      filterBar(parts.model, parts.version, parts.group, parts.since, parts.feature, parts.metric),
      parts.summary,
      section("Drift per group × feature over time", parts.heatmap),
      h(
        "div",
        { class: "row" },
        h("section", { class: "card" }, parts.histogramTitle, parts.histogram),
        section("PSI per feature (largest 20)", parts.features),
      ),
      h(
        "div",
        { class: "row" },
        section("Predicted classes: reference vs live", parts.classes),
        section("Confidence: reference vs live", parts.confidence),
      ),
      section("Drifted devices", parts.devices),
    );
  },

  unmount() {
    charts?.destroyAll();
  },

  async refresh(ctx) {
    const params = ctx.params;
    const [models, groups] = await Promise.all([get("/models"), get("/groups")]);
    parts.model.update(models.map((m) => [m.name, m.name]));
    parts.group.update([["", "whole fleet"], ...groups.map((g) => [g.name, g.name])]);
    parts.since.update(RANGES);
    parts.metric.update([["psi", "PSI"], ["js", "JS distance"]]);
    if (!models.length) {
      fill(parts.summary, empty("No model is registered yet."));
      return;
    }
    const model = params.get("model") || models[0].name;
    if (!params.get("model")) parts.model.querySelector("select").value = model;
    const detail = await get(`/models/${encodeURIComponent(model)}`);
    // By default the version the fleet runs (the production alias), not a canary's.
    const production = detail.aliases.production;
    parts.version.update([
      ["", production ? `production (v${production})` : "newest with data"],
      ...[...detail.versions].reverse().map((v) => [String(v.version), `v${v.version}`]),
    ]);
    const version = params.get("version") || (production ? "production" : undefined);
    const group = params.get("group") || undefined;
    const since = params.get("since") || "24h";
    const metric = params.get("metric") || "psi";
    const report = await get("/drift", { model, version, group, since });
    const feature = params.get("feature") || report.top_features[0] || undefined;
    const [map, histogram] = await Promise.all([
      get("/dashboard/drift/heatmap", {
        model,
        version: version ?? String(report.version),
        group: group ? [group] : undefined,
        since,
        metric,
      }),
      get("/dashboard/drift/histogram", {
        model,
        version: version ?? String(report.version),
        group,
        since,
        feature,
      }),
    ]);
    parts.feature.update([["", "most drifted"], ...histogram.features.map((f) => [f, f])]);

    const devices = report.devices;
    fill(
      parts.summary,
      facts([
        ["Model", `${report.model} v${report.version}`],
        ["Scope", report.group ? `group ${report.group}` : "whole fleet"],
        ["Range", `${new Date(report.since).toISOString().slice(0, 16)}Z → ${new Date(report.until).toISOString().slice(0, 16)}Z`],
        [
          "Devices",
          `${devices.with_drift_data} sent drift counts, ${devices.evaluated} evaluated, ` +
            `${devices.act} drifted (${pct(devices.drifted_share)}), ${devices.warn} warning`,
        ],
        ["Top features", report.top_features.join(", ") || "none at warn or act"],
        [
          "Latency / errors",
          `p50 ${num(report.sla.p50_ms)} ms, p95 ${num(report.sla.p95_ms)} ms, ` +
            `error rate ${pct(report.sla.error_rate)} over ${num(report.sla.inferences)} inferences`,
        ],
      ]),
    );

    // groups that sent no drift counts in the range get a line below, not empty rows
    const silent = map.groups.filter((g) =>
      map.rows.filter((r) => r.group === g).every((r) => r.values.every((v) => v === null)),
    );
    const shown = map.rows.filter((r) => !silent.includes(r.group));
    if (shown.length && map.starts.length) {
      heatmap(parts.heatmap, {
        rows: shown.map((r) => ({ label: `${r.group} · ${r.feature}`, values: r.values })),
        starts: map.starts,
        bucket: map.bucket,
        warn: metric === "psi" ? map.thresholds.warn : 0.1,
        act: metric === "psi" ? map.thresholds.act : 0.25,
        metric: metric === "psi" ? "PSI" : "JS",
      });
      if (silent.length) {
        parts.heatmap.append(
          h("p", { class: "muted" }, `No drift counts in this range from: ${silent.join(", ")}.`),
        );
      }
    } else {
      fill(parts.heatmap, empty("No drift counts in this range for any group."));
    }

    parts.histogramTitle.textContent =
      `Reference vs live: ${histogram.feature}` +
      (histogram.psi === null ? " (no live values)" : ` — PSI ${num(histogram.psi)}, ${histogram.level}`);
    charts.draw(parts.histogram, "drift-histogram", {
      type: "bar",
      data: {
        labels: histogram.labels,
        datasets: [
          { label: "reference (training)", data: histogram.reference_share, backgroundColor: COLORS.reference },
          { label: `live (${num(histogram.n)} values)`, data: histogram.live_share, backgroundColor: COLORS.live },
        ],
      },
      options: {
        scales: { y: { beginAtZero: true, title: { display: true, text: "share" } } },
        plugins: { legend: { position: "bottom" } },
      },
    });

    const ranked = [...report.features].sort((a, b) => b.psi - a.psi).slice(0, 20);
    if (ranked.length) {
      charts.draw(parts.features, "drift-features", {
        type: "bar",
        data: {
          labels: ranked.map((f) => f.name),
          datasets: [
            {
              label: "PSI",
              data: ranked.map((f) => f.psi),
              backgroundColor: ranked.map((f) => LEVEL_COLOR[f.level]),
            },
          ],
        },
        options: {
          plugins: { legend: { display: false } },
          scales: { y: { beginAtZero: true } },
          onClick: (_event, elements) => {
            if (elements.length) ctx.setParams({ feature: ranked[elements[0].index].name });
          },
        },
      });
    } else {
      fill(parts.features, empty("No drift counts in this range."));
    }

    const shift = report.predictions || {};
    drawShift(parts.classes, "drift-classes", shift.classes, (i) => `class ${i}`);
    drawShift(parts.confidence, "drift-confidence", shift.confidence, (i, n) =>
      `${(i / n).toFixed(1)}–${((i + 1) / n).toFixed(1)}`,
    );

    fill(
      parts.devices,
      report.top_devices.length
        ? table(
            [
              { label: "Device", value: (d) => h("code", {}, d.device_id) },
              { label: "Level", value: (d) => badge(d.level) },
              { label: "Largest PSI", value: (d) => num(d.psi) },
              {
                label: "on feature",
                value: (d) =>
                  h("a", { href: "#", onclick: (e) => { e.preventDefault(); ctx.setParams({ feature: d.feature }); } }, d.feature),
              },
              { label: "Features at act", value: (d) => d.features_act },
              { label: "at warn or act", value: (d) => d.features_warn },
              { label: "Values", value: (d) => num(d.n) },
            ],
            report.top_devices,
            { id: "drift-devices-table" },
          )
        : empty("No device has enough values in this range to be judged."),
    );
  },
};

function drawShift(holder, key, shift, label) {
  if (!shift) {
    fill(holder, empty("No predictions counted in this range."));
    return;
  }
  const n = shift.reference.length;
  charts.draw(holder, key, {
    type: "bar",
    data: {
      labels: shift.reference.map((_, i) => label(i, n)),
      datasets: [
        { label: "reference", data: shift.reference, backgroundColor: COLORS.reference },
        { label: `live (PSI ${num(shift.psi)}, ${shift.level})`, data: shift.live, backgroundColor: COLORS.live },
      ],
    },
    options: {
      scales: { y: { beginAtZero: true } },
      plugins: { legend: { position: "bottom" } },
    },
  });
}
