// Backup jobs, their runs with live progress, and collectors (the fleet API; a server without it
// answers 404, shown as "no jobs configured" / "no collectors").

import { get, optional, post } from "./api.js";
import { ago, badge, duration, h, rate, size, table, timeCell } from "./format.js";

const POLL_MS = 1500; // a running run is polled this often
const LIVE = new Set(["queued", "running"]);

export async function jobs(ctx) {
  const answer = await optional("/backup-jobs");
  const list = answer?.jobs ?? [];
  const rows = list.map((job) => h("tr", { dataset: { job: job.name } },
    h("th", { scope: "row" }, h("a", { href: `#/jobs/${encodeURIComponent(job.name)}` }, job.name)),
    h("td", {}, job.collector),
    h("td", {}, `${job.host_pattern} / ${job.vm_pattern}`),
    h("td", {}, h("code", {}, job.schedule)),
    h("td", {}, job.enabled ? (job.next_run ? timeCell(job.next_run) : "–") : badge("disabled", "info")),
    h("td", {}, job.last_run
      ? h("a", { href: `#/runs/${encodeURIComponent(job.last_run.run_id)}` }, badge(job.last_run.state), " ",
        job.last_run.finished ? timeCell(job.last_run.finished) : "")
      : "never"),
    h("td", { class: "actions" }, ctx.isAdmin() ? h("button", {
      type: "button", class: "run-now", onclick: (e) => startJob(ctx, job.name, e.currentTarget),
    }, "Run now") : "")));
  ctx.show(
    h("h2", {}, "Backup jobs"),
    table("jobs", ["Job", "Collector", "Hosts / VMs", "Schedule", "Next run", "Last run", ""], rows,
      answer === null ? "No jobs configured (this server has no backup-jobs API)."
        : "No jobs configured. Create one with `chunkyard job create`."),
  );
}

async function startJob(ctx, name, button) {
  button.disabled = true;
  try {
    const { run_id: runId } = await post(`/backup-jobs/${encodeURIComponent(name)}/run`, {});
    ctx.status(`Started ${name}: run ${runId}`);
    location.hash = `#/runs/${encodeURIComponent(runId)}`;
  } catch (e) {
    button.disabled = false;
    ctx.status(e.status === 403 ? "Starting a job needs an admin token." : `Could not start ${name}: ${e.message}`,
      true);
  }
}

export async function jobRuns(ctx, name) {
  const job = encodeURIComponent(name);
  const [detail, { runs }] = await Promise.all([get(`/backup-jobs/${job}`), get(`/backup-jobs/${job}/runs?limit=50`)]);
  const rows = runs.map((run) => h("tr", { dataset: { runId: run.run_id } },
    h("th", { scope: "row" }, h("a", { href: `#/runs/${encodeURIComponent(run.run_id)}` }, timeCell(run.started))),
    h("td", {}, run.trigger),
    h("td", {}, badge(run.state)),
    h("td", {}, run.finished ? duration(run.finished - run.started) : "running"),
    h("td", { class: "num" }, size(run.totals?.bytes_new)),
    h("td", { class: "num" }, size(run.totals?.bytes_sent))));
  ctx.show(
    h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")),
    h("h2", {}, `Job ${detail.name}`),
    h("p", { class: "lead" }, `Collector ${detail.collector} · hosts ${detail.host_pattern} · VMs `
      + `${detail.vm_pattern} · schedule ${detail.schedule}${detail.enabled ? "" : " (disabled)"}`),
    h("button", { type: "button", class: "run-now", onclick: (e) => startJob(ctx, detail.name, e.currentTarget) },
      "Run now"),
    h("h3", {}, "Runs"),
    table("runs", ["Started", "Trigger", "State", "Duration", "New data", "Sent"], rows, "This job has not run yet."),
  );
}

// One run, re-read every POLL_MS while it is queued or running.
export async function run(ctx, runId) {
  for (;;) {
    const r = await get(`/runs/${encodeURIComponent(runId)}`);
    if (!ctx.alive()) return;
    ctx.show(...runView(r));
    if (!LIVE.has(r.state)) return;
    await ctx.sleep(POLL_MS);
    if (!ctx.alive()) return;
  }
}

function runView(r) {
  const rows = r.vms.map((v) => {
    const done = !LIVE.has(v.state); // a VM's counters arrive with its result
    return h("tr", { dataset: { vmName: v.vm.name ?? v.vm.id, state: v.state } },
      h("th", { scope: "row" }, v.vm.name ?? v.vm.id),
      h("td", {}, v.host),
      h("td", {}, badge(v.state), v.attempt > 1 ? ` (attempt ${v.attempt})` : ""),
      h("td", { class: "progress" }, progressOf(v)),
      h("td", {}, v.consistency ? badge(v.consistency) : "–"),
      h("td", { class: "num" }, done ? size(v.bytes_read) : "–"),
      h("td", { class: "num" }, done ? size(v.bytes_new) : "–"),
      h("td", { class: "num" }, done ? size(v.bytes_sent) : "–"),
      h("td", { class: "num" }, done ? duration(v.duration_s) : "–"),
      h("td", { class: "error" }, v.error ?? ""));
  });
  const t = r.totals ?? {};
  return [
    h("p", {}, h("a", { href: `#/jobs/${encodeURIComponent(r.job)}` }, `← Job ${r.job}`)),
    h("h2", {}, "Run ", h("span", { class: "id" }, r.run_id)),
    h("p", { id: "run-state", class: "lead", dataset: { state: r.state } }, badge(r.state), ` ${r.trigger} run, `,
      `started ${ago(r.started)}`, r.finished ? `, took ${duration(r.finished - r.started)}` : "",
      r.finished && t.bytes_new !== undefined ? ` · new ${size(t.bytes_new)}, sent ${size(t.bytes_sent)}` : ""),
    table("run-vms", ["VM", "Host", "State", "Progress", "Consistency", "Read", "New", "Sent", "Took", "Error"], rows,
      "No VM matched this job's patterns."),
  ];
}

function progressOf(v) {
  const p = v.progress;
  if (!p || v.state !== "running") return v.state === "succeeded" ? "done" : "";
  const label = p.total_bytes ? `${size(p.done_bytes)} of ${size(p.total_bytes)}` : size(p.done_bytes);
  return [
    h("progress", { max: p.total_bytes || 1, value: p.total_bytes ? p.done_bytes : 0, "aria-label": label }),
    h("div", { class: "small" }, `${p.phase} · ${label} · ${rate(p.rate_bytes_per_s)}`),
  ];
}

export async function collectors(ctx) {
  const answer = await optional("/collectors");
  const list = answer?.collectors ?? [];
  list.sort((a, b) => a.name.localeCompare(b.name));
  const rows = list.map((c) => h("tr", { dataset: { collector: c.name } },
    h("th", { scope: "row" }, c.name),
    h("td", {}, c.tenant || "–"),
    h("td", {}, c.version ?? "–"),
    h("td", {}, (c.hosts ?? []).map((host) => `${host.host} (${host.vms?.length ?? 0} VMs)`).join(", ") || "–"),
    h("td", {}, timeCell(c.last_seen)),
    h("td", {}, c.online ? badge("online", "succeeded") : badge("offline", "failed"))));
  ctx.show(
    h("h2", {}, "Collectors"),
    table("collectors", ["Collector", "Tenant", "Version", "Hosts", "Last seen", "Status"], rows,
      answer === null ? "No collectors registered (this server has no collectors API)."
        : "No collectors registered. Start one with `chunkyard collector run --server URL --token T --source …`."),
  );
}
