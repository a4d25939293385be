"""The NVML probe against a fake `pynvml` that mimics the calls it makes (no GPU needed)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from scepsy_hpc.errors import TopologyError
from scepsy_hpc.topology.nvml import probe_nvml

SWITCH, NPU = "switch", "npu"


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


def fake_nvml(names, links, *, mig=None, hw_links=18, remote_type=True, init_error=None,
              count_error=None, name_bytes=False, bus_format="{:08X}:{:02X}:00.0"):
    """A pynvml look-alike. `links[g]` lists, per link index, the GPU index it reaches, SWITCH,
    NPU or None (link disabled); links from len(links[g]) to hw_links-1 are down, and indices past
    hw_links raise as NVML does. `mig[g]` is that GPU's MIG profiles (MIG mode on)."""
    mig = mig or {}
    calls: list[str] = []

    def bus(g):                      # the GPU's own id, in the format NVML returns
        return bus_format.format(0, 0x18 + g)

    def remote(g):                   # a remote end's id: legacy short form, to test normalising
        return f"0000:{0x18 + g:02x}:00.0" if isinstance(g, int) else "0000:c5:00.0"

    def raise_if(err):
        if err:
            raise FakeNVMLError(err)

    def link(h, k):
        if k >= hw_links:
            raise FakeNVMLError("Not Supported")
        return links[h][k] if k < len(links[h]) else None

    def state(h, k):
        return 0 if link(h, k) is None else 1

    def remote_pci(h, k):
        return SimpleNamespace(busId=remote(link(h, k)).encode())

    def remote_kind(h, k):
        return {SWITCH: 2, NPU: 1}.get(link(h, k), 0)

    def name(h):
        text = f"{names[h[1]]} MIG {mig[h[1]][h[2]]}" if isinstance(h, tuple) else names[h]
        return text.encode() if name_bytes else text

    def mig_handle(h, k):
        if k >= len(mig[h]) or mig[h][k] is None:
            raise FakeNVMLError("Not Found")
        return ("mig", h, k)

    mod = SimpleNamespace(
        NVMLError=FakeNVMLError,
        NVML_NVLINK_MAX_LINKS=hw_links + 2,
        calls=calls,
        nvmlInit=lambda: (calls.append("init"), raise_if(init_error)),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: (raise_if(count_error), len(names))[1],
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=name,
        nvmlDeviceGetPciInfo=lambda h: SimpleNamespace(busId=bus(h)),
        nvmlDeviceGetNvLinkState=state,
        nvmlDeviceGetNvLinkRemotePciInfo_v2=remote_pci,
        nvmlDeviceGetMigMode=lambda h: (1 if h in mig else 0, 0),
        nvmlDeviceGetMaxMigDeviceCount=lambda h: 7,
        nvmlDeviceGetMigDeviceHandleByIndex=mig_handle,
    )
    if remote_type:
        mod.nvmlDeviceGetNvLinkRemoteDeviceType = remote_kind
    return mod


def test_nvswitch_board_is_all_to_all():
    nvml = fake_nvml(["NVIDIA H100 80GB HBM3"] * 8, {g: [SWITCH] * 18 for g in range(8)})
    links = probe_nvml(nvml)
    assert links.n_gpus == 8
    assert links.domains() == [list(range(8))]
    assert links.pairs() == [(i, j, 18) for i in range(8) for j in range(i + 1, 8)]
    assert links.gpu_names == ("NVIDIA H100 80GB HBM3",) * 8
    assert nvml.calls == ["init", "shutdown"]


def test_nvswitch_found_by_bus_id_when_the_binding_lacks_remote_type():
    nvml = fake_nvml(["A100"] * 4, {g: [SWITCH] * 12 for g in range(4)}, remote_type=False)
    assert probe_nvml(nvml).pairs() == [(i, j, 12) for i in range(4) for j in range(i + 1, 4)]


def test_bridged_pairs_count_links_per_pair():
    links = {0: [1] * 4, 1: [0] * 4, 2: [3] * 4, 3: [2] * 4}
    got = probe_nvml(fake_nvml(["RTX A6000"] * 4, links, hw_links=4))
    assert got.pairs() == [(0, 1, 4), (2, 3, 4)]
    assert got.domains() == [[0, 1], [2, 3]]


def test_cube_mesh_with_mixed_link_counts_and_a_disabled_link():
    links = {0: [1, 2, 2, None], 1: [0, 2], 2: [0, 0, 1], 3: []}
    got = probe_nvml(fake_nvml(["V100"] * 4, links, hw_links=6))
    assert got.pairs() == [(0, 1, 1), (0, 2, 2), (1, 2, 1)]


def test_power9_links_to_the_cpu_are_not_a_switch():
    links = {0: [1, 1, 1, NPU, NPU, NPU], 1: [0, 0, 0, NPU, NPU, NPU]}
    got = probe_nvml(fake_nvml(["V100"] * 2, links, hw_links=6))
    assert got.pairs() == [(0, 1, 3)]


def test_no_nvlink():
    got = probe_nvml(fake_nvml(["RTX 3090"] * 4, {g: [] for g in range(4)}, hw_links=0))
    assert got.n_gpus == 4
    assert got.pairs() == [] and got.domains() == [[0], [1], [2], [3]]
    assert got.mig == {}


def test_mig_mode_and_devices_are_recorded():
    nvml = fake_nvml(["A100-SXM4-80GB"] * 2, {0: [1] * 12, 1: [0] * 12},
                     mig={0: ["3g.40gb", None, "1g.10gb"]}, name_bytes=True)
    got = probe_nvml(nvml)
    assert got.mig == {0: ("3g.40gb", "1g.10gb")}
    assert got.gpu_names == ("A100-SXM4-80GB",) * 2


def test_nvml_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)   # makes `import pynvml` raise ImportError
    with pytest.raises(TopologyError) as info:
        probe_nvml()
    assert "nvidia-ml-py" in str(info.value) and "nvidia-smi topo -m" in str(info.value)


def test_nvml_init_failure_is_translated():
    nvml = fake_nvml([], {}, init_error="Driver Not Loaded")
    with pytest.raises(TopologyError) as info:
        probe_nvml(nvml)
    assert "NVML did not start (Driver Not Loaded)" in str(info.value)
    assert not isinstance(info.value, FakeNVMLError)


def test_query_failure_is_translated_and_nvml_shut_down():
    nvml = fake_nvml(["A100"], {0: []}, count_error="Unknown Error")
    with pytest.raises(TopologyError) as info:
        probe_nvml(nvml)
    assert "NVML query failed (Unknown Error)" in str(info.value)
    assert nvml.calls == ["init", "shutdown"]
