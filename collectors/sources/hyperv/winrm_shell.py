"""WinRM transport: one remote shell per backup, one powershell.exe per script, JSON back.

pywinrm's `run_ps` puts the script on the command line (8 KB limit) and opens a shell per call; we
keep one shell open, start `powershell.exe -EncodedCommand <BOOTSTRAP>` in it and send the script
over stdin. The answer is the script's JSON on stdout; failures arrive as our error JSON (exit 1),
as PowerShell error records (CLIXML on stderr), as WS-Man faults, or as HTTP 401.
"""

from __future__ import annotations

import json
import logging
import re
import time
import xml.etree.ElementTree as ET
from typing import Any, Protocol

import requests
from winrm.exceptions import (
    AuthenticationError,
    WinRMError,
    WinRMOperationTimeoutError,
    WinRMTransportError,
    WSManFaultError,
)
from winrm.protocol import Protocol as WinRMProtocol

from . import scripts
from .config import HyperVConfig
from .errors import HostAccessDenied, HostTimeout, HyperVError

log = logging.getLogger(__name__)

MAX_OUTPUT = 64 << 20  # a runaway script must not exhaust the collector's memory
STDIN_PIECE = 32 << 10  # well under the host's MaxEnvelopeSizekb once base64-wrapped again
ACCESS_DENIED_CODES = {5, 0x80070005, 0x80041003}  # ERROR_ACCESS_DENIED, E_ACCESSDENIED, WBEM_E_ACCESS_DENIED
_CLIXML_ESCAPE = re.compile(r"_x([0-9A-Fa-f]{4})_")
_ACCESS_HINT = ("the account needs to be a member of 'Hyper-V Administrators' (or local Administrators) "
                "and allowed to use WinRM on the host")


class Transport(Protocol):
    """What pywinrm's Protocol needs of its transport; tests substitute a fake host here."""

    def send_message(self, message: str) -> bytes | str: ...

    def close_session(self) -> None: ...


def make_protocol(config: HyperVConfig, transport: Transport | None = None) -> WinRMProtocol:
    """A pywinrm Protocol for the configured endpoint; `transport` replaces the HTTP layer (tests)."""
    scheme = "https" if config.https else "http"
    protocol = WinRMProtocol(
        f"{scheme}://{config.host}:{config.port}/wsman",
        transport=config.transport,
        username=config.user,
        password=config.password(),
        server_cert_validation="validate" if config.verify_tls else "ignore",
        ca_trust_path=config.ca_file or "legacy_requests",
        read_timeout_sec=config.operation_timeout + 10,
        operation_timeout_sec=config.operation_timeout,
    )
    if transport is not None:
        protocol.transport = transport
    return protocol


def _unescape_clixml(text: str) -> str:
    return _CLIXML_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def clixml_errors(stderr: bytes) -> list[str]:
    """The error records in PowerShell's CLIXML stderr (progress and other records are ignored)."""
    text = stderr.decode("utf-8", "replace").lstrip("\ufeff")
    if not text.startswith("#< CLIXML"):
        return [text.strip()] if text.strip() else []
    chunks = re.findall(r"<Objs\b.*?</Objs>", text, re.S)
    if not chunks:  # cut short: keep what there is rather than lose the message
        rest = text.removeprefix("#< CLIXML").strip()
        return [rest] if rest else []
    messages = []
    for chunk in chunks:
        try:
            root = ET.fromstring(chunk)
        except ET.ParseError:
            messages.append(chunk)
            continue
        for node in root.iter():
            if node.tag.endswith("}S") and node.get("S") == "Error" and node.text:
                messages.append(_unescape_clixml(node.text))
    return ["".join(messages).strip()] if messages else []


def parse_output(op: str, stdout: bytes, stderr: bytes, exit_code: int) -> Any:
    """The `result` of a script run, or a HyperVError saying what went wrong and where."""
    text = stdout.decode("utf-8", "replace").lstrip("\ufeff").strip()
    errors = clixml_errors(stderr)
    answer: Any = None
    if text:
        try:
            answer = json.loads(text)
        except json.JSONDecodeError as e:
            if not errors:
                raise HyperVError(f"host answer to {op} is not valid JSON ({e.msg} at character {e.pos}; "
                                  f"truncated or not from our script?): {text[:200]!r}") from None
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        raise host_error(op, answer["error"])
    if errors:
        raise HyperVError(f"{op} failed on the host (exit code {exit_code}): {errors[0][:2000]}")
    if exit_code != 0:
        said = f": {text[:200]!r}" if text else " and no error message"
        raise HyperVError(f"{op} failed on the host with exit code {exit_code}{said}")
    if not isinstance(answer, dict) or "result" not in answer:
        raise HyperVError(f"host answer to {op} has no 'result': {text[:200]!r}")
    return answer["result"]


def host_error(op: str, report: dict) -> HyperVError:
    """Our catch block's report (message, category, id, hresult) as the right HyperVError."""
    message = str(report.get("message") or "no message").strip()
    category = str(report.get("category") or "")
    hresult = report.get("hresult")
    code = hresult & 0xFFFFFFFF if isinstance(hresult, int) else None
    where = f"{op} failed on the host: {message} [{category or 'no category'}; {report.get('id') or 'no id'}]"
    denied = any(words in message.lower() for words in ("access denied", "access is denied"))
    if category == "PermissionDenied" or code in ACCESS_DENIED_CODES or denied:
        return HostAccessDenied(f"{where}; {_ACCESS_HINT}")
    return HyperVError(where)


class WinRMShell:
    """A remote cmd shell that runs our scripts one at a time. Not thread-safe; one per backup."""

    def __init__(self, protocol: WinRMProtocol, *, host: str, user: str | None, command_timeout: float):
        self.protocol = protocol
        self.host = host
        self.user = user
        self.command_timeout = command_timeout
        self.shell_id: str | None = None

    def run(self, op: str, **params: scripts.Value) -> Any:
        """Run operation `op` with `params` and return its parsed `result`."""
        script = scripts.render(op, **params)
        started = time.monotonic()
        stdout, stderr, code = self._guarded(op, lambda: self._execute(op, script))
        log.debug("%s on %s: exit %s in %.2f s", op, self.host, code, time.monotonic() - started)
        return parse_output(op, stdout, stderr, code)

    def close(self) -> None:
        if self.shell_id is not None:
            shell, self.shell_id = self.shell_id, None
            try:
                self.protocol.close_shell(shell)
            except (WinRMError, WinRMTransportError, requests.RequestException, OSError) as e:
                log.warning("closing the WinRM shell on %s failed (the host expires it): %s", self.host, e)

    def _execute(self, op: str, script: str) -> tuple[bytes, bytes, int]:
        if self.shell_id is None:
            self.shell_id = self.protocol.open_shell(codepage=65001, noprofile=True)
        shell = self.shell_id
        command = self.protocol.run_command(
            shell, "powershell.exe",
            ["-NoLogo", "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass",
             "-EncodedCommand", scripts.encode_bootstrap()],
            console_mode_stdin=False)
        try:
            data = scripts.encode_stdin(script)
            for start in range(0, len(data), STDIN_PIECE):
                piece = data[start : start + STDIN_PIECE]
                self.protocol.send_command_input(shell, command, piece, end=start + STDIN_PIECE >= len(data))
            return self._collect(op, shell, command)
        finally:
            self.protocol.cleanup_command(shell, command)

    def _collect(self, op: str, shell: str, command: str) -> tuple[bytes, bytes, int]:
        deadline = time.monotonic() + self.command_timeout
        out, err, size = [], [], 0
        while True:
            if time.monotonic() > deadline:
                raise HostTimeout(f"{op} did not finish on {self.host} within {self.command_timeout:.0f} s")
            try:
                stdout, stderr, code, done = self.protocol.get_command_output_raw(shell, command)
            except WinRMOperationTimeoutError:
                continue  # no output yet: WinRM's long poll expired, ask again
            out.append(stdout)
            err.append(stderr)
            size += len(stdout) + len(stderr)
            if size > MAX_OUTPUT:
                raise HyperVError(f"{op} produced more than {MAX_OUTPUT >> 20} MiB of output on {self.host}")
            if done:
                return b"".join(out), b"".join(err), code

    def _guarded(self, op: str, call: Any) -> tuple[bytes, bytes, int]:
        """Translate pywinrm's and requests' exceptions into HyperVErrors that name the host and user."""
        who = f"{self.user or 'the current Kerberos principal'} on {self.host}"
        try:
            return call()
        except AuthenticationError as e:
            raise HostAccessDenied(f"WinRM rejected the credentials of {who}: {e}") from None
        except WSManFaultError as e:
            if e.wsman_fault_code in ACCESS_DENIED_CODES or e.code == 401:
                raise HostAccessDenied(f"WinRM denied {op} to {who}: {e.reason.strip()}; {_ACCESS_HINT}") from None
            raise HyperVError(f"WinRM fault during {op} on {self.host}: {e.reason.strip()} "
                              f"(WS-Man code {e.wsman_fault_code})") from None
        except WinRMTransportError as e:
            raise HyperVError(f"WinRM transport error during {op} on {self.host}: HTTP {e.code} "
                              f"{e.message}") from None
        except requests.exceptions.SSLError as e:
            raise HyperVError(f"TLS verification of {self.host} failed ({e}); give the host's CA as ca_file, "
                              "or fix the certificate's name") from None
        except requests.RequestException as e:
            raise HyperVError(f"cannot reach WinRM on {self.host}: {e}") from None
        except WinRMError as e:
            raise HyperVError(f"WinRM error during {op} on {self.host}: {e}") from None
