"""protocol.api: the /generate body's common fields, and which workflow a request means."""

from __future__ import annotations

import json
from typing import Any

import pytest

from protocol.api import DEFAULT_INPAINT_WORKFLOW, DEFAULT_WORKFLOW, parse_generate
from protocol.errors import RequestError


def parse(**body: Any) -> Any:
    return parse_generate(
        json.dumps({"prompt": "a fox", **body}).encode(), extra_fields=frozenset({"width"})
    )


@pytest.mark.parametrize(
    ("body", "workflow", "inpaint"),
    [
        ({}, DEFAULT_WORKFLOW, None),
        ({"inpaint": False}, DEFAULT_WORKFLOW, False),
        ({"inpaint": True}, DEFAULT_INPAINT_WORKFLOW, True),
        ({"inpaint": None}, DEFAULT_WORKFLOW, None),
        ({"workflow": None}, DEFAULT_WORKFLOW, None),
        ({"workflow": "mine", "inpaint": True}, "mine", True),
    ],
)
def test_the_workflow_a_request_means(
    body: dict[str, Any], workflow: str, inpaint: bool | None
) -> None:
    parsed = parse(**body)
    assert (parsed.workflow, parsed.inpaint) == (workflow, inpaint)


def test_workflow_parameters_are_passed_on() -> None:
    parsed = parse(width=768, seed=5, name="n", description="d")
    assert parsed.params == {"width": 768}
    assert (parsed.seed, parsed.name, parsed.description) == (5, "n", "d")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inpaint": "yes"}, "inpaint: must be true or false"),
        ({"inpaint": 1}, "inpaint: must be true or false"),
        ({"workflow": 3}, "workflow: must be a workflow name"),
        ({"workflow": ""}, "workflow: must be a workflow name"),
        ({"height": 5}, "unknown field(s): height"),
    ],
)
def test_bad_common_fields(body: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse(**body)
    assert caught.value.message == message
    assert caught.value.status_hint == 400


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"prompt":"fox","description":"\\ud800"}', "description"),
        (b'{"prompt":"fox","name":"a\\udfffb"}', "name"),
        (b'{"prompt":"fox \\ud800"}', "prompt"),
        (b'{"prompt":"fox","workflow":"\\udc80"}', "workflow"),
        (b'{"prompt":"fox","width":["ok",{"x":"\\ud83d"}]}', "width"),
        (b'{"prompt":"fox","description":"\xed\xa0\x80"}', "description"),  # raw bytes
        (b'{"prompt":"fox","\\ud800":1}', "\\ud800"),  # in a field's name
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_generate(raw, extra_fields=frozenset({"width"}))
    assert caught.value.status_hint == 400
    assert caught.value.details["field"] == field
    assert "Unicode" in caught.value.message
    caught.value.message.encode("utf-8")  # the answer itself must encode


def test_paired_surrogates_are_text() -> None:
    parsed = parse_generate(b'{"prompt":"fox \\ud83e\\udd8a"}')
    assert parsed.prompt == "fox \U0001f98a"
