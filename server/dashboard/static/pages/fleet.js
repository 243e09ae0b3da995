// Fleet: devices online/offline per group and per profile, which versions run where, and
// every device with its last-seen time. Filters: group, profile, online/offline.

import { get } from "../api.js";
import {
  COLORS,
  Charts,
  PALETTE,
  ago,
  badge,
  chartHolder,
  empty,
  fill,
  filterBar,
  h,
  section,
  select,
  table,
} from "../ui.js";

let charts;
let parts;

const groupLabel = (g) => g ?? "(no group)";

export default {
  title: "Fleet",

  mount(root, ctx) {
    charts = new Charts();
    parts = {
      group: select(ctx, "group", "Group", [["", "all groups"]]),
      profile: select(ctx, "profile", "Profile", [["", "all profiles"]]),
      online: select(ctx, "online", "Presence", [
        ["", "online and offline"],
        ["true", "online"],
        ["false", "offline"],
      ]),
      totals: h("div", { class: "totals", id: "fleet-totals" }),
      byGroup: chartHolder("chart-fleet-groups"),
      byProfile: chartHolder("chart-fleet-profiles"),
      versions: chartHolder("chart-fleet-versions"),
      devices: h("div", { id: "fleet-devices" }),
    };
    fill(
      root,
      filterBar(parts.group, parts.profile, parts.online),
      parts.totals,
      h(
        "div",
        { class: "row" },
        section("Online / offline per group", parts.byGroup),
        section("Online / offline per profile", parts.byProfile),
      ),
      section("Model versions running, per group", parts.versions),
      section("Devices", parts.devices),
    );
  },

  unmount() {
    charts?.destroyAll();
  },

  async refresh(ctx) {
    const params = ctx.params;
    const group = params.get("group") || undefined;
    const profile = params.get("profile") || undefined;
    const online = params.get("online") || "";
    const [overview, everything] = await Promise.all([
      get("/dashboard/fleet", { group, profile }),
      get("/dashboard/fleet"),
    ]);
    parts.group.update([["", "all groups"], ...overview.groups.map((g) => [g, g])]);
    parts.profile.update([["", "all profiles"], ...everything.profiles.map((p) => [p, p])]);
    parts.online.update([
      ["", "online and offline"],
      ["true", "online"],
      ["false", "offline"],
    ]);

    fill(
      parts.totals,
      h("div", { class: "total" }, h("b", {}, overview.devices), " devices"),
      h("div", { class: "total online" }, h("b", {}, overview.online), " online"),
      h("div", { class: "total offline" }, h("b", {}, overview.offline), " offline"),
    );

    const stacked = {
      responsive: true,
      scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, ticks: { precision: 0 } } },
      plugins: { legend: { position: "bottom" } },
    };
    const groups = [...new Set(overview.by_group_profile.map((c) => c.group))];
    const sumBy = (cells, key, field) =>
      key.map((k) => cells.filter((c) => c.k === k).reduce((n, c) => n + c[field], 0));
    const perGroup = overview.by_group_profile.map((c) => ({ ...c, k: c.group }));
    charts.draw(parts.byGroup, "fleet-groups", {
      type: "bar",
      data: {
        labels: groups.map(groupLabel),
        datasets: [
          { label: "online", data: sumBy(perGroup, groups, "online"), backgroundColor: COLORS.online },
          { label: "offline", data: sumBy(perGroup, groups, "offline"), backgroundColor: COLORS.offline },
        ],
      },
      options: stacked,
    });
    const profiles = [...new Set(overview.by_group_profile.map((c) => c.profile))];
    // a device in two groups counts once per profile: take the device rows
    const perProfile = overview.device_rows.map((d) => ({
      k: d.profile,
      online: d.online ? 1 : 0,
      offline: d.online ? 0 : 1,
    }));
    charts.draw(parts.byProfile, "fleet-profiles", {
      type: "bar",
      data: {
        labels: profiles,
        datasets: [
          { label: "online", data: sumBy(perProfile, profiles, "online"), backgroundColor: COLORS.online },
          { label: "offline", data: sumBy(perProfile, profiles, "offline"), backgroundColor: COLORS.offline },
        ],
      },
      options: stacked,
    });

    const versionKeys = [...new Set(overview.versions.map((v) => `${v.model}@${v.version}`))];
    const versionGroups = [...new Set(overview.versions.map((v) => v.group))];
    if (versionKeys.length) {
      charts.draw(parts.versions, "fleet-versions", {
        type: "bar",
        data: {
          labels: versionGroups.map(groupLabel),
          datasets: versionKeys.map((key, i) => ({
            label: key,
            backgroundColor: PALETTE[i % PALETTE.length],
            data: versionGroups.map(
              (g) =>
                overview.versions
                  .filter((v) => v.group === g && `${v.model}@${v.version}` === key)
                  .reduce((n, v) => n + v.devices, 0),
            ),
          })),
        },
        options: stacked,
      });
    } else {
      fill(parts.versions, empty("No device reports a model yet."));
    }

    let rows = overview.device_rows;
    if (online) rows = rows.filter((d) => String(d.online) === online);
    fill(
      parts.devices,
      rows.length
        ? table(
            [
              { label: "Device", value: (d) => h("code", {}, d.id) },
              { label: "Status", value: (d) => badge(d.status) },
              { label: "Presence", value: (d) => badge(d.online ? "online" : "offline") },
              { label: "Last seen", value: (d) => h("span", { title: d.last_seen || "" }, ago(d.last_seen)) },
              { label: "Profile", value: (d) => d.profile },
              { label: "Groups", value: (d) => d.groups.join(", ") || "–" },
              { label: "Models", value: (d) => d.models.join(", ") || "–" },
              { label: "Last update", value: (d) => d.last_update || "–" },
              { label: "Agent", value: (d) => d.agent_version },
            ],
            rows,
            { id: "devices-table", rowAttrs: (d) => ({ "data-device": d.id }) },
          )
        : empty("No devices match."),
      overview.truncated ? h("p", { class: "muted" }, "Only the first 10 000 devices are listed.") : null,
    );
  },
};
