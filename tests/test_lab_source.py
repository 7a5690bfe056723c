"""The lab source: real qemu-img VHDX disks, a change journal in RCT's role, checkpoints that freeze churn."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import subprocess
from pathlib import Path

import pytest
import zstandard

from chunkyard.vdisk import open_vhdx
from collectors.lab_cli import add_lab_parser
from collectors.sources import SourceError
from collectors.sources import lab as labmod
from collectors.sources.lab import LabSource, churn, init_lab, reset_tracking
from tests.conftest import require_tool

MiB = 1 << 20
PAGE = 4096
SEED = 7
SHARE = 0.5


@pytest.fixture(autouse=True)
def _qemu() -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")


@pytest.fixture(scope="module")
def shared_lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two VMs of one 32 MiB disk; the tests that use it do not change the disks."""
    require_tool("qemu-img")
    path = tmp_path_factory.mktemp("shared") / "lab"
    init_lab(path, vms=2, disk_size=32 * MiB, template_share=SHARE, seed=SEED)
    return path


@pytest.fixture
def small_lab(tmp_path: Path) -> Path:
    """One VM of one 32 MiB disk, for tests that change it."""
    path = tmp_path / "lab"
    init_lab(path, vms=1, disk_size=32 * MiB, seed=SEED)
    return path


def disk_bytes(lab: Path, vm: str) -> bytes:
    with LabSource(lab).begin(vm) as backup, backup.open_disk(backup.disks[0].disk_id) as disk:
        return disk.read(0, disk.virtual_size)


def pages(ranges: list[tuple[int, int]]) -> set[int]:
    return {p for offset, length in ranges for p in range(offset, offset + length, PAGE)}


def differing_pages(a: bytes, b: bytes) -> set[int]:
    return {p for p in range(0, len(a), PAGE) if a[p : p + PAGE] != b[p : p + PAGE]}


def nonzero_pages(data: bytes) -> list[bytes]:
    return [data[p : p + PAGE] for p in range(0, len(data), PAGE) if data[p : p + PAGE].count(0) != PAGE]


def only_disk(lab: Path, vm: str = "vm01") -> str:
    return LabSource(lab)._find(vm).disks[0].disk_id


# ------------------------------------------------------------------------------------------ init


def test_disks_are_valid_vhdx_and_read_like_qemu(shared_lab: Path, tmp_path: Path) -> None:
    for vhdx in sorted(shared_lab.glob("*/*.vhdx")):
        subprocess.run(["qemu-img", "check", str(vhdx)], check=True, capture_output=True)
        raw = tmp_path / f"{vhdx.parent.name}.raw"
        subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(vhdx), str(raw)], check=True)
        with open_vhdx(vhdx) as disk:
            assert disk.disk_type == "dynamic"
            assert disk.read(0, disk.virtual_size) == raw.read_bytes()


def test_zero_regions_stay_unallocated(shared_lab: Path) -> None:
    with open_vhdx(shared_lab / "vm01" / "sys.vhdx") as disk:
        data = disk.read(0, disk.virtual_size)
        allocated = pages(disk.allocated_ranges())
    blocks = [data[b : b + MiB] for b in range(0, len(data), MiB)]
    for i, block in enumerate(blocks):
        assert (block.count(0) == MiB) == (i * MiB not in allocated), f"block {i}"
    data_share = len(nonzero_pages(data)) * PAGE / len(data)
    assert 0.55 <= data_share <= 0.72
    assert data_share < len(allocated) * PAGE / len(data) <= 0.95
    extents = labmod._layout(SEED, 0, len(data), SHARE)
    assert any(offset % MiB for offset, _, _ in extents), "extents are 4 KiB-aligned, not all 1 MiB-aligned"
    assert all(offset % PAGE == 0 and length % PAGE == 0 for offset, length, _ in extents)


def test_template_is_shared_and_the_rest_is_unique(shared_lab: Path) -> None:
    one, two = disk_bytes(shared_lab, "vm01"), disk_bytes(shared_lab, "vm02")
    extents = labmod._layout(SEED, 0, len(one), SHARE)
    template = [(o, n) for o, n, shared in extents if shared]
    unique = [(o, n) for o, n, shared in extents if not shared]
    assert template and unique
    assert all(one[o : o + n] == two[o : o + n] for o, n in template)
    assert all(one[o : o + n] != two[o : o + n] for o, n in unique)
    equal = len(nonzero_pages(one)) - len(differing_pages(one, two))
    assert abs(equal / len(nonzero_pages(one)) - SHARE) < 0.15


def test_data_compresses_as_intended(shared_lab: Path) -> None:
    """About 60 % text-like data at about 3x with zstd-1, the rest incompressible."""
    data = b"".join(nonzero_pages(disk_bytes(shared_lab, "vm01")))
    compressor = zstandard.ZstdCompressor(level=1)

    def ratio(data: bytes) -> float:  # per 1 MiB, as the pipeline compresses chunks
        return len(data) / sum(len(compressor.compress(data[i : i + MiB])) for i in range(0, len(data), MiB))

    pieces = [data[i : i + 4 * PAGE] for i in range(0, len(data), 4 * PAGE)]
    text = b"".join(p for p in pieces if len(compressor.compress(p)) < len(p) * 0.8)
    assert 0.45 <= len(text) / len(data) <= 0.75
    assert 2.6 <= ratio(text) <= 3.6
    assert 1.4 <= ratio(data) <= 2.0


def test_init_layout(shared_lab: Path) -> None:
    source = LabSource(shared_lab)
    assert [vm.name for vm in source.vms()] == ["vm01", "vm02"]
    assert len({vm.id for vm in source.vms()}) == 2
    assert source.seed == SEED and source.host.startswith("lab-")
    with source.begin(source.vms()[1].id) as backup:  # by id as well as by name
        assert backup.vm.name == "vm02"
        assert backup.consistency == "application"
        config = backup.config_files()
        assert {"vm02.vmcx", "vm02.vmgs", "vm02.vmrs"} <= set(config)
        assert all(config.values())


def test_init_refuses_a_used_directory_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(SourceError, match="not an empty directory"):
        init_lab(tmp_path / "used", vms=1, disk_size=16 * MiB)
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["keep.txt"]
    with pytest.raises(SourceError, match="multiple of 4 KiB"):
        init_lab(tmp_path / "odd", vms=1, disk_size=16 * MiB + 512)
    with pytest.raises(SourceError, match="template share"):
        init_lab(tmp_path / "odd", vms=1, disk_size=16 * MiB, template_share=1.5)
    with pytest.raises(SourceError, match="at least one VM"):
        init_lab(tmp_path / "odd", vms=0, disk_size=16 * MiB)


def test_failed_init_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise SourceError("qemu-img failed (exit 1): disk full")

    monkeypatch.setattr(labmod, "_run", broken)  # fails in the background conversion
    with pytest.raises(SourceError, match="disk full"):
        init_lab(tmp_path / "lab", vms=2, disk_size=16 * MiB)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ churn and tracking


def test_churn_records_exactly_what_changed(small_lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labmod, "QEMU_IO_BATCH", (4, MiB))  # several qemu-io runs
    before = disk_bytes(small_lab, "vm01")
    result = churn(small_lab, "vm01", 10, seed=3)
    after = disk_bytes(small_lab, "vm01")
    disk_id = only_disk(small_lab)
    ranges = result["ranges"][disk_id]
    assert pages(ranges) == differing_pages(before, after)
    assert all(offset % PAGE == 0 and length % PAGE == 0 for offset, length in ranges)
    assert abs(result["bytes"] - len(before) // 10) <= PAGE
    was_zero = [before[p : p + PAGE].count(0) == PAGE for p in pages(ranges)]
    assert any(was_zero) and not all(was_zero), "churn rewrites data and fills free space"
    with LabSource(small_lab).begin("vm01") as backup:
        assert backup.tracking_ids() == result["tracking_ids"]
    subprocess.run(["qemu-img", "check", str(small_lab / "vm01" / "sys.vhdx")], check=True, capture_output=True)


def test_changed_ranges_follow_the_journal(small_lab: Path, shared_lab: Path) -> None:
    source = LabSource(small_lab)
    disk_id = only_disk(small_lab)
    with source.begin("vm01") as backup:
        start = backup.tracking_ids()[disk_id]
        backup.end(committed=True)
    first = churn(small_lab, "vm01", 2, seed=1)
    second = churn(small_lab, "vm01", 3, seed=2)
    with source.begin("vm01") as backup:
        union = backup.changed_ranges(disk_id, start)
        assert union is not None
        assert pages(union) == pages(first["ranges"][disk_id]) | pages(second["ranges"][disk_id])
        assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(union)), "sorted, merged"
        assert backup.changed_ranges(disk_id, first["tracking_ids"][disk_id]) == second["ranges"][disk_id]
        assert backup.changed_ranges(disk_id, backup.tracking_ids()[disk_id]) == []
        assert backup.changed_ranges(disk_id, None) is None
        assert backup.changed_ranges(disk_id, f"{disk_id}:1:00000000") is None
        other = LabSource(shared_lab).begin("vm01")
        assert backup.changed_ranges(disk_id, other.tracking_ids()[other.disks[0].disk_id]) is None
        other.end(committed=False)
        with pytest.raises(SourceError, match="no disk"):
            backup.changed_ranges("nope", start)
    new_ids = reset_tracking(small_lab, "vm01")
    with source.begin("vm01") as backup:
        assert backup.tracking_ids() == new_ids
        assert backup.changed_ranges(disk_id, second["tracking_ids"][disk_id]) is None
        assert backup.changed_ranges(disk_id, new_ids[disk_id]) == []
    assert new_ids[disk_id].startswith(f"{disk_id}:2:")


def test_journal_keeps_the_last_entries(small_lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labmod, "JOURNAL_KEEP", 3)
    disk_id = only_disk(small_lab)
    ids = [churn(small_lab, "vm01", 0.1, seed=i)["tracking_ids"][disk_id] for i in range(4)]
    with LabSource(small_lab).begin("vm01") as backup:
        assert backup.changed_ranges(disk_id, ids[0]) is None  # dropped: the next backup reads in full
        assert backup.changed_ranges(disk_id, ids[1]) is not None


def test_checkpoint_freezes_the_disks(small_lab: Path) -> None:
    backup = LabSource(small_lab).begin("vm01")
    assert (small_lab / "vm01" / "checkpoint.json").exists()
    with pytest.raises(SourceError, match="VM vm01: a backup holds a checkpoint; wait for it to end"):
        churn(small_lab, "vm01", 1)
    backup.end(committed=False)
    assert not (small_lab / "vm01" / "checkpoint.json").exists()
    churn(small_lab, "vm01", 1)


def test_stale_checkpoint_is_taken_over(small_lab: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = LabSource(small_lab)
    killed = source.begin("vm01")  # its collector "dies": it never ends
    with caplog.at_level(logging.WARNING):
        current = source.begin("vm01")
    assert "taking over the checkpoint" in caplog.text
    checkpoint = json.loads((small_lab / "vm01" / "checkpoint.json").read_text())
    assert checkpoint["backup_id"] == current.backup_id != killed.backup_id
    killed.end(committed=False)  # a late release of the old backup leaves the new checkpoint alone
    assert (small_lab / "vm01" / "checkpoint.json").exists()
    current.end(committed=True)
    assert not (small_lab / "vm01" / "checkpoint.json").exists()


def test_churn_refuses_bad_percentages(small_lab: Path) -> None:
    for percent in (0, -1, 101):
        with pytest.raises(SourceError, match="percentage"):
            churn(small_lab, "vm01", percent)


# ------------------------------------------------------------------------------------------ bad lab files


def test_unknown_vm_and_missing_lab(small_lab: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"no VM 'vm09' in the lab .*; its VMs: vm01"):
        LabSource(small_lab).begin("vm09")
    with pytest.raises(SourceError, match=r"nowhere/lab\.json is missing; .*chunkyard lab init"):
        LabSource(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["lab.json", "vm01/vm.json", "vm01/tracking.json"])
@pytest.mark.parametrize("content", ["{not json", "[]", '{"host": 5, "disks": 7, "seed": "x"}', "{}"])
def test_malformed_files_are_named(small_lab: Path, name: str, content: str) -> None:
    (small_lab / name).write_text(content)
    with pytest.raises(SourceError, match=rf"{name}.* (is unreadable|is malformed)"):
        LabSource(small_lab).begin("vm01")


@pytest.mark.parametrize("name", ["lab.json", "vm01/vm.json", "vm01/tracking.json"])
def test_missing_files_are_named(small_lab: Path, name: str) -> None:
    (small_lab / name).unlink()
    with pytest.raises(SourceError, match=rf"{name} is missing; "):
        LabSource(small_lab).begin("vm01")


def test_damaged_tracking_is_repaired_by_reset(small_lab: Path) -> None:
    (small_lab / "vm01" / "tracking.json").write_text('{"disks": {}}')
    with pytest.raises(SourceError, match=r"tracking\.json is malformed .*chunkyard lab reset-tracking"):
        churn(small_lab, "vm01", 1)
    reset_tracking(small_lab, "vm01")
    with LabSource(small_lab).begin("vm01") as backup:
        assert backup.changed_ranges(backup.disks[0].disk_id, None) is None


# ------------------------------------------------------------------------------------------ CLI


def run_cli(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    add_lab_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lab = str(tmp_path / "lab")
    run_cli("lab", "init", lab, "--vms", "2", "--disk-size", "16MiB", "--disks-per-vm", "2", "--seed", "3")
    out = capsys.readouterr().out
    assert "created the lab" in out and "vm02" in out and "data1.vhdx" in out
    run_cli("lab", "churn", lab, "--vm", "vm01", "--percent", "5", "--seed", "1")
    assert "vm01: changed 1.6 MiB" in capsys.readouterr().out
    run_cli("lab", "reset-tracking", lab, "--vm", "vm02")
    assert "the next backup reads every disk in full" in capsys.readouterr().out
    backup = LabSource(lab).begin("vm01")
    run_cli("lab", "list", lab)
    out = capsys.readouterr().out
    assert f"checkpoint of backup {backup.backup_id}" in out
    assert out.count(":2:") == 2 and out.count("16.0 MiB") == 4
    backup.end(committed=True)
    with pytest.raises(SourceError, match="no VM 'vm07'"):
        run_cli("lab", "churn", lab, "--vm", "vm07", "--percent", "1")
    with pytest.raises(SystemExit):
        run_cli("lab", "init", lab, "--vms", "1", "--disk-size", "lots")
