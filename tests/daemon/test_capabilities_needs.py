"""What a graph needs from a backend: read from its nodes, one instance per kind."""

from __future__ import annotations

import weakref

from daemon.comfy.capabilities import Needs, needs_of


def graph(checkpoint: str, text: str) -> dict[str, object]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ("4", 1)}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ("8", 0)}},
        "note": "not a node",
    }


def test_a_graph_needs_its_node_classes_and_checkpoints() -> None:
    assert needs_of(graph("a.safetensors", "cat")) == Needs(
        frozenset({"CheckpointLoaderSimple", "CLIPTextEncode", "SaveImage"}),
        frozenset({"a.safetensors"}),
    )


def test_graphs_that_need_the_same_share_one_needs_while_it_is_held() -> None:
    first = needs_of(graph("a.safetensors", "cat"))
    assert needs_of(graph("a.safetensors", "dog")) is first  # thousands of tasks, one Needs
    other = needs_of(graph("b.safetensors", "cat"))
    assert other != first
    held = weakref.ref(first)
    del first
    assert held() is None  # nobody holds it any more: not kept for ever
