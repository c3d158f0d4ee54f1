"""Which Ray nodes ``RayLauncher`` aims a worker's bundle at when spreading: only nodes that could host
it at all (enough of each resource in total, the labels of its ``label_selector``, Ray's selector
syntax). Pure: entries shaped as ``ray.nodes()`` gives them. On a real cluster: ``test_ray.py``."""

from __future__ import annotations

from typing import Any

import pytest

from dspex_trio._ray_launcher import could_host

GPU_NODE: dict[str, Any] = {
    "NodeID": "a",
    "Resources": {"CPU": 2.0, "GPU": 2.0, "memory": 1e9},
    "Labels": {"ray.io/node-id": "a", "pool": "gpu", "zone": "eu-1"},
}
CPU_NODE: dict[str, Any] = {"NodeID": "b", "Resources": {"CPU": 2.0}, "Labels": {"ray.io/node-id": "b"}}


@pytest.mark.parametrize(
    ("bundle", "selector", "hosts"),
    [
        ({"CPU": 1.0}, {}, {"a", "b"}),
        ({"CPU": 1.0, "GPU": 1.0}, {}, {"a"}),
        ({"CPU": 1.0, "GPU": 0.5}, {}, {"a"}),
        ({"CPU": 3.0}, {}, set()),  # more than any node has in all
        ({"CPU": 1.0, "bigmem": 1.0}, {}, set()),  # a resource no node has
        ({"CPU": 1.0}, {"pool": "gpu"}, {"a"}),
        ({"CPU": 1.0}, {"pool": "!gpu"}, {"b"}),  # not that value (or no such label)
        ({"CPU": 1.0}, {"zone": "in(eu-1, eu-2)"}, {"a"}),
        ({"CPU": 1.0}, {"zone": "!in(eu-1, eu-2)"}, {"b"}),
        ({"CPU": 1.0}, {"pool": "gpu", "zone": "us-1"}, set()),  # every label must match
        ({"CPU": 1.0, "GPU": 1.0}, {"pool": "!gpu"}, set()),
    ],
)
def test_the_nodes_that_could_host_a_bundle(
    bundle: dict[str, float], selector: dict[str, str], hosts: set[str]
) -> None:
    assert {n["NodeID"] for n in (GPU_NODE, CPU_NODE) if could_host(n, bundle, selector)} == hosts


def test_a_node_entry_without_resources_or_labels_hosts_only_an_empty_unlabelled_bundle() -> None:
    assert could_host({"NodeID": "c"}, {}, {})
    assert not could_host({"NodeID": "c"}, {"CPU": 1.0}, {})
    assert not could_host({"NodeID": "c"}, {}, {"pool": "gpu"})
