"""A deployment's session directory: what its node agents read and write, on a file system they share.

    <state dir>/deployments/<name>/serve.json     the engines for the node agents (from the plan's placement)
                                  /plan.yaml      the plan served
                                  /agents/N.json  each node agent's report (rewritten at least every 5 s)
                                  /logs/          the job's submission script and output, one log per engine

The daemon (`scepsy_hpc.service`) writes serve.json and reads the reports; the state dir is described
in `service/paths.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scepsy_hpc.backend.records import RERUN, AgentReport, ServeConfig
from scepsy_hpc.spec.records import read_record, write_record


@dataclass(frozen=True)
class Session:
    """One deployment's session directory."""

    dir: Path

    @property
    def name(self) -> str:
        """The deployment's name (its directory's)."""
        return self.dir.name

    @property
    def serve_path(self) -> Path:
        """serve.json."""
        return self.dir / "serve.json"

    @property
    def log_dir(self) -> Path:
        """The submission script, job and agent output, engine logs."""
        return self.dir / "logs"

    def serve_config(self) -> ServeConfig:
        """serve.json."""
        return read_record(self.serve_path, ServeConfig, RERUN)

    def write_serve_config(self, config: ServeConfig) -> None:
        """Write serve.json (atomically, readable by its owner only)."""
        write_record(self.serve_path, config)

    def agents(self) -> dict[str, AgentReport]:
        """Each node agent's latest report, by node."""
        out = {}
        for p in sorted((self.dir / "agents").glob("*.json")):
            try:
                out[p.stem] = read_record(p, AgentReport, RERUN)
            except FileNotFoundError:
                continue  # removed by a new `up` while we looked
        return out
