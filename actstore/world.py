"""The embedded miniature's image world: small pictures of coloured shapes with captions from their ground truth.

Deterministic by seed. Each image shows 1-3 identical shapes (shape, colour, size); a single shape also has a
position. Because every caption word comes from known attributes, a latent's description can be scored against
what is really in the image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235),
    "yellow": (235, 215, 40), "purple": (160, 60, 210), "white": (235, 235, 235),
}
SIZES = {"small": 4, "large": 8}  # half-width in pixels
POSITIONS = {"left": (16, 8), "right": (16, 24), "top": (8, 16), "bottom": (24, 16), "center": (16, 16)}
COUNTS = ("one", "two", "three")
ATTRIBUTES = ("shape", "colour", "size", "count", "position")


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image."""

    shape: str
    colour: str
    size: str
    count: str
    position: str | None

    def caption(self) -> str:
        """The caption derived from the ground truth, e.g. 'one small red circle on the left'."""
        noun = self.shape + ("es" if self.shape == "cross" and self.count != "one" else "")
        noun = noun + ("s" if self.count != "one" and self.shape != "cross" else "")
        text = f"{self.count} {self.size} {self.colour} {noun}"
        if self.position is not None:
            preposition = {"center": "in", "top": "at", "bottom": "at"}.get(self.position, "on")
            text += f" {preposition} the {self.position}"
        return text

    def words(self) -> set[str]:
        """The attribute words an image of this scene should evoke."""
        return {w for w in (self.shape, self.colour, self.size, self.count, self.position) if w}


def _mask(shape: str, cy: float, cx: float, half: int) -> np.ndarray:
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy**2 + dx**2 <= half**2
    if shape == "square":
        return (np.abs(dy) <= half * 0.85) & (np.abs(dx) <= half * 0.85)
    if shape == "triangle":
        return (dy <= half * 0.8) & (dy >= -half) & (np.abs(dx) <= (dy + half) * 0.6)
    return ((np.abs(dy) <= half) & (np.abs(dx) <= half / 3)) | ((np.abs(dx) <= half) & (np.abs(dy) <= half / 3))


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene."""
    count = COUNTS[rng.integers(3)] if rng.random() < 0.4 else "one"
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        size=list(SIZES)[rng.integers(len(SIZES))] if count == "one" else "small",
        count=count,
        position=list(POSITIONS)[rng.integers(len(POSITIONS))] if count == "one" else None,
    )


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image (IMAGE_SIZE x IMAGE_SIZE) of ``scene`` on a noisy dark background."""
    image = rng.normal(30, 8, (IMAGE_SIZE, IMAGE_SIZE, 3))
    half = SIZES[scene.size]
    n = COUNTS.index(scene.count) + 1
    if scene.position is not None:
        centres = [POSITIONS[scene.position]]
    else:  # several shapes: spread over distinct cells of a 3x3 grid
        cells = rng.choice(9, size=n, replace=False)
        centres = [(6 + 10 * (c // 3), 6 + 10 * (c % 3)) for c in cells]
    colour = np.array(COLOURS[scene.colour], dtype=np.float64)
    for cy, cx in centres:
        jitter = rng.uniform(-1.0, 1.0, 2)
        image[_mask(scene.shape, cy + jitter[0], cx + jitter[1], half)] = colour * rng.uniform(0.85, 1.0)
    return np.clip(image, 0, 255).astype(np.uint8)


def generate(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` examples: image (uint8 HxWx3), caption, image_id and the scene's attributes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene = sample_scene(rng)
        out.append({"image_id": f"world-{seed}-{i:06d}", "image": render(scene, rng), "caption": scene.caption(),
                    **asdict(scene)})
    return out


def as_dataset(n: int, seed: int = 0) -> Any:
    """The world as a ``datasets.Dataset`` with an ``image`` column of PIL images."""
    import datasets
    from PIL import Image

    rows = generate(n, seed)
    for row in rows:
        row["image"] = Image.fromarray(row["image"])
        row["position"] = row["position"] or ""
    return datasets.Dataset.from_list(rows)


def vocabulary() -> list[str]:
    """Every word a caption can use."""
    words = set(SHAPES) | {s + "s" for s in SHAPES} | {"crosses"} | set(COLOURS) | set(SIZES) | set(COUNTS)
    words |= set(POSITIONS) | {"on", "the", "in", "at"}
    return sorted(words)
