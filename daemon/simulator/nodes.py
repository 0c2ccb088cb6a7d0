"""The node catalogue: the capture's probe nodes and the stock nodes real workflows use.

Input names, types, limits and the object_info shape follow ComfyUI 0.3.64's
nodes.py; the probe nodes follow the capture (tests/fixtures/comfyui/README.md).
A node's `run` gets a :class:`NodeContext` (progress, files, clock) from the executor.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from daemon.simulator.config import SimulatorConfig
from daemon.simulator.files import FileStore, annotated_filepath
from daemon.simulator.frames import JPEG_FORMAT, PNG_FORMAT, EncodedPreview
from daemon.simulator.png import encode_png, png_size
from daemon.simulator.values import (
    ConditioningValue,
    ImageValue,
    LatentValue,
    MaskValue,
    ModelValue,
    Pattern,
    stable_int,
)

MAX_RESOLUTION = 16384

SAMPLERS = (
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
)
SCHEDULERS = (
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


class NodeContext(Protocol):
    """What a running node may use; the executor provides it."""

    node_id: str
    prompt_id: str
    prompt: Mapping[str, Any]
    files: FileStore
    config: SimulatorConfig

    async def step(self, natural_seconds: float) -> None:
        """Wait one progress step (scaled by the knobs, or gated in manual mode)."""

    def progress(self, value: int, total: int, preview: EncodedPreview | None = None) -> None:
        """Report a progress tick (ComfyUI's progress-bar hook); may raise Interrupted."""

    async def encode_preview(self, image: ImageValue, image_format: int) -> EncodedPreview:
        """The image as a preview (fitted into preview_size), encoded off the event loop."""

    def progress_text(self, text: str) -> None:
        """Send a binary type-3 progress text for this node."""

    def temp_suffix(self) -> str:
        """PreviewImage's per-node random "_temp_xxxxx" name part."""


@dataclass(frozen=True)
class NodeResult:
    """A node's outputs (one per RETURN_TYPES entry) and its UI output, if any."""

    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None = None


@dataclass(frozen=True)
class NodeEnv:
    """What INPUT_TYPES, VALIDATE_INPUTS and IS_CHANGED may look at."""

    checkpoints: tuple[str, ...]
    files: FileStore


InputTypes = dict[str, dict[str, Any]]
RunFn = Callable[[NodeContext, dict[str, Any]], Awaitable[NodeResult]]


@dataclass(frozen=True)
class NodeDef:
    """One node class: its ComfyUI class attributes plus the simulated behaviour."""

    name: str
    input_types: Callable[[NodeEnv], InputTypes]
    return_types: tuple[str, ...]
    run: RunFn
    display_name: str
    category: str
    description: str = ""
    output_node: bool = False
    return_names: tuple[str, ...] | None = None
    output_tooltips: tuple[str, ...] | None = None
    python_module: str = "nodes"
    # VALIDATE_INPUTS: called with these inputs; True, False or an error string.
    validate: Callable[[NodeEnv, dict[str, Any]], bool | str] | None = None
    validate_inputs: tuple[str, ...] = ()
    # IS_CHANGED: part of the cache signature (LoadImage hashes its file).
    is_changed: Callable[[NodeEnv, dict[str, Any]], object] | None = None

    def info(self, env: NodeEnv) -> dict[str, Any]:
        """The node's /object_info entry."""
        types = self.input_types(env)
        info: dict[str, Any] = {
            "input": types,
            "input_order": {key: list(value) for key, value in types.items()},
            "output": list(self.return_types),
            "output_is_list": [False] * len(self.return_types),
            "output_name": list(self.return_names or self.return_types),
            "name": self.name,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        }
        if self.output_tooltips is not None:
            info["output_tooltips"] = list(self.output_tooltips)
        return info


def _fixed(types: InputTypes) -> Callable[[NodeEnv], InputTypes]:
    return lambda _env: types


# ---------------------------------------------------------------- images on disk


def _render(image: ImageValue, index: int, config: SimulatorConfig) -> tuple[int, int, list[bytes]]:
    width, height = image.width, image.height
    # Memory guard: draw huge pictures smaller instead of allocating gigabytes.
    while width * height > config.max_render_pixels:
        width, height = max(1, width // 2), max(1, height // 2)
    return width, height, image.pattern.variant(index).rows(width, height)


def save_images(ctx: NodeContext, images: ImageValue, prefix: str, folder: str) -> dict[str, Any]:
    """SaveImage/PreviewImage: write `{prefix}_{counter:05}_.png` files, return the UI."""
    subfolder, name = ctx.files.save_path(prefix)
    counter = ctx.files.next_counter(folder, subfolder, name)
    metadata = {"prompt": json.dumps(ctx.prompt)}
    results = []
    for index in range(images.batch):
        filename = f"{name.replace('%batch_num%', str(index))}_{counter:05}_.png"
        width, height, rows = _render(images, index, ctx.config)
        png = encode_png(width, height, rows, text=metadata)
        ctx.files.put(folder, subfolder, filename, png)
        results.append({"filename": filename, "subfolder": subfolder, "type": folder})
        counter += 1
    return {"images": results}


# ---------------------------------------------------------------- probe nodes


async def _empty_image(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    image = ImageValue(a["width"], a["height"], a["batch_size"], Pattern(color=a["color"]))
    return NodeResult((image,))


async def _slow_progress(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    steps = a["steps"]
    for i in range(1, steps + 1):
        await ctx.step(a["delay"])
        ctx.progress(i, steps)
    return NodeResult((a["image"],))


async def _failing(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    raise RuntimeError("probe failure")


async def _preview_progress(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    steps = a["steps"]
    for i in range(1, steps + 1):
        await ctx.step(a["delay"])
        ctx.progress_text(f"probe step {i}/{steps}")
        ctx.progress(i, steps, preview=await ctx.encode_preview(a["image"], PNG_FORMAT))
    return NodeResult((a["image"],))


_PROBE_IMAGE = {"image": ("IMAGE",)}
_PROBE_STEPS = {
    "steps": ("INT", {"default": 5, "min": 1, "max": 10000}),
    "delay": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 60.0, "step": 0.01}),
}


# ---------------------------------------------------------------- stock nodes


async def _save_image(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    return NodeResult((), save_images(ctx, a["images"], a["filename_prefix"], "output"))


async def _preview_image(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    return NodeResult((), save_images(ctx, a["images"], "ComfyUI" + ctx.temp_suffix(), "temp"))


async def _checkpoint_loader(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    name = a["ckpt_name"]
    return NodeResult(tuple(ModelValue(kind, name) for kind in ("MODEL", "CLIP", "VAE")))


async def _clip_text_encode(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    return NodeResult((ConditioningValue(a["text"], a["clip"].checkpoint),))


async def _empty_latent(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    latent = LatentValue(a["width"], a["height"], a["batch_size"], Pattern(color=0x808080))
    return NodeResult((latent,))


async def _ksampler(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    latent: LatentValue = a["latent_image"]
    steps: int = a["steps"]
    # The "generated" picture depends on everything a real sampler's result depends on.
    material = (
        a["seed"],
        a["positive"].text,
        a["negative"].text,
        a["model"].checkpoint,
        steps,
        a["cfg"],
        a["sampler_name"],
        a["scheduler"],
        a["denoise"],
        latent.pattern,
    )
    final = Pattern(color=stable_int("color", *material) & 0xFFFFFF, seed=stable_int(*material))
    for i in range(1, steps + 1):
        await ctx.step(ctx.config.sampler_step_time)
        preview = None
        if ctx.config.sampler_previews:
            picture = ImageValue(latent.width, latent.height, 1, final.variant(steps - i))
            image_format = PNG_FORMAT if ctx.config.preview_format == "png" else JPEG_FORMAT
            preview = await ctx.encode_preview(picture, image_format)
        if ctx.config.sampler_progress_text:
            ctx.progress_text(f"step {i}/{steps}")
        ctx.progress(i, steps, preview)
    result = LatentValue(latent.width, latent.height, latent.batch, final, latent.noise_mask)
    return NodeResult((result,))


async def _vae_decode(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    s: LatentValue = a["samples"]
    return NodeResult((ImageValue(s.width, s.height, s.batch, s.pattern),))


async def _vae_encode(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    p: ImageValue = a["pixels"]
    return NodeResult((LatentValue(p.width // 8 * 8, p.height // 8 * 8, p.batch, p.pattern),))


async def _vae_encode_inpaint(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    p: ImageValue = a["pixels"]
    latent = LatentValue(p.width // 8 * 8, p.height // 8 * 8, p.batch, p.pattern, a["mask"])
    return NodeResult((latent,))


def _load_image_path(name: str) -> tuple[str, str, str]:
    name, folder = annotated_filepath(name)
    subfolder, _, filename = name.rpartition("/")
    return folder or "input", subfolder, filename


def _read_input(env_files: FileStore, image: str) -> bytes | None:
    folder, subfolder, filename = _load_image_path(image)
    return env_files.get(folder, subfolder, filename)


async def _load_image(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    data = _read_input(ctx.files, a["image"])
    if data is None:
        raise FileNotFoundError(f"[Errno 2] No such file or directory: '{a['image']}'")
    width, height = png_size(data) or (512, 512)
    image = ImageValue(
        width, height, 1, Pattern(color=stable_int(data) & 0xFFFFFF, seed=stable_int(data))
    )
    # Without an alpha channel ComfyUI returns a 64x64 zero mask.
    return NodeResult((image, MaskValue(64, 64, 0.0)))


def _validate_load_image(env: NodeEnv, inputs: dict[str, Any]) -> bool | str:
    image = inputs.get("image")
    if not isinstance(image, str) or _read_input(env.files, image) is None:
        return f"Invalid image file: {image}"
    return True


def _load_image_changed(env: NodeEnv, inputs: dict[str, Any]) -> object:
    image = inputs.get("image")
    data = _read_input(env.files, image) if isinstance(image, str) else None
    return stable_int(data) if data is not None else None


def _load_image_types(env: NodeEnv) -> InputTypes:
    files = sorted(n for n in env.files.names_in("input") if n.lower().endswith(IMAGE_EXTENSIONS))
    return {"required": {"image": (files, {"image_upload": True})}}


async def _solid_mask(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    return NodeResult((MaskValue(a["width"], a["height"], a["value"]),))


_MASK_OPS: dict[str, Callable[[float, float], float]] = {
    "multiply": lambda d, s: d * s,
    "add": lambda d, s: d + s,
    "subtract": lambda d, s: d - s,
    "and": lambda d, s: float(round(d) and round(s)),
    "or": lambda d, s: float(round(d) or round(s)),
    "xor": lambda d, s: float(round(d) != round(s)),
}


async def _mask_composite(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    dest: MaskValue = a["destination"]
    value = _MASK_OPS[a["operation"]](dest.value, a["source"].value)
    return NodeResult((MaskValue(dest.width, dest.height, min(1.0, max(0.0, value))),))


async def _image_scale(ctx: NodeContext, a: dict[str, Any]) -> NodeResult:
    image: ImageValue = a["image"]
    width, height = a["width"], a["height"]
    if width == 0 and height == 0:
        return NodeResult((image,))
    if width == 0:
        width = max(1, round(image.width * height / image.height))
    elif height == 0:
        height = max(1, round(image.height * width / image.width))
    return NodeResult((ImageValue(width, height, image.batch, image.pattern),))


def _int(
    default: int, lo: int, hi: int, step: int | None = None, **more: Any
) -> tuple[str, dict[str, Any]]:
    opts: dict[str, Any] = {"default": default, "min": lo, "max": hi}
    if step is not None:
        opts["step"] = step
    return ("INT", {**opts, **more})


def _build() -> dict[str, NodeDef]:
    probe = "custom_nodes.progress_probe"
    save_tooltip = (
        "The prefix for the file to save. This may include formatting information such as "
        "%date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."
    )
    hidden = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    defs = [
        NodeDef(
            "EmptyImage",
            _fixed(
                {
                    "required": {
                        "width": _int(512, 1, MAX_RESOLUTION, 1),
                        "height": _int(512, 1, MAX_RESOLUTION, 1),
                        "batch_size": _int(1, 1, 4096),
                        "color": _int(0, 0, 0xFFFFFF, 1, display="color"),
                    }
                }
            ),
            ("IMAGE",),
            _empty_image,
            "EmptyImage",
            "image",
        ),
        NodeDef(
            "SlowProgress",
            _fixed({"required": {**_PROBE_IMAGE, **_PROBE_STEPS}}),
            ("IMAGE",),
            _slow_progress,
            "Slow Progress (probe)",
            "progress_probe",
            python_module=probe,
        ),
        NodeDef(
            "FailingNode",
            _fixed({"required": dict(_PROBE_IMAGE)}),
            ("IMAGE",),
            _failing,
            "Failing Node (probe)",
            "progress_probe",
            python_module=probe,
        ),
        NodeDef(
            "PreviewProgress",
            _fixed({"required": {**_PROBE_IMAGE, **_PROBE_STEPS}}),
            ("IMAGE",),
            _preview_progress,
            "Preview Progress (probe)",
            "progress_probe",
            python_module=probe,
        ),
        NodeDef(
            "SaveImage",
            _fixed(
                {
                    "required": {
                        "images": ("IMAGE", {"tooltip": "The images to save."}),
                        "filename_prefix": (
                            "STRING",
                            {"default": "ComfyUI", "tooltip": save_tooltip},
                        ),
                    },
                    "hidden": hidden,
                }
            ),
            (),
            _save_image,
            "Save Image",
            "image",
            description="Saves the input images to your ComfyUI output directory.",
            output_node=True,
        ),
        NodeDef(
            "PreviewImage",
            _fixed({"required": {"images": ("IMAGE",)}, "hidden": hidden}),
            (),
            _preview_image,
            "Preview Image",
            "image",
            description="Saves the input images to your ComfyUI output directory.",
            output_node=True,
        ),
        NodeDef(
            "CheckpointLoaderSimple",
            lambda env: {
                "required": {
                    "ckpt_name": (
                        list(env.checkpoints),
                        {"tooltip": "The name of the checkpoint (model) to load."},
                    )
                }
            },
            ("MODEL", "CLIP", "VAE"),
            _checkpoint_loader,
            "Load Checkpoint",
            "loaders",
            description=(
                "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."
            ),
            output_tooltips=(
                "The model used for denoising latents.",
                "The CLIP model used for encoding text prompts.",
                "The VAE model used for encoding and decoding images to and from latent space.",
            ),
        ),
        NodeDef(
            "CLIPTextEncode",
            _fixed(
                {
                    "required": {
                        "text": (
                            "STRING",
                            {
                                "multiline": True,
                                "dynamicPrompts": True,
                                "tooltip": "The text to be encoded.",
                            },
                        ),
                        "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."}),
                    }
                }
            ),
            ("CONDITIONING",),
            _clip_text_encode,
            "CLIP Text Encode (Prompt)",
            "conditioning",
            description=(
                "Encodes a text prompt using a CLIP model into an embedding that can be used "
                "to guide the diffusion model towards generating specific images."
            ),
            output_tooltips=(
                "A conditioning containing the embedded text used to guide the diffusion model.",
            ),
        ),
        NodeDef(
            "EmptyLatentImage",
            _fixed(
                {
                    "required": {
                        "width": _int(
                            512,
                            16,
                            MAX_RESOLUTION,
                            8,
                            tooltip="The width of the latent images in pixels.",
                        ),
                        "height": _int(
                            512,
                            16,
                            MAX_RESOLUTION,
                            8,
                            tooltip="The height of the latent images in pixels.",
                        ),
                        "batch_size": _int(
                            1, 1, 4096, tooltip="The number of latent images in the batch."
                        ),
                    }
                }
            ),
            ("LATENT",),
            _empty_latent,
            "Empty Latent Image",
            "latent",
            description="Create a new batch of empty latent images to be denoised via sampling.",
            output_tooltips=("The empty latent image batch.",),
        ),
        NodeDef(
            "KSampler",
            _fixed(
                {
                    "required": {
                        "model": (
                            "MODEL",
                            {"tooltip": "The model used for denoising the input latent."},
                        ),
                        "seed": (
                            "INT",
                            {
                                "default": 0,
                                "min": 0,
                                "max": 0xFFFFFFFFFFFFFFFF,
                                "control_after_generate": True,
                                "tooltip": "The random seed used for creating the noise.",
                            },
                        ),
                        "steps": (
                            "INT",
                            {
                                "default": 20,
                                "min": 1,
                                "max": 10000,
                                "tooltip": "The number of steps used in the denoising process.",
                            },
                        ),
                        "cfg": (
                            "FLOAT",
                            {
                                "default": 8.0,
                                "min": 0.0,
                                "max": 100.0,
                                "step": 0.1,
                                "round": 0.01,
                                "tooltip": (
                                    "The Classifier-Free Guidance scale balances "
                                    "creativity and adherence to the prompt."
                                ),
                            },
                        ),
                        "sampler_name": (
                            list(SAMPLERS),
                            {"tooltip": "The algorithm used when sampling."},
                        ),
                        "scheduler": (
                            list(SCHEDULERS),
                            {
                                "tooltip": (
                                    "The scheduler controls how noise is gradually "
                                    "removed to form the image."
                                )
                            },
                        ),
                        "positive": (
                            "CONDITIONING",
                            {
                                "tooltip": (
                                    "The conditioning describing the attributes "
                                    "you want to include in the image."
                                )
                            },
                        ),
                        "negative": (
                            "CONDITIONING",
                            {
                                "tooltip": (
                                    "The conditioning describing the attributes "
                                    "you want to exclude from the image."
                                )
                            },
                        ),
                        "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
                        "denoise": (
                            "FLOAT",
                            {
                                "default": 1.0,
                                "min": 0.0,
                                "max": 1.0,
                                "step": 0.01,
                                "tooltip": "The amount of denoising applied.",
                            },
                        ),
                    }
                }
            ),
            ("LATENT",),
            _ksampler,
            "KSampler",
            "sampling",
            description=(
                "Uses the provided model, positive and negative conditioning "
                "to denoise the latent image."
            ),
            output_tooltips=("The denoised latent.",),
        ),
        NodeDef(
            "VAEDecode",
            _fixed(
                {
                    "required": {
                        "samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
                        "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."}),
                    }
                }
            ),
            ("IMAGE",),
            _vae_decode,
            "VAE Decode",
            "latent",
            description="Decodes latent images back into pixel space images.",
            output_tooltips=("The decoded image.",),
        ),
        NodeDef(
            "VAEEncode",
            _fixed({"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}),
            ("LATENT",),
            _vae_encode,
            "VAE Encode",
            "latent",
        ),
        NodeDef(
            "VAEEncodeForInpaint",
            _fixed(
                {
                    "required": {
                        "pixels": ("IMAGE",),
                        "vae": ("VAE",),
                        "mask": ("MASK",),
                        "grow_mask_by": _int(6, 0, 64, 1),
                    }
                }
            ),
            ("LATENT",),
            _vae_encode_inpaint,
            "VAE Encode (for Inpainting)",
            "latent/inpaint",
        ),
        NodeDef(
            "LoadImage",
            _load_image_types,
            ("IMAGE", "MASK"),
            _load_image,
            "Load Image",
            "image",
            validate=_validate_load_image,
            validate_inputs=("image",),
            is_changed=_load_image_changed,
        ),
        NodeDef(
            "SolidMask",
            _fixed(
                {
                    "required": {
                        "value": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                        "width": _int(512, 1, MAX_RESOLUTION, 1),
                        "height": _int(512, 1, MAX_RESOLUTION, 1),
                    }
                }
            ),
            ("MASK",),
            _solid_mask,
            "SolidMask",
            "mask",
        ),
        NodeDef(
            "MaskComposite",
            _fixed(
                {
                    "required": {
                        "destination": ("MASK",),
                        "source": ("MASK",),
                        "x": _int(0, 0, MAX_RESOLUTION, 1),
                        "y": _int(0, 0, MAX_RESOLUTION, 1),
                        "operation": (list(_MASK_OPS),),
                    }
                }
            ),
            ("MASK",),
            _mask_composite,
            "MaskComposite",
            "mask",
        ),
        NodeDef(
            "ImageScale",
            _fixed(
                {
                    "required": {
                        "image": ("IMAGE",),
                        "upscale_method": (
                            ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],
                        ),
                        "width": _int(512, 0, MAX_RESOLUTION, 1),
                        "height": _int(512, 0, MAX_RESOLUTION, 1),
                        "crop": (["disabled", "center"],),
                    }
                }
            ),
            ("IMAGE",),
            _image_scale,
            "Upscale Image",
            "image/upscaling",
        ),
    ]
    return {d.name: d for d in defs}


def build_catalogue() -> dict[str, NodeDef]:
    """Every node class the simulator knows, by class_type."""
    return _build()
