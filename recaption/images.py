"""Decode web images into RGB PIL images an engine can take, or a readable reason why not."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Refuse images whose header claims more pixels than this (decompression bombs).
DEFAULT_MAX_PIXELS = 64_000_000
# Longest side handed to the engine; the vision processor resizes further anyway.
DEFAULT_MAX_SIDE = 1024
_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """A per-image failure; str() is 'reason: detail' for the output's `error` column."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class PreparedImage:
    image: Image.Image  # RGB, longest side <= max_side
    width: int          # decoded size before downscaling (after EXIF rotation)
    height: int


@dataclass(frozen=True)
class ImageConfig:
    max_side: int = DEFAULT_MAX_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = True  # let the JPEG decoder downscale by 1/2..1/8 while decoding

    def as_dict(self) -> dict:
        return {"max_side": self.max_side, "max_pixels": self.max_pixels, "draft": self.draft}


def _to_rgb(img: Image.Image) -> Image.Image:
    """Flatten alpha onto white and map palette, CMYK, 16-bit, float and 1-bit modes to RGB."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if img.mode.startswith("I;16") or arr.max() > 255 else (0.0, 255.0)
        arr = np.clip((arr - lo) * 255.0 / (hi - lo), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def prepare_image(data: bytes, config: ImageConfig = ImageConfig()) -> PreparedImage:
    """Decode, rotate by EXIF, convert to RGB and downscale; raises ImageError with a reason."""
    if not data:
        raise ImageError("empty", "zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > config.max_pixels:
                raise ImageError("bomb", f"{width}x{height} exceeds {config.max_pixels} pixels")
            if config.draft and img.format == "JPEG" and max(width, height) > config.max_side:
                # Ask for the aspect-preserving target: draft keeps both sides >= the request, so a
                # square (max_side, max_side) request would block any reduction of non-square images.
                scale = config.max_side / max(width, height)
                img.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("bomb", str(e)) from None
    except OSError as e:
        reason = "truncated" if "truncated" in str(e) else "decode"
        raise ImageError(reason, str(e) or type(e).__name__) from None
    except Exception as e:  # Pillow raises assorted types on hostile input
        raise ImageError("decode", f"{type(e).__name__}: {e}") from None
    try:
        rotated = img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not cost the image
        rotated = False
    if rotated:
        width, height = height, width
    img = _to_rgb(img)
    if max(img.size) > config.max_side:
        img.thumbnail((config.max_side, config.max_side), Image.Resampling.BICUBIC)
    return PreparedImage(img, width, height)
