"""How progress is shown: step text per node type, percentages, overall progress, ETA.

Pure arithmetic; the task state machine (protocol/task/) calls these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

# Human-readable step text per ComfyUI class_type (the seed's NODE_STEP_NAMES,
# extended with the other stock nodes a txt2img or inpaint graph uses).
NODE_STEP_NAMES: Final[Mapping[str, str]] = {
    "CheckpointLoaderSimple": "Loading model...",
    "CheckpointLoader": "Loading model...",
    "UNETLoader": "Loading model...",
    "CLIPLoader": "Loading text encoder...",
    "DualCLIPLoader": "Loading text encoder...",
    "VAELoader": "Loading VAE...",
    "LoraLoader": "Loading LoRA...",
    "ControlNetLoader": "Loading ControlNet...",
    "UpscaleModelLoader": "Loading upscaler...",
    "CLIPTextEncode": "Encoding prompt...",
    "CLIPSetLastLayer": "Preparing text encoder...",
    "EmptyLatentImage": "Preparing latent image...",
    "EmptyImage": "Preparing image...",
    "LoadImage": "Loading image...",
    "LoadImageMask": "Loading mask...",
    "SolidMask": "Building mask...",
    "MaskComposite": "Building mask...",
    "VAEEncode": "Encoding image...",
    "VAEEncodeForInpaint": "Preparing inpainting...",
    "SetLatentNoiseMask": "Preparing inpainting...",
    "KSampler": "Sampling image...",
    "KSamplerAdvanced": "Sampling image...",
    "SamplerCustom": "Sampling image...",
    "SamplerCustomAdvanced": "Sampling image...",
    "ControlNetApply": "Applying ControlNet...",
    "ControlNetApplyAdvanced": "Applying ControlNet...",
    "VAEDecode": "Decoding image...",
    "VAEDecodeTiled": "Decoding image...",
    "ImageScale": "Scaling image...",
    "ImageScaleBy": "Scaling image...",
    "ImageUpscaleWithModel": "Upscaling image...",
    "SaveImage": "Saving image...",
    "PreviewImage": "Preparing preview...",
}

STEP_STARTING: Final = "Starting..."
STEP_QUEUED: Final = "Queued"
STEP_WAITING_FOR_BACKEND: Final = "Waiting for ComfyUI..."
STEP_BACKEND_AWAY: Final = "Waiting for ComfyUI to come back..."
STEP_REQUEUED: Final = "Requeued"
STEP_FETCHING_OUTPUT: Final = "Saving image..."
STEP_COMPLETE: Final = "Complete"
STEP_FAILED: Final = "Failed"
STEP_CANCELLING: Final = "Cancelling..."


def step_name(class_type: str | None) -> str:
    """The step text for a node type, with a readable fallback for any other node."""
    if class_type is None:
        return "Processing..."
    known = NODE_STEP_NAMES.get(class_type)
    if known is not None:
        return known
    return f"Running {class_type}..."


def queued_step(ahead: int) -> str:
    """'Queued (2 ahead)' while other prompts run first; 'Queued' when next in line."""
    return f"{STEP_QUEUED} ({ahead} ahead)" if ahead > 0 else STEP_QUEUED


def requeued_step(ahead: int) -> str:
    """'Requeued (2 ahead)': resubmitted after its backend lost it, waiting for a backend."""
    return f"{STEP_REQUEUED} ({ahead} ahead)" if ahead > 0 else STEP_REQUEUED


def percentage(value: float, maximum: float) -> float:
    """value/max*100 (the seed's formula), clamped to 0..100, 0 when max is not positive."""
    if maximum <= 0:
        return 0.0
    return round(min(100.0, max(0.0, value / maximum * 100.0)), 1)


@dataclass(frozen=True, slots=True)
class Overall:
    """Progress over the whole graph: finished nodes plus the running node's fraction."""

    percentage: float
    nodes_done: int
    nodes_total: int

    def to_json(self) -> dict[str, float | int]:
        pct = self.percentage
        return {
            "percentage": int(pct) if float(pct).is_integer() else pct,
            "nodesDone": self.nodes_done,
            "nodesTotal": self.nodes_total,
        }


def overall(previous: float, nodes_done: int, nodes_total: int, running_fraction: float) -> Overall:
    """Overall progress that never goes backwards (cached nodes count as done)."""
    if nodes_total <= 0:
        return Overall(previous, nodes_done, nodes_total)
    fraction = min(1.0, max(0.0, running_fraction))
    raw = (min(nodes_done, nodes_total) + fraction) / nodes_total * 100.0
    return Overall(max(previous, round(min(100.0, raw), 1)), nodes_done, nodes_total)


@dataclass(frozen=True, slots=True)
class TickOrigin:
    """The first progress tick seen for the running node: the base of its rate."""

    node: str | None
    at: float
    value: float


def eta_seconds(
    origin: TickOrigin | None, now: float, value: float, maximum: float
) -> float | None:
    """Seconds left for the running node at the rate observed since its first tick.

    Sampler nodes dominate a generation's time, so the current node's step rate
    is the best cheap estimate; None until two ticks give a rate.
    """
    if origin is None or maximum <= 0:
        return None
    steps_done = value - origin.value
    elapsed = now - origin.at
    if steps_done <= 0 or elapsed <= 0:
        return None
    remaining = max(0.0, maximum - value)
    return round(remaining * elapsed / steps_done, 1)
