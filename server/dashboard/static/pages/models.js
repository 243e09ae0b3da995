// Models: versions (status, aliases, metrics), the chosen version's lineage
// (dataset version -> training run -> model version) and its per-target artifacts with
// size, metric, latency and gate results. Filters: model, version.

import { get } from "../api.js";
import {
  COLORS,
  Charts,
  PALETTE,
  badge,
  bytes,
  chartHolder,
  empty,
  facts,
  fill,
  filterBar,
  fmtTime,
  h,
  num,
  section,
  select,
  table,
} from "../ui.js";

let charts;
let parts;

function metricNames(versions) {
  const names = new Set();
  for (const v of versions) {
    for (const [key, value] of Object.entries(v.metrics || {})) {
      if (typeof value === "number") names.add(key);
    }
  }
  return [...names].sort();
}

export default {
  title: "Models",

  mount(root, ctx) {
    charts = new Charts();
    parts = {
      model: select(ctx, "model", "Model", []),
      version: select(ctx, "version", "Version", [["", "latest"]]),
      summary: h("div", { id: "model-summary" }),
      metrics: chartHolder("chart-model-metrics"),
      versions: h("div", { id: "model-versions" }),
      lineage: h("div", { id: "model-lineage" }),
      targets: chartHolder("chart-model-targets"),
      artifacts: h("div", { id: "model-artifacts" }),
    };
    fill(
      root,
      filterBar(parts.model, parts.version),
      parts.summary,
      h(
        "div",
        { class: "row" },
        section("Metrics per version", parts.metrics),
        section("Lineage of the chosen version", parts.lineage),
      ),
      section("Versions", parts.versions),
      section("Artifacts per target: size and latency", parts.targets),
      section("Artifacts per target: metric and gates", parts.artifacts),
    );
  },

  unmount() {
    charts?.destroyAll();
  },

  async refresh(ctx) {
    const params = ctx.params;
    const models = await get("/models");
    parts.model.update(models.map((m) => [m.name, m.name]));
    if (!models.length) {
      fill(parts.summary, empty("No model is registered yet (edgefleet train …)."));
      return;
    }
    const name = params.get("model") || models[0].name;
    if (!params.get("model")) parts.model.querySelector("select").value = name;
    const model = await get(`/models/${encodeURIComponent(name)}`);
    const versions = model.versions;
    parts.version.update([
      ["", "latest"],
      ...[...versions].reverse().map((v) => [String(v.version), `v${v.version}`]),
    ]);
    const chosen = params.get("version") || "latest";
    const detail = await get(
      `/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(chosen)}`,
    );

    fill(
      parts.summary,
      facts([
        ["Task", model.task],
        ["Latest version", model.latest_version ?? "–"],
        [
          "Aliases",
          Object.entries(model.aliases)
            .map(([alias, v]) => `${alias} → v${v}`)
            .join(", ") || "none",
        ],
        [
          "Gates",
          `metric drop ≤ ${num(model.gates.max_metric_drop)}` +
            (model.gates.enforce_size_budget ? ", size budget" : "") +
            (model.gates.enforce_op_support ? ", op support" : ""),
        ],
      ]),
    );

    const names = metricNames(versions);
    if (names.length) {
      charts.draw(parts.metrics, "model-metrics", {
        type: "line",
        data: {
          labels: versions.map((v) => `v${v.version}`),
          datasets: names.map((metric, i) => ({
            label: metric,
            data: versions.map((v) => v.metrics?.[metric] ?? null),
            borderColor: PALETTE[i % PALETTE.length],
            backgroundColor: PALETTE[i % PALETTE.length],
            pointRadius: 4,
          })),
        },
        options: { plugins: { legend: { position: "bottom" } } },
      });
    } else {
      fill(parts.metrics, empty("No version has metrics yet."));
    }

    fill(
      parts.versions,
      table(
        [
          { label: "Version", value: (v) => `v${v.version}` },
          { label: "Status", value: (v) => badge(v.status) },
          { label: "Aliases", value: (v) => v.aliases.map((a) => badge(a, "alias")) },
          { label: "Source", value: (v) => v.source },
          {
            label: "Metrics",
            value: (v) =>
              Object.entries(v.metrics || {})
                .filter(([, x]) => typeof x === "number")
                .map(([k, x]) => `${k} ${num(x)}`)
                .join(", ") || "–",
          },
          { label: "Targets passed", value: (v) => v.targets_passed.join(", ") || "none" },
          { label: "Created", value: (v) => fmtTime(v.created_at) },
        ],
        [...versions].reverse(),
        {
          id: "versions-table",
          rowAttrs: (v) => ({
            class: v.version === detail.version ? "selected clickable" : "clickable",
            onclick: () => ctx.setParams({ version: String(v.version) }),
          }),
        },
      ),
    );

    const lineage = detail.lineage || {};
    fill(
      parts.lineage,
      h(
        "ol",
        { class: "lineage" },
        h(
          "li",
          {},
          h("b", {}, "dataset "),
          lineage.dataset ? `${lineage.dataset} @ v${lineage.dataset_version}` : "unknown",
        ),
        h(
          "li",
          {},
          h("b", {}, "run "),
          lineage.run_id ? `#${lineage.run_id}` : `none (${lineage.source || detail.source})`,
        ),
        h("li", {}, h("b", {}, "model "), `${detail.model} v${detail.version}`),
      ),
      facts([
        ["Status", badge(detail.status)],
        ["Aliases", detail.aliases.join(", ") || "none"],
        ["Preprocessing", detail.preprocessing.map((s) => s.op || "step").join(" → ") || "none"],
        ["Notes", detail.notes || "–"],
      ]),
    );

    const artifacts = detail.artifacts;
    if (artifacts.length) {
      charts.draw(parts.targets, "model-targets", {
        type: "bar",
        data: {
          labels: artifacts.map((a) => `${a.target} (${a.format} ${a.quantization})`),
          datasets: [
            {
              label: "size (KiB)",
              data: artifacts.map((a) => (a.size_bytes === null ? null : a.size_bytes / 1024)),
              backgroundColor: COLORS.live,
              yAxisID: "size",
            },
            {
              label: "p50 latency (ms)",
              data: artifacts.map((a) => a.latency_p50_ms),
              backgroundColor: COLORS.warn,
              yAxisID: "latency",
            },
          ],
        },
        options: {
          scales: {
            size: { position: "left", beginAtZero: true, title: { display: true, text: "KiB" } },
            latency: {
              position: "right",
              beginAtZero: true,
              grid: { drawOnChartArea: false },
              title: { display: true, text: "ms" },
            },
          },
          plugins: { legend: { position: "bottom" } },
        },
      });
    } else {
      fill(parts.targets, empty("This version has no artifacts."));
    }
    fill(
      parts.artifacts,
      artifacts.length
        ? table(
            [
              { label: "Target", value: (a) => a.target },
              { label: "Format", value: (a) => `${a.format} ${a.quantization}` },
              { label: "Runtime", value: (a) => a.runtime },
              { label: "Size", value: (a) => bytes(a.size_bytes) },
              { label: "Metric", value: (a) => `${a.metric_name} ${num(a.metric_value)}` },
              { label: "vs float", value: (a) => num(a.metric_delta) },
              { label: "p50 latency", value: (a) => (a.latency_p50_ms === null ? "–" : `${num(a.latency_p50_ms)} ms`) },
              { label: "Gate", value: (a) => badge(a.gate_passed ? "passed" : "failed") },
              { label: "Gate reasons", value: (a) => a.error || a.gate_reasons.join("; ") || "–" },
            ],
            artifacts,
            { id: "artifacts-table" },
          )
        : empty("This version has no artifacts."),
    );
  },
};
