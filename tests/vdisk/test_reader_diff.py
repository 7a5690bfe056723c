"""Differencing chains: parents made by qemu, children by FATtools, checked against libvhdi and dissect.

FATtools stores the Windows-style locator `.\\parent.vhdx`; to write into a child it
looks that literal name up in the current directory, hence the odd symlinks.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from chunkyard.vdisk import VhdxError, default_parent_opener, open_vhdx

from .vhdx_helpers import MiB, apply, covered, make_child, nonzero_spans, overlaps, payload_states

SIZE = 24 * MiB
PARENT_WRITES = ("write -P 0x11 0 3M", "write -P 0x22 6M 1M", "write -P 0x23 12M 4K")
CHILD_WRITES = (
    (1000, b"\x33" * 100),  # inside one sector: FATtools copies the rest of the sector from the parent
    (2 * MiB + 1536, b"\x44" * 1536),  # sector aligned, parent has data: PARTIALLY_PRESENT
    (3 * MiB + 100, b"\x45" * 70000),  # runs from parent data into a parent hole
    (6 * MiB + 2560, bytes(512)),  # zeros over parent data must hide the parent
    (8 * MiB + 7, b"\x55" * 5000),
    (18 * MiB, b"\x66" * (2 * MiB)),  # parent block absent: FULLY_PRESENT
)


@pytest.mark.parametrize("parent_block", [MiB, 8 * MiB], ids=["parent-1M", "parent-8M"])
def test_differencing_matches_libvhdi_and_dissect(
    qemu, vhdxutils, libvhdi_read, dissect_read, tmp_path: Path, parent_block: int
) -> None:
    parent = qemu.create(tmp_path / "parent.vhdx", SIZE, block_size=parent_block)
    qemu.write(parent, *PARENT_WRITES)
    model = bytearray(qemu.raw(parent))
    child = make_child(vhdxutils, tmp_path, "child.vhdx", "parent.vhdx", CHILD_WRITES)
    apply(model, CHILD_WRITES)
    states = payload_states(child, SIZE // (2 * MiB))
    assert states[:2] == [7, 7] and states[5:7] == [0, 0]  # PARTIALLY_PRESENT, and NOT_PRESENT: parent

    with open_vhdx(child) as disk:
        assert disk.disk_type == "differencing"
        assert disk.parent is not None and disk.parent.disk_type == "dynamic"
        assert disk.parent_locator["relative_path"] == ".\\parent.vhdx"
        assert disk.block_size == 2 * MiB
        ours = disk.read(0, SIZE)
        assert ours == model
        assert disk.read(1000, 100) == b"\x33" * 100
        assert disk.read(6 * MiB + 2048, 1536) == b"\x22" * 512 + bytes(512) + b"\x22" * 512
        ranges = disk.allocated_ranges()
    assert libvhdi_read([child, parent]) == ours
    if parent_block >= 2 * MiB:  # dissect misreads parent runs that cross a parent block
        assert dissect_read(child, 2 * MiB) == ours
    for start, length in nonzero_spans(ours):
        assert covered(ranges, start, length)
    assert not overlaps(ranges, 16 * MiB, 2 * MiB)  # written nowhere in the chain
    assert not overlaps(ranges, 22 * MiB, 2 * MiB)


def test_three_level_chain(qemu, vhdxutils, libvhdi_read, tmp_path: Path) -> None:
    """libvhdi only: dissect misreads sector-bitmap runs that start at odd sectors two levels down."""
    grand = qemu.create(tmp_path / "grand.vhdx", SIZE)
    qemu.write(grand, *PARENT_WRITES)
    model = bytearray(qemu.raw(grand))
    middle_writes = ((MiB + 512, b"\x77" * 4096), (20 * MiB, b"\x78" * MiB))
    child_writes = ((MiB + 1024, b"\x79" * 512), (20 * MiB + 100, b"\x7a" * 10))
    parent = make_child(vhdxutils, tmp_path, "parent.vhdx", "grand.vhdx", middle_writes)
    child = make_child(vhdxutils, tmp_path, "child.vhdx", "parent.vhdx", child_writes)
    apply(model, middle_writes)
    apply(model, child_writes)

    with open_vhdx(child) as disk:
        assert disk.parent.parent.name.endswith("grand.vhdx")
        ours = disk.read(0, SIZE)
        ranges = disk.allocated_ranges()
    assert ours == model
    assert libvhdi_read([child, parent, grand]) == ours
    for start, length in nonzero_spans(ours):
        assert covered(ranges, start, length)
    assert not overlaps(ranges, 16 * MiB, 4 * MiB)


def test_parent_opener_for_streams(qemu, vhdxutils, tmp_path: Path) -> None:
    parent = qemu.create(tmp_path / "parent.vhdx", SIZE, block_size=2 * MiB)
    qemu.write(parent, *PARENT_WRITES)
    child = make_child(vhdxutils, tmp_path, "child.vhdx", "parent.vhdx", CHILD_WRITES)
    expected = open_vhdx(child).read(0, SIZE)
    calls = []

    def opener(locator: dict[str, str], child_name: str):
        calls.append((dict(locator), child_name))
        return (tmp_path / locator["relative_path"].replace("\\", "/")).open("rb")

    with child.open("rb") as fh, open_vhdx(fh, name="\\\\hv1\\vms\\child.vhdx", parent_opener=opener) as disk:
        assert disk.read(0, SIZE) == expected
        assert disk.parent.name == str(tmp_path / "parent.vhdx")
    assert calls[0][1] == "\\\\hv1\\vms\\child.vhdx"
    assert calls[0][0]["relative_path"] == ".\\parent.vhdx"
    assert calls[0][0]["parent_linkage"].startswith("{")

    with pytest.raises(VhdxError, match="stream without a path; pass parent_opener"):
        open_vhdx(io.BytesIO(child.read_bytes()))


def test_default_parent_opener(tmp_path: Path) -> None:
    child = tmp_path / "vm" / "disk_1A2B.avhdx"
    child.parent.mkdir()
    (tmp_path / "vm" / "disk.vhdx").write_bytes(b"")
    (tmp_path / "base.vhdx").write_bytes(b"")
    assert default_parent_opener({"relative_path": ".\\disk.vhdx"}, str(child)) == str(tmp_path / "vm" / "disk.vhdx")
    assert default_parent_opener({"relative_path": "..\\base.vhdx"}, str(child)) == str(tmp_path / "base.vhdx")
    # relative path broken (the chain was copied elsewhere): the absolute path's file name next to the child
    locator = {"relative_path": ".\\gone.vhdx", "absolute_win32_path": "C:\\Hyper-V\\VM1\\disk.vhdx"}
    assert default_parent_opener(locator, str(child)) == str(tmp_path / "vm" / "disk.vhdx")
    locator = {"volume_path": "\\\\?\\Volume{0b4f6c3e-0000-0000-0000-100000000000}\\VMs\\disk.vhdx"}
    assert default_parent_opener(locator, str(child)) == str(tmp_path / "vm" / "disk.vhdx")
    assert default_parent_opener({"relative_path": ".\\gone.vhdx"}, str(child)) is None
