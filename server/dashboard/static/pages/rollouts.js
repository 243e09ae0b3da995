// Rollouts: the list, and for the chosen one (?rollout=ID, default the newest) its progress
// per phase, gate values against their thresholds, failures with reasons, and the
// pause / resume / approve / abort buttons (operators and admins only).

import { get, post } from "../api.js";
import {
  COLORS,
  Charts,
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

// What a rollout moves: a model version, or (kind "agent") an agent release.
function rolledOut(r) {
  return r.kind === "agent" ? `agent ${r.agent_version}` : `${r.model_name} v${r.model_version}`;
}

let charts;
let parts;

const COMMANDS = [
  // [command, label, statuses it is allowed in, asks for a reason]
  ["pause", "Pause", ["pending", "running", "waiting_approval"], true],
  ["resume", "Resume", ["paused"], false],
  ["approve", "Approve phase", ["running", "waiting_approval"], false],
  ["abort", "Abort", ["pending", "running", "waiting_approval", "paused"], true],
];

function statusFilter(status) {
  if (!status || status === "active") return { active: true };
  if (status === "all") return {};
  return { status };
}

async function command(ctx, rollout, name) {
  const needsReason = COMMANDS.find((c) => c[0] === name)[3];
  const reason = parts.reason ? parts.reason.value.trim() : "";
  const body = needsReason && reason ? { reason } : {};
  try {
    await post(`/rollouts/${encodeURIComponent(rollout.id)}/${name}`, body);
    ctx.notify(`${rollout.id}: ${name} done.`, "ok");
    if (parts.reason) parts.reason.value = "";
  } catch (e) {
    ctx.failed(e);
  }
  ctx.refresh();
}

export default {
  title: "Rollouts",

  mount(root, ctx) {
    charts = new Charts();
    parts = {
      status: select(
        ctx,
        "status",
        "Status",
        [
          ["active", "active"],
          ["all", "all"],
          ...["running", "waiting_approval", "paused", "completed", "aborted"].map((s) => [s, s]),
        ],
        "active",
      ),
      model: select(ctx, "model", "Model", [["", "all models"]]),
      group: select(ctx, "group", "Group", [["", "all groups"]]),
      list: h("div", { id: "rollouts-list" }),
      detail: h("div", { id: "rollout-detail" }),
    };
    fill(
      root,
      filterBar(parts.status, parts.model, parts.group),
      section("Rollouts", parts.list),
      parts.detail,
    );
  },

  unmount() {
    charts?.destroyAll();
  },

  async refresh(ctx) {
    const params = ctx.params;
    const model = params.get("model") || undefined;
    const group = params.get("group") || undefined;
    const [list, models, groups] = await Promise.all([
      get("/rollouts", { ...statusFilter(params.get("status")), model, group }),
      get("/models"),
      get("/groups"),
    ]);
    parts.model.update([["", "all models"], ...models.map((m) => [m.name, m.name])]);
    parts.group.update([["", "all groups"], ...groups.map((g) => [g.name, g.name])]);
    const chosenId = params.get("rollout") || (list[0] && list[0].id);

    fill(
      parts.list,
      list.length
        ? table(
            [
              { label: "Rollout", value: (r) => h("code", {}, r.id) },
              { label: "Kind", value: (r) => r.kind || "model" },
              { label: "What", value: (r) => rolledOut(r) },
              { label: "Group", value: (r) => r.group },
              { label: "Status", value: (r) => badge(r.status) },
              { label: "Phase", value: (r) => `${r.phase} / ${r.phases}` },
              {
                label: "Devices",
                value: (r) =>
                  Object.entries(r.counts)
                    .filter(([, n]) => n)
                    .map(([k, n]) => `${k} ${n}`)
                    .join(", ") || "–",
              },
              { label: "Updated", value: (r) => ago(r.updated_at) },
            ],
            list,
            {
              id: "rollouts-table",
              rowAttrs: (r) => ({
                class: r.id === chosenId ? "selected clickable" : "clickable",
                "data-rollout": r.id,
                onclick: () => ctx.setParams({ rollout: r.id }),
              }),
            },
          )
        : empty("No rollouts match these filters."),
    );

    if (!chosenId) {
      fill(parts.detail, empty("Choose a rollout above."));
      parts.shown = null;
      return;
    }
    const r = await get(`/rollouts/${encodeURIComponent(chosenId)}`);
    renderDetail(ctx, r);
  },
};

function skeleton(ctx, id) {
  const d = {
    id,
    title: h("h2", {}, `Rollout ${id}`),
    actions: h("div", { class: "actions", id: "rollout-actions" }),
    facts: h("div", {}),
    progress: chartHolder("chart-rollout-phases"),
    gates: chartHolder("chart-rollout-gates"),
    gateTable: h("div", { id: "gates" }),
    failures: h("div", { id: "failures" }),
    shownStatus: null,
  };
  parts.reason = null;
  fill(
    parts.detail,
    h("section", { class: "card" }, d.title, d.actions, d.facts),
    h(
      "div",
      { class: "row" },
      section("Progress per phase", d.progress),
      section("Gates: value ÷ threshold (1 = the limit)", d.gates),
    ),
    section("Gate values against thresholds", d.gateTable),
    section("Failures and exclusions", d.failures),
  );
  return d;
}

function renderActions(ctx, d, r) {
  const key = `${r.status}|${ctx.canAct}`;
  if (d.shownStatus === key) return;
  d.shownStatus = key;
  if (!ctx.canAct) {
    parts.reason = null;
    fill(d.actions);
    return;
  }
  const allowed = COMMANDS.filter(([, , statuses]) => statuses.includes(r.status));
  const withReason = allowed.some(([, , , reason]) => reason);
  parts.reason = withReason
    ? h("input", {
        type: "text",
        id: "rollout-reason",
        placeholder: "reason (optional, kept with pause/abort)",
        maxlength: 500,
      })
    : null;
  fill(
    d.actions,
    allowed.map(([name, label]) =>
      h(
        "button",
        {
          type: "button",
          class: name === "abort" ? "danger" : "",
          "data-action": name,
          onclick: () => command(ctx, r, name),
        },
        label,
      ),
    ),
    parts.reason,
  );
}

function renderDetail(ctx, r) {
  let d = parts.shown;
  if (!d || d.id !== r.id || !d.title.isConnected) {
    d = parts.shown = skeleton(ctx, r.id);
  }
  renderActions(ctx, d, r);
  fill(
    d.facts,
    facts([
      ["Kind", r.kind || "model"],
      [r.kind === "agent" ? "Agent" : "Model", rolledOut(r)],
      ...(r.kind === "agent" && r.spec.health_timeout_s
        ? [["Health timeout", `${r.spec.health_timeout_s} s`]]
        : []),
      ["Group", `${r.group} (${r.group_members} members, ${r.eligible} eligible)`],
      ["Status", [badge(r.status), r.status_reason ? ` ${r.status_reason}` : ""]],
      ["Phase", `${r.phase} of ${r.phases}`],
      ["On breach", r.spec.on_breach || "pause"],
      ["Started", fmtTime(r.started_at)],
      ["Finished", fmtTime(r.finished_at)],
    ]),
  );
  fill(
    d.gateTable,
    r.gates.length
      ? table(
          [
            { label: "Gate", value: (g) => g.gate },
            { label: "Status", value: (g) => badge(g.status) },
            { label: "Value", value: (g) => num(g.value) },
            { label: "Threshold", value: (g) => num(g.threshold) },
            { label: "Summary", value: (g) => g.summary },
          ],
          r.gates,
          { id: "gates-table" },
        )
      : empty("No gate has been evaluated yet (the current phase has no data)."),
  );
  const failures = r.devices.filter((x) => ["failed", "timed_out", "rolled_back"].includes(x.state));
  fill(
    d.failures,
    failures.length || r.excluded.length
      ? table(
          [
            { label: "Device", value: (x) => h("code", {}, x.device_id) },
            { label: "State", value: (x) => badge(x.state) },
            { label: "Phase", value: (x) => x.phase ?? "–" },
            { label: "Reason", value: (x) => x.reason || "–" },
            { label: "Detail", value: (x) => x.detail || "" },
            { label: "When", value: (x) => fmtTime(x.outcome_at) },
          ],
          [...failures, ...r.excluded],
          { id: "failures-table" },
        )
      : empty("No device failed, rolled back or was left out."),
  );

  const phases = r.phase_progress;
  const shares = ["activated", "in_progress", "failed", "timed_out", "rolled_back"];
  charts.draw(d.progress, "rollout-phases", {
    type: "bar",
    data: {
      labels: phases.map(
        (p) => `phase ${p.phase}: ${p.size}${p.approval_required ? ", approval" : ""} (${p.state})`,
      ),
      datasets: [
        ...shares.map((key) => ({
          label: key.replace("_", " "),
          data: phases.map((p) => p[key]),
          backgroundColor: COLORS[key],
        })),
        {
          label: "not yet targeted",
          data: phases.map((p, i) => {
            const before = i === 0 ? 0 : phases[i - 1].target;
            return Math.max(0, p.target - before - p.targeted);
          }),
          backgroundColor: COLORS.remaining,
        },
      ],
    },
    options: {
      indexAxis: "y",
      scales: {
        x: { stacked: true, beginAtZero: true, ticks: { precision: 0 } },
        y: { stacked: true },
      },
      plugins: { legend: { position: "bottom" } },
    },
  });
  const judged = r.gates.filter((g) => g.threshold);
  if (judged.length) {
    charts.draw(d.gates, "rollout-gates", {
      type: "bar",
      data: {
        labels: judged.map((g) => g.gate.replaceAll("_", " ")),
        datasets: [
          {
            label: "value ÷ threshold",
            // a negative figure (e.g. confidence went up) is as good as none: no bar
            data: judged.map((g) => (g.value === null ? 0 : Math.max(0, g.value / g.threshold))),
            backgroundColor: judged.map((g) =>
              g.status === "breached"
                ? COLORS.fail
                : g.status === "holds"
                  ? COLORS.pass
                  : COLORS.remaining,
            ),
          },
        ],
      },
      options: {
        indexAxis: "y",
        scales: { x: { beginAtZero: true, suggestedMax: 1.2 } },
        plugins: { legend: { display: false } },
      },
    });
  } else {
    fill(d.gates, empty("No gate values yet: the current phase has not been judged."));
  }
}
