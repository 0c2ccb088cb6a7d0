"""The shipped workflows against ComfyUI's node definitions (the simulator's copy of 0.3.64).

Every value a request can put into a node must be one ComfyUI accepts: choices
within its combo lists, numbers within its input limits. The end-to-end tests
run the defaults; this covers the edges of every parameter.
"""

from __future__ import annotations

from typing import Any

import pytest

from daemon.simulator import SimulatorConfig
from daemon.simulator.files import FileStore
from daemon.simulator.nodes import NodeEnv, build_catalogue
from daemon.workflow_files import load_catalog
from protocol.workflow import AREA_FIELDS, MAX_RESOLUTION, Parameter, Workflow

CATALOGUE = build_catalogue()
ENV = NodeEnv(SimulatorConfig().checkpoints, FileStore())
WORKFLOWS = load_catalog(None, default_checkpoint=SimulatorConfig().checkpoints[0]).workflows


def input_spec(class_type: str, name: str) -> tuple[Any, dict[str, Any]]:
    types = CATALOGUE[class_type].input_types(ENV)
    for section in ("required", "optional"):
        if name in types.get(section, {}):
            spec = types[section][name]
            return spec[0], (spec[1] if len(spec) > 1 else {})
    raise AssertionError(f"{class_type} has no input {name}")


def value_range(param: Parameter, part: str | None) -> tuple[float, float] | None:
    """The lowest and highest value a request can bind through this binding."""
    if param.type in ("integer", "number"):
        assert param.min is not None
        assert param.max is not None
        return param.min, param.max
    if param.type == "area":
        lowest = 0 if part in ("x", "y") else 1
        return lowest, MAX_RESOLUTION
    if param.type == "image" and part in ("width", "height"):
        return 1, MAX_RESOLUTION
    return None


@pytest.mark.parametrize("workflow", WORKFLOWS.values(), ids=list(WORKFLOWS))
def test_every_node_and_input_is_stock(workflow: Workflow) -> None:
    for node_id, node in workflow.graph.items():
        assert node["class_type"] in CATALOGUE, node_id
        required = CATALOGUE[node["class_type"]].input_types(ENV).get("required", {})
        assert set(required) <= set(node["inputs"]), node_id
        for name in node["inputs"]:
            input_spec(node["class_type"], name)


@pytest.mark.parametrize("workflow", WORKFLOWS.values(), ids=list(WORKFLOWS))
def test_every_bindable_value_is_one_comfyui_accepts(workflow: Workflow) -> None:
    for param in workflow.parameters.values():
        for target in param.bind:
            kind, options = input_spec(workflow.graph[target.node]["class_type"], target.input)
            where = f"{param.name} -> {target.node}.{target.input}"
            if param.type == "choice":
                assert set(param.choices) <= set(kind), where
            if param.type == "checkpoint":
                assert param.default in kind, where
            if param.type in ("string", "image") and target.field in (None, "name"):
                assert kind == "STRING" or isinstance(kind, list), where
            limits = value_range(param, target.field)
            if limits is not None:
                assert kind in ("INT", "FLOAT"), where
                assert options.get("min", -float("inf")) <= limits[0], where
                assert limits[1] <= options.get("max", float("inf")), where


def test_the_inpaint_mask_covers_the_area() -> None:
    """The area's size goes to the painted SolidMask, its corner to MaskComposite."""
    inpaint = WORKFLOWS["inpaint"]
    area = inpaint.parameters["inpaintArea"]
    targets = {b.field: (inpaint.graph[b.node]["class_type"], b.input) for b in area.bind}
    assert set(targets) == set(AREA_FIELDS)
    assert targets["x"] == ("MaskComposite", "x")
    assert targets["y"] == ("MaskComposite", "y")
    assert targets["width"] == ("SolidMask", "width")
    painted = next(b.node for b in area.bind if b.field == "width")
    assert inpaint.graph[painted]["inputs"]["value"] == 1.0
    composite = next(b.node for b in area.bind if b.field == "x")
    assert inpaint.graph[composite]["inputs"]["source"] == (painted, 0)  # a link
    assert inpaint.graph[composite]["inputs"]["operation"] == "add"
