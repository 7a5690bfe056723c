// The dashboard's shell: login, navigation by URL hash, the encryption banner and view lifecycles.

import { ApiError, api, get, session, whenUnauthorized } from "./api.js";
import { collectors, jobRuns, jobs, run } from "./jobs.js";
import { fleet, repository, vm } from "./views.js";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 15000; // list views re-read the API this often while shown

const ROUTES = [
  [/^#\/vm\/(.+)$/, "fleet", vm, false],
  [/^#\/jobs\/(.+)$/, "jobs", jobRuns, true],
  [/^#\/jobs$/, "jobs", jobs, true],
  [/^#\/runs\/(.+)$/, "jobs", run, false],
  [/^#\/collectors$/, "collectors", collectors, true],
  [/^#\/repository$/, "repository", repository, true],
  [/^#\/fleet$/, "fleet", fleet, true],
];

let generation = 0; // bumped on every navigation: views of older generations stop polling
let me = null; // the logged-in token, {id, name, role, tenant, expires} from /whoami (never the secret)

function context(gen) {
  return {
    alive: () => gen === generation,
    show: (...nodes) => { if (gen === generation) $("view").replaceChildren(...nodes.flat()); },
    sleep: (ms) => new Promise((resolve) => { setTimeout(resolve, ms); }),
    status,
    encryption,
    isAdmin: () => me?.role === "admin", // admin-only actions are hidden from reader tokens
  };
}

function status(message, isError = false) {
  const el = $("status");
  el.textContent = message;
  el.classList.toggle("error", isError);
}

function encryption(kind) {
  const banner = $("banner");
  banner.hidden = kind !== "none";
  banner.textContent = kind === "none" ? "This repository is not encrypted: anyone who can read the server's "
    + "data directory or its cloud tiers can read every backup. New repositories are encrypted by default "
    + "(chunkyard init without --no-encrypt)." : "";
}

async function route() {
  const gen = ++generation;
  if (!session.token) return showLogin();
  const hash = location.hash || "#/fleet";
  const match = ROUTES.map(([re, section, view, refresh]) => [hash.match(re), section, view, refresh])
    .find(([m]) => m) ?? [["#/fleet"], "fleet", fleet, true];
  const [m, section, view, refresh] = match;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.section === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const ctx = context(gen);
  for (let first = true; ctx.alive(); first = false) {
    try {
      if (!me) showIdentity(await get("/whoami")); // after a reload: the token is in sessionStorage
      await view(ctx, ...m.slice(1).map(decodeURIComponent));
    } catch (e) {
      if (!ctx.alive()) return;
      if (e instanceof ApiError && e.status === 401) return; // whenUnauthorized shows the login
      if (first) ctx.show(errorView(e));
      else status(`Refresh failed: ${e.message}`, true);
    }
    if (!refresh) return;
    await ctx.sleep(REFRESH_MS);
  }
}

function errorView(e) {
  const p = document.createElement("p");
  p.className = "error";
  p.setAttribute("role", "alert");
  p.textContent = e instanceof ApiError && e.status === 404 ? `Not found: ${e.message}` : `Error: ${e.message}`;
  return p;
}

function showIdentity(who) {
  me = who;
  const el = $("whoami");
  el.textContent = `${who.role} · ${who.tenant ? `tenant ${who.tenant}` : "all tenants"}`;
  el.title = `token ${who.name || who.id}${who.expires ? `, expires ${new Date(who.expires * 1000).toLocaleString()}`
    : ""}`;
  el.hidden = false;
}

function showLogin(message = "", isError = true) {
  generation += 1;
  me = null;
  $("whoami").hidden = true;
  $("login").hidden = false;
  $("nav").hidden = true;
  $("logout").hidden = true;
  $("banner").hidden = true;
  $("view").replaceChildren();
  $("login-error").textContent = message;
  $("login-error").className = isError ? "error" : "note";
  $("token").focus();
}

function showApp() {
  $("login").hidden = true;
  $("nav").hidden = false;
  $("logout").hidden = false;
  $("login-error").textContent = "";
  get("/repository").then((r) => encryption(r.encryption), () => {});
}

async function login(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  $("login-error").textContent = "";
  let who;
  try {
    who = await api("GET", "/whoami", { token });
  } catch (e) {
    $("login-error").className = "error";
    $("login-error").textContent = e.status === 401
      ? "That token was refused: it is unknown, revoked or expired. Paste the whole token (it starts with cy_)."
      : `Cannot log in: ${e.message}`;
    return;
  }
  if (who.role !== "admin" && who.role !== "reader") {
    $("login-error").className = "error";
    $("login-error").textContent = `This is a ${who.role} token, which cannot use the dashboard: log in with an `
      + "admin or reader token.";
    return;
  }
  session.set(token);
  $("token").value = "";
  showApp();
  showIdentity(who);
  route();
}

function logout() {
  session.clear();
  status("");
  showLogin("Logged out.", false);
}

whenUnauthorized(() => {
  session.clear();
  showLogin("The server refused the token (revoked or expired): log in again.");
});
$("login-form").addEventListener("submit", login);
$("logout").addEventListener("click", logout);
window.addEventListener("hashchange", () => { status(""); route(); });
if (session.token) showApp();
route();
