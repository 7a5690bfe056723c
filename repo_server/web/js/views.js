// The fleet overview, a VM's restore points (with downloads) and the repository and tier status.

import { get, post } from "./api.js";
import { badge, h, ratio, size, table, timeCell } from "./format.js";

const STALE_SECONDS = 36 * 3600; // a VM without a backup for this long is flagged

export async function fleet(ctx) {
  const { vms } = await get("/vms");
  vms.sort((a, b) => (a.name ?? a.id).localeCompare(b.name ?? b.id));
  const now = Date.now() / 1000;
  const rows = vms.map((vm) => h("tr", { dataset: { vmId: vm.id, vmName: vm.name ?? vm.id } },
    h("th", { scope: "row" }, h("a", { href: `#/vm/${encodeURIComponent(vm.id)}` }, vm.name ?? vm.id)),
    h("td", {}, vm.host ?? "–"),
    h("td", { class: now - vm.latest_time > STALE_SECONDS ? "last stale" : "last" }, timeCell(vm.latest_time)),
    h("td", {}, vm.latest_consistency ? badge(vm.latest_consistency) : "–"),
    h("td", { class: "num" }, size(vm.latest_size)),
    h("td", { class: "num" }, size(vm.latest_logical_bytes)),
    h("td", { class: "num" }, size(vm.new_bytes)),
    h("td", { class: "num" }, ratio(vm.dedup_ratio)),
    h("td", { class: "num" }, vm.points)));
  ctx.show(
    h("h2", {}, "Fleet"),
    h("p", { class: "lead" }, `${vms.length} VM${vms.length === 1 ? "" : "s"} with restore points.`),
    table("vms", ["VM", "Host", "Last backup", "Consistency", "Disk size", "Data in last point",
      "Added by its backups", "Dedup", "Points"], rows,
    "No VM has a restore point yet. Back one up with `chunkyard backup`, or define a backup job."),
  );
}

export async function vm(ctx, vmId) {
  const [{ points }, { vms }] = await Promise.all([get(`/vms/${encodeURIComponent(vmId)}/points`), get("/vms")]);
  const summary = vms.find((v) => v.id === vmId) ?? { id: vmId };
  const name = summary.name ?? vmId;
  const rows = [];
  for (const point of points.slice().reverse()) { // newest first
    for (const disk of point.disks) {
      rows.push(h("tr", { dataset: { pointId: point.point_id, diskId: disk.disk_id } },
        h("td", {}, timeCell(point.created), h("div", { class: "id" }, point.point_id)),
        h("td", {}, badge(point.consistency)),
        h("td", {}, disk.name || disk.disk_id, h("div", { class: "id" }, disk.disk_id)),
        h("td", { class: "num" }, size(disk.size)),
        h("td", { class: "num" }, size(disk.allocated_chunks * point.chunk_size)),
        h("td", { class: "num" }, size(point.stats?.new_bytes)),
        h("td", {}, verifyText(point.verify), point.protected ? badge("protected", "info") : null),
        h("td", { class: "actions" },
          downloadButton(ctx, point, disk, "raw", "Raw"),
          downloadButton(ctx, point, disk, "vhdx", "VHDX"))));
    }
  }
  ctx.show(
    h("p", {}, h("a", { href: "#/fleet" }, "← Fleet")),
    h("h2", { id: "vm-name" }, name),
    h("p", { class: "lead" }, `Host ${summary.host ?? "–"} · ${points.length} restore point`
      + `${points.length === 1 ? "" : "s"} · every point is a full: any one restores on its own.`),
    table("points", ["Created", "Consistency", "Disk", "Size", "Data", "New data", "Verified", "Download"], rows,
      "This VM has no restore points."),
  );
}

function verifyText(verify) {
  if (!verify) return "not yet";
  return verify.ok === false ? badge("damaged", "failed") : badge("ok", "succeeded");
}

function downloadButton(ctx, point, disk, format, label) {
  return h("button", {
    type: "button", class: "download", dataset: { format },
    title: `Download ${disk.name || disk.disk_id} as a ${format === "raw" ? "raw image" : "dynamic VHDX"}`,
    onclick: () => download(ctx, point, disk, format),
  }, label);
}

// A link cannot send the token: ask for a short-lived signed URL, then let the browser download it.
async function download(ctx, point, disk, format) {
  try {
    const path = `/points/${point.point_id}/disks/${encodeURIComponent(disk.disk_id)}/download-url`;
    const { url, filename } = await post(path, { format });
    const link = h("a", { href: url, download: filename, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    ctx.status(`Download started: ${filename}`);
  } catch (e) {
    ctx.status(`Download failed: ${e.message}`, true);
  }
}

export async function repository(ctx) {
  const [repo, { tiers }] = await Promise.all([get("/repository"), get("/tiers")]);
  ctx.encryption(repo.encryption);
  const facts = [
    ["Repository id", repo.repository_id],
    ["Encryption", repo.encryption === "none" ? badge("not encrypted", "failed")
      : `${repo.encryption}${repo.key_fingerprint ? ` (key ${repo.key_fingerprint})` : ""}`],
    ["Chunk size", size(repo.chunk_size)],
    ["Protected data (all points)", size(repo.logical_bytes)],
    ["Unique data", size(repo.unique_bytes)],
    ["Stored on disk", size(repo.stored_bytes)],
    ["Dedup ratio", ratio(repo.dedup_ratio)],
    ["Compression ratio", ratio(repo.compression_ratio)],
    ["VMs", repo.vm_count],
    ["Restore points", repo.point_count],
    ["Chunks", repo.chunk_count],
    ["Packs", repo.pack_count],
  ];
  const tierRows = tiers.map((t) => h("tr", { dataset: { tier: t.name } },
    h("th", { scope: "row" }, t.name),
    h("td", {}, `${t.kind} · ${t.mode}${t.immutable_days ? ` · immutable ${t.immutable_days} d` : ""}`),
    h("td", {}, badge(t.state, t.state === "error" ? "failed" : t.state)),
    h("td", { class: "num" }, `${t.pending_packs} packs, ${size(t.pending_bytes)}`),
    h("td", { class: "num" }, t.pending_points),
    h("td", {}, t.synced_at ? timeCell(t.synced_at) : "not yet"),
    h("td", { class: "error" }, t.last_error ?? "")));
  ctx.show(
    h("h2", {}, "Repository"),
    h("dl", { id: "repository", class: "facts" },
      facts.map(([k, v]) => [h("dt", {}, k), h("dd", { dataset: { fact: k } }, v)])),
    h("h2", {}, "Cloud tiers"),
    table("tiers", ["Tier", "Kind", "State", "Waiting to upload", "Points waiting", "In sync as of", "Last error"],
      tierRows, "No cloud tiers configured: every copy is on this server's disk."),
  );
}
