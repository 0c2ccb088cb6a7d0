"""POST /generate, up to the task: parse, pick the workflow, check, fetch the source, bind.

Every check (`protocol.api`, `protocol.binding`, the source image's size) runs
before the only step that reaches ComfyUI, the source image's upload, so a
request that fails validation leaves ComfyUI untouched.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from daemon.comfy.http_api import ComfyHttp
from daemon.source_images import SourceImages
from protocol import api, binding
from protocol.task import TaskSpec
from protocol.workflow import Catalog

SpecFactory = Callable[[str, str, int], TaskSpec]  # (task_id, prompt_id, uid) -> spec


class Binder:
    def __init__(self, catalog: Catalog, sources: SourceImages) -> None:
        self.catalog = catalog
        self.sources = sources
        self._fields = catalog.parameter_names() - frozenset(api.COMMON_FIELDS)

    async def prepare(self, body: bytes, comfy: ComfyHttp) -> SpecFactory:
        """The task's spec factory for a /generate body. Raises RequestError, ComfyUnavailable."""
        request = api.parse_generate(body, extra_fields=self._fields)
        workflow = self.catalog.get(request.workflow)
        seed = request.seed
        if seed is None:
            seed = binding.draw_seed(workflow, secrets.randbelow)
        checked = binding.check_request(workflow, request, seed=seed)
        source = None
        image = workflow.of_type("image")
        if image is not None:
            stored = await self.sources.read(checked.values[image.name], field=image.name)
            binding.check_source(checked, stored.info.width, stored.info.height)
            comfy_name = await self.sources.to_comfy(stored, comfy)
            source = binding.SourceImage(comfy_name, stored.info.width, stored.info.height)
        graph = binding.bind(checked, source)

        def spec_for(task_id: str, prompt_id: str, uid: int) -> TaskSpec:
            return binding.task_spec(checked, graph, task_id=task_id, prompt_id=prompt_id, uid=uid)

        return spec_for
