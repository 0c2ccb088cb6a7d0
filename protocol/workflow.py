"""Workflows: a ComfyUI API-format graph plus the parameters a request may set.

For now one built-in txt2img graph; parameterised templates loaded from files
replace it in the workflows issue.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from protocol.api import GenerateRequest
from protocol.errors import RequestError

DEFAULT_CHECKPOINT: Final = "v1-5-pruned-emaonly.safetensors"
KNOWN_WORKFLOWS: Final = ("txt2img",)


def txt2img_graph(
    *,
    prompt: str,
    seed: int,
    checkpoint: str = DEFAULT_CHECKPOINT,
    negative_prompt: str = "",
    width: int = 512,
    height: int = 512,
    steps: int = 20,
    cfg: float = 7.0,
) -> dict[str, Any]:
    """The stock ComfyUI text-to-image graph, every input given (ComfyUI wants them all)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        "7": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": negative_prompt, "clip": ["4", 1]},
        },
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": width, "height": height, "batch_size": 1},
        },
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": cfg,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": "comfy-progress", "images": ["8", 0]},
        },
    }


def bind(request: GenerateRequest, *, seed: int, checkpoint: str) -> Mapping[str, Any]:
    """The graph to submit for a request."""
    if request.workflow not in KNOWN_WORKFLOWS:
        raise RequestError(
            f"unknown workflow {request.workflow!r}",
            status_hint=404,
            details={"known": list(KNOWN_WORKFLOWS)},
        )
    if request.params:
        raise RequestError(
            f"unknown field(s): {', '.join(sorted(request.params))}",
            details={"unknown": sorted(request.params)},
        )
    return txt2img_graph(prompt=request.prompt, seed=seed, checkpoint=checkpoint)
