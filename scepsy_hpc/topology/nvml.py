"""Probe this host's GPUs through NVML (`nvidia-ml-py`, imported as `pynvml`) into `GPULinks`.

NVLink is read per link: for each enabled link of each GPU, the PCI bus id at the far end says
which GPU it reaches. On NVSwitch boards (HGX/DGX A100, H100, H200, B200) the far end is a switch,
not a GPU, so no GPU pair shows up directly; every GPU that reaches a switch can then talk to every
other such GPU over all its switch-facing links, which is what `nvidia-smi topo -m` prints as NV#.
NVML numbers GPUs in PCI bus order (ignoring CUDA_VISIBLE_DEVICES), like `topo -m` and Slurm.
"""

from __future__ import annotations

import re
from typing import Any

from scepsy_hpc.errors import TopologyError
from scepsy_hpc.topology.model import GPULinks

_BUS = re.compile(r"([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+)\.([0-7])")
_GPU, _IBMNPU, _SWITCH = 0, 1, 2          # nvmlIntNvLinkDeviceType_t
_MIG_ENABLE = 1                            # NVML_DEVICE_MIG_ENABLE
_FIX = ("run this on a GPU node with the NVIDIA driver loaded, or save `nvidia-smi topo -m` "
        "there and give scepsy the file")


def _text(value: Any) -> str:
    # Older bindings return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else str(value)


def _bus(pci: Any) -> tuple[int, ...] | None:
    """A PCI address as numbers, so '00000000:18:00.0' and '0000:18:00.0' compare equal."""
    m = _BUS.search(_text(getattr(pci, "busId", b"")))
    return tuple(int(x, 16) for x in m.groups()) if m else None


def _peers(nvml: Any, handle: Any, error: type) -> list[tuple[tuple[int, ...] | None, int | None]]:
    """(remote bus id, remote device type or None) for every enabled NVLink of one GPU."""
    remote_pci = getattr(nvml, "nvmlDeviceGetNvLinkRemotePciInfo_v2", None) \
        or nvml.nvmlDeviceGetNvLinkRemotePciInfo
    remote_type = getattr(nvml, "nvmlDeviceGetNvLinkRemoteDeviceType", None)
    out = []
    for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if nvml.nvmlDeviceGetNvLinkState(handle, link) != 1:   # NVML_FEATURE_ENABLED
                continue
            bus = _bus(remote_pci(handle, link))
        except error:
            continue          # links past the hardware's count raise NotSupported/InvalidArgument
        kind = None
        if remote_type is not None:
            try:
                kind = remote_type(handle, link)
            except error:
                kind = None
        out.append((bus, kind))
    return out


def _mig(nvml: Any, handle: Any, error: type) -> tuple[str, ...] | None:
    """MIG device profiles ('1g.10gb', …) when MIG is on for this GPU, else None."""
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except (error, AttributeError):
        return None           # not a MIG-capable GPU, or a binding without MIG calls
    if current != _MIG_ENABLE:
        return None
    profiles = []
    try:
        for k in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                dev = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, k)
            except error:
                continue      # empty slot
            name = _text(nvml.nvmlDeviceGetName(dev))
            profiles.append(name.split("MIG", 1)[1].strip() if "MIG" in name else name)
    except error:
        pass
    return tuple(profiles)


def probe_nvml(nvml: Any = None) -> GPULinks:
    """NVLink counts, GPU names and MIG devices of this host's GPUs, read live through NVML."""
    if nvml is None:
        try:
            import pynvml as nvml   # optional extra: only the probe needs it
        except ImportError:
            raise TopologyError("probing GPUs needs NVML's Python binding: pip install "
                                "'scepsy_hpc[nvml]' (the nvidia-ml-py package); or " + _FIX) from None
    error = getattr(nvml, "NVMLError", Exception)
    try:
        nvml.nvmlInit()
    except error as e:
        raise TopologyError(f"NVML did not start ({e}): {_FIX}") from None
    try:
        return _probe(nvml, error)
    except error as e:
        raise TopologyError(f"NVML query failed ({e}): {_FIX}") from None
    finally:
        try:
            nvml.nvmlShutdown()
        except error:
            pass


def _probe(nvml: Any, error: type) -> GPULinks:
    n = nvml.nvmlDeviceGetCount()
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
    names = tuple(_text(nvml.nvmlDeviceGetName(h)) for h in handles)
    index_of = {_bus(nvml.nvmlDeviceGetPciInfo(h)): i for i, h in enumerate(handles)}
    direct: dict[tuple[int, int], int] = {}
    switch_links = [0] * n
    for i, h in enumerate(handles):
        for bus, kind in _peers(nvml, h, error):
            j = index_of.get(bus) if kind in (None, _GPU) else None
            if j is not None and j != i:
                direct[(i, j)] = direct.get((i, j), 0) + 1
            elif kind == _SWITCH or (kind is None and j is None):
                switch_links[i] += 1
            # _IBMNPU: an NVLink to a POWER9 CPU, not to another GPU
    nvlinks: dict[tuple[int, int], int] = {}
    for a in range(n):
        for b in range(a + 1, n):
            # Both ends report a bridge; the smaller count is what both agree is up.
            count = min(direct.get((a, b), 0), direct.get((b, a), 0))
            if switch_links[a] and switch_links[b]:
                count += min(switch_links[a], switch_links[b])
            if count:
                nvlinks[(a, b)] = count
    mig = {i: m for i, h in enumerate(handles) if (m := _mig(nvml, h, error)) is not None}
    return GPULinks(n_gpus=n, nvlinks=nvlinks, gpu_names=names, mig=mig)
