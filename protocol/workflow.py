"""Workflows: a ComfyUI API-format graph plus the parameters a request may set.

A workflow file is JSON; its file name (without `.json`) is the workflow's name::

    {
      "description": "Text to image",
      "parameters": {
        "width": {"type": "integer", "default": 512, "min": 64, "max": 2048, "multipleOf": 8,
                  "bind": [{"node": "5", "input": "width"}]},
        ...
      },
      "graph": { ComfyUI's API format: "5": {"class_type": "EmptyLatentImage", "inputs": {...}} }
    }

A parameter's name is the request field that sets it. It binds to one or more
node inputs, which must exist in the graph with a value of the same kind (so
the graph stays a valid ComfyUI graph as it is). Types: `string` (maxLength,
10 000 when not given), `integer` and `number` (min and max required,
multipleOf for integers), `boolean`, `choice` (choices), `checkpoint` (a model
file name; its default is the configured one unless the file gives one),
`image` (the URL of an image the daemon holds; its bindings pick `"field"`
`name` (the default), `width` or `height`) and `area` (`{x, y, width, height}`
in pixels, inside the image; every binding picks a `"field"`). A parameter
without a default is required, except `seed`, which the daemon draws when a
request has none. A workflow with an `area` parameter inpaints.

`parse_workflow` checks all of that and raises `WorkflowError` saying where
(`parameters.width.bind[0]: ...`); the daemon adds the file name.
"""

from __future__ import annotations

import math
import re
import sys
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from protocol.api import MAX_PROMPT_CHARS, MAX_SEED
from protocol.errors import RequestError, field_error

MAX_RESOLUTION: Final = 16384  # ComfyUI's per-side limit (SolidMask, MaskComposite, ...)
DEFAULT_MAX_LENGTH: Final = 10_000
MAX_CHECKPOINT_CHARS: Final = 255
SEED: Final = "seed"
PROMPT: Final = "prompt"
# Request fields that are not graph parameters (protocol.api handles them).
RESERVED_NAMES: Final = frozenset({"workflow", "name", "description", "inpaint"})
IMAGE_FIELDS: Final = ("name", "width", "height")
AREA_FIELDS: Final = ("x", "y", "width", "height")

_WORKFLOW_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_PARAMETER_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
# The last path segment of an image URL the daemon served: /image/<name>. Any
# prefix (a reverse proxy's, or scheme and host) is fine: we only look the name up.
_IMAGE_URL_PATH: Final = re.compile(r"(?:.*/)?image/([A-Za-z0-9_-][A-Za-z0-9_.-]{0,127})")
_CONTROL_CHARS: Final = re.compile(r"[\x00-\x1f\x7f]")


class WorkflowError(Exception):
    """A workflow definition is broken; the message says where and what."""


# ---------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class Binding:
    """One node input a parameter sets; `field` picks a part of an image or area."""

    node: str
    input: str
    field: str | None = None


@dataclass(frozen=True, slots=True)
class Area:
    """A rectangle in pixels (the seed's inpaintArea)."""

    x: int
    y: int
    width: int
    height: int

    def to_json(self) -> dict[str, int]:
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height}


def image_name_from_url(url: str) -> str | None:
    """`/image/abc.png` or `http://host/image/abc.png?v=1` -> `abc.png`; None otherwise."""
    try:
        path = urllib.parse.urlsplit(url).path
    except ValueError:
        return None
    match = _IMAGE_URL_PATH.fullmatch(path)
    return match.group(1) if match else None


# ---------------------------------------------------------------------------
# Parameters and their checks


@dataclass(frozen=True, slots=True)
class Parameter:
    name: str
    type: str
    bind: tuple[Binding, ...]
    default: Any = None
    description: str = ""
    min: int | float | None = None
    max: int | float | None = None
    multiple_of: int | None = None
    max_length: int | None = None
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is None and self.name != SEED

    def check(self, value: Any) -> Any:
        """The request's value, checked against this declaration (None is not a value)."""
        return _CHECKS[self.type](self, value)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "required": self.required}
        if self.default is not None:
            out["default"] = self.default
        for key, limit in (
            ("min", self.min),
            ("max", self.max),
            ("multipleOf", self.multiple_of),
            ("maxLength", self.max_length),
        ):
            if limit is not None:
                out[key] = limit
        if self.choices:
            out["choices"] = list(self.choices)
        if self.type == "area":
            out["fields"] = list(AREA_FIELDS)
        if self.description:
            out["description"] = self.description
        return out


def _in_range(p: Parameter, value: int | float) -> None:
    if p.min is not None and value < p.min:
        raise field_error(p.name, f"must be at least {p.min}", min=p.min)
    if p.max is not None and value > p.max:
        raise field_error(p.name, f"must be at most {p.max}", max=p.max)


def _check_string(p: Parameter, value: Any) -> str:
    if not isinstance(value, str):
        raise field_error(p.name, "must be a string")
    limit = p.max_length if p.max_length is not None else DEFAULT_MAX_LENGTH
    if len(value) > limit:
        raise field_error(p.name, f"must be at most {limit} characters", maxLength=limit)
    return value


def _check_integer(p: Parameter, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise field_error(p.name, "must be an integer")
    _in_range(p, value)
    if p.multiple_of is not None and value % p.multiple_of:
        step = p.multiple_of
        raise field_error(p.name, f"must be a multiple of {step}", multipleOf=step)
    return value


def _check_number(p: Parameter, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise field_error(p.name, "must be a number")
    # An int is finite, and may be too large for a float (OverflowError): range first.
    if isinstance(value, float) and not math.isfinite(value):
        raise field_error(p.name, "must be a number")
    _in_range(p, value)
    return float(value)


def _check_boolean(p: Parameter, value: Any) -> bool:
    if not isinstance(value, bool):
        raise field_error(p.name, "must be true or false")
    return value


def _check_choice(p: Parameter, value: Any) -> str:
    if not isinstance(value, str) or value not in p.choices:
        raise field_error(p.name, f"must be one of {', '.join(p.choices)}", choices=list(p.choices))
    return value


def _check_checkpoint(p: Parameter, value: Any) -> str:
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_CHECKPOINT_CHARS
        or _CONTROL_CHARS.search(value)
        or ".." in value.replace("\\", "/").split("/")
    ):
        raise field_error(
            p.name,
            f"must be a checkpoint file name of 1 to {MAX_CHECKPOINT_CHARS} characters",
            maxLength=MAX_CHECKPOINT_CHARS,
        )
    return value


def _check_image(p: Parameter, value: Any) -> str:
    name = image_name_from_url(value) if isinstance(value, str) else None
    if name is None:
        raise field_error(
            p.name,
            "must be the URL of an image from this daemon, like /image/<name> "
            "(a generated image, or one sent to POST /upload)",
        )
    return name


def _check_area(p: Parameter, value: Any) -> Area:
    if not isinstance(value, dict) or set(value) != set(AREA_FIELDS):
        rule = "must be an object with exactly x, y, width and height"
        raise field_error(p.name, rule, fields=list(AREA_FIELDS))
    for key in AREA_FIELDS:
        part, lowest = value[key], (0 if key in ("x", "y") else 1)
        where = f"{p.name}.{key}"
        if isinstance(part, bool) or not isinstance(part, int):
            raise field_error(where, "must be an integer (pixels)")
        if part < lowest:
            raise field_error(where, f"must be at least {lowest}", min=lowest)
        if part > MAX_RESOLUTION:
            raise field_error(where, f"must be at most {MAX_RESOLUTION}", max=MAX_RESOLUTION)
    return Area(value["x"], value["y"], value["width"], value["height"])


_CHECKS: Final[Mapping[str, Callable[[Parameter, Any], Any]]] = {
    "string": _check_string,
    "integer": _check_integer,
    "number": _check_number,
    "boolean": _check_boolean,
    "choice": _check_choice,
    "checkpoint": _check_checkpoint,
    "image": _check_image,
    "area": _check_area,
}
PARAMETER_TYPES: Final = tuple(_CHECKS)

# The keys a parameter declaration may have, beyond type/description/default/bind.
_TYPE_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "string": frozenset({"maxLength"}),
    "integer": frozenset({"min", "max", "multipleOf"}),
    "number": frozenset({"min", "max"}),
    "boolean": frozenset(),
    "choice": frozenset({"choices"}),
    "checkpoint": frozenset(),
    "image": frozenset(),
    "area": frozenset(),
}
_COMMON_KEYS: Final = frozenset({"type", "description", "default", "bind"})
# What a bound graph input must hold already, per parameter type and binding field.
_NUMBER: Final = (int, float)


def _input_kinds(kind: str, part: str | None) -> tuple[type, ...]:
    if kind in ("string", "choice", "checkpoint") or (kind == "image" and part == "name"):
        return (str,)
    if kind == "number":
        return _NUMBER
    if kind == "boolean":
        return (bool,)
    return (int,)  # integer, image width/height, area fields


# ---------------------------------------------------------------------------
# Workflows


@dataclass(frozen=True, slots=True)
class Workflow:
    name: str
    graph: Mapping[str, Any] = field(repr=False, hash=False)
    parameters: Mapping[str, Parameter] = field(hash=False)  # in the file's order
    description: str = ""

    def of_type(self, kind: str) -> Parameter | None:
        return next((p for p in self.parameters.values() if p.type == kind), None)

    @property
    def inpaint(self) -> bool:
        return self.of_type("area") is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "inpaint": self.inpaint,
            "parameters": [p.to_json() for p in self.parameters.values()],
        }


@dataclass(frozen=True, slots=True)
class Catalog:
    """The workflows a daemon offers, by name."""

    workflows: Mapping[str, Workflow]

    def get(self, name: str) -> Workflow:
        found = self.workflows.get(name)
        if found is None:
            raise RequestError(
                f"unknown workflow {name!r}",
                status_hint=404,
                details={"field": "workflow", "known": sorted(self.workflows)},
            )
        return found

    def parameter_names(self) -> frozenset[str]:
        return frozenset(n for w in self.workflows.values() for n in w.parameters)

    def to_json(self) -> dict[str, Any]:
        return {"workflows": [self.workflows[n].to_json() for n in sorted(self.workflows)]}


# ---------------------------------------------------------------------------
# Reading a workflow definition


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WorkflowError(f"{where}: must be a JSON object")
    return value


def _no_unknown_keys(value: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise WorkflowError(
            f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )


def _links(inputs: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for name, value in inputs.items():
        if isinstance(value, list):
            yield name, value


def _graph(raw: Any) -> dict[str, Any]:
    graph = _object(raw, "graph")
    if not graph:
        raise WorkflowError("graph: has no nodes")
    for node_id, node in graph.items():
        where = f"graph.{node_id}"
        _object(node, where)
        if not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise WorkflowError(f"{where}.class_type: must be a node class name")
        _object(node.get("inputs"), f"{where}.inputs")
        # In ComfyUI's API format every list is a link: [node id, output slot].
        for name, link in _links(node["inputs"]):
            ok = (
                len(link) == 2
                and isinstance(link[0], str)
                and isinstance(link[1], int)
                and not isinstance(link[1], bool)
                and link[1] >= 0
            )
            if not ok:
                raise WorkflowError(f"{where}.inputs.{name}: a link must be [node id, slot]")
            if link[0] not in graph:
                raise WorkflowError(f"{where}.inputs.{name}: node {link[0]!r} is not in the graph")
    return graph


def _limit(spec: Mapping[str, Any], key: str, where: str, *, integer: bool) -> Any:
    value = spec.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int if integer else _NUMBER)
        # JSON files may say NaN or Infinity (Python reads them): a NaN limit
        # would hold nothing back, and GET /workflows could not show either.
        # An int is finite (math.isfinite raises OverflowError past a float);
        # a number's limit must fit the float its values become.
        or (not integer and not abs(value) <= sys.float_info.max)
    ):
        raise WorkflowError(f"{where}.{key}: must be {'an integer' if integer else 'a number'}")
    return value


def _bindings(kind: str, raw: Any, graph: Mapping[str, Any], where: str) -> tuple[Binding, ...]:
    if not isinstance(raw, list) or not raw:
        raise WorkflowError(f"{where}.bind: must be a non-empty list of {{node, input}}")
    out = []
    fields = {"image": IMAGE_FIELDS, "area": AREA_FIELDS}.get(kind, ())
    for index, item in enumerate(raw):
        at = f"{where}.bind[{index}]"
        _no_unknown_keys(_object(item, at), frozenset({"node", "input", "field"}), at)
        node, name, part = item.get("node"), item.get("input"), item.get("field")
        if not isinstance(node, str) or node not in graph:
            raise WorkflowError(f"{at}: node {node!r} is not in the graph")
        inputs = graph[node]["inputs"]
        if not isinstance(name, str) or name not in inputs:
            has = f"it has: {', '.join(inputs)}" if inputs else "it has no inputs"
            raise WorkflowError(
                f"{at}: node {node} ({graph[node]['class_type']}) has no input {name!r} ({has})"
            )
        if kind == "image" and part is None:
            part = "name"
        if part is not None and part not in fields:
            allowed = ", ".join(fields) if fields else f"none for a {kind} parameter"
            raise WorkflowError(f"{at}.field: {part!r} is not a field (allowed: {allowed})")
        if kind == "area" and part is None:
            raise WorkflowError(f"{at}.field: an area binding needs one of {', '.join(fields)}")
        current = inputs[name]
        wanted = _input_kinds(kind, part)
        if isinstance(current, list):
            raise WorkflowError(f"{at}: input {node}.{name} is a link; bind a value input")
        if isinstance(current, bool) != (bool in wanted) or not isinstance(current, wanted):
            raise WorkflowError(
                f"{at}: input {node}.{name} holds {current!r}, "
                f"not a {' or '.join(t.__name__ for t in wanted)} this parameter could set"
            )
        out.append(Binding(node, name, part))
    return tuple(out)


def _parameter(
    name: str, raw: Any, graph: Mapping[str, Any], *, default_checkpoint: str
) -> Parameter:
    where = f"parameters.{name}"
    if not _PARAMETER_NAME.fullmatch(name):
        raise WorkflowError(f"{where}: a parameter name is a letter, then letters, digits or _")
    if name in RESERVED_NAMES:
        raise WorkflowError(f"{where}: {name!r} is a request field of its own, not a parameter")
    spec = _object(raw, where)
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in _CHECKS:
        raise WorkflowError(f"{where}.type: {kind!r} is not one of {', '.join(PARAMETER_TYPES)}")
    if name == PROMPT and kind != "string":
        raise WorkflowError(f"{where}.type: the prompt is a string")
    if name == SEED and kind != "integer":
        raise WorkflowError(f"{where}.type: the seed is an integer")
    _no_unknown_keys(spec, _COMMON_KEYS | _TYPE_KEYS[kind], where)
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise WorkflowError(f"{where}.description: must be a string")
    integer = kind == "integer"
    low = _limit(spec, "min", where, integer=integer)
    high = _limit(spec, "max", where, integer=integer)
    if kind in ("integer", "number") and (low is None or high is None):
        raise WorkflowError(f"{where}: a {kind} parameter needs both min and max")
    if low is not None and high is not None and low > high:
        raise WorkflowError(f"{where}: min {low} is above max {high}")
    if name == SEED and (low < 0 or high > MAX_SEED):
        # A request's seed is always in 0..MAX_SEED; a seed drawn outside it
        # would reach ComfyUI.
        raise WorkflowError(f"{where}: min and max must lie within 0 to 2^64-1")
    multiple = _limit(spec, "multipleOf", where, integer=True)
    max_length = _limit(spec, "maxLength", where, integer=True)
    if kind == "string" and max_length is None:
        max_length = DEFAULT_MAX_LENGTH  # every string is bounded, and GET /workflows says so
    for key, value in (("multipleOf", multiple), ("maxLength", max_length)):
        if value is not None and value < 1:
            raise WorkflowError(f"{where}.{key}: must be at least 1")
    if multiple is not None and high // multiple * multiple < low:
        # No value could pass: every request would be refused, a drawn seed too.
        raise WorkflowError(
            f"{where}: no multiple of {multiple} lies between min {low} and max {high}"
        )
    if name == PROMPT and max_length is not None and max_length > MAX_PROMPT_CHARS:
        # A request's prompt is refused past this before any workflow is asked:
        # GET /workflows must not promise more.
        raise WorkflowError(f"{where}.maxLength: must be at most {MAX_PROMPT_CHARS}")
    choices = spec.get("choices", ())
    if kind == "choice" and (
        not isinstance(choices, list)
        or not choices
        or not all(isinstance(c, str) and c for c in choices)
        or len(set(choices)) != len(choices)
    ):
        raise WorkflowError(f"{where}.choices: must be a list of distinct non-empty strings")
    default = spec.get("default")
    if default is not None and (kind in ("image", "area") or name in (PROMPT, SEED)):
        raise WorkflowError(f"{where}.default: {name} has no default; requests must give it")
    if default is None and kind == "checkpoint":
        default = default_checkpoint
    param = Parameter(
        name=name,
        type=kind,
        bind=_bindings(kind, spec.get("bind"), graph, where),
        description=description,
        min=low,
        max=high,
        multiple_of=multiple,
        max_length=max_length,
        choices=tuple(choices),
    )
    if default is not None:
        try:
            default = param.check(default)
        except RequestError as exc:
            raise WorkflowError(f"{where}.default: {default!r}: {exc.message}") from None
    return replace(param, default=default)


def _check_whole(parameters: Mapping[str, Parameter]) -> None:
    images = [p.name for p in parameters.values() if p.type == "image"]
    areas = [p.name for p in parameters.values() if p.type == "area"]
    if len(images) > 1 or len(areas) > 1:
        raise WorkflowError(
            f"parameters: at most one image and one area parameter (found {images + areas})"
        )
    if areas and not images:
        raise WorkflowError(
            f"parameters.{areas[0]}: an area needs an image parameter to lie inside"
        )
    bound: dict[tuple[str, str], str] = {}
    for param in parameters.values():
        for b in param.bind:
            key = (b.node, b.input)
            if key in bound:
                raise WorkflowError(
                    f"parameters.{param.name}.bind: input {b.node}.{b.input} is already set by "
                    f"{bound[key]}; each input takes one value"
                )
            bound[key] = param.name


def parse_workflow(name: str, data: Any, *, default_checkpoint: str) -> Workflow:
    """Check a workflow definition (the parsed JSON of its file) and build the Workflow."""
    if not _WORKFLOW_NAME.fullmatch(name):
        raise WorkflowError(
            f"the name {name!r} (from the file name) must be letters, digits, - or _, "
            "at most 64, starting with a letter or digit"
        )
    top = _object(data, "the file")
    _no_unknown_keys(top, frozenset({"description", "parameters", "graph"}), "the file")
    description = top.get("description", "")
    if not isinstance(description, str):
        raise WorkflowError("description: must be a string")
    graph = _graph(top.get("graph"))
    raw_parameters = _object(top.get("parameters"), "parameters")
    parameters = {
        key: _parameter(key, value, graph, default_checkpoint=default_checkpoint)
        for key, value in raw_parameters.items()
    }
    _check_whole(parameters)
    return Workflow(
        name=name, graph=_links_as_tuples(graph), parameters=parameters, description=description
    )


def _links_as_tuples(value: Any) -> Any:
    """The graph with its arrays (links: ["4", 0]) as tuples, which JSON writes alike.

    Every task holds a copy of its graph until it ends. The cyclic garbage
    collector stops tracking a tuple of strings and numbers at its first
    collection, never a list: with lists, a queue of 2,000 tasks kept ~10
    more objects each in every older-generation collection (`make bench`,
    generate), and each of those collections took longer."""
    if isinstance(value, dict):
        return {key: _links_as_tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_links_as_tuples(item) for item in value)
    return value
