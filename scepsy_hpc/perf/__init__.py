"""Engine performance model shared by the simulator, the simulated engine server and synthetic profiles."""

from scepsy_hpc.perf.model import EngineConfig, EnginePerf, DecodeSeries

__all__ = ["EngineConfig", "EnginePerf", "DecodeSeries"]
