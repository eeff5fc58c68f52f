"""Broken samples the input reader must turn into rows with a reason (or caption anyway)."""
from __future__ import annotations

import random
import struct
import zlib

import numpy as np
from PIL import Image

from dataset.synthetic.shapes import jpeg_bytes, png_bytes

# Bad samples `--bad` injects, each with whether a correct reader can still caption it.
BAD_KINDS = {
    "corrupt_jpeg": False,    # JPEG magic followed by garbage
    "truncated_jpeg": False,  # a valid JPEG cut in half
    "zero_bytes": False,      # empty image member
    "bomb_header": False,     # PNG whose header claims 30000x30000
    "missing_image": False,   # txt + json but no image member
    "missing_txt": True,      # image + json, no web caption
    "missing_json": True,     # image + txt, no metadata
    "png_alpha": True,        # RGBA PNG
    "cmyk_jpeg": True,        # CMYK JPEG
    "png_16bit": True,        # 16-bit greyscale PNG
    "duplicate_key": True,    # a second sample group reusing an earlier key (first one wins)
}

def bomb_png_bytes(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose IHDR claims a huge size (the pixels are never there)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def bad_image(kind: str, img: Image.Image, rng: random.Random) -> tuple[str, bytes]:
    """Return (extension, bytes) for an injected bad image member."""
    if kind == "corrupt_jpeg":
        return "jpg", b"\xff\xd8\xff\xe0" + rng.randbytes(2000)
    if kind == "truncated_jpeg":
        data = jpeg_bytes(img)
        return "jpg", data[: len(data) // 2]
    if kind == "zero_bytes":
        return "jpg", b""
    if kind == "bomb_header":
        return "png", bomb_png_bytes()
    if kind == "png_alpha":
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.new("L", img.size, 128))
        return "png", png_bytes(rgba)
    if kind == "cmyk_jpeg":
        return "jpg", jpeg_bytes(img.convert("CMYK"))
    if kind == "png_16bit":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257)
        return "png", png_bytes(Image.fromarray(arr.astype(np.uint16)))
    return "jpg", jpeg_bytes(img)
