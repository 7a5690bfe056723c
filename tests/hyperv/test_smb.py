"""The data path: host paths mapped to SMB (a real smbd on loopback) or local paths, frozen VHDX and
AVHDX chains read through smbprotocol and compared with local reads of the same files."""

from __future__ import annotations

import random
import secrets
import subprocess
import threading
from pathlib import Path

import pytest

from chunkyard.vdisk import open_vhdx
from collectors.sources.hyperv import HostAccessDenied, HyperVError
from collectors.sources.hyperv.smb import HostFiles, PathMapper, open_frozen_disk
from tests.conftest import require_module
from tests.vdisk.vhdx_helpers import make_child

from .conftest import PASSWORD_ENV, MiB, Samba, lab_config, qemu_io


@pytest.mark.parametrize(("path", "expected"), [
    ("D:\\VMs\\web\\sys.vhdx", "\\\\hv01\\vms\\web\\sys.vhdx"),
    ("d:\\vms\\Web\\Sys.vhdx", "\\\\hv01\\vms\\Web\\Sys.vhdx"),  # Windows paths compare case-insensitively
    ("D:\\VMs\\gold\\base.vhdx", "/mnt/gold/base.vhdx"),  # the longer prefix wins
    ("D:\\Other\\x.vhdx", "\\\\hv01\\D$\\Other\\x.vhdx"),  # admin share
    ("C:\\ClusterStorage\\Volume1\\vm\\a.avhdx", "\\\\hv01\\C$\\ClusterStorage\\Volume1\\vm\\a.avhdx"),
    ("\\\\sofs\\share\\vm\\a.vhdx", "\\\\sofs\\share\\vm\\a.vhdx"),  # already UNC (scale-out file server)
    ("D:\\VMs\\web\\.\\x\\..\\sys.vhdx", "\\\\hv01\\vms\\web\\sys.vhdx"),
])
def test_path_mapping(path: str, expected: str) -> None:
    mapper = PathMapper("hv01", {"D:\\VMs": "\\\\hv01\\vms", "D:\\VMs\\gold": "/mnt/gold"}, admin_shares=True,
                        local=False)
    assert mapper.map(path) == expected


def test_path_mapping_refusals_and_local_mode() -> None:
    strict = PathMapper("hv01", {}, admin_shares=False, local=False)
    with pytest.raises(HyperVError, match=r"no hyperv.paths entry covers"):
        strict.map("D:\\VMs\\a.vhdx")
    with pytest.raises(HyperVError, match=r"not an absolute Windows path"):
        strict.map("relative\\a.vhdx")
    admin = PathMapper("hv01", {}, admin_shares=True, local=False)
    assert admin.map("D:\\..\\..\\etc\\passwd") == "\\\\hv01\\D$\\etc\\passwd"  # never above the share
    local = PathMapper("hv01", {"E:\\": "/srv/e"}, admin_shares=True, local=True)
    assert local.map("D:\\VMs\\a.vhdx") == "D:\\VMs\\a.vhdx"  # on the host itself
    assert local.map("E:\\VMs\\a.vhdx") == "/srv/e/VMs/a.vhdx"


@pytest.fixture
def files(samba: Samba, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(PASSWORD_ENV, samba.password)
    host_files = HostFiles(lab_config(samba))
    yield host_files
    host_files.close()


@pytest.fixture
def folder(samba: Samba) -> tuple[Path, str]:
    """A fresh folder on the D$ share: (local path, Windows path)."""
    name = f"smb-{secrets.token_hex(4)} O'Brien $x"
    (samba.shares["D$"] / name).mkdir()
    return samba.shares["D$"] / name, f"D:\\{name}"


def make_vhdx(qemu: tuple[str, str], path: Path, size: int, *writes: str) -> Path:
    subprocess.run([qemu[0], "create", "-q", "-f", "vhdx", "-o", "block_size=2097152", str(path), str(size)],
                   check=True)
    if writes:
        qemu_io(qemu[1], path, *writes)
    return path


def local_read(path: Path) -> tuple[bytes, list]:
    with open_vhdx(path) as disk:
        return disk.read(0, disk.virtual_size), disk.allocated_ranges()


def test_vhdx_over_smb_matches_local_read(files: HostFiles, folder, qemu) -> None:
    local, windows = folder
    path = make_vhdx(qemu, local / "sys.vhdx", 40 * MiB, "write -P 0x5a 1M 3M", "write -P 0xa5 33M 100K")
    disk = files.open_vhdx(f"{windows}\\sys.vhdx")
    try:
        assert disk.name == f"{windows}\\sys.vhdx"  # errors name the host path
        assert (disk.read(0, disk.virtual_size), disk.allocated_ranges()) == local_read(path)
    finally:
        disk.close()
    assert files.read_file(f"{windows}\\sys.vhdx", 64 * MiB) == path.read_bytes()
    with pytest.raises(HyperVError, match=r"larger than 1 MiB"):
        files.read_file(f"{windows}\\sys.vhdx", MiB)
    with pytest.raises(FileNotFoundError):
        files.read_file(f"{windows}\\missing.vmrs", MiB)


def test_avhdx_chain_over_smb(files: HostFiles, folder, qemu) -> None:
    """A frozen disk that is an AVHDX (the VM has user checkpoints): the parent is found through SMB."""
    vhdxutils = require_module("FATtools.vhdxutils")
    local, windows = folder
    make_vhdx(qemu, local / "sys.vhdx", 24 * MiB, "write -P 0x11 0 5M", "write -P 0x22 12M 1M")
    child_name = "sys_6A1B2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D.avhdx"
    child = make_child(vhdxutils, local, child_name, "sys.vhdx",
                       ((1000, b"\x33" * 100), (2 * MiB + 512, b"\x44" * 70000), (20 * MiB, b"\x55" * MiB)))
    disk = files.open_vhdx(f"{windows}\\{child_name}")
    try:
        assert disk.disk_type == "differencing" and disk.parent.name == f"{windows}\\sys.vhdx"
        assert (disk.read(0, disk.virtual_size), disk.allocated_ranges()) == local_read(child)
    finally:
        disk.close()
    (local / "sys.vhdx").rename(local / "moved.vhdx")
    with pytest.raises(HyperVError, match=r"parent disk not found"):
        open_frozen_disk(files, f"{windows}\\{child_name}", "0", 24 * MiB, 1)


def test_pooled_reads_in_parallel(files: HostFiles, folder, qemu) -> None:
    local, windows = folder
    path = make_vhdx(qemu, local / "data.vhdx", 64 * MiB, "write -P 0x01 0 20M", "write -P 0x02 30M 30M")
    expected, _ = local_read(path)
    with open_vhdx(path) as disk:
        disk_id, size = str(disk.virtual_disk_id), disk.virtual_size
    pool = open_frozen_disk(files, f"{windows}\\data.vhdx", disk_id, size, 3)
    rng = random.Random(7)
    jobs = [(o, min(rng.randrange(1, 9 * MiB), size - o)) for o in (rng.randrange(0, size) for _ in range(24))]
    errors: list[BaseException] = []

    def reader(part: list[tuple[int, int]]) -> None:
        try:
            for offset, length in part:
                assert pool.read(offset, length) == expected[offset : offset + length]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(jobs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors[0]
        assert 1 < len(pool._all) <= 3  # extra handles were opened for overlapping reads, no more than allowed
        assert pool.allocated_ranges() == local_read(path)[1]
    finally:
        pool.close()


def test_wrong_mapping_is_detected(files: HostFiles, folder, qemu) -> None:
    local, windows = folder
    path = make_vhdx(qemu, local / "a.vhdx", 8 * MiB)
    with open_vhdx(path) as disk:
        real = str(disk.virtual_disk_id)
    with pytest.raises(HyperVError, match=r"is not the disk the host reported.*check hyperv.paths"):
        open_frozen_disk(files, f"{windows}\\a.vhdx", "4a3c5c67-0f5b-4d4e-9d1b-5d2e3c8a1f00", 8 * MiB, 1)
    with pytest.raises(HyperVError, match=r"is not the disk the host reported"):
        open_frozen_disk(files, f"{windows}\\a.vhdx", real, 16 * MiB, 1)
    with pytest.raises(HyperVError, match=r"missing.vhdx \(mapped to \\\\127.0.0.1\\D\$.*does not exist"):
        open_frozen_disk(files, f"{windows}\\missing.vhdx", real, 8 * MiB, 1)
    (local / "junk.vhdx").write_bytes(b"not a vhdx" * 100)
    with pytest.raises(HyperVError, match=r"junk.vhdx"):
        open_frozen_disk(files, f"{windows}\\junk.vhdx", real, 8 * MiB, 1)


def test_smb_access_denied(samba: Samba, folder, qemu, monkeypatch: pytest.MonkeyPatch) -> None:
    local, windows = folder
    make_vhdx(qemu, local / "a.vhdx", 8 * MiB)
    monkeypatch.setenv(PASSWORD_ENV, "wrong-password")
    files = HostFiles(lab_config(samba))
    try:
        with pytest.raises(HostAccessDenied, match=r"SMB denied .* access to .*needs read access"):
            files.open(f"{windows}\\a.vhdx")
    finally:
        files.close()


def test_local_data_path(samba: Samba, folder, qemu, monkeypatch: pytest.MonkeyPatch) -> None:
    """data_path = "local": the collector runs on the host; here D:\\ maps to the share's directory."""
    local, windows = folder
    path = make_vhdx(qemu, local / "a.vhdx", 8 * MiB, "write -P 0x7e 1M 1M")
    monkeypatch.setenv(PASSWORD_ENV, samba.password)
    files = HostFiles(lab_config(samba, data_path="local", paths={"D:\\": str(samba.shares["D$"])}))
    disk = files.open_vhdx(f"{windows}\\a.vhdx")
    try:
        assert disk.read(0, disk.virtual_size) == local_read(path)[0]
    finally:
        disk.close()
        files.close()
