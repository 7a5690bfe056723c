"""Independent VHDX oracles: qemu-img/qemu-io, FATtools, libvhdi-python (pyvhdi), dissect.hypervisor.

A missing oracle fails the test when CI=true (so CI can never go green by skipping)
and skips it elsewhere.
"""

from __future__ import annotations

import importlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


def _missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        _missing(f"{name} is not installed (apt-get install {package})")
    return path


def need_module(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        _missing(f"Python module {module} is not installed (pip install {package})")
        raise  # unreachable: _missing raises


class Qemu:
    """qemu-img / qemu-io wrappers for making and checking VHDX files."""

    def __init__(self, img: str, io: str) -> None:
        self._img = img
        self._io = io

    def img(self, *args: str | os.PathLike[str]) -> str:
        done = subprocess.run([self._img, *map(str, args)], capture_output=True, text=True, check=False)
        if done.returncode:
            raise AssertionError(f"qemu-img {args} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def create(self, path: Path, size: int, **options: object) -> Path:
        opts = ",".join(f"{k}={v}" for k, v in options.items())
        self.img("create", "-q", "-f", "vhdx", *(["-o", opts] if opts else []), path, str(size))
        return path

    def io(
        self, target: str | Path, *commands: str, fmt: str | None = "vhdx", read_only: bool = False
    ) -> subprocess.CompletedProcess[str]:
        args = [self._io, *(["-f", fmt] if fmt else []), *(["-r"] if read_only else [])]
        for command in commands:
            args += ["-c", command]
        return subprocess.run([*args, str(target)], capture_output=True, text=True, check=False)

    def write(self, path: Path, *commands: str) -> None:
        done = self.io(path, *commands)
        if done.returncode or "error" in done.stdout.lower() or "failed" in done.stdout.lower():
            raise AssertionError(f"qemu-io {commands} failed: {done.stdout}{done.stderr}")

    def raw(self, path: Path) -> bytes:
        """The virtual disk as qemu-img converts it to raw."""
        out = path.with_name(path.name + ".qemu.raw")
        self.img("convert", "-f", "vhdx", "-O", "raw", path, out)
        try:
            return out.read_bytes()
        finally:
            out.unlink()


@pytest.fixture
def qemu() -> Qemu:
    return Qemu(need_tool("qemu-img", "qemu-utils"), need_tool("qemu-io", "qemu-utils"))


@pytest.fixture
def vhdxutils() -> ModuleType:
    """FATtools' VHDX module (creates differencing disks, writes partial sectors)."""
    need_module("FATtools", "FATtools")
    return need_module("FATtools.vhdxutils", "FATtools")


@pytest.fixture
def libvhdi_read() -> Callable[[list[Path]], bytes]:
    """Read a whole chain with libvhdi: pass [child, parent, grandparent, ...]."""
    pyvhdi = need_module("pyvhdi", "libvhdi-python")

    def read(chain: list[Path]) -> bytes:
        files = []
        for path in chain:
            f = pyvhdi.file()
            f.open(str(path))
            files.append(f)
        for child, parent in itertools.pairwise(files):
            child.set_parent(parent)
        try:
            return files[0].read_buffer_at_offset(files[0].media_size, 0)
        finally:
            for f in files:
                f.close()

    return read


@pytest.fixture
def dissect_read() -> Callable[[Path, int], bytes]:
    """Read a disk (resolving parents itself) with dissect.hypervisor.

    Reads go block by block: dissect mishandles a read that starts inside one block and
    runs into the next (it does not clip to the block end).
    """
    vhdx = need_module("dissect.hypervisor.disk.vhdx", "dissect.hypervisor")

    def read(path: Path, step: int) -> bytes:
        disk = vhdx.VHDX(path)
        try:
            parts = []
            for offset in range(0, disk.size, step):
                disk.seek(offset)
                parts.append(disk.read(min(step, disk.size - offset)))
            return b"".join(parts)
        finally:
            layer = disk
            while layer is not None:
                layer.fh.close()
                layer = layer.parent

    return read


@pytest.fixture
def dissect_vhdx() -> ModuleType:
    return need_module("dissect.hypervisor.disk.vhdx", "dissect.hypervisor")
