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
# Refuse images with a side below this: nothing to caption, and transformers' image processors read an
# HWC array whose first dimension is 1 or 3 as channels-first.
DEFAULT_MIN_SIDE = 8
# Refuse images more elongated than this: a shortest-edge resize (CLIP processors) blows a 1:100 strip
# up to 336x33600 px, and a centre crop keeps 1/ratio of it. Qwen2-VL's processor refuses beyond 200.
DEFAULT_MAX_ASPECT_RATIO = 20.0
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
    min_side: int = DEFAULT_MIN_SIDE
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    draft: bool = True  # let the JPEG decoder downscale by 1/2..1/8 while decoding

    def as_dict(self) -> dict:
        return {"max_side": self.max_side, "max_pixels": self.max_pixels, "min_side": self.min_side,
                "max_aspect_ratio": self.max_aspect_ratio, "draft": self.draft}


def _check_size(width: int, height: int, config: ImageConfig) -> None:
    """Refuse, from the header alone, sizes that are bombs, too small to show anything, or too elongated."""
    if width * height > config.max_pixels:
        raise ImageError("bomb", f"{width}x{height} exceeds {config.max_pixels} pixels")
    if min(width, height) < config.min_side:
        raise ImageError("small", f"{width}x{height}, a side below {config.min_side} px")
    if max(width, height) > config.max_aspect_ratio * min(width, height):
        raise ImageError("aspect", f"{width}x{height}, aspect ratio {max(width, height) / min(width, height):.1f} "
                                   f"beyond {config.max_aspect_ratio:g}")


def _decode(data: bytes, config: ImageConfig) -> tuple[Image.Image, int, int]:
    """Open, check the header's size, and decode (JPEGs at the smallest draft scale that still covers max_side).

    Returns the image and the size its header gives (draft decoding may already have made it smaller).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        _check_size(width, height, config)
        if config.draft and img.format == "JPEG" and max(width, height) > config.max_side:
            # Ask for the aspect-preserving target: draft keeps both sides >= the request, so a
            # square (max_side, max_side) request would block any reduction of non-square images.
            scale = config.max_side / max(width, height)
            img.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
        img.load()
    return img, width, height


def _downscale(img: Image.Image, max_side: int) -> Image.Image:
    """Longest side to max_side in the image's own mode (16-bit and float too), before any conversion.

    Palette and 1-bit images are expanded first: Pillow resizes them by nearest neighbour only.
    """
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    if max(img.size) > max_side:
        # Pillow's box reduce (reducing_gap) has no 16-bit kernel; their resize is direct.
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC,
                      reducing_gap=None if img.mode.startswith("I;16") else 2.0)
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Flatten alpha onto white and map CMYK, 16-bit, 32-bit and float modes to 8-bit RGB.

    Integer images use 0..255 unless a value exceeds it (then 0..65535, as 16-bit ones always do);
    float images use 0..1 when no value exceeds 1 (normalised data), else 0..255.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        top = float(arr.max(initial=0.0))
        if img.mode == "F":
            hi = 1.0 if top <= 1.0 else 255.0
        else:
            hi = 65535.0 if img.mode.startswith("I;16") or top > 255 else 255.0
        arr = np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _rotated(img: Image.Image) -> bool:
    """Whether the EXIF orientation swaps width and height; a broken EXIF block must not cost the image."""
    try:
        return img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:
        return False


def prepare_image(data: bytes, config: ImageConfig = ImageConfig()) -> PreparedImage:
    """Decode, downscale, rotate by EXIF and convert to RGB; any failure is an ImageError with a reason.

    Downscaling comes before mode conversion and rotation, so a 64 MP 16-bit or float image is never
    held converted at full size: peak memory is the decoded frame plus the small copy.
    """
    if not data:
        raise ImageError("empty", "zero-byte image")
    try:
        img, width, height = _decode(data, config)
        if _rotated(img):
            width, height = height, width
            img = ImageOps.exif_transpose(_downscale(img, config.max_side))
        else:
            img = _downscale(img, config.max_side)
        return PreparedImage(_to_rgb(img), width, height)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("bomb", str(e)) from None
    except OSError as e:
        reason = "truncated" if "truncated" in str(e) else "decode"
        raise ImageError(reason, str(e) or type(e).__name__) from None
    except Exception as e:  # Pillow raises assorted types on hostile input
        raise ImageError("decode", f"{type(e).__name__}: {e}") from None
