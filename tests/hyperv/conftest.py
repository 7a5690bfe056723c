"""Fixtures for the Hyper-V source: a real Samba server on loopback and a lab VM behind a fake host.

The Samba server shares two folders: `D$` (an admin share, as a Windows host has one per drive) and
`vmdata` (a plain share, reached through a `paths` mapping). The lab VM's disks are qemu-img VHDX
files in those folders; the fake WinRM host (fakehost.py) reports them at their Windows paths.
"""

from __future__ import annotations

import getpass
import itertools
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from collectors.sources.hyperv import HyperVConfig, HyperVSource, parse_config
from tests.conftest import free_port, require_tool

from .fakehost import FakeDisk, FakeHyperV, FakeVm, FakeWinRM

MiB = 1 << 20
PASSWORD_ENV = "CHUNKYARD_TEST_HYPERV_PASSWORD"
_lab_numbers = itertools.count(1)


@dataclass
class Samba:
    port: int
    user: str
    password: str
    shares: dict[str, Path]  # share name -> directory
    log: Path


SMB_CONF = """[global]
  server role = standalone server
  interfaces = 127.0.0.1
  bind interfaces only = yes
  smb ports = {port}
  disable netbios = yes
  server min protocol = SMB2_10
  map to guest = never
  private dir = {root}/private
  state directory = {root}/state
  lock directory = {root}/lock
  pid directory = {root}/pid
  cache directory = {root}/cache
  ncalrpc dir = {root}/state/ncalrpc
  log file = {root}/log/smbd.log
  passdb backend = tdbsam:{root}/private/passdb.tdb
  load printers = no
  printing = bsd
  printcap name = /dev/null
  disable spoolss = yes
{shares}"""


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"smbd exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"smbd did not listen on {port}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def samba(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Samba]:
    """smbd on 127.0.0.1:<free port> with its own passdb, state and log directories."""
    smbd, smbpasswd = require_tool("smbd"), require_tool("smbpasswd")
    root = tmp_path_factory.mktemp("samba")
    for sub in ("private", "state", "lock", "pid", "cache", "log", "D", "vmdata"):
        (root / sub).mkdir()
    shares = {"D$": root / "D", "vmdata": root / "vmdata"}
    port = free_port()
    sections = "".join(f"[{name}]\n  path = {path}\n  read only = yes\n" for name, path in shares.items())
    conf = root / "smb.conf"
    conf.write_text(SMB_CONF.format(port=port, root=root, shares=sections))
    user, password = getpass.getuser(), secrets.token_urlsafe(12)
    subprocess.run([smbpasswd, "-c", str(conf), "-L", "-s", "-a", user], input=f"{password}\n{password}\n",
                   text=True, check=True, capture_output=True)
    log = root / "log" / "console.txt"
    with open(log, "wb") as out:
        proc = subprocess.Popen([smbd, "--foreground", "--no-process-group", "-s", str(conf)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_port(port, proc, log)
        yield Samba(port, user, password, shares, root / "log" / "smbd.log")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def qemu() -> tuple[str, str]:
    return require_tool("qemu-img"), require_tool("qemu-io")


def qemu_io(qemu_io_path: str, path: Path, *commands: str) -> None:
    args = [qemu_io_path, "-f", "vhdx"]
    for command in commands:
        args += ["-c", command]
    done = subprocess.run([*args, str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done.stdout + done.stderr


def qemu_raw(qemu_img: str, path: Path) -> bytes:
    out = path.with_name(path.name + ".raw")
    subprocess.run([qemu_img, "convert", "-f", "vhdx", "-O", "raw", str(path), str(out)], check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


@dataclass
class Lab:
    """One VM (two disks) on the fake host, its files on the Samba shares, and a config to reach both."""

    fake: FakeHyperV
    transport: FakeWinRM
    config: HyperVConfig
    vm: FakeVm
    qemu: tuple[str, str]

    def source(self) -> HyperVSource:
        return HyperVSource(self.config, transport=self.transport)

    def disk(self, name: str) -> FakeDisk:
        return next(d for d in self.vm.disks if d.local_path.name == name)

    def write(self, name: str, offset: int, length: int, pattern: int) -> None:
        """A guest write: into the VHDX (qemu-io) and into the fake host's change tracking."""
        disk = self.disk(name)
        qemu_io(self.qemu[1], disk.local_path, f"write -P {pattern:#x} {offset} {length}")
        self.fake.record_write(disk.windows_path, offset, length)

    def raw(self, name: str) -> bytes:
        return qemu_raw(self.qemu[0], self.disk(name).local_path)


def lab_config(samba: Samba, **overrides: object) -> HyperVConfig:
    table = {"host": "127.0.0.1", "user": samba.user, "password_env": PASSWORD_ENV, "collector_id": "col1",
             "smb_port": samba.port, "paths": {"E:\\Data": "\\\\127.0.0.1\\vmdata"}, "job_timeout": 30,
             "command_timeout": 30} | overrides
    return parse_config(table)


@pytest.fixture
def lab(samba: Samba, qemu: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> Lab:
    """VM "web01" with sys.vhdx (64 MiB, on D: via the D$ admin share, in a folder whose name needs
    quoting) and data.vhdx (32 MiB, on E:\\Data via a configured mapping)."""
    monkeypatch.setenv(PASSWORD_ENV, samba.password)
    n = next(_lab_numbers)
    folder = f"O'Brien $web-{n} `x`"
    vm_dir = samba.shares["D$"] / "Hyper-V" / folder
    (vm_dir / "Virtual Hard Disks").mkdir(parents=True)
    data_dir = samba.shares["vmdata"] / f"lab{n}"
    data_dir.mkdir()
    sys_path, data_path = vm_dir / "Virtual Hard Disks" / "sys.vhdx", data_dir / "data.vhdx"
    for path, size in ((sys_path, 64 * MiB), (data_path, 32 * MiB)):
        subprocess.run([qemu[0], "create", "-q", "-f", "vhdx", "-o", "block_size=1048576", str(path), str(size)],
                       check=True)
    qemu_io(qemu[1], sys_path, "write -P 0x11 0 3M", "write -P 0x22 10M 1M", "write -P 0x33 40M 2M")
    qemu_io(qemu[1], data_path, "write -P 0x44 1M 1M", "write -P 0x55 20M 4M")
    vm_id = f"5B3D9E6A-1C2F-4E8B-9A7D-3F2E1C0B{n:04X}"
    windows_vm = f"D:\\Hyper-V\\{folder}"
    slot = f"Microsoft:{vm_id}\\83F8638B-8DCA-4152-9EDA-2CA8B33039B4\\0\\{{}}\\L"
    vm = FakeVm(vm_id, "web01", [
        FakeDisk(f"{windows_vm}\\Virtual Hard Disks\\sys.vhdx", sys_path, slot.format(0)),
        FakeDisk(f"E:\\Data\\lab{n}\\data.vhdx", data_path, slot.format(1)),
    ], windows_vm, config_dir=vm_dir)
    fake = FakeHyperV([vm], window=40 * MiB)
    return Lab(fake, FakeWinRM(fake), lab_config(samba), vm, qemu)
