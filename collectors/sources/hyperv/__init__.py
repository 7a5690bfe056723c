"""The Hyper-V source: agentless, host-level backup of Hyper-V VMs with Resilient Change Tracking.

Control over WinRM (PowerShell/WMI scripts, JSON answers), disk data over SMB; see docs/hyperv.md.
"""

from .config import ConfigError, HyperVConfig, load_config, parse_config
from .errors import HostAccessDenied, HostRefused, HostTimeout, HyperVError
from .source import HyperVBackup, HyperVSource

__all__ = [
    "ConfigError",
    "HostAccessDenied",
    "HostRefused",
    "HostTimeout",
    "HyperVBackup",
    "HyperVConfig",
    "HyperVError",
    "HyperVSource",
    "load_config",
    "parse_config",
]
