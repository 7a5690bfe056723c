"""`chunkyard lab ...`: create and drive a lab, the local stand-in Hyper-V host (collectors/sources/lab.py).

`add_lab_parser` adds the command group to the main parser; each command's `func` takes the parsed args, prints a
short summary, and raises SourceError for problems the user can fix (the main CLI prints them).
"""

from __future__ import annotations

import argparse
import time

from chunkyard.units import format_size, parse_size
from collectors.sources.lab import LabSource, churn, init_lab, lab_status, reset_tracking


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _print_status(lab: str) -> None:
    source, status = LabSource(lab), lab_status(lab)
    print(f"lab {lab}: host {source.host}, seed {source.seed}, {source.template_share:.0%} of the data shared")
    for vm in status:
        checkpoint = vm["checkpoint"]
        if checkpoint is None:
            held = "no checkpoint"
        elif isinstance(taken := checkpoint.get("taken"), float):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(taken))
            held = f"checkpoint of backup {checkpoint.get('backup_id')} (pid {checkpoint.get('pid')}) since {since}"
        else:
            held = "checkpoint held (checkpoint.json unreadable)"
        print(f"{vm['vm'].name}  id {vm['vm'].id}  {held}")
        for disk in vm["disks"]:
            info = disk["disk"]
            print(f"  {info.name:<12} {format_size(info.size):>10}  allocated {format_size(disk['allocated']):>10}"
                  f"  tracking {disk['tracking_id']}")


def cmd_init(args: argparse.Namespace) -> None:
    started = time.monotonic()
    vms = init_lab(args.dir, args.vms, args.disk_size, args.template_share, args.seed, args.disks_per_vm)
    disks = f"{args.disks_per_vm} disk{'s' if args.disks_per_vm > 1 else ''}"
    print(f"created the lab {args.dir} in {time.monotonic() - started:.1f} s: {len(vms)} VMs, each with {disks} "
          f"of {format_size(args.disk_size)}")
    _print_status(args.dir)
    print(f"next: chunkyard lab churn {args.dir} --vm {vms[0].name} --percent 2")


def cmd_churn(args: argparse.Namespace) -> None:
    result = churn(args.dir, args.vm, args.percent, args.seed)
    print(f"{args.vm}: changed {format_size(result['bytes'])}")
    for disk_id, tracking_id in result["tracking_ids"].items():
        ranges = result["ranges"][disk_id]
        print(f"  {format_size(sum(n for _, n in ranges)):>10} in {len(ranges)} ranges, new tracking id {tracking_id}")


def cmd_reset_tracking(args: argparse.Namespace) -> None:
    ids = reset_tracking(args.dir, args.vm)
    print(f"{args.vm}: change tracking reset; the next backup reads every disk in full")
    for tracking_id in ids.values():
        print(f"  new tracking id {tracking_id}")


def cmd_list(args: argparse.Namespace) -> None:
    _print_status(args.dir)


def add_lab_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Adds `lab init|churn|reset-tracking|list` to the main parser's subcommands."""
    lab = subparsers.add_parser(
        "lab", help="a local stand-in Hyper-V host for demos, tests and benchmarks",
        description="A lab is a directory of VM folders with real dynamic VHDX disks (made by qemu-img, changed by "
                    "qemu-io), small config files and a change journal that plays Resilient Change Tracking's role. "
                    "Collectors back it up like a Hyper-V host, without Windows.",
        epilog="Example: chunkyard lab init ./lab --vms 4 --disk-size 256MiB; "
               "chunkyard lab churn ./lab --vm vm01 --percent 2")
    actions = lab.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    p = actions.add_parser(
        "init", help="create a lab of VMs with realistic disks",
        description="Create VMs vm01, vm02, ... in DIR (new or empty), each with dynamic VHDX disks. About 65 % "
                    "of each disk holds data: a template share identical in every VM (same bytes at the same "
                    "offsets, like VMs cloned from one OS image) and the rest unique; about 60 % of the data is "
                    "text-like (about 3x with zstd) and the rest random. Zero regions stay unallocated. Disk "
                    "contents depend only on --seed; VM and disk ids are new every time. Needs qemu-img.")
    p.add_argument("dir", metavar="DIR", help="lab directory to create (must not exist or be empty)")
    p.add_argument("--vms", type=int, required=True, metavar="N", help="number of VMs")
    p.add_argument("--disk-size", type=_size, required=True, metavar="SIZE",
                   help="virtual size of each disk, a multiple of 4 KiB, at least 4 MiB (e.g. 256MiB, 2G)")
    p.add_argument("--template-share", type=float, default=0.5, metavar="P",
                   help="share of each disk's data that is identical across VMs, 0..1 (default 0.5)")
    p.add_argument("--disks-per-vm", type=int, default=1, metavar="K",
                   help="disks per VM: sys.vhdx, data1.vhdx, ... (default 1)")
    p.add_argument("--seed", type=int, default=1, metavar="S", help="seed for the disk contents (default 1)")
    p.set_defaults(func=cmd_init)

    p = actions.add_parser(
        "churn", help="change part of a VM's disks, like a running guest",
        description="Write new content over about P % of each disk of a VM (4 KiB-aligned extents of 4 KiB-1 MiB, "
                    "mostly over data, some into free space) through qemu-io, and record the changed ranges under "
                    "a new tracking id per disk. Refused while a backup holds a checkpoint on the VM. Needs qemu-io.")
    p.add_argument("dir", metavar="DIR", help="lab directory")
    p.add_argument("--vm", required=True, metavar="NAME", help="VM name or id")
    p.add_argument("--percent", type=float, required=True, metavar="P",
                   help="share of each disk's virtual size to change, in percent (0 < P <= 100)")
    p.add_argument("--seed", type=int, metavar="S", help="seed for where and what to write (default: random)")
    p.set_defaults(func=cmd_churn)

    p = actions.add_parser(
        "reset-tracking", help="invalidate a VM's change tracking ids (next backup reads everything)",
        description="Start a new tracking generation for every disk of a VM, as when Hyper-V loses RCT: ids "
                    "handed out before answer 'unknown', so the next backup reads every allocated range and compares "
                    "digests. Also repairs a damaged tracking.json.")
    p.add_argument("dir", metavar="DIR", help="lab directory")
    p.add_argument("--vm", required=True, metavar="NAME", help="VM name or id")
    p.set_defaults(func=cmd_reset_tracking)

    p = actions.add_parser(
        "list", help="show VMs, disks, allocated bytes, tracking ids and checkpoints",
        description="Show each VM of the lab with its id and checkpoint state, and each disk with its virtual "
                    "size, allocated bytes and current tracking id.")
    p.add_argument("dir", metavar="DIR", help="lab directory")
    p.set_defaults(func=cmd_list)
    return lab
