"""Small workflow definitions for the protocol tests (ComfyUI's API format, stock node names)."""

from __future__ import annotations

from typing import Any

from protocol.workflow import Workflow, parse_workflow

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


def bind(node: str, name: str, part: str | None = None) -> dict[str, str]:
    out = {"node": node, "input": name}
    if part is not None:
        out["field"] = part
    return out


def txt2img_definition() -> dict[str, Any]:
    return {
        "description": "text to image",
        "parameters": {
            "prompt": {"type": "string", "maxLength": 50, "bind": [bind("6", "text")]},
            "negativePrompt": {"type": "string", "default": "", "bind": [bind("7", "text")]},
            "seed": {"type": "integer", "min": 10, "max": 2**64 - 1, "bind": [bind("3", "seed")]},
            "width": {
                "type": "integer",
                "default": 512,
                "min": 64,
                "max": 2048,
                "multipleOf": 8,
                "bind": [bind("5", "width")],
            },
            "cfg": {
                "type": "number",
                "default": 7,
                "min": 0,
                "max": 30,
                "bind": [bind("3", "cfg")],
            },
            "sampler": {
                "type": "choice",
                "default": "euler",
                "choices": ["euler", "heun"],
                "bind": [bind("3", "sampler_name")],
            },
            "tiled": {"type": "boolean", "default": False, "bind": [bind("8", "tiled")]},
            "checkpoint": {"type": "checkpoint", "bind": [bind("4", "ckpt_name")]},
        },
        "graph": {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
            "5": {
                "class_type": "EmptyLatentImage",
                "inputs": {"width": 512, "height": 512, "batch_size": 1},
            },
            "3": {
                "class_type": "KSampler",
                "inputs": {
                    "seed": 0,
                    "steps": 20,
                    "cfg": 8.0,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 1.0,
                    "model": ["4", 0],
                    "positive": ["6", 0],
                    "negative": ["7", 0],
                    "latent_image": ["5", 0],
                },
            },
            "8": {
                "class_type": "VAEDecodeMaybeTiled",
                "inputs": {"samples": ["3", 0], "vae": ["4", 2], "tiled": True},
            },
            "9": {
                "class_type": "SaveImage",
                "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
            },
        },
    }


def inpaint_definition() -> dict[str, Any]:
    return {
        "parameters": {
            "prompt": {"type": "string", "bind": [bind("2", "text")]},
            "image": {
                "type": "image",
                "bind": [
                    bind("4", "image"),
                    bind("5", "width", "width"),
                    bind("5", "height", "height"),
                ],
            },
            "inpaintArea": {
                "type": "area",
                "bind": [
                    bind("6", "width", "width"),
                    bind("6", "height", "height"),
                    bind("7", "x", "x"),
                    bind("7", "y", "y"),
                ],
            },
        },
        "graph": {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "4": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
            "5": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 8, "height": 8}},
            "6": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 8, "height": 8}},
            "7": {
                "class_type": "MaskComposite",
                "inputs": {
                    "destination": ["5", 0],
                    "source": ["6", 0],
                    "x": 0,
                    "y": 0,
                    "operation": "add",
                },
            },
            "8": {
                "class_type": "VAEEncodeForInpaint",
                "inputs": {
                    "pixels": ["4", 0],
                    "vae": ["1", 2],
                    "mask": ["7", 0],
                    "grow_mask_by": 6,
                },
            },
        },
    }


def txt2img() -> Workflow:
    return parse_workflow("txt2img", txt2img_definition(), default_checkpoint=CHECKPOINT)


def inpaint() -> Workflow:
    return parse_workflow("inpaint", inpaint_definition(), default_checkpoint=CHECKPOINT)
