"""protocol.binding: every request value checked, then put into the graph."""

from __future__ import annotations

import gc
import json
import math
import re
from dataclasses import replace
from typing import Any

import pytest

from protocol.api import GenerateRequest
from protocol.binding import (
    SourceImage,
    bind,
    check_request,
    check_source,
    copy_graph,
    draw_seed,
    task_spec,
)
from protocol.errors import RequestError
from protocol.workflow import Area, Parameter, Workflow
from tests.protocol.workflow_samples import CHECKPOINT, inpaint, txt2img

AREA = {"x": 16, "y": 32, "width": 64, "height": 48}
SOURCE: dict[str, Any] = {"image": "/image/src_0123456789abcdef.png", "inpaintArea": AREA}


def request(
    workflow: str = "txt2img", inpaint: bool | None = None, **params: Any
) -> GenerateRequest:
    return GenerateRequest(prompt="a fox", workflow=workflow, inpaint=inpaint, params=params)


def test_defaults_fill_what_the_request_leaves_out() -> None:
    checked = check_request(txt2img(), request(width=None), seed=42)
    assert checked.values == {
        "prompt": "a fox",
        "negativePrompt": "",
        "seed": 42,
        "width": 512,
        "cfg": 7.0,
        "sampler": "euler",
        "tiled": False,
        "checkpoint": CHECKPOINT,
    }
    assert checked.area is None


def test_links_are_tuples_the_collector_stops_tracking_and_json_writes_as_arrays() -> None:
    graph = bind(check_request(txt2img(), request(), seed=2**64 - 1))
    link = graph["6"]["inputs"]["clip"]
    gc.collect()
    # A list would stay tracked, and be scanned by every collection while the task lives.
    assert not gc.is_tracked(link)
    assert json.loads(json.dumps(graph))["6"]["inputs"]["clip"] == ["4", 1]


def test_bind_puts_each_value_into_its_inputs_and_leaves_the_template_alone() -> None:
    workflow = txt2img()
    given = request(
        negativePrompt="blurry",
        width=768,
        cfg=5,
        sampler="heun",
        tiled=True,
        checkpoint="sd_xl_base_1.0.safetensors",
    )
    graph = bind(check_request(workflow, given, seed=2**64 - 1))
    assert graph["6"]["inputs"] == {"text": "a fox", "clip": ("4", 1)}  # a link: a tuple
    assert graph["7"]["inputs"]["text"] == "blurry"
    assert graph["5"]["inputs"] == {"width": 768, "height": 512, "batch_size": 1}
    sampler = graph["3"]["inputs"]
    assert (sampler["seed"], sampler["cfg"], sampler["sampler_name"]) == (2**64 - 1, 5.0, "heun")
    assert isinstance(sampler["cfg"], float)
    assert sampler["steps"] == 20  # not a parameter: as in the file
    assert graph["8"]["inputs"]["tiled"] is True
    assert graph["4"]["inputs"]["ckpt_name"] == "sd_xl_base_1.0.safetensors"
    assert workflow.graph["6"]["inputs"]["text"] == ""  # the template is untouched
    assert workflow.graph["5"]["inputs"]["width"] == 512
    graph["3"]["inputs"]["model"] = ("9", 0)
    graph["3"]["inputs"]["extra"] = 1
    assert workflow.graph["3"]["inputs"]["model"] == ("4", 0)  # no dict shared (links
    assert "extra" not in workflow.graph["3"]["inputs"]  # are tuples: nothing to change)


def test_copy_graph_shares_nothing_mutable_and_keeps_types() -> None:
    link = ["4", 0]
    nested = ("5", [1])  # a tuple holding a list: copied too
    graph = {
        "3": {
            "inputs": {"seed": 2**64 - 1, "cfg": 7.0, "tiled": True, "a": link, "b": link},
            "class_type": "KSampler",
            "links": [("4", 0), nested, {"deep": [link]}],
        }
    }
    copied = copy_graph(graph)
    assert copied == graph
    inputs = copied["3"]["inputs"]
    assert (type(inputs["cfg"]), type(inputs["tiled"])) == (float, bool)
    inputs["a"].append("x")
    copied["3"]["links"][1][1].append(2)
    copied["3"]["links"][2]["deep"][0].append("y")
    assert link == ["4", 0]  # nothing mutable shared with the original...
    assert nested == ("5", [1])
    assert inputs["b"] == ["4", 0]  # ...nor between two places of the copy
    # What cannot change is shared: a task's graph costs half the memory.
    assert copied["3"]["class_type"] is graph["3"]["class_type"]
    assert copied["3"]["links"][0] is graph["3"]["links"][0]  # type: ignore[index]
    assert inputs["seed"] is graph["3"]["inputs"]["seed"]  # type: ignore[index]

    class Opaque:
        pass

    odd = {"1": {"inputs": {"value": Opaque()}}}
    assert copy_graph(odd)["1"]["inputs"]["value"] is not odd["1"]["inputs"]["value"]


def test_inpainting_binds_the_source_and_the_area() -> None:
    checked = check_request(inpaint(), request("inpaint", True, **SOURCE), seed=7)
    assert checked.values["image"] == "src_0123456789abcdef.png"  # the store's name
    assert checked.area == Area(16, 32, 64, 48)
    graph = bind(checked, SourceImage("src_0123456789abcdef.png", 640, 480))
    assert graph["4"]["inputs"]["image"] == "src_0123456789abcdef.png"
    assert graph["5"]["inputs"] == {"value": 0.0, "width": 640, "height": 480}
    assert graph["6"]["inputs"] == {"value": 1.0, "width": 64, "height": 48}
    assert (graph["7"]["inputs"]["x"], graph["7"]["inputs"]["y"]) == (16, 32)
    with pytest.raises(ValueError, match="needs the source image"):
        bind(checked)


def test_task_spec_echoes_the_request() -> None:
    workflow = inpaint()
    given = GenerateRequest(
        prompt="a hat",
        workflow="inpaint",
        seed=None,
        name="Bob",
        description="Bob with a hat",
        params=SOURCE,
    )
    checked = check_request(workflow, given, seed=99)
    graph = bind(checked, SourceImage("in.png", 640, 480))
    spec = task_spec(checked, graph, task_id="t", prompt_id="p", uid=1234, source_image="in.png")
    assert (spec.task_id, spec.prompt_id, spec.uid) == ("t", "p", 1234)
    assert spec.source_image == "in.png"
    assert spec.graph == graph
    assert (spec.prompt, spec.seed, spec.name, spec.description) == (
        "a hat",
        99,
        "Bob",
        given.description,
    )
    assert spec.workflow == "inpaint"
    assert spec.inpaint is True
    assert spec.inpaint_area == AREA
    plain = check_request(txt2img(), request(), seed=11)
    spec = task_spec(plain, bind(plain), task_id="t", prompt_id="p", uid=1)
    assert (spec.inpaint, spec.inpaint_area, spec.workflow) == (False, None, "txt2img")
    assert spec.source_image is None


def _error(workflow: Workflow, given: GenerateRequest, seed: int = 42) -> RequestError:
    with pytest.raises(RequestError) as caught:
        check_request(workflow, given, seed=seed)
    return caught.value


T2I: list[tuple[dict[str, Any], str, dict[str, Any]]] = [
    ({"width": "512"}, "width: must be an integer", {}),
    ({"width": 512.0}, "width: must be an integer", {}),
    ({"width": True}, "width: must be an integer", {}),
    ({"width": 56}, "width: must be at least 64", {"min": 64}),
    ({"width": 2056}, "width: must be at most 2048", {"max": 2048}),
    ({"width": 516}, "width: must be a multiple of 8", {"multipleOf": 8}),
    ({"cfg": "7"}, "cfg: must be a number", {}),
    ({"cfg": False}, "cfg: must be a number", {}),
    ({"cfg": math.nan}, "cfg: must be a number", {}),  # json.loads accepts NaN
    ({"cfg": math.inf}, "cfg: must be a number", {}),
    ({"cfg": -0.5}, "cfg: must be at least 0", {"min": 0}),
    ({"cfg": 30.5}, "cfg: must be at most 30", {"max": 30}),
    ({"cfg": 10**400}, "cfg: must be at most 30", {"max": 30}),  # no float holds it
    ({"negativePrompt": ["a"]}, "negativePrompt: must be a string", {}),
    (
        {"negativePrompt": "x" * 10_001},
        "negativePrompt: must be at most 10000 characters",
        {"maxLength": 10_000},
    ),
    ({"sampler": "ddim"}, "sampler: must be one of euler, heun", {"choices": ["euler", "heun"]}),
    ({"sampler": ["euler"]}, "sampler: must be one of euler, heun", {"choices": ["euler", "heun"]}),
    ({"tiled": "yes"}, "tiled: must be true or false", {}),
    ({"tiled": 1}, "tiled: must be true or false", {}),
    (
        {"checkpoint": ""},
        "checkpoint: must be a checkpoint file name of 1 to 255",
        {"maxLength": 255},
    ),
    ({"checkpoint": "x" * 256}, "checkpoint: must be a checkpoint file name", {"maxLength": 255}),
    ({"checkpoint": "../../etc/passwd"}, "checkpoint: must be a checkpoint", {"maxLength": 255}),
    ({"checkpoint": "sd\\..\\x"}, "checkpoint: must be a checkpoint", {"maxLength": 255}),
    ({"checkpoint": "a\nb"}, "checkpoint: must be a checkpoint", {"maxLength": 255}),
    ({"checkpoint": 3}, "checkpoint: must be a checkpoint", {"maxLength": 255}),
    (
        {"inpaintArea": AREA},
        "inpaintArea: is not a parameter of workflow 'txt2img'",
        {"workflow": "txt2img"},
    ),
]


@pytest.mark.parametrize(("params", "message", "details"), T2I)
def test_each_bad_value_names_its_field_and_limit(
    params: dict[str, Any], message: str, details: dict[str, Any]
) -> None:
    error = _error(txt2img(), request(**params))
    assert error.status_hint == 400
    assert error.message == message or error.message.startswith(message)
    field = message.split(":", 1)[0]
    assert error.details["field"] == field
    assert details.items() <= error.details.items()


def test_the_workflow_limits_apply_to_prompt_and_seed_too() -> None:
    long = GenerateRequest(prompt="x" * 51, workflow="txt2img")
    assert _error(txt2img(), long).message == "prompt: must be at most 50 characters"
    low = _error(txt2img(), request(), seed=9)
    assert (low.message, low.details["min"]) == ("seed: must be at least 10", 10)


def test_unknown_parameters_list_the_known_ones() -> None:
    error = _error(inpaint(), request("inpaint", width=512, **SOURCE))
    assert error.message == "width: is not a parameter of workflow 'inpaint'"
    assert error.details["parameters"] == ["prompt", "image", "inpaintArea"]


@pytest.mark.parametrize(
    ("workflow", "inpaint_flag", "message"),
    [
        (
            txt2img(),
            True,
            "inpaint: workflow 'txt2img' does not inpaint; leave inpaint out or set it to false",
        ),
        (
            inpaint(),
            False,
            "inpaint: workflow 'inpaint' inpaints; leave inpaint out or set it to true",
        ),
    ],
)
def test_inpaint_must_agree_with_the_workflow(
    workflow: Workflow, inpaint_flag: bool, message: str
) -> None:
    error = _error(workflow, request(workflow.name, inpaint_flag, **SOURCE))
    assert error.message == message
    assert error.details["field"] == "inpaint"


INPAINT: list[tuple[dict[str, Any], str, dict[str, Any]]] = [
    ({"inpaintArea": AREA}, "image: is required by workflow 'inpaint'", {}),
    ({"image": SOURCE["image"]}, "inpaintArea: is required by workflow 'inpaint'", {}),
    ({**SOURCE, "image": None}, "image: is required by workflow 'inpaint'", {}),
    ({**SOURCE, "image": 12}, "image: must be the URL of an image from this daemon", {}),
    ({**SOURCE, "image": "/view?filename=x.png"}, "image: must be the URL of an image", {}),
    (
        {**SOURCE, "inpaintArea": [0, 0, 8, 8]},
        "inpaintArea: must be an object with exactly x, y",
        {},
    ),
    (
        {**SOURCE, "inpaintArea": {"x": 0, "y": 0, "width": 8}},
        "inpaintArea: must be an object with exactly x, y, width and height",
        {"fields": ["x", "y", "width", "height"]},
    ),
    (
        {**SOURCE, "inpaintArea": {**AREA, "w": 1}},
        "inpaintArea: must be an object with exactly",
        {},
    ),
    (
        {**SOURCE, "inpaintArea": {**AREA, "x": "1"}},
        "inpaintArea.x: must be an integer (pixels)",
        {},
    ),
    (
        {**SOURCE, "inpaintArea": {**AREA, "y": 1.5}},
        "inpaintArea.y: must be an integer (pixels)",
        {},
    ),
    (
        {**SOURCE, "inpaintArea": {**AREA, "width": True}},
        "inpaintArea.width: must be an integer",
        {},
    ),
    ({**SOURCE, "inpaintArea": {**AREA, "x": -1}}, "inpaintArea.x: must be at least 0", {"min": 0}),
    (
        {**SOURCE, "inpaintArea": {**AREA, "height": 0}},
        "inpaintArea.height: must be at least 1",
        {"min": 1},
    ),
    (
        {**SOURCE, "inpaintArea": {**AREA, "width": 16385}},
        "inpaintArea.width: must be at most 16384",
        {"max": 16384},
    ),
]


@pytest.mark.parametrize(("params", "message", "details"), INPAINT)
def test_inpainting_values(params: dict[str, Any], message: str, details: dict[str, Any]) -> None:
    error = _error(inpaint(), request("inpaint", **params))
    assert error.status_hint == 400
    assert error.message.startswith(message)
    assert error.details["field"] == message.split(":", 1)[0]
    assert details.items() <= error.details.items()


@pytest.mark.parametrize(
    ("area", "size", "message"),
    [
        ({"x": 0, "y": 0, "width": 640, "height": 480}, (640, 480), None),
        ({"x": 600, "y": 0, "width": 40, "height": 480}, (640, 480), None),
        (
            {"x": 601, "y": 0, "width": 40, "height": 10},
            (640, 480),
            "inpaintArea: must lie inside the 640x480 source image (x + width = 641 > 640)",
        ),
        (
            {"x": 0, "y": 470, "width": 10, "height": 11},
            (640, 480),
            "inpaintArea: must lie inside the 640x480 source image (y + height = 481 > 480)",
        ),
        (
            {"x": 0, "y": 0, "width": 8, "height": 8},
            (16385, 16),
            "image: the image is 16385x16 pixels; each side must be at most 16384",
        ),
        (
            {"x": 0, "y": 0, "width": 8, "height": 8},
            (16, 16385),
            "image: the image is 16x16385 pixels; each side must be at most 16384",
        ),
    ],
)
def test_the_area_must_lie_inside_the_source(
    area: dict[str, int], size: tuple[int, int], message: str | None
) -> None:
    checked = check_request(
        inpaint(), request("inpaint", image=SOURCE["image"], inpaintArea=area), seed=1
    )
    if message is None:
        check_source(checked, *size)
        bind(checked, SourceImage("in.png", *size))
        return
    with pytest.raises(RequestError, match=re.escape(message)) as caught:
        check_source(checked, *size)
    assert caught.value.details["field"] == message.split(":", 1)[0]
    with pytest.raises(RequestError, match=re.escape(message)):
        bind(checked, SourceImage("in.png", *size))  # bind checks again


def test_check_source_ignores_workflows_without_a_source() -> None:
    check_source(check_request(txt2img(), request(), seed=10), 99_999, 99_999)


def test_draw_seed_stays_within_the_workflows_limits() -> None:
    asked: list[int] = []

    def randbelow(n: int) -> int:
        asked.append(n)
        return n - 1

    assert draw_seed(txt2img(), randbelow) == 10 + 2**32 - 1  # min 10, span capped at 2**32
    assert draw_seed(inpaint(), randbelow) == 2**32 - 1  # no seed parameter
    small = txt2img()
    narrow = {**small.parameters, "seed": _with(small, "seed", min=3, max=5)}
    assert draw_seed(Workflow("w", small.graph, narrow), randbelow) == 5
    assert asked == [2**32, 2**32, 3]


def test_a_drawn_seed_is_a_multiple_the_seed_takes() -> None:
    # A seed with multipleOf: the seed was drawn from the whole range, so a
    # request without one was mostly refused ("seed: must be a multiple of 10").
    base = txt2img()
    tens = {**base.parameters, "seed": _with(base, "seed", min=3, max=25, multiple_of=10)}
    workflow = Workflow("w", base.graph, tens)
    lowest, highest = (draw_seed(workflow, pick) for pick in (lambda n: 0, lambda n: n - 1))
    assert (lowest, highest) == (10, 20)
    for seed in (lowest, highest):
        assert check_request(workflow, request(), seed=seed).values["seed"] == seed


def _with(workflow: Workflow, name: str, **changes: Any) -> Parameter:
    return replace(workflow.parameters[name], **changes)
