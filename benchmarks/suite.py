"""The fleet benchmark suite: a realistic VM fleet (benchmarks.fleet), then per run the machine limits measured on
the fleet's own data, ingest (benchmarks.ingest), restore (benchmarks.restore) and restic/borg side by side
(benchmarks.peers). Prints one table per benchmark, each row the median of the runs with min–max, and writes
everything (every run's rows and details, machine, commit) as JSON to benchmarks/out/.

    python -m benchmarks.suite --scale smoke     # CI (make bench-smoke): 1 run, about 2 minutes with a cached fleet
    python -m benchmarks.suite --scale small     # make bench: 3 runs, about 30 minutes
    python -m benchmarks.suite --scale full      # tens of GiB, 1 run, hours: run it rarely, the machine is shared
    python -m benchmarks.suite --only ingest     # one benchmark (also: python -m benchmarks.ingest)

A missed target is a finding, not a failure: the exit status is non-zero only when something breaks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import ingest, peers, restore
from .common import (
    TIME,
    MiB,
    Row,
    aggregate,
    elapsed,
    format_table,
    machine_info,
    measure_limits,
    source_state,
    write_json,
)
from .fleet import SCALES, Fleet, describe, load_or_build, sample_chunks

BENCHMARKS = ("ingest", "restore", "peers")
OUT = Path(__file__).resolve().parent / "out"
TOOLS = ("qemu-img", "qemu-io", "mkfs.ext4", "debugfs", "dumpe2fs", TIME)
PEER_TOOLS = ("restic", "borg")
PROBE_MIB = {"smoke": (32, 64, 256)}  # fleet sample, disk probe, loopback transfer
DEFAULT_PROBE_MIB = (128, 256, 1024)
TABLES = (  # (key, heading, limit column)
    ("limits", "Machine limits (same run, fleet data)", "machine limit"),
    ("ingest", "Ingest (1 MiB chunks)", "machine limit"),
    ("chunk sizes", "Chunk size: 256 KiB / 1 MiB / 4 MiB on the same days (limit column: the 1 MiB number)",
     "1 MiB chunks"),
    ("restore", "Restore", "machine limit"),
    ("peers", "Chunkyard beside restic and borg (limit column: the peer's number; ratio = Chunkyard ÷ peer)",
     "peer"),
)


def check_tools(only: Sequence[str]) -> None:
    """Fail before a long run starts, not in its middle, when a tool is missing."""
    missing = [t for t in (*TOOLS, *(PEER_TOOLS if "peers" in only else ())) if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run benchmarks/install-peers.sh")


def one_run(fleet: Fleet, only: Sequence[str], work: Path) -> dict:
    """Limits, then the chosen benchmarks, on a fresh work directory; every table's rows of this run."""
    sample, disk, loopback = PROBE_MIB.get(fleet.scale.name, DEFAULT_PROBE_MIB)
    work.mkdir(parents=True)
    # A lab copy plus repositories (ingest), or sparse raw images plus three repositories and a restore (peers).
    need = int(fleet.allocated_bytes * max(1.2 + 0.3 * len(fleet.scale.chunk_sizes), 1.8))
    if shutil.disk_usage(work).free < need:
        raise SystemExit(f"a {fleet.scale.name} run needs about {need >> 30} GiB free in {work}")
    print("limits: codecs on fleet data, disk, loopback HTTP ...", flush=True)
    limits = measure_limits(sample_chunks(fleet, sample * MiB), work, disk_bytes=disk * MiB,
                            loopback_bytes=loopback * MiB)
    tables: dict[str, list[Row]] = {"limits": limits.rows()}
    details: dict = {"limits": limits.to_json()}
    rct_s = None
    if "ingest" in only:
        result = ingest.run(fleet, work / "ingest", limits)
        tables["ingest"], tables["chunk sizes"] = result["rows"], result["chunk_rows"]
        details["ingest"] = result["details"]
        rct_s = sum(b["seconds"] for day in range(1, fleet.scale.days + 1)
                    for b in result["details"]["phases"]["1 MiB"][f"day {day}"])
    if "restore" in only:
        repository = result["repository"] if "ingest" in only else restore.prepare(fleet, work / "restore")
        out = restore.run(fleet, work / "restore", limits, repository)
        tables["restore"], details["restore"] = out["rows"], out["details"]
    shutil.rmtree(work / "ingest", ignore_errors=True)  # room for the peers' images and repositories
    if "peers" in only:
        out = peers.run(fleet, work / "peers", rct_s)
        tables["peers"], details["peers"] = out["rows"], out["details"]
    return {"tables": tables, "details": details}


def report(per_run: Sequence[dict[str, list[Row]]], heading: str) -> dict[str, list[Row]]:
    """Print the headline and one table per benchmark over the runs' tables; return the aggregated tables."""
    tables = {key: aggregate([r[key] for r in per_run]) for key, _, _ in TABLES if per_run[0].get(key)}
    headline = [r for key in ("ingest", "restore", "peers") for r in tables.get(key, []) if r.target is not None]
    print(f"\n{heading}\n")
    print("## Headline: DESIGN §7 targets\n")
    print(format_table(headline, "limit / peer"))
    for key, title, limit_head in TABLES:
        if key in tables:
            print(f"\n## {title}\n")
            print(format_table(tables[key], limit_head))
    missed = [r.name for r in headline if r.passed is False]
    print(f"\n{len(missed)} target(s) missed{': ' + '; '.join(missed) if missed else ''}")
    return tables


def reprint(path: Path) -> int:
    """`--report`: the tables of a saved run, aggregated again (after a change to the tables, say)."""
    doc = json.loads(path.read_text())
    per_run = [{k: [Row.from_json(r) for r in rows] for k, rows in run["tables"].items()} for run in doc["per_run"]]
    print(doc["fleet_description"])
    report(per_run, f"Fleet: {doc['scale']}, {doc['runs']} run(s), {doc['machine']['timestamp']}, commit "
                    f"{(doc['source']['commit'] or '?')[:7]}; {doc['machine']['cpu']}, {doc['machine']['nproc']} cores")
    if doc["contended_phases"]:
        print(f"\nWARNING: other processes used more than 0.2 core during: {', '.join(doc['contended_phases'])}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=SCALES, default="smoke")
    parser.add_argument("--runs", type=int, help="runs to take the median of (default: the scale's)")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, help="run only this benchmark (repeatable)")
    parser.add_argument("--json", type=Path, help="where to write the results (default benchmarks/out/<name>.json)")
    parser.add_argument("--keep", action="store_true", help="keep each run's work directory under benchmarks/out")
    parser.add_argument("--rebuild-fleet", action="store_true", help="build the fleet again, even if cached")
    parser.add_argument("--report", type=Path, metavar="JSON", help="print the tables of a saved run; run nothing")
    args = parser.parse_args(argv)
    if args.report:
        return reprint(args.report)
    only = args.only or list(BENCHMARKS)
    scale = SCALES[args.scale]
    runs = args.runs or scale.runs
    name = "suite" if only == list(BENCHMARKS) else "-".join(only)
    json_path = args.json or OUT / f"{name}-{scale.name}.json"
    check_tools(only)
    began = time.perf_counter()
    info, source = machine_info(), source_state()
    fleet = load_or_build(scale, rebuild=args.rebuild_fleet)
    print(describe(fleet), "\n", flush=True)
    results = []
    for n in range(runs):
        print(f"=== run {n + 1} of {runs} ===", flush=True)
        work = OUT / "work" / f"{scale.name}-run{n + 1}"
        shutil.rmtree(work, ignore_errors=True)
        started = time.perf_counter()
        try:
            results.append(one_run(fleet, only, work) | {"seconds": elapsed(started)})
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    tables = report([r["tables"] for r in results],
                    f"Fleet: {fleet.scale.name}, {runs} run(s); {info['cpu']}, {info['nproc']} cores")
    contended = sorted({p for r in results for d in r["details"].values() if isinstance(d, dict)
                        for p in d.get("contended", [])})
    if contended:
        print(f"\nWARNING: other processes used more than 0.2 core during: {', '.join(contended)}")
    duration = elapsed(began)
    write_json(json_path, {
        "benchmark": name, "scale": scale.name, "runs": runs,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.suite",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": info, "source": source, "duration_s": duration, "fleet": fleet.to_json(),
        "fleet_description": describe(fleet), "contended_phases": contended,
        "tables": {key: [r.to_json() for r in rows] for key, rows in tables.items()},
        "per_run": [{"seconds": r["seconds"], "details": r["details"],
                     "tables": {k: [row.to_json() for row in rows] for k, rows in r["tables"].items()}}
                    for r in results]})
    print(f"{duration:.0f} s; JSON: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
