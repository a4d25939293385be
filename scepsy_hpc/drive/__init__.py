"""Drivers: send workflow requests through the gateway, synthetic (`program`) or real (`driver.entrypoint`)."""

from __future__ import annotations

from scepsy_hpc.drive.core import DriveResult, RequestResult
from scepsy_hpc.drive.entrypoint import drive_entrypoint, load_entrypoint, read_inputs
from scepsy_hpc.drive.synthetic import drive_program

__all__ = ["DriveResult", "RequestResult", "drive_entrypoint", "drive_program", "load_entrypoint", "read_inputs"]
