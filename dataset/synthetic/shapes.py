"""Coloured shapes on plain backgrounds, the web captions and recaptions that describe them."""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 210, 30),
    "purple": (140, 40, 170), "orange": (245, 140, 20), "black": (15, 15, 15), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
CAPTION_TEMPLATES = (
    "a {color} {shape}", "{color} {shape} on a {bg} background", "photo of a {color} {shape}",
    "a {shape} in {color}", "simple {color} {shape} clipart", "{color} {shape} icon",
)
BACKGROUNDS = ("white", "black", "yellow", "blue")

@dataclass(frozen=True)
class ShapeSample:
    color: str
    shape: str
    background: str

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"


def draw_shape(sample: ShapeSample, size: int, rng: random.Random) -> Image.Image:
    """Render one shape at a random position and scale on a plain background."""
    bg = COLORS[sample.background]
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = COLORS[sample.color]
    box = (cx - r, cy - r, cx + r, cy + r)
    if sample.shape == "circle":
        d.ellipse(box, fill=fill)
    elif sample.shape == "square":
        d.rectangle(box, fill=fill)
    elif sample.shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif sample.shape == "cross":
        w = r / 3
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    elif sample.shape == "ring":
        d.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    elif sample.shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    noise = np.random.default_rng(rng.randrange(2**32)).integers(-12, 13, (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def random_sample(rng: random.Random) -> ShapeSample:
    color = rng.choice(list(COLORS))
    background = rng.choice([b for b in BACKGROUNDS if b != color])
    return ShapeSample(color, rng.choice(SHAPES), background)


def web_caption(sample: ShapeSample, rng: random.Random) -> str:
    return rng.choice(CAPTION_TEMPLATES).format(color=sample.color, shape=sample.shape, bg=sample.background)


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


RECAPTION_TEMPLATES = (
    "The image shows a {color} {shape} on a plain {bg} background. The {shape} is drawn in a flat {color} colour. "
    "There is nothing else in the picture.",
    "A single {color} {shape} is placed on a {bg} background. The edges of the {shape} are sharp! "
    "The picture is simple and clean.",
    "This is a simple graphic of a {shape}. Its colour is {color} and the background is {bg}. "
    "The image has slight noise.",
)


def write_imagefolder(out_dir: str | Path, per_class: int, *, image_size: int = 128, seed: int = 1) -> list[str]:
    """Write a held-out ImageFolder tree `out_dir/{color shape}/NNN.jpg` for zero-shot evaluation."""
    out = Path(out_dir)
    rng = random.Random(seed)
    classes = [f"{c} {s}" for c in COLORS for s in SHAPES]
    for label in classes:
        color, shape = label.split()
        (out / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            bg = rng.choice([b for b in BACKGROUNDS if b != color])
            image = draw_shape(ShapeSample(color, shape, bg), image_size, rng)
            (out / label / f"{i:03d}.jpg").write_bytes(jpeg_bytes(image))
    return classes


# URL failures `--metadata-only --bad` injects once each per metadata file. The loopback server
