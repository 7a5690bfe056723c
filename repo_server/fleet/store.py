"""Durable fleet state: JSON files under <data>/fleet, each written atomically (tmp, fsync, rename).

    fleet/jobs.json          every backup job definition
    fleet/collectors.json    registered pull collectors and their inventories
    fleet/state.json         scheduler bookkeeping (VMs already alerted as stale)
    fleet/runs/<run_id>.json one file per run, rewritten on every state change

Files rather than a RocksDB column family: the index is a rebuildable cache (`chunkyard repair
--rebuild-index` recreates it from packs and points), while job definitions and run history exist
nowhere else. As with retention.json, the file is the only copy, so a rebuild cannot lose it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from repo_server.engine.durable import write_atomic
from repo_server.engine.errors import Corrupt

log = logging.getLogger("chunkyard.fleet")


class FleetStore:
    def __init__(self, root: Path):
        self.root = root
        self.runs_dir = root / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)

    def _read(self, path: Path, default: Any) -> Any:
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            return default
        except ValueError as e:
            raise Corrupt(f"{path} is unreadable ({e}); fix it or move it away", "bad_fleet_file") from None

    def load(self, name: str, default: Any) -> Any:
        return self._read(self.root / f"{name}.json", default)

    def save(self, name: str, value: Any) -> None:
        write_atomic(self.root / f"{name}.json", json.dumps(value, indent=1, sort_keys=True).encode())

    def load_runs(self) -> list[dict]:
        runs = []
        for path in sorted(self.runs_dir.glob("*.json")):
            try:
                runs.append(json.loads(path.read_bytes()))
            except ValueError as e:  # one damaged history file must not stop the scheduler
                log.error("ignoring unreadable run file %s: %s", path, e)
        return runs

    def save_run(self, run: dict) -> None:
        write_atomic(self.runs_dir / f"{run['run_id']}.json", json.dumps(run, sort_keys=True).encode())

    def delete_run(self, run_id: str) -> None:
        (self.runs_dir / f"{run_id}.json").unlink(missing_ok=True)
