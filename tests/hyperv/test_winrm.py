"""The WinRM layer: WS-Man exchanges through a fake transport, and what a host's output can look like.

The host is faked at pywinrm's transport boundary (no Windows host can run here); the envelopes and
outputs are modelled on recorded WinRM traffic and documented PowerShell behaviour (tests/hyperv/recorded).
Malformed output of every kind must become a clear HyperVError, never a crash.
"""

from __future__ import annotations

import string

import pytest
import requests
from winrm.exceptions import InvalidCredentialsError, WinRMTransportError

from collectors.sources.hyperv import HostAccessDenied, HostTimeout, HyperVError, parse_config
from collectors.sources.hyperv.winrm_shell import WinRMShell, clixml_errors, make_protocol, parse_output
from tests.hyperv import fakehost

from .conftest import PASSWORD_ENV


@pytest.fixture
def shell_and_fake(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(PASSWORD_ENV, "pw")
    config = parse_config({"host": "hv01.lab.example", "user": "LAB\\svc-backup", "password_env": PASSWORD_ENV})
    fake = fakehost.FakeHyperV([])
    transport = fakehost.FakeWinRM(fake)
    shell = WinRMShell(make_protocol(config, transport), host=config.host, user=config.user, command_timeout=5)
    yield shell, fake, transport
    shell.close()


def recorded_bytes(name: str) -> bytes:
    return (fakehost.RECORDED / name).read_bytes()


# ---------------------------------------------------------------------------------------------- parse_output


def test_answer_with_bom_and_progress_noise() -> None:
    stdout = "\ufeff".encode() + recorded_bytes("method_done.json") + b"\r\n"
    assert parse_output("x", stdout, recorded_bytes("stderr_progress_only.clixml"), 0) == {
        "ReturnValue": 0, "Job": None, "Result": None}


@pytest.mark.parametrize(("stdout", "stderr", "code", "error", "message"), [
    (b'{"result":{"ReturnValue":40', b"", 0, HyperVError, "not valid JSON .*truncated"),
    (b"WARNING: something\r\n", b"", 0, HyperVError, "not valid JSON"),
    (b"", b"", 0, HyperVError, "has no 'result'"),
    (b"[1, 2]", b"", 0, HyperVError, "has no 'result'"),
    (b'{"answer": 1}', b"", 0, HyperVError, "has no 'result'"),
    (b"", b"", 1, HyperVError, "exit code 1 and no error message"),
    (b'{"result": 1}', b"", 3, HyperVError, "exit code 3: .*result"),
    (b'{"error": {"message": "Msvm_ComputerSystem with Name X not found", "category": "OperationStopped"}}', b"", 1,
     HyperVError, "x failed on the host: Msvm_ComputerSystem with Name X not found .OperationStopped"),
    (b'{"error": "not an object"}', b"", 1, HyperVError, "exit code 1: .*not an object"),
    (b'{"error": {}}', b"", 1, HyperVError, "no message"),
    (b"", b"plain text on stderr", 1, HyperVError, "plain text on stderr"),
])
def test_malformed_output(stdout: bytes, stderr: bytes, code: int, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        parse_output("x", stdout, stderr, code)


def test_recorded_error_reports() -> None:
    with pytest.raises(HostAccessDenied, match=r"Access denied .*Hyper-V Administrators"):
        parse_output("vms", recorded_bytes("error_access_denied.json"), b"", 1)
    with pytest.raises(HyperVError, match=r"cannot find the file specified.*ObjectNotFound") as failure:
        parse_output("changes", recorded_bytes("error_file_not_found.json"), b"", 1)
    assert not isinstance(failure.value, HostAccessDenied)
    with pytest.raises(HyperVError, match=r"Msvm_ComputerSystem with Name 5B3D9E6A-.* not found .OperationStopped"):
        parse_output("inventory", recorded_bytes("error_vm_not_found.json"), b"", 1)


def test_clixml_error_records() -> None:
    stderr = recorded_bytes("stderr_command_not_found.clixml")
    (message,) = clixml_errors(stderr)
    assert message.startswith("The term 'Get-CimInstance' is not recognized")
    assert "\r\n" in message and "_x000D_" not in message and "Preparing modules" not in message
    with pytest.raises(HyperVError, match=r"vms failed on the host .exit code 1.: The term 'Get-CimInstance'"):
        parse_output("vms", b"", stderr, 1)
    with pytest.raises(HyperVError, match=r"not recognized"):  # an error record beats a plausible answer
        parse_output("vms", b'{"result": []}', stderr, 0)
    assert clixml_errors(recorded_bytes("stderr_progress_only.clixml")) == []
    assert clixml_errors(b"#< CLIXML\r\n<Objs><S S='Error'>cut short") == ["<Objs><S S='Error'>cut short"]


# ---------------------------------------------------------------------------------------------- the shell


def test_long_answer_over_several_receives_after_operation_timeouts(shell_and_fake) -> None:
    shell, fake, transport = shell_and_fake
    fake.queue["vms"].append(fake_answer("vms.json"))
    transport.timeouts_before_output = 2  # WinRM's long poll expires twice before the output is ready
    vms = shell.run("vms")
    assert [vm["Name"] for vm in vms] == ["web01", "legacy01", "appliance01", "O'Brien & Sons $vm `test`"]
    fake.queue["inventory"].append(fake_answer("inventory.json"))
    assert len(shell.run("inventory", VmId="5B3D9E6A-1C2F-4E8B-9A7D-3F2E1C0B9A88")["Snapshots"]) == 3
    assert transport.opened == 1 and len(transport.shells) == 1  # one shell, two commands
    assert fake.calls == [("vms", {}), ("inventory", {"VmId": "5B3D9E6A-1C2F-4E8B-9A7D-3F2E1C0B9A88"})]
    shell.close()
    assert transport.closed == 1 and not transport.shells


def fake_answer(name: str) -> fakehost.Answer:
    return fakehost.Answer.file(name)


def test_rejected_credentials(shell_and_fake) -> None:
    shell, _, transport = shell_and_fake
    transport.fail_next = InvalidCredentialsError("the specified credentials were rejected by the server")
    with pytest.raises(HostAccessDenied, match=r"WinRM rejected the credentials of LAB\\svc-backup on hv01"):
        shell.run("vms")


def test_access_denied_fault(shell_and_fake) -> None:
    shell, _, transport = shell_and_fake
    fault = string.Template((fakehost.RECORDED / "wsman" / "fault_access_denied.xml").read_text()).substitute(
        message_id="1", relates_to="uuid:2", host="HV01")
    transport.fail_next = WinRMTransportError("http", 500, fault)
    with pytest.raises(HostAccessDenied, match=r"WinRM denied vms to .*Access is denied"):
        shell.run("vms")


def test_unreachable_host_and_http_errors(shell_and_fake) -> None:
    shell, _, transport = shell_and_fake
    transport.fail_next = requests.exceptions.ConnectionError("connection refused")
    with pytest.raises(HyperVError, match=r"cannot reach WinRM on hv01.lab.example"):
        shell.run("vms")
    transport.fail_next = requests.exceptions.SSLError("certificate verify failed")
    with pytest.raises(HyperVError, match=r"TLS verification of hv01.lab.example failed.*ca_file"):
        shell.run("vms")
    transport.fail_next = WinRMTransportError("http", 503, "Service Unavailable")
    with pytest.raises(HyperVError, match=r"HTTP 503"):
        shell.run("vms")


def test_command_timeout(shell_and_fake) -> None:
    shell, fake, transport = shell_and_fake
    shell.command_timeout = 0.2
    transport.timeouts_before_output = 10**9  # the script never produces output
    fake.queue["vms"].append(fake_answer("vms.json"))
    with pytest.raises(HostTimeout, match=r"vms did not finish on hv01.lab.example within 0 s"):
        shell.run("vms")
    assert not transport.commands, "the command was signalled to terminate"
