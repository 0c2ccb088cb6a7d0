"""POST /generate's binder: the spec factory it hands the route."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.api.binder import Binder
from daemon.api.source_images import SourceImages
from daemon.comfy.capabilities import needs_of
from daemon.images.store import ImageStore
from daemon.workflow_files import load_catalog


async def test_the_spec_factory_knows_what_its_graph_needs(tmp_path: Path) -> None:
    catalog = load_catalog(None, default_checkpoint="shipped.safetensors")
    binder = Binder(catalog, SourceImages(ImageStore(tmp_path)))
    spec_for = await binder.prepare(json.dumps({"prompt": "a red fox"}).encode())
    # Worked out once, for the 422 check and the task's place in the queue alike.
    assert spec_for.needs == needs_of(spec_for.graph)
    assert "KSampler" in spec_for.needs.classes
    assert spec_for.needs.checkpoints == {"shipped.safetensors"}
    spec = spec_for("t", "p", 1)
    assert spec.graph == spec_for.graph
    assert spec.source_image is None
