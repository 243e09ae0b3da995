// The dashboard's one way to the server: fetch under /api/v1 with the operator's token.
//
// The token lives in localStorage ("edgefleet.token"), as the operator-auth contract
// says; every request carries it as "Authorization: Bearer <token>". A 401 means the
// token is missing, wrong, revoked or expired (the caller shows the login screen); a
// 403 names the role the action needs.

export const TOKEN_KEY = "edgefleet.token";
export const API = "/api/v1";

export class ApiError extends Error {
  constructor(status, detail, path) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
    this.path = path;
  }
}

export function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

export function setToken(token) {
  if (token) localStorage.setItem(TOKEN_KEY, token);
  else localStorage.removeItem(TOKEN_KEY);
}

function detailOf(body, fallback) {
  if (body && typeof body === "object" && "detail" in body) {
    const detail = body.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail
        .map((d) => `${(d.loc || []).slice(1).join(".") || "request"}: ${d.msg}`)
        .join("; ");
    }
    return JSON.stringify(detail);
  }
  return fallback;
}

// GET/POST a path under /api/v1; query: an object whose null/undefined/"" values are left
// out and whose arrays repeat the parameter.
export async function request(method, path, { query, body, token } = {}) {
  const url = new URL(API + path, location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value === null || value === undefined || value === "") continue;
    for (const item of Array.isArray(value) ? value : [value]) {
      url.searchParams.append(name, String(item));
    }
  }
  const headers = { Accept: "application/json" };
  const bearer = token === undefined ? getToken() : token;
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (e) {
    throw new ApiError(0, `cannot reach the server (${e.message})`, path);
  }
  const text = await response.text();
  let parsed = null;
  if (text) {
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = text;
    }
  }
  if (!response.ok) {
    throw new ApiError(response.status, detailOf(parsed, response.statusText || "error"), path);
  }
  return parsed;
}

export const get = (path, query, options = {}) => request("GET", path, { ...options, query });
export const post = (path, body, options = {}) => request("POST", path, { ...options, body });
