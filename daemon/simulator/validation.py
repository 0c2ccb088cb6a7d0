"""POST /prompt validation with ComfyUI's exact error shapes (FACTS §5, s3_invalid).

This mirrors execution.py's validate_prompt/validate_inputs step by step,
including its quirks: inputs are converted in place (the queue and history show
the converted values), an exception while validating a linked node is filed
under the *linked* node with the *linking* input's name, and the set of
validated nodes decides which nodes get a node_errors entry.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from daemon.simulator.nodes import NodeDef, NodeEnv


class PromptCrash(Exception):
    """The real handler would raise here and aiohttp would answer a bare 500."""


@dataclass(frozen=True)
class Validation:
    """validate_prompt's 4-tuple: (ok, error, good outputs, node_errors)."""

    ok: bool
    error: dict[str, Any] | None
    outputs: list[str]
    node_errors: dict[str, Any]


def full_type_name(cls: type) -> str:
    """`RuntimeError` for builtins, `module.Class` otherwise (ComfyUI's spelling)."""
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _invalid(message: str, node_id: str) -> Validation:
    error = {
        "type": "invalid_prompt",
        "message": message,
        "details": f"Node ID '#{node_id}'",
        "extra_info": {},
    }
    return Validation(False, error, [], {})


def _no_outputs() -> Validation:
    error = {
        "type": "prompt_no_outputs",
        "message": "Prompt has no outputs",
        "details": "",
        "extra_info": {},
    }
    return Validation(False, error, [], {})


def validate_node_input(received_type: Any, input_type: Any) -> bool:
    """Whether an output type may feed an input type ("*" and "A,B" unions allowed)."""
    if received_type == input_type:
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    received = {t.strip() for t in received_type.split(",")}
    wanted = {t.strip() for t in input_type.split(",")}
    if "*" in received or "*" in wanted:
        return True
    return bool(received & wanted)


def _input_info(types: Mapping[str, Any], name: str) -> tuple[Any, str | None, dict[str, Any]]:
    for category in ("required", "optional", "hidden"):
        section = types.get(category) or {}
        if name in section:
            spec = section[name]
            if category == "hidden":
                return spec, category, {}
            extra = spec[1] if len(spec) > 1 else {}
            return spec[0], category, extra
    return None, None, {}


_Result = tuple[bool, list[dict[str, Any]], str]


class _Validator:
    def __init__(self, prompt: dict[str, Any], catalogue: Mapping[str, NodeDef], env: NodeEnv):
        self.prompt = prompt
        self.catalogue = catalogue
        self.env = env
        self.validated: dict[str, _Result] = {}
        # Real ComfyUI recurses until RecursionError on a cycle; we stop at the
        # first revisit and raise the same error from the same place.
        self.visiting: set[str] = set()

    def validate_inputs(self, unique_id: str) -> _Result:
        if unique_id in self.validated:
            return self.validated[unique_id]
        if unique_id in self.visiting:
            raise RecursionError("maximum recursion depth exceeded")
        self.visiting.add(unique_id)
        try:
            return self._validate(unique_id)
        finally:
            self.visiting.discard(unique_id)

    def _validate(self, unique_id: str) -> _Result:
        node = self.prompt[unique_id]
        inputs = node["inputs"]
        node_def = self.catalogue[node["class_type"]]
        types = node_def.input_types(self.env)
        valid_inputs = [*types.get("required", {}), *types.get("optional", {})]
        errors: list[dict[str, Any]] = []
        valid = True

        for x in valid_inputs:
            input_type, category, extra_info = _input_info(types, x)
            if x not in inputs:
                if category == "required":
                    errors.append(
                        {
                            "type": "required_input_missing",
                            "message": "Required input is missing",
                            "details": f"{x}",
                            "extra_info": {"input_name": x},
                        }
                    )
                continue

            val = inputs[x]
            info = [input_type, extra_info]
            if isinstance(val, list):
                if len(val) != 2:
                    errors.append(
                        {
                            "type": "bad_linked_input",
                            "message": (
                                "Bad linked input, must be a length-2 list of [node_id, slot_index]"
                            ),
                            "details": f"{x}",
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "received_value": val,
                            },
                        }
                    )
                    continue
                o_id = val[0]
                o_class_type = self.prompt[o_id]["class_type"]
                received_type = self.catalogue[o_class_type].return_types[val[1]]
                if not validate_node_input(received_type, input_type):
                    errors.append(
                        {
                            "type": "return_type_mismatch",
                            "message": "Return type mismatch between linked nodes",
                            "details": (
                                f"{x}, received_type({received_type}) "
                                f"mismatch input_type({input_type})"
                            ),
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "received_type": received_type,
                                "linked_node": val,
                            },
                        }
                    )
                    continue
                try:
                    r = self.validate_inputs(o_id)
                    if r[0] is False:
                        valid = False  # the reasons are already in validated[o_id]
                        continue
                except Exception as ex:  # noqa: BLE001 - ComfyUI files any exception as a reason
                    valid = False
                    self.validated[o_id] = (
                        False,
                        [
                            {
                                "type": "exception_during_inner_validation",
                                "message": "Exception when validating inner node",
                                "details": str(ex),
                                "extra_info": {
                                    "input_name": x,
                                    "input_config": info,
                                    "exception_message": str(ex),
                                    "exception_type": full_type_name(type(ex)),
                                    "traceback": traceback.format_tb(ex.__traceback__),
                                    "linked_node": val,
                                },
                            }
                        ],
                        o_id,
                    )
                    continue
            else:
                try:
                    if isinstance(val, dict) and "__value__" in val:
                        val = val["__value__"]
                        inputs[x] = val
                    if input_type == "INT":
                        val = int(val)
                        inputs[x] = val
                    if input_type == "FLOAT":
                        val = float(val)
                        inputs[x] = val
                    if input_type == "STRING":
                        val = str(val)
                        inputs[x] = val
                    if input_type == "BOOLEAN":
                        val = bool(val)
                        inputs[x] = val
                except Exception as ex:  # noqa: BLE001 - any conversion failure is a reason
                    errors.append(
                        {
                            "type": "invalid_input_type",
                            "message": f"Failed to convert an input value to a {input_type} value",
                            "details": f"{x}, {val}, {ex}",
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "received_value": val,
                                "exception_message": str(ex),
                            },
                        }
                    )
                    continue

                if x in node_def.validate_inputs:
                    continue  # VALIDATE_INPUTS replaces the min/max/list checks
                if "min" in extra_info and val < extra_info["min"]:
                    errors.append(self._range_error("smaller", "min", x, info, val))
                    continue
                if "max" in extra_info and val > extra_info["max"]:
                    errors.append(self._range_error("bigger", "max", x, info, val))
                    continue
                if isinstance(input_type, list) and val not in input_type:
                    big = len(input_type) > 20  # huge lists (model files) are not echoed
                    list_info = f"(list of length {len(input_type)})" if big else str(input_type)
                    errors.append(
                        {
                            "type": "value_not_in_list",
                            "message": "Value not in list",
                            "details": f"{x}: '{val}' not in {list_info}",
                            "extra_info": {
                                "input_name": x,
                                "input_config": None if big else info,
                                "received_value": val,
                            },
                        }
                    )
                    continue

        if node_def.validate is not None:
            filtered = {
                name: inputs[name]
                for name in node_def.validate_inputs
                if name in inputs and not isinstance(inputs[name], list)
            }
            verdict = node_def.validate(self.env, filtered)
            if verdict is not True:
                for x in filtered:
                    details = f"{x}" if verdict is False else f"{x} - {verdict}"
                    errors.append(
                        {
                            "type": "custom_validation_failed",
                            "message": "Custom validation failed for node",
                            "details": details,
                            "extra_info": {"input_name": x},
                        }
                    )

        ret: _Result = (False, errors, unique_id) if errors or not valid else (True, [], unique_id)
        self.validated[unique_id] = ret
        return ret

    @staticmethod
    def _range_error(word: str, limit: str, x: str, info: list[Any], val: Any) -> dict[str, Any]:
        return {
            "type": f"value_{word}_than_{limit}",
            "message": f"Value {val} {word} than {limit} of {info[1][limit]}",
            "details": f"{x}",
            "extra_info": {"input_name": x, "input_config": info, "received_value": val},
        }


def validate_prompt(
    prompt: Any, partial_targets: Any, catalogue: Mapping[str, NodeDef], env: NodeEnv
) -> Validation:
    """Validate a submitted graph. Mutates `prompt` (converted input values).

    Raises PromptCrash where the real server's handler raises instead of answering.
    """
    if not isinstance(prompt, dict):
        # Iterating "" or [] finds no output node; anything else crashes the handler.
        if isinstance(prompt, str | list) and len(prompt) == 0:
            return _no_outputs()
        raise PromptCrash(f"prompt is a {type(prompt).__name__}")

    outputs: list[str] = []
    for x, node in prompt.items():
        if not isinstance(node, dict):
            if isinstance(node, list | str) and "class_type" not in node:
                return _invalid(
                    "Cannot execute because a node is missing the class_type property.", x
                )
            raise PromptCrash(f"node {x} is a {type(node).__name__}")
        if "class_type" not in node:
            return _invalid("Cannot execute because a node is missing the class_type property.", x)
        class_type = node["class_type"]
        try:
            node_def = catalogue.get(class_type)
        except TypeError:
            raise PromptCrash(f"class_type of node {x} is unhashable") from None
        if node_def is None:
            return _invalid(f"Cannot execute because node {class_type} does not exist.", x)
        if node_def.output_node:
            try:
                wanted = partial_targets is None or x in partial_targets
            except TypeError:
                raise PromptCrash("partial_execution_targets is not a list") from None
            if wanted:
                outputs.append(x)

    if not outputs:
        return _no_outputs()

    validator = _Validator(prompt, catalogue, env)
    good: list[str] = []
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    for o in outputs:
        try:
            valid, reasons, _ = validator.validate_inputs(o)
        except Exception as ex:  # noqa: BLE001 - ComfyUI turns it into a reason
            valid = False
            reasons = [
                {
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": str(ex),
                    "extra_info": {
                        "exception_type": full_type_name(type(ex)),
                        "traceback": traceback.format_tb(ex.__traceback__),
                    },
                }
            ]
            validator.validated[o] = (False, reasons, o)
        if valid is True:
            good.append(o)
            continue
        failed.append((o, reasons))
        for node_id, (node_valid, node_reasons, _) in validator.validated.items():
            # Downstream nodes of a broken one are invalid without reasons: not listed.
            if node_valid is not True and node_reasons:
                if node_id not in node_errors:
                    node_errors[node_id] = {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    }
                node_errors[node_id]["dependent_outputs"].append(o)

    if not good:
        details = "\n".join(
            f"{error['message']}: {error['details']}" for _, reasons in failed for error in reasons
        )
        error = {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": details,
            "extra_info": {},
        }
        return Validation(False, error, [], node_errors)
    return Validation(True, None, good, node_errors)
