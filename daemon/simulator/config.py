"""The simulator's start-up settings (frozen); runtime knobs live in control.py."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimulatorConfig:
    """How a simulator starts. Every field has a default that mimics a stock ComfyUI.

    ``step_time`` and ``slow_factor`` are only the initial values of the runtime
    knobs of the same name (see :class:`daemon.simulator.control.SimulatorControls`).
    """

    # Seconds per progress step. None: a probe node sleeps its own `delay` input and a
    # sampler sleeps `sampler_step_time`; a number overrides both (tests use 0.01).
    step_time: float | None = None
    sampler_step_time: float = 0.05
    # Multiplies every step duration (2.0 = twice as slow).
    slow_factor: float = 1.0
    # Steps wait for grant_steps() instead of a clock (deterministic tests).
    manual_steps: bool = False
    # Previews are scaled to fit this square, up or down, like ComfyUI's 512.
    preview_size: int = 512
    # Real ComfyUI sends sampler previews only with a preview method configured.
    sampler_previews: bool = False
    # The sampler previews' format: "jpeg" (ComfyUI's default) or "png". The probe
    # node PreviewProgress always sends PNG, as the capture's did.
    preview_format: str = "jpeg"
    # False: a ComfyUI from before feature flags; it neither answers `feature_flags`
    # nor sends type 4 previews (always type 1, without a prompt id).
    preview_metadata: bool = True
    # False: a ComfyUI from before POST /prompt took a `prompt_id`; it makes up
    # its own for every prompt, whatever the body says.
    prompt_ids: bool = True
    # The sampler also sends a progress text ("step 3/20") per step, like some
    # custom samplers do (ComfyUI's own KSampler sends none).
    sampler_progress_text: bool = False
    # The checkpoint names CheckpointLoaderSimple offers (its combo list).
    checkpoints: tuple[str, ...] = (
        "v1-5-pruned-emaonly.safetensors",
        "sd_xl_base_1.0.safetensors",
    )
    # Node classes this server does not have (a ComfyUI without some custom nodes).
    hidden_nodes: tuple[str, ...] = ()
    # Saved images larger than this many pixels are drawn smaller (memory guard).
    max_render_pixels: int = 2048 * 2048
    # Generated (output/temp) files kept in memory; the oldest are dropped beyond this.
    max_stored_files: int = 5000
    # Uploaded (input) files kept in memory, in bytes; the oldest are dropped beyond this.
    max_input_bytes: int = 256 * 1024 * 1024
    max_upload_size: int = 104_857_600
    max_history: int = 10_000
    # Frames buffered per WebSocket before the simulator gives up on a slow reader.
    client_queue_size: int = 10_000
    # Seed for made-up ids (sids, prompt ids, temp names); None: os entropy.
    seed: int | None = None
    comfyui_version: str = "0.3.64"
