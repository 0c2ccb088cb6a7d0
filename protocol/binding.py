"""Binding a /generate request to a workflow: check every value, then fill the graph.

Three steps, so that everything is checked before anything reaches ComfyUI:

1. `check_request(workflow, request, seed=...)` checks each parameter against
   its declaration (defaults filled in) and returns a `CheckedRequest`. An
   inpainting request names its source image: the value of the workflow's
   image parameter is that image's name in the daemon's store.
2. The daemon reads that image and its pixel size; `check_source` checks the
   area lies inside it.
3. The daemon uploads the image to ComfyUI; `bind(checked, source)` returns
   the graph to submit, and `task_spec` what the task echoes in its result.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from protocol.api import GenerateRequest
from protocol.errors import field_error
from protocol.task import TaskSpec
from protocol.workflow import MAX_RESOLUTION, PROMPT, SEED, Area, Parameter, Workflow

# A drawn seed stays below 2**32: exact in JavaScript and short to read back.
DRAWN_SEED_SPAN: Final = 2**32


@dataclass(frozen=True, slots=True)
class SourceImage:
    """The inpainting source as ComfyUI knows it: LoadImage's file name, and its size."""

    comfy_name: str
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class CheckedRequest:
    workflow: Workflow
    request: GenerateRequest
    seed: int
    # Every parameter's value: defaults filled in, an image as its store name,
    # an area as an Area.
    values: Mapping[str, Any] = field(hash=False)

    @property
    def area(self) -> Area | None:
        param = self.workflow.of_type("area")
        area: Area | None = None if param is None else self.values[param.name]
        return area


def draw_seed(workflow: Workflow, randbelow: Callable[[int], int]) -> int:
    """A random seed within the workflow's seed limits.

    `randbelow(n)` gives 0 <= r < n (the daemon passes a Random's randrange)."""
    param = workflow.parameters.get(SEED)
    if param is None or param.min is None or param.max is None:
        return randbelow(DRAWN_SEED_SPAN)
    # Only multiples of multipleOf pass the seed's check: draw one of those.
    step = param.multiple_of or 1
    first = -(-int(param.min) // step) * step
    count = (int(param.max) - first) // step + 1
    return first + step * randbelow(min(count, DRAWN_SEED_SPAN))


def check_request(workflow: Workflow, request: GenerateRequest, *, seed: int) -> CheckedRequest:
    """Check the request's values against the workflow; raises RequestError (400)."""
    if request.inpaint is not None and request.inpaint != workflow.inpaint:
        does = "inpaints" if workflow.inpaint else "does not inpaint"
        raise field_error(
            "inpaint",
            f"workflow {workflow.name!r} {does}; leave inpaint out or set it to "
            f"{str(workflow.inpaint).lower()}",
            workflow=workflow.name,
        )
    unknown = sorted(set(request.params) - set(workflow.parameters))
    if unknown:
        raise field_error(
            unknown[0],
            f"is not a parameter of workflow {workflow.name!r}",
            workflow=workflow.name,
            parameters=list(workflow.parameters),
        )
    given = {**request.params, PROMPT: request.prompt, SEED: seed}
    values = {p.name: _value(p, given.get(p.name), workflow) for p in workflow.parameters.values()}
    return CheckedRequest(workflow=workflow, request=request, seed=seed, values=values)


def _value(param: Parameter, value: Any, workflow: Workflow) -> Any:
    if value is None:  # absent and null alike
        if param.required:
            raise field_error(param.name, f"is required by workflow {workflow.name!r}")
        return param.default
    return param.check(value)


def check_source(checked: CheckedRequest, width: int, height: int) -> None:
    """The source image is `width` x `height`: it must fit ComfyUI, the area must fit it."""
    image = checked.workflow.of_type("image")
    if image is None:
        return
    if width > MAX_RESOLUTION or height > MAX_RESOLUTION:
        raise field_error(
            image.name,
            f"the image is {width}x{height} pixels; each side must be at most {MAX_RESOLUTION}",
            max=MAX_RESOLUTION,
        )
    area = checked.area
    area_param = checked.workflow.of_type("area")
    if area is None or area_param is None:
        return
    right, bottom = area.x + area.width, area.y + area.height
    if right > width or bottom > height:
        overflow = f"x + width = {right} > {width}"
        if right <= width:
            overflow = f"y + height = {bottom} > {height}"
        raise field_error(
            area_param.name,
            f"must lie inside the {width}x{height} source image ({overflow})",
            imageWidth=width,
            imageHeight=height,
        )


def _part(param: Parameter, value: Any, part: str | None, source: SourceImage | None) -> Any:
    if param.type == "image":
        if source is None:
            raise ValueError("bind() needs the source image of an inpainting workflow")
        return source.comfy_name if part == "name" else getattr(source, part or "")
    if param.type == "area":
        return getattr(value, part or "")
    return value


# Values a graph copy shares with its original: nothing can change them.
_SHARED_TYPES: Final = frozenset((str, int, float, bool, type(None)))


def copy_graph(graph: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a JSON-shaped graph that shares nothing mutable with it: dicts
    and lists are new, strings, numbers and tuples of them (links) are shared.
    A task holds its graph while it waits: sharing them halves what the copy
    costs in memory (5.5 -> 2.9 KB for txt2img; a marshal round trip made new
    strings too). Anything else is copied with copy.deepcopy."""
    return {k: v if type(v) in _SHARED_TYPES else _copy_value(v) for k, v in graph.items()}


def _copy_value(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: v if type(v) in _SHARED_TYPES else _copy_value(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _SHARED_TYPES else _copy_value(v) for v in value]
    if kind is tuple:
        if all(type(v) in _SHARED_TYPES for v in value):
            return value
        return tuple(_copy_value(v) for v in value)
    if kind in _SHARED_TYPES:
        return value
    return copy.deepcopy(value)


def bind(checked: CheckedRequest, source: SourceImage | None = None) -> dict[str, Any]:
    """The graph to submit: the workflow's graph with every parameter's value in place."""
    if source is not None:  # the caller checked already; a graph must never get a bad area
        check_source(checked, source.width, source.height)
    graph = copy_graph(checked.workflow.graph)
    for param in checked.workflow.parameters.values():
        value = checked.values[param.name]
        for target in param.bind:
            graph[target.node]["inputs"][target.input] = _part(param, value, target.field, source)
    return graph


def task_spec(
    checked: CheckedRequest,
    graph: Mapping[str, Any],
    *,
    task_id: str,
    prompt_id: str,
    uid: int,
    source_image: str | None = None,
) -> TaskSpec:
    """What the task is created with; its result echoes these fields. `source_image`:
    our name of an inpainting source the graph refers to."""
    request = checked.request
    area = checked.area
    return TaskSpec(
        task_id=task_id,
        prompt_id=prompt_id,
        graph=graph,
        prompt=request.prompt,
        workflow=checked.workflow.name,
        seed=checked.seed,
        name=request.name,
        description=request.description,
        inpaint=checked.workflow.inpaint,
        inpaint_area=area.to_json() if area is not None else None,
        uid=uid,
        source_image=source_image,
    )


def replace_input_value(graph: Mapping[str, Any], old: str, new: str) -> Mapping[str, Any]:
    """The graph with every input whose value is `old` set to `new` (a source image's name
    as the chosen backend stored it); the same graph when nothing changes."""
    if old == new:
        return graph
    out = copy_graph(graph)
    for node in out.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict):
            for key, value in inputs.items():
                if value == old:
                    inputs[key] = new
    return out
