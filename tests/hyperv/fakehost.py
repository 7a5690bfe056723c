"""A fake Hyper-V host behind pywinrm's transport boundary.

No Windows host can run here, so the host is faked where pywinrm hands a SOAP envelope to its HTTP
transport: `FakeWinRM.send_message(xml)` parses the WS-Man action (Create, Command, Send, Receive,
Signal, Delete) and answers with envelopes modelled on recorded WinRM traffic (the shapes pywinrm's
own tests replay through `TransportStub`; tests/hyperv/recorded/wsman). The script that arrives over
stdin is parsed with the tree-sitter PowerShell grammar (the [test] extra tree-sitter-powershell);
its `$P_*` parameter literals are decoded with PowerShell's quoting rules, so a quoting bug shows up
as a wrong value, not only as a parse error.

`FakeHyperV` plays the host's WMI: VMs whose disks are real VHDX files (served to the collector by
a real Samba server), recovery checkpoints, reference points, RCT ids, jobs that run and then
complete. Its answers are checked against the recorded answers in tests/hyperv/recorded, so they
have the shapes (and value formats: upper-case GUIDs, `\\/Date(ms)\\/`, WMI return codes) of what
the scripts print on a real host. Tests can queue recorded answers (`fake.queue`) or refuse a method
(`fake.refuse`) to play failures: job failed, access denied, invalid RCT id, non-JSON output.
"""

from __future__ import annotations

import base64
import functools
import json
import string
import uuid
import xml.etree.ElementTree as ET
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from winrm.exceptions import WinRMTransportError

from chunkyard.vdisk import open_vhdx
from collectors.sources.hyperv import scripts
from tests.conftest import require_module

RECORDED = Path(__file__).parent / "recorded"
NS = {"s": "http://www.w3.org/2003/05/soap-envelope", "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
      "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
      "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"}
SHELL = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/"
TRANSFER = "http://schemas.xmlsoap.org/ws/2004/09/transfer/"
RECOVERY = "Microsoft:Hyper-V:Snapshot:Recovery"


# ------------------------------------------------------------------------------------ recorded answers


def recorded(name: str) -> Any:
    return json.loads((RECORDED / name).read_text())


@dataclass
class Answer:
    """What powershell.exe left behind: stdout, stderr, exit code."""

    stdout: bytes
    stderr: bytes = b""
    exit_code: int = 0

    @classmethod
    def file(cls, name: str) -> Answer:
        """A recorded answer: JSON (stdout; exit 1 when it is an error report) or CLIXML (stderr, exit 1)."""
        raw = (RECORDED / name).read_bytes()
        if name.endswith(".clixml"):
            return cls(b"", raw, 1)
        return cls(raw, b"", 1 if b'"error"' in raw[:10] else 0)

    @classmethod
    def result(cls, value: Any) -> Answer:
        return cls(json.dumps({"result": value}, separators=(",", ":")).encode())


def same_shape(sample: Any, value: Any, where: str = "answer") -> None:
    """Assert `value` has the keys and JSON types of the recorded `sample` (lists: their first items)."""
    if isinstance(sample, dict):
        assert isinstance(value, dict), f"{where}: {value!r:.80} is not an object"
        assert set(sample) == set(value), f"{where}: keys {sorted(value)} != recorded {sorted(sample)}"
        for key in sample:
            if sample[key] is not None and value[key] is not None:
                same_shape(sample[key], value[key], f"{where}.{key}")
    elif isinstance(sample, list):
        assert isinstance(value, list), f"{where}: {value!r:.80} is not a list"
        if sample and value:
            same_shape(sample[0], value[0], f"{where}[0]")
    else:
        assert isinstance(value, type(sample)), f"{where}: {value!r:.80} is not {type(sample).__name__}"


SHAPES = {
    "vms": "vms.json", "inventory": "inventory.json", "job": "job_completed.json",
    "job_result": "job_result_snapshot.json", "checkpoint": "checkpoint.json",
    "reference_point": "reference_point.json", "changes": "changes_first_window.json",
}


# ------------------------------------------------------------------------------------ PowerShell


@functools.cache
def parser() -> Any:
    """The tree-sitter PowerShell parser (a test dependency: missing fails under CI=true, else skips)."""
    tree_sitter = require_module("tree_sitter")
    return tree_sitter.Parser(tree_sitter.Language(require_module("tree_sitter_powershell").language()))


def syntax_errors(script: str) -> list[str]:
    """ERROR and MISSING nodes of the tree-sitter parse, as 'line:col text'."""
    found = []

    def walk(node: Any) -> None:
        if node.type == "ERROR" or node.is_missing:
            found.append(f"{node.start_point[0] + 1}:{node.start_point[1]} {node.type} "
                         f"{node.text.decode(errors='replace')[:60]!r}")
        for child in node.children:
            walk(child)

    walk(parser().parse(script.encode()).root_node)
    return found


def _literal(node: Any) -> Any:
    """Decode the literal a `$P_x = ...` assignment binds, with PowerShell's rules."""
    text = node.text.decode()
    if node.type == "verbatim_string_characters":
        body = text[1:-1]
        for quote in scripts.SINGLE_QUOTES:
            body = body.replace(quote * 2, quote)
        return body
    if node.type == "decimal_integer_literal":
        return int(text)
    if node.type == "variable" and text.lower() in ("$true", "$false", "$null"):
        return {"$true": True, "$false": False, "$null": None}[text.lower()]
    if node.child_count == 1:
        return _literal(node.children[0])
    raise AssertionError(f"not a literal: {node.type} {text!r:.60}")


def parse_script(script: str) -> tuple[str, dict[str, Any]]:
    """(operation, parameters) of a script rendered by scripts.render, checked with the grammar."""
    errors = syntax_errors(script)
    assert not errors, f"the script does not parse: {errors[:5]}"
    first, _, _ = script.partition("\n")
    assert first.startswith(scripts.OP_MARKER), first
    params = {}
    root = parser().parse(script.encode()).root_node
    statements = [n for top in root.children if top.type == "statement_list" for n in top.children]
    for statement in statements:
        assignment = statement.children[0] if statement.children else None
        if assignment is None or assignment.type != "assignment_expression":
            continue
        target = assignment.children[0].text.decode()
        if target.startswith("$P_"):
            value = assignment.children[-1]
            while value.child_count == 1 and value.type not in ("verbatim_string_characters",):
                value = value.children[0]
            params[target[3:]] = _literal(value)
    return first[len(scripts.OP_MARKER):], params


# ------------------------------------------------------------------------------------ WS-Man


def _template(name: str, **values: str) -> str:
    return string.Template((RECORDED / "wsman" / name).read_text()).substitute(values)


class FakeWinRM:
    """pywinrm's transport, answering WS-Man with recorded envelopes and running scripts on `host`."""

    def __init__(self, host: FakeHyperV, name: str = "hv01.lab.example"):
        self.host = host
        self.name = name
        self.shells: set[str] = set()
        self.commands: dict[str, dict] = {}
        self.fail_next: Exception | None = None  # raised by the next send_message (401, 500 fault)
        self.timeouts_before_output = 0  # Receive answers with an OperationTimeout fault this often first
        self.opened = self.closed = 0

    def close_session(self) -> None:
        pass

    def send_message(self, message: str) -> bytes:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        root = ET.fromstring(message)
        action = root.findtext("s:Header/a:Action", namespaces=NS)
        message_id = root.findtext("s:Header/a:MessageID", namespaces=NS)
        shell = root.findtext("s:Header/w:SelectorSet/w:Selector[@Name='ShellId']", namespaces=NS)
        ids = {"relates_to": message_id, "message_id": str(uuid.uuid4()).upper(), "host": self.name}
        if action == TRANSFER + "Create":
            options = {o.get("Name"): o.text for o in root.iterfind("s:Header/w:OptionSet/w:Option", NS)}
            assert options.get("WINRS_CODEPAGE") == "65001", options
            shell = str(uuid.uuid4()).upper()
            self.shells.add(shell)
            self.opened += 1
            return _template("create_response.xml", shell_id=shell, owner="LAB\\svc-backup", **ids).encode()
        assert shell in self.shells, f"{action} for unknown shell {shell}"
        if action == TRANSFER + "Delete":
            self.shells.discard(shell)
            self.closed += 1
            return _template("delete_response.xml", **ids).encode()
        body = root.find("s:Body", NS)
        if action == SHELL + "Command":
            return self._command(body, ids)
        if action == SHELL + "Send":
            stream = body.find("rsp:Send/rsp:Stream", NS)
            command = self.commands[stream.get("CommandId")]
            command["stdin"] += base64.b64decode(stream.text or "")
            if stream.get("End") == "true":
                script = base64.b64decode(command["stdin"]).decode("utf-8")
                command["output"] = self.host.run_script(script)
            return _template("send_response.xml", **ids).encode()
        if action == SHELL + "Receive":
            return self._receive(body, ids)
        if action == SHELL + "Signal":
            self.commands.pop(body.find("rsp:Signal", NS).get("CommandId"), None)
            return _template("signal_response.xml", **ids).encode()
        raise AssertionError(f"unexpected WS-Man action {action}")

    def _command(self, body: ET.Element, ids: dict) -> bytes:
        assert body.findtext("rsp:CommandLine/rsp:Command", namespaces=NS) == "powershell.exe"
        arguments = body.findtext("rsp:CommandLine/rsp:Arguments", namespaces=NS).split()
        assert len(" ".join(arguments)) < 8000, "the command line must stay under cmd.exe's 8191 characters"
        encoded = arguments[arguments.index("-EncodedCommand") + 1]
        assert base64.b64decode(encoded).decode("utf-16-le") == scripts.BOOTSTRAP
        command = str(uuid.uuid4()).upper()
        self.commands[command] = {"stdin": b"", "output": None, "sent": 0, "timeouts": self.timeouts_before_output}
        return _template("command_response.xml", command_id=command, **ids).encode()

    def _receive(self, body: ET.Element, ids: dict) -> bytes:
        command_id = body.find("rsp:Receive/rsp:DesiredStream", NS).get("CommandId")
        command = self.commands[command_id]
        assert command["output"] is not None, "Receive before the script's stdin was closed"
        if command["timeouts"]:
            command["timeouts"] -= 1
            raise WinRMTransportError("http", 500, _template("fault_operation_timeout.xml", **ids))
        answer: Answer = command["output"]
        # Long output arrives over two Receive rounds, as WinRM does once its buffer fills.
        half = (len(answer.stdout) + 1) // 2 if len(answer.stdout) > 2000 else len(answer.stdout)
        start = command["sent"]
        chunk = answer.stdout[start : start + half] if start < len(answer.stdout) else b""
        command["sent"] = start + len(chunk)
        done = command["sent"] >= len(answer.stdout)
        streams = []
        for name, data in (("stdout", chunk), ("stderr", answer.stderr if done else b"")):
            if data:
                streams.append(f'            <rsp:Stream Name="{name}" CommandId="{command_id}">'
                               f'{base64.b64encode(data).decode()}</rsp:Stream>')
        if done:
            streams += [f'            <rsp:Stream Name="{n}" CommandId="{command_id}" End="true"></rsp:Stream>'
                        for n in ("stdout", "stderr")]
        return _template("receive_response.xml", command_id=command_id, streams="\n".join(streams),
                         state="Done" if done else "Running",
                         exit_code=f"<rsp:ExitCode>{answer.exit_code}</rsp:ExitCode>" if done else "",
                         **ids).encode()


# ------------------------------------------------------------------------------------ the host


def wmi_guid(value: uuid.UUID | str) -> str:
    return str(value).upper()


def rct_id(tracking: uuid.UUID, generation: int) -> str:
    return f"rctX:{str(tracking).replace('-', ':')}:{generation:08x}"


@dataclass
class FakeDisk:
    windows_path: str
    local_path: Path
    slot: str  # the VM's Msvm_StorageAllocationSettingData InstanceID for this drive
    tracking: uuid.UUID = field(default_factory=uuid.uuid4)
    generation: int = 1
    writes: list[tuple[int, int, int]] = field(default_factory=list)  # (generation, offset, length)
    rct_valid: bool = True

    @property
    def virtual_disk_id(self) -> str:
        with open_vhdx(self.local_path) as disk:
            return wmi_guid(disk.virtual_disk_id)

    def info(self) -> dict:
        with open_vhdx(self.local_path) as disk:
            return {"Path": self.windows_path, "VirtualDiskId": wmi_guid(disk.virtual_disk_id),
                    "Size": disk.virtual_size, "Format": 3}


@dataclass
class FakeVm:
    id: str
    name: str
    disks: list[FakeDisk]
    config_root: str
    config_dir: Path | None = None  # local folder behind config_root: checkpoints put their .vmcx/.vmgs here
    state: int = 2  # EnabledState: 2 running, 3 off, 6 saved
    application_consistent: bool = True  # guest VSS (Backup integration service) works
    crash_consistent: bool = True
    version: str = "9.0"


class FakeHyperV:
    """The WMI side of a Hyper-V host, enough for the Hyper-V source's scripts."""

    def __init__(self, vms: list[FakeVm], *, window: int | None = None):
        self.vms = {vm.id: vm for vm in vms}
        self.window = window  # GetVirtualDiskChanges processes at most this many bytes per call
        self.calls: list[tuple[str, dict]] = []
        self.queue: dict[str, deque[Answer]] = defaultdict(deque)
        self.refuse: dict[str, str] = {}  # method op -> ErrorDescription of a job that fails once
        self.snapshots: dict[str, dict] = {}
        self.points: dict[str, dict] = {}
        self.jobs: dict[str, deque[dict]] = {}
        self.job_results: dict[str, str] = {}
        self.state_changes: list[tuple[str, int]] = []

    def ops(self, name: str) -> list[dict]:
        return [params for op, params in self.calls if op == name]

    def record_write(self, windows_path: str, offset: int, length: int) -> None:
        """Tell RCT about a guest write (the test makes the same write to the file)."""
        disk = self._disk(windows_path)
        disk.writes.append((disk.generation, offset, length))

    def add_snapshot(self, vm_id: str, name: str, kind: str = RECOVERY) -> str:
        instance = f"Microsoft:{wmi_guid(uuid.uuid4())}"
        self.snapshots[instance] = {"vm": vm_id, "name": name, "type": kind, "created": 1795561200000}
        return instance

    # -- script execution

    def run_script(self, script: str) -> Answer:
        op, params = parse_script(script)
        self.calls.append((op, params))
        if self.queue[op]:
            return self.queue[op].popleft()
        if op in self.refuse:
            return Answer.result(self._job(False, text=self.refuse.pop(op)))
        value = getattr(self, f"op_{op}")(**params)
        if isinstance(value, Answer):
            return value
        if op in SHAPES:
            same_shape(recorded(SHAPES[op])["result"], value, op)
        return Answer.result(value)

    def _disk(self, windows_path: str) -> FakeDisk:
        for vm in self.vms.values():
            for disk in vm.disks:
                if disk.windows_path.lower() == windows_path.lower():
                    return disk
        raise AssertionError(f"no disk {windows_path}")

    def _vm(self, vm_id: str) -> FakeVm:
        for vm in self.vms.values():
            if vm.id.lower() == vm_id.lower():
                return vm
        raise AssertionError(f"no VM {vm_id}")

    def _job(self, ok: bool = True, *, result: str | None = None, code: int = 32768, text: str = "",
             name: str = "Create virtual machine snapshot") -> dict:
        """Start a job that is running at the first poll and finished (or failed) at the second."""
        job = wmi_guid(uuid.uuid4())
        base = recorded("job_completed.json")["result"] | {"InstanceID": job, "Name": name}
        running = base | {"JobState": 4, "PercentComplete": 40}
        finished = base if ok else base | {"JobState": 10, "ErrorCode": code, "ErrorDescription": text,
                                           "ErrorSummaryDescription": "Operation failed."}
        self.jobs[job] = deque([running, finished])
        if result:
            self.job_results[job] = result
        return {"ReturnValue": 4096, "Job": job, "Result": None}

    # -- operations (names and parameters as in collectors/sources/hyperv/scripts.py)

    def op_vms(self) -> list:
        return [{"Id": vm.id, "Name": vm.name, "EnabledState": vm.state, "Version": vm.version,
                 "Disks": [d.info() for d in vm.disks]} for vm in self.vms.values()]

    def op_inventory(self, VmId: str) -> dict:
        vm = self._vm(VmId)
        snapshots = [{"InstanceID": i, "Name": s["name"], "Type": s["type"], "Created": f"/Date({s['created']})/"}
                     for i, s in self.snapshots.items() if s["vm"] == vm.id]
        points = [{"InstanceID": i, "Type": 2} for i, p in self.points.items() if p["vm"] == vm.id]
        return {"EnabledState": vm.state, "Snapshots": snapshots, "ReferencePoints": points}

    def op_create_checkpoint(self, VmId: str, ConsistencyLevel: int) -> dict:
        vm = self._vm(VmId)
        running = vm.state == 2
        if running and ConsistencyLevel == 1 and not vm.application_consistent:
            text = recorded("job_failed_application_consistency.json")["result"]["ErrorDescription"]
            return self._job(False, text=text.replace("appliance01", vm.name))
        if running and not vm.crash_consistent:
            text = recorded("job_failed_no_integration_services.json")["result"]["ErrorDescription"]
            return self._job(False, code=32770, text=text.replace("appliance01", vm.name))
        instance = f"Microsoft:{wmi_guid(uuid.uuid4())}"
        self.snapshots[instance] = {"vm": vm.id, "name": f"{vm.name} - Backup - (11/25/2026 - 23:00:02)",
                                    "type": RECOVERY, "created": 1795647602000, "level": ConsistencyLevel,
                                    "vm_state": vm.state, "disks": list(vm.disks)}
        self._config_files(vm, instance, create=True)
        return self._job(result=instance)

    def _config_files(self, vm: FakeVm, snapshot: str, *, create: bool) -> None:
        """A checkpoint's configuration files exist while the checkpoint does, as on a host."""
        if vm.config_dir is None:
            return
        for extension in (".vmcx", ".vmgs"):
            path = vm.config_dir / "Snapshots" / (snapshot.split(":")[1] + extension)
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(f"{extension} of {vm.name} at {snapshot}".encode() * 100)
            else:
                path.unlink(missing_ok=True)

    def op_job(self, JobId: str, WaitSeconds: int) -> dict:
        assert 1 <= WaitSeconds <= 10
        states = self.jobs[JobId]
        return states.popleft() if len(states) > 1 else states[0]

    def op_job_result(self, JobId: str, ClassName: str) -> list:
        made = self.job_results[JobId]
        expected = "Msvm_VirtualSystemReferencePoint" if made in self.points else "Msvm_VirtualSystemSettingData"
        assert ClassName == expected
        return [made]

    def op_rename_checkpoint(self, SnapshotId: str, Name: str) -> dict:
        self.snapshots[SnapshotId]["name"] = Name
        return {"ReturnValue": 0, "Job": None, "Result": None}

    def op_checkpoint(self, SnapshotId: str) -> dict:
        snapshot = self.snapshots[SnapshotId]
        vm = self._vm(snapshot["vm"])
        return {"InstanceID": SnapshotId, "Name": snapshot["name"], "Type": snapshot["type"],
                "Created": f"/Date({snapshot['created']})/", "ConfigurationDataRoot": vm.config_root,
                "ConfigurationFile": f"Snapshots\\{SnapshotId.split(':')[1]}.vmcx",
                "Disks": [d.info() for d in snapshot["disks"]]}

    def op_destroy_checkpoint(self, SnapshotId: str) -> dict:
        if SnapshotId not in self.snapshots:
            return Answer.file("error_file_not_found.json")
        snapshot = self.snapshots.pop(SnapshotId)
        self._config_files(self._vm(snapshot["vm"]), SnapshotId, create=False)
        return self._job(name="Delete virtual machine snapshot")

    def op_convert_checkpoint(self, SnapshotId: str) -> dict:
        snapshot = self.snapshots.pop(SnapshotId)
        self._config_files(self._vm(snapshot["vm"]), SnapshotId, create=False)
        point = f"Microsoft:{wmi_guid(uuid.uuid4())}"
        self.points[point] = {"vm": snapshot["vm"],
                              "disks": [(d.slot, rct_id(d.tracking, d.generation)) for d in snapshot["disks"]]}
        for disk in snapshot["disks"]:
            disk.generation += 1  # writes from now on are changes since this point
        return self._job(result=point, name="Convert virtual machine snapshot to reference point")

    def op_reference_point(self, ReferencePointId: str) -> dict:
        point = self.points[ReferencePointId]
        vm = self._vm(point["vm"])
        disks = []
        for slot, _ in point["disks"]:
            disk = next((d for d in vm.disks if d.slot == slot), None)
            disks.append({"Identifier": slot, "Path": disk and disk.windows_path,
                          "VirtualDiskId": disk and disk.virtual_disk_id})
        return {"InstanceID": ReferencePointId, "ReferencePointType": 2,
                "VirtualDiskIdentifiers": [s for s, _ in point["disks"]],
                "ResilientChangeTrackingIdentifiers": [r for _, r in point["disks"]], "Disks": disks}

    def op_destroy_reference_point(self, ReferencePointId: str) -> dict:
        del self.points[ReferencePointId]
        return {"ReturnValue": 0, "Job": None, "Result": None}

    def op_changes(self, Path: str, LimitId: str, Offset: int, Length: int) -> dict | Answer:
        disk = self._disk(Path)
        tracking, _, generation = LimitId.rpartition(":")
        if not disk.rct_valid or tracking != rct_id(disk.tracking, 0).rpartition(":")[0]:
            return Answer.file("changes_invalid_parameter.json")
        since = int(generation, 16)
        with open_vhdx(disk.local_path) as vhdx:
            assert Offset + Length <= vhdx.virtual_size
        processed = min(Length, self.window or Length)
        end = Offset + processed
        offsets, lengths = [], []
        for _, start, length in sorted((w for w in disk.writes if w[0] > since), key=lambda w: w[1]):
            lo, hi = max(start, Offset), min(start + length, end)
            if lo < hi:
                offsets.append(lo)
                lengths.append(hi - lo)
        return {"ReturnValue": 0, "Job": None, "Result": None, "ProcessedByteLength": processed,
                "ChangedByteOffsets": offsets, "ChangedByteLengths": lengths}

    def op_set_state(self, VmId: str, RequestedState: int) -> dict:
        vm = self._vm(VmId)
        vm.state = RequestedState
        self.state_changes.append((vm.id, RequestedState))
        return self._job(name="Change virtual machine state")
