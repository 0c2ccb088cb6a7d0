"""What a backend can run: the node classes and checkpoints a workflow needs, read from
ComfyUI's `/object_info/{class}` (one small request per class the workflows use, not the
whole multi-megabyte `/object_info`).

A reading is kept while its backend is away: dispatch and the 4xx for a workflow no
backend can run both go by the last reading.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from daemon.comfy.http_api import ComfyHttp

CHECKPOINT_INPUT: Final = "ckpt_name"  # the input that binds a checkpoint file


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Needs:
    """What one graph needs from a backend."""

    classes: frozenset[str]
    checkpoints: frozenset[str]


# The tasks of one workflow need the same: they share one Needs (0.7 KB each
# otherwise, and thousands of tasks may wait), kept while some task holds it.
_shared_needs: weakref.WeakValueDictionary[tuple[frozenset[str], frozenset[str]], Needs] = (
    weakref.WeakValueDictionary()
)


def needs_of(graph: Mapping[str, Any]) -> Needs:
    classes: set[str] = set()
    checkpoints: set[str] = set()
    for node in graph.values():
        # dict first: an isinstance check against the Mapping ABC is several times slower.
        if not isinstance(node, dict | Mapping) or not isinstance(node.get("class_type"), str):
            continue
        classes.add(node["class_type"])
        inputs = node.get("inputs")
        if isinstance(inputs, dict | Mapping) and isinstance(inputs.get(CHECKPOINT_INPUT), str):
            checkpoints.add(inputs[CHECKPOINT_INPUT])
    key = (frozenset(classes), frozenset(checkpoints))  # (not the Needs: keys are held)
    needs = _shared_needs.get(key)
    if needs is None:
        needs = _shared_needs[key] = Needs(*key)
    return needs


def combo_options(info: Mapping[str, Any], input_name: str) -> frozenset[str] | None:
    """The choices of a combo input in an /object_info entry, in either of ComfyUI's forms:
    `[["a", "b"], {...}]` or `["COMBO", {"options": ["a", "b"]}]`."""
    inputs = info.get("input")
    if not isinstance(inputs, Mapping):
        return None
    for group in ("required", "optional"):
        spec = (
            inputs.get(group, {}).get(input_name)
            if isinstance(inputs.get(group), Mapping)
            else None
        )
        if not isinstance(spec, list) or not spec:
            continue
        if isinstance(spec[0], list):
            return frozenset(str(o) for o in spec[0])
        if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], Mapping):
            options = spec[1].get("options")
            if isinstance(options, list):
                return frozenset(str(o) for o in options)
    return None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """One reading of a backend: which of the asked classes it has, which checkpoints."""

    present: frozenset[str]
    absent: frozenset[str]
    checkpoints: frozenset[str] | None  # None: no loader told us

    def missing(self, needs: Needs) -> str | None:
        """Why this backend cannot run `needs` (None: it can, or it was not asked);
        of several things missing, the first class, else checkpoint, by name."""
        # Asked for each queued task and each dispatch: set operations first, and
        # a sort only when something is missing.
        if absent := needs.classes & self.absent:
            return f"node class {min(absent)}"
        if self.checkpoints is not None and (lacking := needs.checkpoints - self.checkpoints):
            return f"checkpoint {min(lacking)}"
        return None

    def unknown(self, needs: Needs) -> frozenset[str]:
        """Classes of `needs` this reading did not cover."""
        return needs.classes - self.present - self.absent

    def to_json(self) -> dict[str, Any]:
        return {
            "nodeClasses": len(self.present),
            "missingNodeClasses": sorted(self.absent),
            "checkpoints": sorted(self.checkpoints) if self.checkpoints is not None else None,
        }


async def read_capabilities(http: ComfyHttp, classes: Iterable[str]) -> Capabilities:
    """Ask for each class; raises BackendUnavailable when ComfyUI does not answer."""
    present: set[str] = set()
    absent: set[str] = set()
    checkpoints: set[str] | None = None
    for node_class in sorted(set(classes)):
        info = await http.object_info(node_class)
        if info is None:
            absent.add(node_class)
            continue
        present.add(node_class)
        options = combo_options(info, CHECKPOINT_INPUT)
        if options is not None:
            checkpoints = (checkpoints or set()) | options
    return Capabilities(
        frozenset(present),
        frozenset(absent),
        frozenset(checkpoints) if checkpoints is not None else None,
    )
