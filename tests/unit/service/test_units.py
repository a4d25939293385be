"""service/units.py: a plan's nodes as units, a unit moved onto another node, and the node chosen for it."""

from __future__ import annotations

import pytest

from scepsy_hpc.backend.records import ServeConfig, ServeInstance
from scepsy_hpc.engine.adapters import EngineLaunch
from scepsy_hpc.service.units import Lead, choose_node, gpus_needed, llms_of, unit_config, units
from scepsy_hpc.topology.model import SlurmNode


def _inst(llm: str, replica: int, node: str, gpus: list[int]) -> ServeInstance:
    launch = EngineLaunch(engine="sim", model="llama-3.1-8b", hf_id="meta-llama/Llama-3.1-8B-Instruct", served_name=llm,
                          gpu="h100-sxm", port=8100 + replica)
    return ServeInstance(llm=llm, replica=replica, node=node, gpus=gpus, gpu_frac=1.0, mps_pct=100, port=8100 + replica,
                         launch=launch)


SHAPE = ServeConfig(engine="sim", health_timeout_s=60.0, instances=[
    _inst("gen", 0, "node1", [0, 1]), _inst("rew", 0, "node2", [1]), _inst("rer", 0, "node2", [1]),
    _inst("gen", 1, "node2", [2, 3])])


def test_units_are_the_plans_nodes_and_a_unit_keeps_its_gpus_ports_and_launch_on_another_node() -> None:
    assert units(SHAPE) == ["node1", "node2"]
    moved = unit_config(SHAPE, "node2", "node4")
    assert [(i.llm, i.replica, i.node, i.gpus, i.port) for i in moved.instances] == \
        [("rew", 0, "node4", [1], 8100), ("rer", 0, "node4", [1], 8100), ("gen", 1, "node4", [2, 3], 8101)]
    assert moved.engine == "sim" and moved.health_timeout_s == 60.0
    assert gpus_needed(SHAPE, "node2") == 3 and gpus_needed(SHAPE, "node1") == 2
    assert llms_of(SHAPE) == {"gen": 2, "rew": 1, "rer": 1} and llms_of(SHAPE, "node1") == {"gen": 1}
    with pytest.raises(ValueError, match="no engine on node 'node9'"):
        unit_config(SHAPE, "node9", "node1")


def _node(name: str, alloc: int = 0, state: str = "idle", gpus: int = 4) -> SlurmNode:
    return SlurmNode(name=name, gpus=gpus, gpus_alloc=alloc, state=state, partitions=("gpu",))


def test_a_node_is_chosen_with_room_usable_not_excluded_preferring_nodes_the_deployment_does_not_use() -> None:
    nodes = [_node("node1", 3), _node("node2", 1), _node("node3"), _node("node4", state="drained")]
    assert choose_node(None, "node2", 3) == "node2"   # the local backend: a node is a label
    assert choose_node(None, "node2", 3, exclude={"node2"}) is None
    assert choose_node(nodes, "node2", 3) == "node2"   # its own node when it has room and is not avoided
    assert choose_node(nodes, "node2", 3, avoid={"node2"}) == "node3"
    assert choose_node(nodes, "node2", 3, exclude={"node3"}, avoid={"node2"}) == "node2"
    assert choose_node(nodes, "node2", 4) == "node3"   # node4 has room but is drained
    assert choose_node(nodes, "node2", 4, exclude={"node3"}) is None
    assert choose_node([_node("node1", state="down*")], "node1", 1) is None


def test_the_lead_is_the_sum_of_its_parts() -> None:
    assert Lead(queue_s=12.0, healthy_s=40.5, margin_s=60.0).total_s == 112.5
