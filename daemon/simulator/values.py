"""The values that flow along the links of a simulated graph, and how pictures look.

Nothing here holds pixels: a picture is a size plus a :class:`Pattern`, drawn only
when a PNG is needed, so graphs stay cheap and everything is deterministic.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace


def stable_int(*parts: object) -> int:
    """A 63-bit integer derived from `parts`, equal across runs (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(repr, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class Pattern:
    """How a simulated picture looks, independent of its size (so scaling is free).

    `seed` None is a flat `color`; otherwise a seeded diagonal gradient over it.
    """

    color: int = 0
    seed: int | None = None

    def variant(self, index: int) -> Pattern:
        """A related pattern (another image of a batch, an earlier sampler step)."""
        if index == 0:
            return self
        base = self.seed if self.seed is not None else self.color
        return replace(self, seed=stable_int(base, index))

    def rows(self, width: int, height: int) -> list[bytes]:
        """`height` rows of `width` RGB pixels.

        A seeded pattern is a mosaic of about 32x32 flat cells: cheap to draw in
        pure Python and small once deflated (~25 KB at 512x512), which matters
        for a long soak that keeps every image in memory.
        """
        r0, g0, b0 = (self.color >> 16) & 0xFF, (self.color >> 8) & 0xFF, self.color & 0xFF
        if self.seed is None:
            row = bytes((r0, g0, b0)) * width
            return [row] * height
        rnd = random.Random(self.seed)
        ox, oy, fx, fy = (
            rnd.randrange(256),
            rnd.randrange(256),
            rnd.randint(1, 3),
            rnd.randint(1, 3),
        )
        cell = max(1, min(width, height) // 32)
        cols, lines = -(-width // cell), -(-height // cell)
        rows: list[bytes] = []
        for cy in range(lines):
            green = (cy * 256 * fy // lines + oy + g0) & 0xFF
            flip = (cy * 8 // lines) % 2  # blue runs the other way every eighth band
            cells = []
            for cx in range(cols):
                red = (cx * 256 * fx // cols + ox + r0) & 0xFF
                blue = ((cols - 1 - cx if flip else cx) * 512 * fy // cols + b0) & 0xFF
                cells.append(bytes((red, green, blue)) * cell)
            row = b"".join(cells)[: 3 * width]
            rows.extend([row] * min(cell, height - cy * cell))
        return rows


@dataclass(frozen=True)
class ImageValue:
    """IMAGE: a batch of pictures."""

    width: int
    height: int
    batch: int
    pattern: Pattern

    def __str__(self) -> str:
        # ComfyUI reports inputs with str(tensor); this keeps the spirit, not the digits.
        return f"tensor(<IMAGE {self.batch}x{self.height}x{self.width}x3>)"


@dataclass(frozen=True)
class MaskValue:
    """MASK: a uniform mask (value 0.0..1.0)."""

    width: int
    height: int
    value: float

    def __str__(self) -> str:
        return f"tensor(<MASK 1x{self.height}x{self.width} value={self.value}>)"


@dataclass(frozen=True)
class LatentValue:
    """LATENT: sizes are kept in pixels (the latent itself would be 1/8)."""

    width: int
    height: int
    batch: int
    pattern: Pattern
    noise_mask: MaskValue | None = None

    def __str__(self) -> str:
        return (
            f"{{'samples': tensor(<LATENT {self.batch}x4x{self.height // 8}x{self.width // 8}>)}}"
        )


@dataclass(frozen=True)
class ModelValue:
    """MODEL, CLIP or VAE: only the checkpoint name matters to the simulator."""

    kind: str
    checkpoint: str

    def __str__(self) -> str:
        return f"<comfy {self.kind} from {self.checkpoint}>"


@dataclass(frozen=True)
class ConditioningValue:
    """CONDITIONING: the encoded prompt text."""

    text: str
    checkpoint: str

    def __str__(self) -> str:
        return f"[[tensor(<CONDITIONING {self.text[:20]!r}>), {{'pooled_output': tensor(...)}}]]"
