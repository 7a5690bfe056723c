"""`chunkyard job ...`: backup jobs defined on the server and run by pull collectors (`chunkyard collector run`).

A job picks VMs by name pattern on one collector, runs on a calendar schedule, and keeps a run history with
per-VM results. (The maintenance jobs of `gc`, `verify` and `prune` are another thing.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from chunkyard.progress import Progress, format_duration
from chunkyard.units import format_size
from chunkyard.wire import Client

Call = Callable[[argparse.Namespace, Callable[[Client], Coroutine[Any, Any, Any]]], Any]

RETENTION = {"keep_last": "the N newest points", "keep_daily": "the newest point of each of the N latest days",
             "keep_weekly": "the newest point of each of the N latest ISO weeks",
             "keep_monthly": "the newest point of each of the N latest months",
             "keep_yearly": "the newest point of each of the N latest years"}
FINISHED = ("succeeded", "partial", "failed")
SCHEDULE_HELP = ('calendar event: "mon..fri 22:00", "daily", "hourly", "*:0/15" (every 15 min), "sat 03:30", '
                 '"*:*:0/30" (every 30 s), or a 5-field cron line "30 22 * * 1-5"')


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _show(args: argparse.Namespace, value: Any, table: Callable[[Any], None]) -> None:
    if args.json:
        print(json.dumps(value, indent=2))
    else:
        table(value)


def job_body(args: argparse.Namespace) -> dict:
    """The job definition from the create flags (the server validates it and explains what is wrong)."""
    retention = {key: getattr(args, key) for key in RETENTION if getattr(args, key) is not None}
    body: dict[str, Any] = {
        "name": args.name, "collector": args.collector, "host_pattern": args.hosts, "vm_pattern": args.vms,
        "schedule": args.schedule, "retention": retention or None, "tier": args.tier,
        "max_per_host": args.max_per_host, "bandwidth_mib_s": args.bandwidth, "retries": args.retries,
        "retry_delay_s": args.retry_delay, "missed": args.missed, "enabled": not args.disabled,
    }
    if args.tenant:
        body["tenant"] = args.tenant
    return body


DEFINITION = ("name", "tenant", "collector", "host_pattern", "vm_pattern", "schedule", "retention", "tier",
              "max_per_host", "bandwidth_mib_s", "retries", "retry_delay_s", "missed", "enabled")


async def set_enabled(client: Client, name: str, enabled: bool) -> dict:
    """Switch a job's schedule on or off, keeping the rest of its definition (PUT replaces it whole)."""
    job = await client.backup_job(name)
    return await client.replace_backup_job(name, {k: job[k] for k in DEFINITION if k in job} | {"enabled": enabled})


def _retention_text(policy: dict | None) -> str:
    return ", ".join(f"{k.removeprefix('keep_')} {n}" for k, n in policy.items()) if policy else "keep every point"


def _last_run(job: dict) -> str:
    last = job.get("last_run")
    return f"{last['state']} {_when(last.get('finished'))}" if last else "never"


def print_jobs(jobs: list[dict]) -> None:
    print(f"{'NAME':<20}{'COLLECTOR':<16}{'HOSTS':<10}{'VMS':<12}{'SCHEDULE':<18}{'NEXT RUN':<21}LAST RUN")
    for j in jobs:
        enabled = "" if j.get("enabled", True) else " (disabled)"
        print(f"{j['name']:<20.19}{j['collector']:<16.15}{j['host_pattern']:<10.9}{j['vm_pattern']:<12.11}"
              f"{j['schedule']:<18.17}{_when(j.get('next_run')):<21}{_last_run(j)}{enabled}")


def print_job(job: dict) -> None:
    bandwidth = f"{job['bandwidth_mib_s']} MiB/s" if job.get("bandwidth_mib_s") else "unlimited"
    rows = [
        ("collector", job["collector"]), ("tenant", job.get("tenant") or "(none)"),
        ("hosts", job["host_pattern"]), ("VMs", job["vm_pattern"]), ("schedule", job["schedule"]),
        ("next run", _when(job.get("next_run"))), ("last run", _last_run(job)),
        ("retention", _retention_text(job.get("retention"))), ("tier", job.get("tier") or "-"),
        ("max per host", job["max_per_host"]), ("bandwidth", bandwidth),
        ("retries", f"{job['retries']} (after {job['retry_delay_s']} s)"), ("missed runs", job["missed"]),
        ("enabled", "yes" if job.get("enabled", True) else "no"),
    ]
    print(f"job {job['name']}")
    for key, value in rows:
        print(f"  {key:<14}{value}")


def _vm_totals(run: dict) -> tuple[int, int]:
    ok = sum(1 for v in run.get("vms", []) if v["state"] == "succeeded")
    return ok, len(run.get("vms", []))


def print_runs(runs: list[dict]) -> None:
    print(f"{'RUN':<28}{'STARTED':<21}{'TRIGGER':<10}{'STATE':<11}{'READ':>11}{'SENT':>11}{'TIME':>10}")
    for r in runs:
        totals = r.get("totals") or {}
        took = (r["finished"] - r["started"]) if r.get("finished") and r.get("started") else None
        print(f"{r['run_id']:<28}{_when(r.get('started')):<21}{r.get('trigger', '-'):<10}{r['state']:<11}"
              f"{format_size(totals.get('bytes_read', 0)):>11}{format_size(totals.get('bytes_sent', 0)):>11}"
              f"{format_duration(took) if took is not None else '-':>10}")


def print_run(run: dict) -> None:
    ok, n = _vm_totals(run)
    print(f"run {run['run_id']} of job {run['job']} ({run.get('trigger')}): {run['state']}, {ok}/{n} VMs backed up, "
          f"started {_when(run.get('started'))}, finished {_when(run.get('finished'))}")
    print(f"  {'VM':<16}{'HOST':<14}{'STATE':<11}{'TRY':>4} {'CONSISTENCY':<13}{'READ':>10}{'CHANGED':>10}"
          f"{'NEW':>10}{'SENT':>10}{'TIME':>9}  POINT / ERROR")
    for v in run.get("vms", []):
        note = v.get("point_id") or v.get("error") or ""
        if v.get("progress") and v["state"] == "running":
            p = v["progress"]
            note = f"{p['phase']} {format_size(p['done_bytes'])} / {format_size(p['total_bytes'])}"
        took = v.get("duration_s")
        print(f"  {v['vm']['name']:<16.15}{v['host']:<14.13}{v['state']:<11}{v.get('attempt', 0):>4} "
              f"{v.get('consistency') or '-':<13}{format_size(v.get('bytes_read') or 0):>10}"
              f"{format_size(v.get('bytes_changed') or 0):>10}{format_size(v.get('bytes_new') or 0):>10}"
              f"{format_size(v.get('bytes_sent') or 0):>10}{format_duration(took) if took else '-':>9}  {note}")


async def follow_run(client: Client, run_id: str, label: str, *, interval: float = 0.5,
                     progress: Progress | None = None) -> dict:
    """Poll a run until it finishes, drawing its VMs' combined progress: bytes read by the VMs that finished
    and by those running, of what those VMs plan to read (VMs not started yet are not known)."""
    progress = progress or Progress(None, label)
    with progress:
        while True:
            run = await client.backup_run(run_id)
            done = total = 0
            for vm in run.get("vms", []):
                if vm["state"] == "running" and vm.get("progress"):
                    done += vm["progress"]["done_bytes"]
                    total += vm["progress"]["total_bytes"] or 0
                elif vm["state"] in ("succeeded", "failed"):
                    done += vm.get("bytes_read") or 0
                    total += vm.get("bytes_read") or 0
            ok, n = _vm_totals(run)
            progress.label = f"{label}: {ok}/{n} VMs done"
            progress.total = total or None
            if done > progress.done:
                progress.update(done - progress.done)
            if run["state"] in FINISHED:
                return run
            await asyncio.sleep(interval)


def cmd_create(args: argparse.Namespace, call: Call) -> None:
    job = call(args, lambda c: c.create_backup_job(job_body(args)))
    _show(args, job, lambda j: (print_job(j), print(f"Created. Run it now with `chunkyard job run {j['name']}`.")))


def cmd_list(args: argparse.Namespace, call: Call) -> None:
    _show(args, call(args, lambda c: c.backup_jobs()), print_jobs)


def cmd_show(args: argparse.Namespace, call: Call) -> None:
    _show(args, call(args, lambda c: c.backup_job(args.name)), print_job)


def cmd_run(args: argparse.Namespace, call: Call) -> None:
    async def go(c: Client) -> dict:
        run_id = await c.run_backup_job(args.name, full=args.full)
        if not args.wait:
            return {"run_id": run_id}
        return await follow_run(c, run_id, f"job {args.name} run {run_id}")

    run = call(args, go)
    if not args.wait:
        _show(args, run, lambda r: print(f"Started run {r['run_id']}; follow it with "
                                         f"`chunkyard job history {args.name} --run {r['run_id']}`."))
        return
    _show(args, run, print_run)
    if run["state"] != "succeeded":
        print(f"chunkyard: run {run['run_id']} {run['state']}", file=sys.stderr)
        raise SystemExit(1)


def cmd_history(args: argparse.Namespace, call: Call) -> None:
    if args.run:
        _show(args, call(args, lambda c: c.backup_run(args.run)), print_run)
    else:
        _show(args, call(args, lambda c: c.backup_job_runs(args.name, args.limit)), print_runs)


def cmd_enable(args: argparse.Namespace, call: Call, enabled: bool) -> None:
    def line(job: dict) -> None:
        if enabled:
            print(f"Job {job['name']} is enabled; next run {_when(job.get('next_run'))}.")
        else:
            print(f"Job {job['name']} is disabled: its schedule no longer fires (`job run` still works).")

    _show(args, call(args, lambda c: set_enabled(c, args.name, enabled)), line)


def cmd_delete(args: argparse.Namespace, call: Call) -> None:
    call(args, lambda c: c.delete_backup_job(args.name))
    print(f"Deleted job {args.name}; its run history stays readable by run id.")


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more; got {value}")
    return value


def add_job_parser(sub: argparse._SubParsersAction, client_args: Callable[[argparse.ArgumentParser], None],
                   call: Call) -> None:
    p = sub.add_parser(
        "job", help="backup jobs run by pull collectors: create, list, show, run, history, enable, disable, delete",
        description="Backup jobs live on the server: which VMs (name patterns on one collector), when (a calendar "
                    "schedule), how long to keep points, and limits. The scheduler hands each VM to the collector "
                    "(`chunkyard collector run`), which reports progress and results back.",
        epilog='Example: chunkyard job create nightly --collector hv01 --vms "sql*" --schedule "mon..fri 22:00" '
               "--keep-daily 14 --keep-weekly 8; chunkyard job run nightly --wait")
    jsub = p.add_subparsers(dest="job_command", required=True, metavar="ACTION")

    sp = jsub.add_parser("create", help="define a job")
    sp.add_argument("name", help="job name")
    sp.add_argument("--collector", required=True, help="the collector that runs it (see `chunkyard collector list`)")
    sp.add_argument("--hosts", default="*", metavar="PATTERN", help="hosts to include, fnmatch-style (default *)")
    sp.add_argument("--vms", default="*", metavar="PATTERN",
                    help="VM names to include, fnmatch-style, case-insensitive (default *)")
    sp.add_argument("--schedule", required=True, help=SCHEDULE_HELP)
    for key, what in RETENTION.items():
        sp.add_argument(f"--{key.replace('_', '-')}", dest=key, type=_positive, metavar="N",
                        help=f"retention: keep {what}")
    sp.add_argument("--tier", help="cloud tier policy for the job's points (default: none)")
    sp.add_argument("--max-per-host", type=int, default=1, metavar="N",
                    help="VMs backed up at once on one host (default 1)")
    sp.add_argument("--bandwidth", type=float, metavar="MIB_S", help="upload limit per VM in MiB/s (default: none)")
    sp.add_argument("--retries", type=_positive, default=2, help="retries of a failed VM (default 2)")
    sp.add_argument("--retry-delay", type=_positive, default=300, metavar="SECONDS",
                    help="wait before a retry (default 300)")
    sp.add_argument("--missed", choices=("run", "skip"), default="run",
                    help="a run missed while the server was down: run it at start-up, or skip it (default run)")
    sp.add_argument("--disabled", action="store_true", help="create it disabled (the schedule does not fire)")
    sp.add_argument("--tenant", help="(unscoped admin token only) the tenant the job belongs to")
    client_args(sp)
    sp.set_defaults(func=lambda args: cmd_create(args, call))

    sp = jsub.add_parser("list", help="jobs with their next and last run")
    client_args(sp)
    sp.set_defaults(func=lambda args: cmd_list(args, call))

    for name, func, text in (("show", cmd_show, "a job's definition"), ("delete", cmd_delete, "delete a job")):
        sp = jsub.add_parser(name, help=text)
        sp.add_argument("name", help="job name")
        client_args(sp)
        sp.set_defaults(func=lambda args, f=func: f(args, call))
    for name, enabled, text in (("enable", True, "let the job's schedule fire again"),
                                ("disable", False, "stop the job's schedule (manual runs still work)")):
        sp = jsub.add_parser(name, help=text)
        sp.add_argument("name", help="job name")
        client_args(sp)
        sp.set_defaults(func=lambda args, e=enabled: cmd_enable(args, call, e))

    sp = jsub.add_parser("run", help="run a job now, outside its schedule")
    sp.add_argument("name", help="job name")
    sp.add_argument("--wait", action="store_true",
                    help="follow the run's progress until it ends; exit status 1 unless every VM succeeded")
    sp.add_argument("--full", action="store_true",
                    help="read every disk in full instead of only the changed blocks (still deduplicated)")
    client_args(sp)
    sp.set_defaults(func=lambda args: cmd_run(args, call))

    sp = jsub.add_parser("history", help="a job's runs, newest first, or one run's per-VM results")
    sp.add_argument("name", help="job name")
    sp.add_argument("--run", metavar="RUN_ID", help="show this run VM by VM (consistency, bytes, errors)")
    sp.add_argument("--limit", type=int, default=20, help="runs to list (default 20)")
    client_args(sp)
    sp.set_defaults(func=lambda args: cmd_history(args, call))
