// Alerts: open and resolved alerts with what fired and the figure against its threshold;
// alerts per hour by severity; the chosen alert's evidence (?alert=ID, default newest).
// Filters: status, severity, group, model, time range.

import { get } from "../api.js";
import {
  COLORS,
  Charts,
  RANGES,
  ago,
  badge,
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
import { renderEvidence } from "./evidence.js";

let charts;
let parts;

const SEVERITY_COLOR = { info: "#0891b2", warning: COLORS.warn, critical: COLORS.fail };

export default {
  title: "Alerts",

  mount(root, ctx) {
    charts = new Charts();
    parts = {
      status: select(ctx, "status", "Status", [["", "open and resolved"], ["open", "open"], ["resolved", "resolved"]]),
      severity: select(ctx, "severity", "Severity", [
        ["", "any severity"],
        ["info", "info"],
        ["warning", "warning"],
        ["critical", "critical"],
      ]),
      group: select(ctx, "group", "Group", [["", "all groups"]]),
      model: select(ctx, "model", "Model", [["", "all models"]]),
      since: select(ctx, "since", "Range", RANGES, "24h"),
      timeline: chartHolder("chart-alerts-timeline"),
      byRule: chartHolder("chart-alerts-rules"),
      list: h("div", { id: "alerts-list" }),
      detailTitle: h("h2", {}, "Alert"),
      detail: h("div", { id: "alert-detail" }),
      evidence: h("div", { id: "alert-evidence" }),
    };
    fill(
      root,
      filterBar(parts.status, parts.severity, parts.group, parts.model, parts.since),
      h(
        "div",
        { class: "row" },
        section("Alerts open per hour, by severity", parts.timeline),
        section("Alerts per rule", parts.byRule),
      ),
      section("Alerts", parts.list),
      h("section", { class: "card" }, parts.detailTitle, parts.detail),
      section("Evidence when it opened", parts.evidence),
    );
  },

  unmount() {
    charts?.destroyAll();
  },

  async refresh(ctx) {
    const params = ctx.params;
    const since = params.get("since") || "24h";
    const [alerts, groups, models] = await Promise.all([
      get("/alerts", {
        status: params.get("status") || undefined,
        severity: params.get("severity") || undefined,
        group: params.get("group") || undefined,
        model: params.get("model") || undefined,
        since,
        limit: 1000,
      }),
      get("/groups"),
      get("/models"),
    ]);
    parts.group.update([["", "all groups"], ...groups.map((g) => [g.name, g.name])]);
    parts.model.update([["", "all models"], ...models.map((m) => [m.name, m.name])]);
    parts.since.update(RANGES);

    drawTimeline(alerts, since);
    const rules = [...new Set(alerts.map((a) => a.rule))].sort();
    if (rules.length) {
      charts.draw(parts.byRule, "alerts-rules", {
        type: "bar",
        data: {
          labels: rules,
          datasets: [
            { label: "open", data: rules.map((r) => alerts.filter((a) => a.rule === r && a.status === "open").length), backgroundColor: COLORS.fail },
            { label: "resolved", data: rules.map((r) => alerts.filter((a) => a.rule === r && a.status === "resolved").length), backgroundColor: COLORS.offline },
          ],
        },
        options: {
          scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, ticks: { precision: 0 } } },
          plugins: { legend: { position: "bottom" } },
        },
      });
    } else {
      fill(parts.byRule, empty("No alerts in this range."));
    }

    const chosen = Number(params.get("alert")) || (alerts[0] && alerts[0].id);
    fill(
      parts.list,
      alerts.length
        ? table(
            [
              { label: "#", value: (a) => a.id },
              { label: "Severity", value: (a) => badge(a.severity) },
              { label: "Status", value: (a) => badge(a.status) },
              { label: "Rule", value: (a) => a.rule },
              { label: "Subject", value: (a) => a.subject },
              { label: "Value / threshold", value: (a) => `${num(a.value)} / ${num(a.threshold)}` },
              { label: "Summary", value: (a) => a.summary },
              { label: "Opened", value: (a) => h("span", { title: fmtTime(a.opened_at) }, ago(a.opened_at)) },
              { label: "Resolved", value: (a) => (a.resolved_at ? ago(a.resolved_at) : "–") },
            ],
            alerts,
            {
              id: "alerts-table",
              rowAttrs: (a) => ({
                class: a.id === chosen ? "selected clickable" : "clickable",
                "data-alert": a.id,
                onclick: () => ctx.setParams({ alert: String(a.id) }),
              }),
            },
          )
        : empty("No alerts match these filters."),
    );

    if (!chosen) {
      parts.detailTitle.textContent = "Alert";
      fill(parts.detail, empty("No alert to show."));
      fill(parts.evidence);
      parts.evidence.dataset.shown = "";
      return;
    }
    const alert = await get(`/alerts/${chosen}`);
    parts.detailTitle.textContent = `Alert #${alert.id}: ${alert.rule} (${alert.status})`;
    fill(
      parts.detail,
      facts([
        ["Subject", alert.subject],
        ["Kind", alert.kind],
        ["Severity", badge(alert.severity)],
        ["Opened", fmtTime(alert.opened_at)],
        ["Resolved", alert.resolved_at ? `${fmtTime(alert.resolved_at)} (${alert.resolution || ""})` : "still open"],
        ["Summary", alert.summary],
        ["Webhook deliveries", alert.deliveries.map((d) => `${d.event}: ${d.status}`).join(", ") || "none"],
      ]),
    );
    renderEvidence(parts.evidence, charts, "alert-evidence", alert.evidence);
  },
};

function drawTimeline(alerts, since) {
  const hours = { "1h": 1, "6h": 6, "24h": 24, "7d": 168, "30d": 720 }[since] || 24;
  const step = hours > 72 ? 24 : 1; // hours per bar
  const end = Math.ceil(Date.now() / 3600e3) * 3600e3;
  const bars = Math.ceil(hours / step);
  const starts = Array.from({ length: bars }, (_, i) => end - (bars - i) * step * 3600e3);
  const severities = ["critical", "warning", "info"];
  const openIn = (a, start) => {
    const opened = new Date(a.opened_at).getTime();
    const resolved = a.resolved_at ? new Date(a.resolved_at).getTime() : Infinity;
    return opened < start + step * 3600e3 && resolved >= start;
  };
  charts.draw(parts.timeline, "alerts-timeline", {
    type: "bar",
    data: {
      labels: starts.map((s) => new Date(s).toISOString().slice(step === 24 ? 5 : 11, step === 24 ? 10 : 13) + (step === 24 ? "" : "h")),
      datasets: severities.map((severity) => ({
        label: severity,
        data: starts.map((s) => alerts.filter((a) => a.severity === severity && openIn(a, s)).length),
        backgroundColor: SEVERITY_COLOR[severity],
      })),
    },
    options: {
      scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, ticks: { precision: 0 } } },
      plugins: { legend: { position: "bottom" } },
    },
  });
}
