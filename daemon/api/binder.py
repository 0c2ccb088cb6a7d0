"""POST /generate, up to the task: parse, pick the workflow, check, read the source, bind.

Nothing here reaches ComfyUI: an inpainting source is named in the spec and
uploaded by the task to whichever backend it is dispatched to.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from daemon.api.source_images import SourceImages
from daemon.comfy.capabilities import Needs, needs_of
from protocol import api, binding
from protocol.task import TaskSpec
from protocol.workflow import Catalog


@dataclass(frozen=True, slots=True)
class SpecFactory:
    """A checked, bound request: `spec_for(task_id, prompt_id, uid)` makes the task's
    spec; `graph` is the bound graph, `needs` what a backend must have to run it."""

    checked: binding.CheckedRequest
    graph: dict[str, Any]
    source_name: str | None
    needs: Needs

    def __call__(self, task_id: str, prompt_id: str, uid: int) -> TaskSpec:
        return binding.task_spec(
            self.checked,
            self.graph,
            task_id=task_id,
            prompt_id=prompt_id,
            uid=uid,
            source_image=self.source_name,
        )


class Binder:
    def __init__(self, catalog: Catalog, sources: SourceImages) -> None:
        self.catalog = catalog
        self.sources = sources
        self._fields = catalog.parameter_names() - frozenset(api.COMMON_FIELDS)
        # Seeds need spread, not secrecy: Mersenne Twister seeded from the OS at start
        # (a system-random draw per request was a getrandom(2) call each).
        self._random = random.Random()

    async def prepare(self, body: bytes) -> SpecFactory:
        """The task's spec factory for a /generate body. Raises RequestError.

        Its source image (if any) is kept from retention until `release(spec_for)`."""
        request = api.parse_generate(body, extra_fields=self._fields)
        workflow = self.catalog.get(request.workflow)
        seed = request.seed
        if seed is None:
            seed = binding.draw_seed(workflow, self._random.randrange)
        checked = binding.check_request(workflow, request, seed=seed)
        source = None
        image = workflow.of_type("image")
        if image is not None:
            # Held from here: the caller `release`s it once its task holds it.
            stored = await self.sources.read(checked.values[image.name], field=image.name)
            try:
                binding.check_source(checked, stored.info.width, stored.info.height)
                # Bound under our name; the task swaps in the name the backend stores it as.
                source = binding.SourceImage(stored.name, stored.info.width, stored.info.height)
                graph = binding.bind(checked, source)
                return SpecFactory(checked, graph, source.comfy_name, needs_of(graph))
            except BaseException:
                self.sources.release(stored.name)
                raise
        graph = binding.bind(checked, None)
        return SpecFactory(checked, graph, None, needs_of(graph))

    def release(self, spec_for: SpecFactory) -> None:
        """The request is done with its source image: its task holds it now, or it
        made none (retention kept it since `prepare` read it)."""
        if spec_for.source_name is not None:
            self.sources.release(spec_for.source_name)
