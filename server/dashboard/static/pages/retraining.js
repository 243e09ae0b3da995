// Retraining decisions: every decision a policy made, and for the chosen one (?decision=ID,
// default newest) its evidence, plan, run, candidate, rollout and history, with approve /
// reject for operators while it waits. Filters: status, model, group.

import { get, post } from "../api.js";
import {
  Charts,
  ago,
  badge,
  empty,
  facts,
  fill,
  filterBar,
  fmtTime,
  h,
  section,
  select,
  table,
} from "../ui.js";
import { renderEvidence } from "./evidence.js";

let charts;
let parts;

async function decide(ctx, decision, action) {
  const note = parts.note ? parts.note.value.trim() : "";
  try {
    await post(`/retraining/decisions/${decision.id}/${action}`, note ? { note } : {});
    ctx.notify(`Decision #${decision.id}: ${action}d.`, "ok");
  } catch (e) {
    ctx.failed(e);
  }
  ctx.refresh();
}

function planDataset(dataset) {
  if (!dataset || typeof dataset !== "object") return "–";
  const which = dataset.dataset ? `${dataset.dataset} v${dataset.version ?? "?"}` : "–";
  return dataset.note || which;
}

export default {
  title: "Retraining decisions",

  mount(root, ctx) {
    charts = new Charts();
    parts = {
      status: select(ctx, "status", "Status", [
        ["", "any status"],
        ...["pending_approval", "training", "completed", "failed", "rejected"].map((s) => [s, s.replace("_", " ")]),
      ]),
      model: select(ctx, "model", "Model", [["", "all models"]]),
      group: select(ctx, "group", "Group", [["", "all groups"]]),
      list: h("div", { id: "decisions-list" }),
      title: h("h2", {}, "Decision"),
      actions: h("div", { class: "actions", id: "decision-actions" }),
      facts: h("div", {}),
      evidence: h("div", { id: "decision-evidence" }),
      history: h("div", { id: "decision-history" }),
      note: null,
      shownKey: null,
    };
    fill(
      root,
      filterBar(parts.status, parts.model, parts.group),
      section("Decisions", parts.list),
      h("section", { class: "card" }, parts.title, parts.actions, parts.facts),
      section("Evidence", parts.evidence),
      section("History", parts.history),
    );
  },

  unmount() {
    charts?.destroyAll();
  },

  async refresh(ctx) {
    const params = ctx.params;
    const [decisions, groups, models] = await Promise.all([
      get("/retraining/decisions", {
        status: params.get("status") || undefined,
        model: params.get("model") || undefined,
        group: params.get("group") || undefined,
        limit: 1000,
      }),
      get("/groups"),
      get("/models"),
    ]);
    parts.group.update([["", "all groups"], ...groups.map((g) => [g.name, g.name])]);
    parts.model.update([["", "all models"], ...models.map((m) => [m.name, m.name])]);
    const chosen = Number(params.get("decision")) || (decisions[0] && decisions[0].id);
    fill(
      parts.list,
      decisions.length
        ? table(
            [
              { label: "#", value: (d) => d.id },
              { label: "Status", value: (d) => badge(d.status) },
              { label: "Policy", value: (d) => d.policy },
              { label: "Model", value: (d) => `${d.model} v${d.version}` },
              { label: "Group", value: (d) => d.group },
              { label: "What fired", value: (d) => d.summary },
              { label: "Candidate", value: (d) => (d.candidate_version ? `v${d.candidate_version}` : "–") },
              { label: "Created", value: (d) => h("span", { title: fmtTime(d.created_at) }, ago(d.created_at)) },
            ],
            decisions,
            {
              id: "decisions-table",
              rowAttrs: (d) => ({
                class: d.id === chosen ? "selected clickable" : "clickable",
                "data-decision": d.id,
                onclick: () => ctx.setParams({ decision: String(d.id) }),
              }),
            },
          )
        : empty("No retraining decisions match these filters."),
    );
    if (!chosen) {
      parts.title.textContent = "Decision";
      fill(parts.actions);
      fill(parts.facts, empty("No decision to show."));
      fill(parts.evidence);
      fill(parts.history);
      parts.shownKey = null;
      return;
    }
    const d = await get(`/retraining/decisions/${chosen}`);
    parts.title.textContent = `Decision #${d.id}: ${d.policy} → ${d.group}`;
    const key = `${d.id}|${d.status}|${ctx.canAct}`;
    if (parts.shownKey !== key) {
      parts.shownKey = key;
      const waiting = d.status === "pending_approval" && ctx.canAct;
      parts.note = waiting
        ? h("input", { type: "text", id: "decision-note", placeholder: "note (optional)", maxlength: 2000 })
        : null;
      fill(
        parts.actions,
        waiting
          ? [
              h("button", { type: "button", "data-action": "approve", onclick: () => decide(ctx, d, "approve") }, "Approve and retrain"),
              h("button", { type: "button", class: "danger", "data-action": "reject", onclick: () => decide(ctx, d, "reject") }, "Reject"),
              parts.note,
            ]
          : [],
      );
    }
    const plan = d.plan || {};
    fill(
      parts.facts,
      facts([
        ["Status", [badge(d.status), ` ${d.status_reason}`]],
        ["What fired", d.summary],
        ["Model version that fired", `${d.model} v${d.version}`],
        ["Window end", fmtTime(d.window_end)],
        ["Retrain on", planDataset(plan.dataset)],
        ["Then", `promote to "${plan.alias ?? "candidate"}"` + (plan.canary ? `, canary ${JSON.stringify(plan.canary)}` : ", no canary rollout")],
        ["Run", d.run ? `#${d.run.id} ${d.run.status} (${d.run.phase})${d.run.error ? ` — ${d.run.error}` : ""}` : "none yet"],
        ["Candidate", d.candidate_version ? `v${d.candidate_version}` : "–"],
        ["Canary rollout", d.rollout_id || "–"],
        ["Decided", d.decided_at ? fmtTime(d.decided_at) : "not yet"],
        ["Note", d.note || "–"],
      ]),
    );
    renderEvidence(parts.evidence, charts, "decision-evidence", d.evidence);
    fill(
      parts.history,
      table(
        [
          { label: "At", value: (x) => fmtTime(x.at) },
          { label: "Status", value: (x) => badge(x.status) },
          { label: "Note", value: (x) => x.note || "" },
        ],
        d.history,
        { id: "decision-history-table" },
      ),
    );
  },
};
