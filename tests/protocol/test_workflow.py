"""protocol.workflow: reading workflow definitions, and every way one can be broken."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protocol.errors import RequestError
from protocol.workflow import Catalog, WorkflowError, image_name_from_url, parse_workflow
from tests.protocol.workflow_samples import (
    CHECKPOINT,
    inpaint,
    inpaint_definition,
    txt2img,
    txt2img_definition,
)

SHIPPED = Path(__file__).resolve().parents[2] / "daemon" / "workflows"
Edit = Callable[[dict[str, Any]], None]


def test_a_definition_becomes_a_workflow() -> None:
    workflow = txt2img()
    assert workflow.name == "txt2img"
    assert workflow.description == "text to image"
    assert list(workflow.parameters) == [
        "prompt",
        "negativePrompt",
        "seed",
        "width",
        "cfg",
        "sampler",
        "tiled",
        "checkpoint",
    ]
    assert not workflow.inpaint
    assert inpaint().inpaint
    params = workflow.parameters
    assert params["checkpoint"].default == CHECKPOINT  # the configured default
    assert params["cfg"].default == 7.0
    assert isinstance(params["cfg"].default, float)
    assert params["prompt"].required
    assert not params["seed"].required  # drawn by the daemon
    assert not params["width"].required
    assert params["width"].bind[0].node == "5"
    assert inpaint().parameters["image"].bind[0].field == "name"  # an image binds its name


def test_a_checkpoint_default_in_the_file_beats_the_configured_one() -> None:
    data = txt2img_definition()
    data["parameters"]["checkpoint"]["default"] = "sdxl.safetensors"
    workflow = parse_workflow("t", data, default_checkpoint=CHECKPOINT)
    assert workflow.parameters["checkpoint"].default == "sdxl.safetensors"


def test_to_json_lists_parameters_in_file_order_with_their_limits() -> None:
    listed = txt2img().to_json()
    assert listed["name"] == "txt2img"
    assert listed["inpaint"] is False
    by_name = {p["name"]: p for p in listed["parameters"]}
    assert [p["name"] for p in listed["parameters"]] == list(txt2img().parameters)
    assert by_name["width"] == {
        "name": "width",
        "type": "integer",
        "required": False,
        "default": 512,
        "min": 64,
        "max": 2048,
        "multipleOf": 8,
    }
    assert by_name["prompt"] == {
        "name": "prompt",
        "type": "string",
        "required": True,
        "maxLength": 50,
    }
    assert by_name["negativePrompt"]["maxLength"] == 10_000  # the default bound, shown
    assert by_name["sampler"]["choices"] == ["euler", "heun"]
    assert by_name["seed"]["required"] is False
    area = {p["name"]: p for p in inpaint().to_json()["parameters"]}["inpaintArea"]
    assert area == {
        "name": "inpaintArea",
        "type": "area",
        "required": True,
        "fields": ["x", "y", "width", "height"],
    }
    json.dumps(listed)  # plain JSON


def test_catalog_lookup_and_listing() -> None:
    catalog = Catalog({"txt2img": txt2img(), "inpaint": inpaint()})
    assert catalog.get("inpaint").inpaint
    with pytest.raises(RequestError) as caught:
        catalog.get("img2vid")
    assert caught.value.status_hint == 404
    assert caught.value.details == {"field": "workflow", "known": ["inpaint", "txt2img"]}
    assert "img2vid" in caught.value.message
    assert "inpaintArea" in catalog.parameter_names()
    assert "width" in catalog.parameter_names()
    assert [w["name"] for w in catalog.to_json()["workflows"]] == ["inpaint", "txt2img"]


@pytest.mark.parametrize("name", ["txt2img", "inpaint"])
def test_the_shipped_files_are_valid(name: str) -> None:
    data = json.loads((SHIPPED / f"{name}.json").read_text(encoding="utf-8"))
    workflow = parse_workflow(name, data, default_checkpoint=CHECKPOINT)
    assert workflow.inpaint == (name == "inpaint")
    expected = {"prompt", "negativePrompt", "seed", "steps", "cfg", "sampler", "scheduler"}
    assert expected | {"checkpoint"} <= set(workflow.parameters)
    if name == "txt2img":
        assert {"width", "height"} <= set(workflow.parameters)
    else:
        assert {"image", "inpaintArea"} <= set(workflow.parameters)


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("/image/abc_DEF-123.png", "abc_DEF-123.png"),
        ("http://127.0.0.1:8000/image/abc.png", "abc.png"),
        ("https://example.org/comfy/image/abc.jpg?v=2#top", "abc.jpg"),
        ("image/abc.png", "abc.png"),
        ("/image/", None),
        ("/image/.hidden.png", None),
        ("/image/a/b.png", None),
        ("/images/abc.png", None),
        ("/image/a%2Fb.png", None),
        ("abc.png", None),
        ("http://[::1/image/abc.png", None),  # not a URL at all
        ("", None),
    ],
)
def test_image_name_from_url(url: str, name: str | None) -> None:
    assert image_name_from_url(url) == name


def _set(path: str, value: Any) -> Edit:
    """An edit that sets data[a][b]... (dots between keys) to value."""

    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = data
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return edit


def _drop(path: str) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = data
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        del target[last]

    return edit


P = "parameters"
BROKEN_TXT2IMG: list[tuple[Edit, str]] = [
    (_set("extra", 1), "the file: unknown key(s) extra (allowed: description, graph, parameters)"),
    (_set("description", 3), "description: must be a string"),
    (_drop("graph"), "graph: must be a JSON object"),
    (_set("graph", {}), "graph: has no nodes"),
    (_set("graph.9", "SaveImage"), "graph.9: must be a JSON object"),
    (_drop("graph.9.class_type"), "graph.9.class_type: must be a node class name"),
    (_set("graph.9.class_type", ""), "graph.9.class_type: must be a node class name"),
    (_set("graph.9.inputs", []), "graph.9.inputs: must be a JSON object"),
    (_set("graph.9.inputs.images", ["8"]), "graph.9.inputs.images: a link must be [node id, slot]"),
    (_set("graph.9.inputs.images", [8, 0]), "graph.9.inputs.images: a link must be"),
    (_set("graph.9.inputs.images", ["8", -1]), "graph.9.inputs.images: a link must be"),
    (_set("graph.9.inputs.images", ["8", True]), "graph.9.inputs.images: a link must be"),
    (
        _set("graph.9.inputs.images", ["88", 0]),
        "graph.9.inputs.images: node '88' is not in the graph",
    ),
    (_drop(P), "parameters: must be a JSON object"),
    (_set(f"{P}.2wide", {"type": "string"}), "parameters.2wide: a parameter name is a letter"),
    (
        _set(f"{P}.name", {"type": "string"}),
        "parameters.name: 'name' is a request field of its own",
    ),
    (_set(f"{P}.inpaint", {"type": "boolean"}), "parameters.inpaint: 'inpaint' is a request field"),
    (_set(f"{P}.width", 512), "parameters.width: must be a JSON object"),
    (_drop(f"{P}.width.type"), "parameters.width.type: None is not one of string, integer"),
    (_set(f"{P}.width.type", "float"), "parameters.width.type: 'float' is not one of"),
    (_set(f"{P}.width.maxLength", 4), "parameters.width: unknown key(s) maxLength (allowed:"),
    (_set(f"{P}.tiled.min", 0), "parameters.tiled: unknown key(s) min"),
    (_set(f"{P}.prompt.type", "checkpoint"), "parameters.prompt.type: the prompt is a string"),
    (_set(f"{P}.seed.type", "number"), "parameters.seed.type: the seed is an integer"),
    (_set(f"{P}.width.description", 7), "parameters.width.description: must be a string"),
    (_set(f"{P}.width.min", 1.5), "parameters.width.min: must be an integer"),
    (_set(f"{P}.width.max", "big"), "parameters.width.max: must be an integer"),
    (_set(f"{P}.cfg.max", True), "parameters.cfg.max: must be a number"),
    (_drop(f"{P}.width.max"), "parameters.width: a integer parameter needs both min and max"),
    (_drop(f"{P}.cfg.min"), "parameters.cfg: a number parameter needs both min and max"),
    (_set(f"{P}.width.min", 4096), "parameters.width: min 4096 is above max 2048"),
    (_set(f"{P}.width.multipleOf", 0), "parameters.width.multipleOf: must be at least 1"),
    (_set(f"{P}.prompt.maxLength", 0), "parameters.prompt.maxLength: must be at least 1"),
    (
        _set(f"{P}.seed.multipleOf", 2**64),
        f"parameters.seed: no multiple of {2**64} lies between min 10 and max {2**64 - 1}",
    ),
    (_set(f"{P}.sampler.choices", []), "parameters.sampler.choices: must be a list of distinct"),
    (_set(f"{P}.sampler.choices", ["euler", "euler"]), "parameters.sampler.choices: must be"),
    (_set(f"{P}.sampler.choices", ["euler", ""]), "parameters.sampler.choices: must be"),
    (_set(f"{P}.sampler.choices", "euler"), "parameters.sampler.choices: must be"),
    (_set(f"{P}.prompt.default", "a cat"), "parameters.prompt.default: prompt has no default"),
    (_set(f"{P}.seed.default", 42), "parameters.seed.default: seed has no default"),
    (
        _set(f"{P}.width.default", 500),
        "parameters.width.default: 500: width: must be a multiple of 8",
    ),
    (_set(f"{P}.width.default", 4096), "parameters.width.default: 4096: width: must be at most"),
    (_set(f"{P}.sampler.default", "ddim"), "parameters.sampler.default: 'ddim': sampler: must be"),
    (_set(f"{P}.tiled.default", "no"), "parameters.tiled.default: 'no': tiled: must be true or"),
    (_drop(f"{P}.width.bind"), "parameters.width.bind: must be a non-empty list"),
    (_set(f"{P}.width.bind", []), "parameters.width.bind: must be a non-empty list"),
    (_set(f"{P}.width.bind", {"node": "5"}), "parameters.width.bind: must be a non-empty list"),
    (_set(f"{P}.width.bind.0", "5.width"), "parameters.width.bind[0]: must be a JSON object"),
    (
        _set(f"{P}.width.bind.0.slot", 1),
        "parameters.width.bind[0]: unknown key(s) slot (allowed: field, input, node)",
    ),
    (
        _set(f"{P}.width.bind.0.node", "55"),
        "parameters.width.bind[0]: node '55' is not in the graph",
    ),
    (_set(f"{P}.width.bind.0.node", 5), "parameters.width.bind[0]: node 5 is not in the graph"),
    (
        _set("graph.5.inputs", {}),
        "parameters.width.bind[0]: node 5 (EmptyLatentImage) has no input 'width' "
        "(it has no inputs)",
    ),
    (
        _set(f"{P}.width.bind.0.input", "w"),
        "parameters.width.bind[0]: node 5 (EmptyLatentImage) has no input 'w' "
        "(it has: width, height, batch_size)",
    ),
    (
        _set(f"{P}.width.bind.0.field", "width"),
        "parameters.width.bind[0].field: 'width' is not a field (allowed: none for a integer",
    ),
    (
        _set(f"{P}.prompt.bind.0.input", "clip"),
        "parameters.prompt.bind[0]: input 6.clip is a link; bind a value input",
    ),
    (
        _set(f"{P}.width.bind.0.node", "6"),
        "parameters.width.bind[0]: node 6 (CLIPTextEncode) has no input 'width'",
    ),
    (
        _set(f"{P}.width.bind.0", {"node": "6", "input": "text"}),
        "parameters.width.bind[0]: input 6.text holds '', not a int this parameter could set",
    ),
    (
        _set(f"{P}.tiled.bind.0", {"node": "5", "input": "batch_size"}),
        "parameters.tiled.bind[0]: input 5.batch_size holds 1, not a bool",
    ),
    (
        _set(f"{P}.width.bind.0", {"node": "8", "input": "tiled"}),
        "parameters.width.bind[0]: input 8.tiled holds True, not a int",
    ),
    (
        _set(f"{P}.cfg.bind.0", {"node": "6", "input": "text"}),
        "parameters.cfg.bind[0]: input 6.text holds '', not a int or float",
    ),
    (
        _set(f"{P}.width.bind", [{"node": "5", "input": "width"}, {"node": "5", "input": "width"}]),
        "parameters.width.bind: input 5.width is already set by width",
    ),
    (
        _set(
            f"{P}.height",
            {"type": "integer", "min": 1, "max": 9, "bind": [{"node": "5", "input": "width"}]},
        ),
        "parameters.height.bind: input 5.width is already set by width; each input takes one value",
    ),
]


@pytest.mark.parametrize(("edit", "message"), BROKEN_TXT2IMG)
def test_broken_definitions(edit: Edit, message: str) -> None:
    data = txt2img_definition()
    edit(data)
    with pytest.raises(WorkflowError, match=re.escape(message)):
        parse_workflow("txt2img", data, default_checkpoint=CHECKPOINT)


BROKEN_INPAINT: list[tuple[Edit, str]] = [
    (_set(f"{P}.image.default", "/image/a.png"), "parameters.image.default: image has no default"),
    (_set(f"{P}.inpaintArea.default", {}), "parameters.inpaintArea.default: inpaintArea has no"),
    (
        _set(f"{P}.image.bind.1.field", "size"),
        "parameters.image.bind[1].field: 'size' is not a field (allowed: name, width, height)",
    ),
    (
        _drop(f"{P}.inpaintArea.bind.2.field"),
        "parameters.inpaintArea.bind[2].field: an area binding needs one of x, y, width, height",
    ),
    (
        _set(f"{P}.inpaintArea.bind.2.field", "name"),
        "parameters.inpaintArea.bind[2].field: 'name' is not a field (allowed: x, y, width",
    ),
    (
        _set(f"{P}.image.bind.0", {"node": "5", "input": "width"}),
        "parameters.image.bind[0]: input 5.width holds 8, not a str",
    ),
    (
        _set(f"{P}.image2", {"type": "image", "bind": [{"node": "1", "input": "ckpt_name"}]}),
        "parameters: at most one image and one area parameter "
        "(found ['image', 'image2', 'inpaintArea'])",
    ),
    (
        _set(
            f"{P}.area2",
            {"type": "area", "bind": [{"node": "8", "input": "grow_mask_by", "field": "x"}]},
        ),
        "parameters: at most one image and one area parameter "
        "(found ['image', 'inpaintArea', 'area2'])",
    ),
    (_drop(f"{P}.image"), "parameters.inpaintArea: an area needs an image parameter to lie inside"),
]


@pytest.mark.parametrize(("edit", "message"), BROKEN_INPAINT)
def test_broken_inpaint_definitions(edit: Edit, message: str) -> None:
    data = inpaint_definition()
    edit(data)
    with pytest.raises(WorkflowError, match=re.escape(message)):
        parse_workflow("inpaint", data, default_checkpoint=CHECKPOINT)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("bad name", txt2img_definition(), "the name 'bad name' (from the file name) must be"),
        ("-x", txt2img_definition(), "the name '-x'"),
        ("x" * 65, txt2img_definition(), "must be letters"),
        ("ok", [], "the file: must be a JSON object"),
        ("ok", None, "the file: must be a JSON object"),
    ],
)
def test_bad_names_and_shapes(name: str, data: Any, message: str) -> None:
    with pytest.raises(WorkflowError, match=re.escape(message)):
        parse_workflow(name, data, default_checkpoint=CHECKPOINT)


def test_a_bad_configured_checkpoint_is_named() -> None:
    with pytest.raises(
        WorkflowError, match=re.escape("parameters.checkpoint.default: '': checkpoint")
    ):
        parse_workflow("t", txt2img_definition(), default_checkpoint="")
