// The JSON API client: the token lives in sessionStorage (this tab only) and travels only in the
// Authorization header, never in a URL.

const KEY = "chunkyard.token";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code);
    this.status = status;
    this.code = code;
  }
}

export const session = {
  get token() { return sessionStorage.getItem(KEY); },
  set(token) { sessionStorage.setItem(KEY, token); },
  clear() { sessionStorage.removeItem(KEY); },
};

// Called when the server refuses the stored token (revoked, expired): the app shows the login again.
let onUnauthorized = () => {};
export function whenUnauthorized(fn) { onUnauthorized = fn; }

export async function api(method, path, { body, token } = {}) {
  const headers = { Authorization: `Bearer ${token ?? session.token ?? ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(`/api/v1${path}`, {
      method, headers, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, "network", `cannot reach the server (${e.message}); is it running?`);
  }
  let data = null;
  if (resp.status !== 204) {
    try { data = await resp.json(); } catch { data = null; }
  }
  if (!resp.ok) {
    const err = new ApiError(resp.status, data?.error ?? "http_error", data?.message ?? resp.statusText);
    if (resp.status === 401 && token === undefined) onUnauthorized(err);
    throw err;
  }
  return data;
}

export const get = (path) => api("GET", path);
export const post = (path, body) => api("POST", path, { body });

// A fleet endpoint (jobs, collectors) that this server may not have: null when it answers 404.
export async function optional(path) {
  try {
    return await get(path);
  } catch (e) {
    if (e.status === 404) return null;
    throw e;
  }
}
