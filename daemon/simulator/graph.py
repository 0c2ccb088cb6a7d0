"""Graph mechanics: cache signatures, the classic output cache, execution order.

- A node's signature covers its class_type, IS_CHANGED value, literal inputs and
  (recursively) the signatures of what it links to, so renumbered but identical
  work is still a cache hit, as with ComfyUI's input-signature cache.
- The "classic" cache keeps only entries the current prompt uses (FACTS: s4 reuses
  s1's EmptyImage, s5 reuses s4's).
- ExecutionList reproduces ComfyUI's topological staging, including the "output
  node first" pick that made s12 run 1, 2, 5, 3, 4.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from daemon.simulator.nodes import NodeDef, NodeEnv


def is_link(value: Any) -> bool:
    """A `["node_id", output_index]` input."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


def _hashable(value: Any) -> Hashable:
    if isinstance(value, list):
        return ("list", tuple(_hashable(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _hashable(v)) for k, v in value.items())))
    return value  # type: ignore[no-any-return]


class _Uncacheable:
    """A signature that equals nothing, for nodes that cannot be cached."""


def signatures(
    prompt: Mapping[str, Any], catalogue: Mapping[str, NodeDef], env: NodeEnv
) -> dict[str, Hashable]:
    """The cache signature of every node of a (validated) prompt."""
    memo: dict[str, Hashable] = {}
    visiting: set[str] = set()

    def sign(node_id: str) -> Hashable:
        if node_id in memo:
            return memo[node_id]
        node = prompt.get(node_id)
        if not isinstance(node, dict) or node_id in visiting:
            return _Uncacheable()  # a dangling link or a cycle: never a cache hit
        visiting.add(node_id)
        node_def = catalogue[node["class_type"]]
        inputs = node.get("inputs")
        inputs = inputs if isinstance(inputs, dict) else {}
        changed = node_def.is_changed(env, inputs) if node_def.is_changed else None
        parts: list[Hashable] = [node["class_type"], changed]
        for key in sorted(inputs):
            value = inputs[key]
            if is_link(value):
                parts.append((key, ("LINK", sign(value[0]), value[1])))
            else:
                parts.append((key, _hashable(value)))
        visiting.discard(node_id)
        memo[node_id] = tuple(parts)
        return memo[node_id]

    return {node_id: sign(node_id) for node_id in prompt}


@dataclass(frozen=True)
class CacheEntry:
    """A node's outputs and its UI entry ({"meta", "output"}) if it had one."""

    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None


class OutputCache:
    """ComfyUI's classic cache: results keyed by signature, pruned per prompt."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, CacheEntry] = {}

    def get(self, signature: Hashable) -> CacheEntry | None:
        """The cached result, if any."""
        return self._entries.get(signature)

    def put(self, signature: Hashable, entry: CacheEntry) -> None:
        """Remember a node's result."""
        self._entries[signature] = entry

    def keep_only(self, used: set[Hashable]) -> None:
        """Forget what the prompt about to run does not use (clean_unused)."""
        self._entries = {k: v for k, v in self._entries.items() if k in used}

    def clear(self) -> None:
        """Forget everything (restart)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class ExecutionList:
    """Which node runs next: ComfyUI's TopologicalSort + ux_friendly_pick_node.

    Cached ancestors are never added; an output node always is (a cached one
    re-sends `executed`).
    """

    def __init__(
        self,
        prompt: Mapping[str, Any],
        is_cached: Callable[[str], bool],
        is_output: Callable[[str], bool],
    ) -> None:
        self._prompt = prompt
        self._is_cached = is_cached
        self._is_output = is_output
        self._pending: dict[str, None] = {}  # insertion-ordered set
        self._block_count: dict[str, int] = {}
        self._blocking: dict[str, dict[str, set[int]]] = {}
        self._staged: str | None = None

    def add_node(self, node_id: str) -> None:
        """Add a node and, depth first, every uncached node it needs."""
        stack = [node_id]
        links: list[tuple[str, int, str]] = []
        while stack:
            unique_id = stack.pop()
            if unique_id in self._pending:
                continue
            self._pending[unique_id] = None
            self._block_count[unique_id] = 0
            self._blocking[unique_id] = {}
            for value in self._prompt[unique_id]["inputs"].values():
                if is_link(value):
                    from_id, socket = value
                    if not self._is_cached(from_id):
                        stack.append(from_id)
                    links.append((from_id, socket, unique_id))
        for from_id, socket, to_id in links:
            if not self._is_cached(from_id):
                self.add_node(from_id)
                if to_id not in self._blocking[from_id]:
                    self._blocking[from_id][to_id] = set()
                    self._block_count[to_id] += 1
                self._blocking[from_id][to_id].add(socket)

    def is_empty(self) -> bool:
        """True when every node has run."""
        return not self._pending

    def stage(self) -> str:
        """Pick the next node to run among those whose inputs are ready."""
        ready = [n for n in self._pending if self._block_count[n] == 0]
        if not ready:
            raise RuntimeError("Dependency cycle detected")  # validation prevents this
        self._staged = self._pick(ready)
        return self._staged

    def complete(self) -> None:
        """The staged node finished: unblock what waited for it."""
        node_id = self._staged
        assert node_id is not None
        del self._pending[node_id]
        for blocked in self._blocking.pop(node_id):
            self._block_count[blocked] -= 1
        self._staged = None

    def _pick(self, ready: list[str]) -> str:
        # Output nodes first, then what feeds an output, then what feeds that:
        # a preview shows up as early as possible (ComfyUI's UX heuristic).
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(b) for b in self._blocking[node_id]):
                return node_id
        for node_id in ready:
            for b in self._blocking[node_id]:
                if any(self._is_output(b1) for b1 in self._blocking[b]):
                    return node_id
        return ready[0]
