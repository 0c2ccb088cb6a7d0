"""The public JSON API: /generate requests in, the shapes we answer with out.

Validation errors are `RequestError`s naming the field and the rule it broke,
so the HTTP layer can answer 400 with `{"error": {"message", "details"}}`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from protocol.errors import RequestError, field_error

MAX_PROMPT_CHARS: Final = 10_000
MAX_NAME_CHARS: Final = 200
MAX_DESCRIPTION_CHARS: Final = 2_000
MAX_SEED: Final = 2**64 - 1  # ComfyUI's KSampler seed is an unsigned 64-bit int
DEFAULT_WORKFLOW: Final = "txt2img"
DEFAULT_INPAINT_WORKFLOW: Final = "inpaint"  # when a request says inpaint but names no workflow


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A validated POST /generate body."""

    prompt: str
    workflow: str = DEFAULT_WORKFLOW
    seed: int | None = None  # None: the daemon picks one and reports it back
    name: str | None = None
    description: str | None = None
    inpaint: bool | None = None  # None: whatever the workflow does
    # Workflow parameters beyond the common ones (negativePrompt, width, steps...),
    # checked against the workflow's declaration when the request is bound.
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)


COMMON_FIELDS: Final = ("prompt", "workflow", "seed", "name", "description", "inpaint")


def _optional_text(body: Mapping[str, Any], name: str, limit: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise field_error(name, "must be a string")
    if len(value) > limit:
        raise field_error(name, f"must be at most {limit} characters", limit=limit)
    return value


def _has_lone_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _bad_text_in(value: Any) -> bool:
    """Does this JSON value hold a string (or key) that is not valid Unicode?"""
    pending = [value]  # a stack, not recursion: nesting may be as deep as the parser allowed
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _has_lone_surrogate(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _printable_name(key: str) -> str:
    # A field name may itself hold the surrogate; the error must still encode.
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def parse_json_object(raw: bytes, what: str = "request body") -> dict[str, Any]:
    """A JSON object whose every string is valid Unicode.

    JSON allows lone surrogates (`"\\ud800"`) and Python's decoder lets the raw
    bytes ED A0 80 through as one too; such text cannot be encoded as UTF-8
    later (in a snapshot, the journal, ComfyUI's request), so it is refused here,
    naming the field that holds it.
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise RequestError(f"{what} is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError(f"{what} must be a JSON object")
    for key, value in body.items():
        if _has_lone_surrogate(key) or _bad_text_in(value):
            raise field_error(_printable_name(key), "is not valid Unicode (a lone surrogate)")
    return body


def parse_generate(raw: bytes, *, extra_fields: frozenset[str] = frozenset()) -> GenerateRequest:
    """Validate a POST /generate body. `extra_fields` are the workflow parameters we know."""
    body = parse_json_object(raw)
    unknown = sorted(set(body) - set(COMMON_FIELDS) - extra_fields)
    if unknown:
        allowed = sorted(set(COMMON_FIELDS) | extra_fields)
        raise RequestError(
            f"unknown field(s): {', '.join(unknown)}",
            details={"unknown": unknown, "allowed": allowed},
        )
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise field_error("prompt", "is required and must be a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise field_error(
            "prompt", f"must be at most {MAX_PROMPT_CHARS} characters", limit=MAX_PROMPT_CHARS
        )
    inpaint = body.get("inpaint")
    if inpaint is not None and not isinstance(inpaint, bool):
        raise field_error("inpaint", "must be true or false")
    workflow = body.get("workflow")
    if workflow is None:
        workflow = DEFAULT_INPAINT_WORKFLOW if inpaint else DEFAULT_WORKFLOW
    if not isinstance(workflow, str) or not workflow:
        raise field_error("workflow", "must be a workflow name")
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
    ):
        raise field_error("seed", f"must be an integer from 0 to {MAX_SEED}", min=0, max=MAX_SEED)
    return GenerateRequest(
        prompt=prompt,
        workflow=workflow,
        seed=seed,
        name=_optional_text(body, "name", MAX_NAME_CHARS),
        description=_optional_text(body, "description", MAX_DESCRIPTION_CHARS),
        inpaint=inpaint,
        params={k: v for k, v in body.items() if k not in COMMON_FIELDS},
    )


def accepted_reply(task_id: str) -> dict[str, str]:
    """The 202 answer to POST /generate."""
    return {
        "taskId": task_id,
        "status": "queued",
        "progressUrl": f"/progress/{task_id}",
        "statusUrl": f"/tasks/{task_id}",
    }
