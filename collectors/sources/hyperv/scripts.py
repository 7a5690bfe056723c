"""The PowerShell the Hyper-V source runs on the host, as fixed templates plus quoted parameters.

Every operation is a static body; the only variable part of a script is a block of assignments
`$P_<Name> = <literal>` at its top, rendered by `literal()`. Values from users or the host (paths,
names, RCT ids) therefore never become code: strings are single-quoted with every single-quote
character doubled (PowerShell also treats the typographic quotes U+2018..U+201B as quotes).

Each script prints exactly one JSON document, `{"result": ...}` or, from its catch block,
`{"error": {message, category, id, hresult}}` with exit code 1. Arrays are built with `@(...)` and
serialised as properties, so one element stays a JSON array (Windows PowerShell 5.1 has no -AsArray).
Scripts travel over stdin (base64 of UTF-8) because a WinRS command line is limited to ~8 KB;
`BOOTSTRAP` is the only text on the command line.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

# Characters PowerShell accepts as a single quote (CodeGeneration.EscapeSingleQuotedStringContent).
SINGLE_QUOTES = "'\u2018\u2019\u201a\u201b"

Value = str | int | bool | None

BOOTSTRAP = (
    "$ErrorActionPreference = 'Stop'; "
    "[Console]::OutputEncoding = [Text.Encoding]::UTF8; "
    "$encoded = [Console]::In.ReadToEnd(); "
    "$code = [Text.Encoding]::UTF8.GetString([Convert]::FromBase64String($encoded.Trim())); "
    "& ([scriptblock]::Create($code))"
)


def literal(value: Value) -> str:
    """A PowerShell literal for `value` that evaluates to exactly that value."""
    if value is None:
        return "$null"
    if isinstance(value, bool):
        return "$true" if value else "$false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("PowerShell strings cannot carry NUL characters")
        return "'" + "".join(c * 2 if c in SINGLE_QUOTES else c for c in value) + "'"
    raise TypeError(f"no PowerShell literal for {type(value).__name__}")


PRELUDE = r"""
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$ns = 'root\virtualization\v2'

function Get-ByKey([string]$Class, [string]$Key, [string]$Value) {
    # WQL string literals escape a backslash and a quote with a backslash.
    $escaped = $Value.Replace('\', '\\').Replace("'", "\'")
    $found = @(Get-CimInstance -Namespace $ns -ClassName $Class -Filter ("{0} = '{1}'" -f $Key, $escaped))
    if ($found.Count -ne 1) { throw ('{0} with {1} {2} not found' -f $Class, $Key, $Value) }
    $found[0]
}

function Get-Related($Object, [string]$Association, [string]$Class) {
    Get-CimAssociatedInstance -InputObject $Object -Association $Association -ResultClassName $Class
}

function Get-Singleton([string]$Class) {
    Get-CimInstance -Namespace $ns -ClassName $Class | Select-Object -First 1
}

function ConvertTo-Embedded($Instance) {
    $serializer = [Microsoft.Management.Infrastructure.Serialization.CimSerializer]::Create()
    $options = [Microsoft.Management.Infrastructure.Serialization.InstanceSerializationOptions]::None
    [Text.Encoding]::Unicode.GetString($serializer.Serialize($Instance, $options))
}

function Out-Method($Call, [string]$Output) {
    $job = $null
    if ($null -ne $Call.Job) { $job = [string]$Call.Job.InstanceID }
    $made = $null
    if ($Output -and $null -ne $Call.$Output) { $made = [string]$Call.$Output.InstanceID }
    [ordered]@{ ReturnValue = [int]$Call.ReturnValue; Job = $job; Result = $made }
}

function Get-DiskInfo([string]$Path) {
    $images = Get-Singleton 'Msvm_ImageManagementService'
    $call = Invoke-CimMethod -InputObject $images -MethodName GetVirtualHardDiskSettingData -Arguments @{ Path = $Path }
    if ($call.ReturnValue -ne 0) {
        throw ('GetVirtualHardDiskSettingData failed for {0} with return value {1}' -f $Path, $call.ReturnValue)
    }
    $properties = @{}
    foreach ($node in ([xml]$call.SettingData).SelectNodes('//PROPERTY')) {
        $properties[$node.GetAttribute('NAME')] = $node.InnerText
    }
    [ordered]@{
        Path = $Path
        VirtualDiskId = [string]$properties['VirtualDiskId']
        Size = [uint64]$properties['MaxInternalSize']
        Format = [int]$properties['Format']
    }
}

function Get-Disks($Settings) {
    $vhd = 'Microsoft:Hyper-V:Virtual Hard Disk'
    $class = 'Msvm_StorageAllocationSettingData'
    $allocations = @(Get-CimAssociatedInstance -InputObject $Settings -ResultClassName $class)
    foreach ($allocation in $allocations) {
        if ($allocation.ResourceType -eq 31 -and $allocation.ResourceSubType -eq $vhd) {
            Get-DiskInfo ([string]$allocation.HostResource[0])
        }
    }
}
"""

WRAPPER = r"""
try {
{body}
    [Console]::Out.Write((ConvertTo-Json -InputObject @{ result = $result } -Compress -Depth 8))
} catch {
    $failure = $_
    $report = [ordered]@{
        message = [string]$failure.Exception.Message
        category = [string]$failure.CategoryInfo.Category
        id = [string]$failure.FullyQualifiedErrorId
        hresult = [int]$failure.Exception.HResult
    }
    [Console]::Out.Write((ConvertTo-Json -InputObject @{ error = $report } -Compress -Depth 4))
    exit 1
}
"""


@dataclass(frozen=True)
class Operation:
    params: tuple[str, ...]
    body: str


OPERATIONS: dict[str, Operation] = {
    "vms": Operation((), r"""
    $guid = '^[0-9A-Fa-f]{8}-([0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}$'
    $systems = @(Get-CimInstance -Namespace $ns -ClassName Msvm_ComputerSystem | Where-Object { $_.Name -match $guid })
    $result = @(foreach ($vm in $systems) {
        $settings = Get-Related $vm 'Msvm_SettingsDefineState' 'Msvm_VirtualSystemSettingData' | Select-Object -First 1
        [ordered]@{
            Id = [string]$vm.Name
            Name = [string]$vm.ElementName
            EnabledState = [int]$vm.EnabledState
            Version = [string]$settings.Version
            Disks = @(Get-Disks $settings)
        }
    })
"""),
    "inventory": Operation(("VmId",), r"""
    $vm = Get-ByKey 'Msvm_ComputerSystem' 'Name' $P_VmId
    $snapshots = @(Get-Related $vm 'Msvm_SnapshotOfVirtualSystem' 'Msvm_VirtualSystemSettingData' | ForEach-Object {
        [ordered]@{
            InstanceID = [string]$_.InstanceID
            Name = [string]$_.ElementName
            Type = [string]$_.VirtualSystemType
            Created = $_.CreationTime
        }
    })
    $association = 'Msvm_ReferencePointOfVirtualSystem'
    $points = @(Get-Related $vm $association 'Msvm_VirtualSystemReferencePoint' | ForEach-Object {
        [ordered]@{ InstanceID = [string]$_.InstanceID; Type = [int]$_.ReferencePointType }
    })
    $result = [ordered]@{ EnabledState = [int]$vm.EnabledState; Snapshots = $snapshots; ReferencePoints = $points }
"""),
    "create_checkpoint": Operation(("VmId", "ConsistencyLevel"), r"""
    $vm = Get-ByKey 'Msvm_ComputerSystem' 'Name' $P_VmId
    $service = Get-Singleton 'Msvm_VirtualSystemSnapshotService'
    $class = Get-CimClass -Namespace $ns -ClassName Msvm_VirtualSystemSnapshotSettingData
    $properties = @{ ConsistencyLevel = [byte]$P_ConsistencyLevel; IgnoreNonSnapshottableDisks = $true }
    $settings = New-CimInstance -CimClass $class -ClientOnly -Property $properties
    $arguments = @{
        AffectedSystem = $vm
        SnapshotSettings = (ConvertTo-Embedded $settings)
        SnapshotType = [uint16]32768
    }
    $call = Invoke-CimMethod -InputObject $service -MethodName CreateSnapshot -Arguments $arguments
    $result = Out-Method $call 'ResultingSnapshot'
"""),
    "job": Operation(("JobId", "WaitSeconds"), r"""
    $deadline = (Get-Date).AddSeconds($P_WaitSeconds)
    $job = Get-ByKey 'Msvm_ConcreteJob' 'InstanceID' $P_JobId
    while (($job.JobState -in @(2, 3, 4, 5, 6)) -and ((Get-Date) -lt $deadline)) {
        Start-Sleep -Milliseconds 500
        $job = Get-ByKey 'Msvm_ConcreteJob' 'InstanceID' $P_JobId
    }
    $result = [ordered]@{
        InstanceID = [string]$job.InstanceID
        Name = [string]$job.ElementName
        JobState = [int]$job.JobState
        PercentComplete = [int]$job.PercentComplete
        ErrorCode = [int]$job.ErrorCode
        ErrorDescription = [string]$job.ErrorDescription
        ErrorSummaryDescription = [string]$job.ErrorSummaryDescription
        StartTime = $job.StartTime
    }
"""),
    "job_result": Operation(("JobId", "ClassName"), r"""
    $job = Get-ByKey 'Msvm_ConcreteJob' 'InstanceID' $P_JobId
    $items = @(Get-Related $job 'Msvm_AffectedJobElement' $P_ClassName)
    if ($P_ClassName -eq 'Msvm_VirtualSystemSettingData') {
        $items = @($items | Where-Object { [string]$_.VirtualSystemType -like 'Microsoft:Hyper-V:Snapshot:*' })
    }
    $result = @($items | ForEach-Object { [string]$_.InstanceID })
"""),
    "rename_checkpoint": Operation(("SnapshotId", "Name"), r"""
    $snapshot = Get-ByKey 'Msvm_VirtualSystemSettingData' 'InstanceID' $P_SnapshotId
    $snapshot.ElementName = $P_Name
    $service = Get-Singleton 'Msvm_VirtualSystemManagementService'
    $arguments = @{ SystemSettings = (ConvertTo-Embedded $snapshot) }
    $call = Invoke-CimMethod -InputObject $service -MethodName ModifySystemSettings -Arguments $arguments
    $result = Out-Method $call ''
"""),
    "checkpoint": Operation(("SnapshotId",), r"""
    $snapshot = Get-ByKey 'Msvm_VirtualSystemSettingData' 'InstanceID' $P_SnapshotId
    $result = [ordered]@{
        InstanceID = [string]$snapshot.InstanceID
        Name = [string]$snapshot.ElementName
        Type = [string]$snapshot.VirtualSystemType
        Created = $snapshot.CreationTime
        ConfigurationDataRoot = [string]$snapshot.ConfigurationDataRoot
        ConfigurationFile = [string]$snapshot.ConfigurationFile
        Disks = @(Get-Disks $snapshot)
    }
"""),
    "destroy_checkpoint": Operation(("SnapshotId",), r"""
    $snapshot = Get-ByKey 'Msvm_VirtualSystemSettingData' 'InstanceID' $P_SnapshotId
    $service = Get-Singleton 'Msvm_VirtualSystemSnapshotService'
    $arguments = @{ AffectedSnapshot = $snapshot }
    $call = Invoke-CimMethod -InputObject $service -MethodName DestroySnapshot -Arguments $arguments
    $result = Out-Method $call ''
"""),
    "convert_checkpoint": Operation(("SnapshotId",), r"""
    $snapshot = Get-ByKey 'Msvm_VirtualSystemSettingData' 'InstanceID' $P_SnapshotId
    $service = Get-Singleton 'Msvm_VirtualSystemSnapshotService'
    $arguments = @{ AffectedSnapshot = $snapshot }
    $call = Invoke-CimMethod -InputObject $service -MethodName ConvertToReferencePoint -Arguments $arguments
    $result = Out-Method $call 'ResultingReferencePoint'
"""),
    "reference_point": Operation(("ReferencePointId",), r"""
    $point = Get-ByKey 'Msvm_VirtualSystemReferencePoint' 'InstanceID' $P_ReferencePointId
    $identifiers = @($point.VirtualDiskIdentifiers | Where-Object { $null -ne $_ })
    $rctIds = @($point.ResilientChangeTrackingIdentifiers | Where-Object { $null -ne $_ })
    $disks = @(foreach ($identifier in $identifiers) {
        $path = $null
        $diskId = $null
        try {
            $allocation = Get-ByKey 'Msvm_StorageAllocationSettingData' 'InstanceID' $identifier
            $path = [string]$allocation.HostResource[0]
            $diskId = (Get-DiskInfo $path).VirtualDiskId
        } catch {
            $diskId = $null
        }
        [ordered]@{ Identifier = [string]$identifier; Path = $path; VirtualDiskId = $diskId }
    })
    $result = [ordered]@{
        InstanceID = [string]$point.InstanceID
        ReferencePointType = [int]$point.ReferencePointType
        VirtualDiskIdentifiers = $identifiers
        ResilientChangeTrackingIdentifiers = $rctIds
        Disks = $disks
    }
"""),
    "destroy_reference_point": Operation(("ReferencePointId",), r"""
    $point = Get-ByKey 'Msvm_VirtualSystemReferencePoint' 'InstanceID' $P_ReferencePointId
    $service = Get-Singleton 'Msvm_VirtualSystemReferencePointService'
    $arguments = @{ AffectedReferencePoint = $point }
    $call = Invoke-CimMethod -InputObject $service -MethodName DestroyReferencePoint -Arguments $arguments
    $result = Out-Method $call ''
"""),
    "changes": Operation(("Path", "LimitId", "Offset", "Length"), r"""
    $images = Get-Singleton 'Msvm_ImageManagementService'
    $arguments = @{
        Path = $P_Path
        LimitId = $P_LimitId
        TargetSnapshotId = ''
        ByteOffset = [uint64]$P_Offset
        ByteLength = [uint64]$P_Length
    }
    $call = Invoke-CimMethod -InputObject $images -MethodName GetVirtualDiskChanges -Arguments $arguments
    $result = Out-Method $call ''
    $result['ProcessedByteLength'] = [uint64]$call.ProcessedByteLength
    $result['ChangedByteOffsets'] = @($call.ChangedByteOffsets | Where-Object { $null -ne $_ })
    $result['ChangedByteLengths'] = @($call.ChangedByteLengths | Where-Object { $null -ne $_ })
"""),
    "set_state": Operation(("VmId", "RequestedState"), r"""
    $vm = Get-ByKey 'Msvm_ComputerSystem' 'Name' $P_VmId
    $arguments = @{ RequestedState = [uint16]$P_RequestedState }
    $result = Out-Method (Invoke-CimMethod -InputObject $vm -MethodName RequestStateChange -Arguments $arguments) ''
"""),
}

OP_MARKER = "# chunkyard-op: "


def render(op: str, **params: Value) -> str:
    """The complete script for `op` with its parameters bound."""
    operation = OPERATIONS[op]
    if set(params) != set(operation.params):
        raise TypeError(f"{op} takes {sorted(operation.params)}, got {sorted(params)}")
    assignments = "".join(f"$P_{name} = {literal(params[name])}\n" for name in operation.params)
    return OP_MARKER + op + "\n" + assignments + PRELUDE + WRAPPER.replace("{body}", operation.body.strip("\n"))


def encode_bootstrap() -> str:
    """The -EncodedCommand argument: BOOTSTRAP as base64 of UTF-16LE, as powershell.exe expects."""
    return base64.b64encode(BOOTSTRAP.encode("utf-16-le")).decode("ascii")


def encode_stdin(script: str) -> bytes:
    """What BOOTSTRAP reads from stdin: the script as base64 of UTF-8 (ASCII-safe under any code page)."""
    return base64.b64encode(script.encode("utf-8")) + b"\r\n"
