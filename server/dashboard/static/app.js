// The dashboard shell: sign-in, the page router, the URL as the view's state, and the
// refresh loop.
//
// - Sign-in follows the operator-auth contract: the token comes from localStorage
//   ("edgefleet.token") or once from a link "#token=<token>" (then removed from the
//   address bar); GET /api/v1/auth/me says who it is and which role it has. No token, or
//   one the server refuses (401), shows the sign-in form.
// - Pages are paths (/fleet, /rollouts, ...); their filters are the query string, so a
//   copied URL reproduces the view. A filter change pushes a new URL and redraws at once.
// - Every page refreshes itself every REFRESH_MS; charts are updated in place and the
//   filters (the URL) are never touched by a refresh.

import { ApiError, get, getToken, setToken } from "./api.js";
import { fill, h } from "./ui.js";
import alerts from "./pages/alerts.js";
import drift from "./pages/drift.js";
import fleet from "./pages/fleet.js";
import models from "./pages/models.js";
import retraining from "./pages/retraining.js";
import rollouts from "./pages/rollouts.js";

const PAGES = { fleet, rollouts, models, drift, alerts, retraining };
const REFRESH_MS = 5000;
const ROLES = ["viewer", "operator", "admin"];

const main = document.getElementById("main");
const notice = document.getElementById("notice");
const identity = document.getElementById("identity");
const logout = document.getElementById("logout");
const refreshState = document.getElementById("refresh-state");

let me = null; // {name, role} from GET /api/v1/auth/me
let current = null; // {name, page, ctx, root, timer, refreshes}
let generation = 0;

function pageName() {
  const name = location.pathname.replace(/^\/+|\/+$/g, "") || "fleet";
  return Object.hasOwn(PAGES, name) ? name : "fleet";
}

export function showNotice(text, kind = "info") {
  if (!text) {
    notice.hidden = true;
    notice.textContent = "";
    return;
  }
  notice.hidden = false;
  notice.className = kind;
  notice.textContent = text;
}

function roleAtLeast(role) {
  if (!me) return false;
  return ROLES.indexOf(me.role) >= ROLES.indexOf(role);
}

// ------------------------------------------------------------------ sign-in

function takeTokenFromLink() {
  const hash = new URLSearchParams(location.hash.replace(/^#/, ""));
  const token = hash.get("token");
  if (token) {
    setToken(token.trim());
    history.replaceState(history.state, "", location.pathname + location.search);
  }
}

// Who the stored token is: {name, role}; null when the server refuses it.
async function whoAmI() {
  try {
    return await get("/auth/me");
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return null;
    throw e;
  }
}

function showLogin(message) {
  stopPage();
  me = null;
  document.body.dataset.role = "";
  identity.textContent = "";
  logout.hidden = true;
  document.querySelectorAll("#nav a").forEach((a) => a.classList.remove("active"));
  const form = document.getElementById("login-template").content.cloneNode(true);
  fill(main, form);
  document.body.dataset.loadedPage = "login";
  const error = document.getElementById("login-error");
  error.textContent = message || "";
  document.getElementById("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = document.getElementById("login-token").value.trim();
    if (!token) return;
    try {
      const who = await get("/auth/me", undefined, { token });
      setToken(token);
      signedIn(who);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        error.textContent = "The server refused this token (unknown, revoked or expired).";
      } else if (e instanceof ApiError && e.status === 429) {
        error.textContent = `Too many refused tokens from here: ${e.detail}.`;
      } else {
        error.textContent = `Cannot sign in: ${e.message}`;
      }
    }
  });
}

function signedIn(who) {
  me = who;
  document.body.dataset.role = who.role;
  identity.replaceChildren(
    h("span", {}, who.name, " ", h("span", { class: `badge role-${who.role}` }, who.role)),
  );
  logout.hidden = false;
  startPage();
}

logout.addEventListener("click", () => {
  setToken(null);
  showLogin("Signed out.");
});

// ------------------------------------------------------------------ pages

function makeContext(name) {
  return {
    name,
    get params() {
      return new URLSearchParams(location.search);
    },
    get me() {
      return me;
    },
    // Buttons that change something are shown to operators and admins only (the server
    // enforces the role regardless).
    get canAct() {
      return roleAtLeast("operator");
    },
    setParams(changes, { replace = false } = {}) {
      const params = new URLSearchParams(location.search);
      for (const [key, value] of Object.entries(changes)) {
        if (value === null || value === undefined || value === "") params.delete(key);
        else params.set(key, value);
      }
      const query = params.toString();
      const url = location.pathname + (query ? `?${query}` : "");
      if (replace) history.replaceState(null, "", url);
      else history.pushState(null, "", url);
      refreshNow();
    },
    notify: showNotice,
    refresh: () => refreshNow(),
    failed: (e) => handleError(e),
  };
}

function stopPage() {
  if (current) {
    clearTimeout(current.timer);
    current.page.unmount?.();
  }
  current = null;
  generation += 1; // a refresh still under way for the old page starts over for the new one
}

function startPage() {
  stopPage();
  const name = pageName();
  const page = PAGES[name];
  document.title = `${page.title} · edgefleet`;
  document.body.dataset.page = name;
  document.body.dataset.loadedPage = "";
  document.querySelectorAll("#nav a").forEach((a) => {
    a.classList.toggle("active", a.dataset.page === name);
  });
  const ctx = makeContext(name);
  const root = h("div", { class: `page page-${name}` });
  fill(main, h("h1", {}, page.title), root);
  current = { name, page, ctx, root, timer: null, refreshes: 0 };
  page.mount(root, ctx);
  refreshNow();
}

function handleError(e) {
  if (e instanceof ApiError && e.status === 401) {
    setToken(null);
    showLogin("Your session ended (the token was refused); sign in again.");
    return;
  }
  if (e instanceof ApiError && e.status === 403) {
    showNotice(`Not allowed: ${e.detail}`, "error");
    return;
  }
  showNotice(e instanceof ApiError ? `${e.path}: ${e.detail}` : String(e), "error");
}

// One refresh at a time: a filter change while one runs queues another, which then reads
// the newest URL -- so an older answer never draws over a newer one.
let refreshing = false;
let queued = false;

async function refreshNow() {
  if (!current) return;
  if (refreshing) {
    queued = true;
    return;
  }
  refreshing = true;
  const view = current;
  const mine = generation;
  clearTimeout(view.timer);
  refreshState.textContent = "refreshing…";
  let failed = null;
  try {
    await view.page.refresh(view.ctx);
  } catch (e) {
    failed = e;
  } finally {
    refreshing = false;
  }
  if (queued || mine !== generation || current !== view) {
    queued = false;
    refreshNow();
    return;
  }
  if (failed) {
    refreshState.textContent = "refresh failed";
    handleError(failed);
    if (!current) return;
  } else {
    view.refreshes += 1;
    document.body.dataset.loadedPage = view.name;
    document.body.dataset.refreshes = String(view.refreshes);
    if (notice.className === "error") showNotice("");
    refreshState.textContent = `updated ${new Date().toLocaleTimeString("en-GB")}`;
  }
  view.timer = setTimeout(refreshNow, REFRESH_MS);
}

// In-app navigation keeps the sign-in and only swaps the page.
document.getElementById("nav").addEventListener("click", (event) => {
  const link = event.target.closest("a[data-page]");
  if (!link || event.ctrlKey || event.metaKey || event.shiftKey || !me) return;
  event.preventDefault();
  history.pushState(null, "", link.getAttribute("href"));
  showNotice("");
  startPage();
});

window.addEventListener("popstate", () => {
  if (!me) return;
  if (current && current.name === pageName()) refreshNow();
  else startPage();
});

async function boot() {
  takeTokenFromLink();
  if (!getToken()) {
    showLogin("");
    return;
  }
  let who;
  try {
    who = await whoAmI();
  } catch (e) {
    fill(main, h("p", { class: "error" }, `Cannot reach the server: ${e.message}`));
    return;
  }
  if (!who) {
    const had = getToken();
    setToken(null);
    showLogin(had ? "The stored token was refused (unknown, revoked or expired)." : "");
    return;
  }
  signedIn(who);
}

boot();
