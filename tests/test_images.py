"""prepare_image: every Pillow mode to RGB, EXIF rotation, refusals with a reason, downscaling."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from dataset.images import ImageConfig, ImageError, PreparedImage, prepare_image
from dataset.synthetic.bad_inputs import bomb_png_bytes

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
# The mode tests use images of a few pixels; the size refusals have their own tests below.
ANY_SIZE = ImageConfig(min_side=1, max_aspect_ratio=float("inf"))


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def pixel(prepared: PreparedImage, xy: tuple[int, int]) -> tuple[int, int, int]:
    assert prepared.image.mode == "RGB"
    return prepared.image.getpixel(xy)


def close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients plus noise, so JPEG sizes and decode costs resemble photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


# --- modes -----------------------------------------------------------------------------------

def test_rgb_passes_through():
    out = prepare_image(encode(Image.new("RGB", (8, 6), (10, 200, 30)), "PNG"), ANY_SIZE)
    assert pixel(out, (3, 3)) == (10, 200, 30)
    assert (out.width, out.height) == (8, 6)


def test_palette_without_transparency():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert pixel(prepare_image(data, ANY_SIZE), (0, 0)) == (10, 200, 30)


def test_palette_with_transparency_goes_on_white():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    data = encode(img, "PNG", transparency=0)  # palette index 0 (black) is fully transparent
    assert "transparency" in Image.open(io.BytesIO(data)).info
    out = prepare_image(data, ANY_SIZE)
    assert pixel(out, (0, 0)) == WHITE
    assert pixel(out, (1, 1)) == (10, 200, 30)


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    out = prepare_image(encode(img, "PNG"), ANY_SIZE)
    assert pixel(out, (0, 0)) == WHITE           # invisible red is not red
    assert pixel(out, (1, 0)) == (0, 0, 255)     # opaque stays as it is
    assert close(pixel(out, (2, 0)), (127, 127, 127), 1)  # half-transparent black over white


def test_la_composited_on_white():
    img = Image.new("LA", (2, 1))
    img.putdata([(0, 0), (0, 255)])
    out = prepare_image(encode(img, "PNG"), ANY_SIZE)
    assert pixel(out, (0, 0)) == WHITE
    assert pixel(out, (1, 0)) == BLACK


def test_cmyk_jpeg():
    red = (220, 30, 30)
    data = encode(Image.new("RGB", (16, 16), red).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert close(pixel(prepare_image(data, ANY_SIZE), (8, 8)), red, 8)


def test_16bit_greyscale_keeps_full_range():
    values = np.array([[0, 65535, 128 * 257, 1000]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = prepare_image(data, ANY_SIZE)
    assert pixel(out, (0, 0)) == BLACK
    assert pixel(out, (1, 0)) == WHITE
    assert pixel(out, (2, 0)) == (128, 128, 128)
    assert pixel(out, (3, 0))[0] <= 4  # 1000/65535 of full scale: dark, not clipped to white


def test_float_image():
    values = np.array([[0.0, 255.0, 128.0, 127.6, -5.0]], dtype=np.float32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = prepare_image(data, ANY_SIZE)
    assert [pixel(out, (x, 0))[0] for x in range(5)] == [0, 255, 128, 127, 0]


def test_float_image_in_unit_range_is_not_black():
    values = np.array([[0.0, 1.0, 0.5, 0.25, 1.0 / 255]], dtype=np.float32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = prepare_image(data, ANY_SIZE)
    # x * 255 truncated to uint8: 0.5 -> 127.5 -> 127; 1/255 in float32 times 255 lands within 1e-5 of 1.
    assert [pixel(out, (x, 0))[0] for x in range(5)] in ([0, 255, 127, 63, 1], [0, 255, 127, 63, 0])


def test_one_bit():
    img = Image.new("1", (2, 1))
    img.putpixel((1, 0), 1)
    out = prepare_image(encode(img, "PNG"), ANY_SIZE)
    assert pixel(out, (0, 0)) == BLACK
    assert pixel(out, (1, 0)) == WHITE


def test_webp():
    rgb = prepare_image(encode(Image.new("RGB", (40, 20), (30, 60, 220)), "WEBP", lossless=True))
    assert (rgb.width, rgb.height) == (40, 20)
    assert pixel(rgb, (5, 5)) == (30, 60, 220)
    transparent = prepare_image(encode(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "WEBP", lossless=True))
    assert pixel(transparent, (4, 4)) == WHITE


# --- EXIF --------------------------------------------------------------------------------------

def test_exif_orientation_6_rotates_and_reports_displayed_size():
    stored = Image.new("RGB", (300, 200), WHITE)
    stored.paste((255, 0, 0), (0, 0, 100, 100))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = prepare_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.image.size == (200, 300)
    assert (out.width, out.height) == (200, 300)
    assert close(pixel(out, (150, 50)), (255, 0, 0), 12)  # now at the displayed top-right
    assert close(pixel(out, (50, 50)), WHITE, 12)


# --- refusals ----------------------------------------------------------------------------------

def reason(data: bytes, config: ImageConfig = ImageConfig()) -> str:
    with pytest.raises(ImageError) as info:
        prepare_image(data, config)
    assert str(info.value).startswith(f"{info.value.reason}: ")
    return info.value.reason


@pytest.mark.parametrize("size", [(30000, 30000), (10000, 10000), (9000, 8000)],
                         ids=["beyond-pillow-error", "beyond-pillow-warning", "beyond-our-default"])
def test_bomb_header_refused_without_allocating(size):
    before = Image.core.get_stats()["new_count"]
    assert reason(bomb_png_bytes(*size)) == "bomb"
    assert Image.core.get_stats()["new_count"] == before  # no pixel buffer was ever created


def test_own_max_pixels_limit():
    data = encode(Image.new("RGB", (200, 100)), "PNG")
    assert reason(data, ImageConfig(max_pixels=200 * 100 - 1)) == "bomb"
    assert prepare_image(data, ImageConfig(max_pixels=200 * 100)).width == 200


def test_empty():
    assert reason(b"") == "empty"


@pytest.mark.parametrize("data", [b"definitely not an image" * 10, b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8],
                         ids=["text", "jpeg-magic-then-garbage"])
def test_garbage(data):
    assert reason(data) == "decode"


def test_truncated_jpeg():
    data = encode(photo_like(300, 200), "JPEG")
    assert reason(data[: len(data) // 2]) == "truncated"


# --- downscaling -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return encode(photo_like(3000, 2000), "JPEG", quality=90)


@pytest.fixture
def decoded_sizes(monkeypatch) -> set[tuple[int, int]]:
    """The sizes the JPEG decoder actually produced (draft mode shrinks them while decoding)."""
    sizes: set[tuple[int, int]] = set()
    original = JpegImageFile.load

    def load(self):
        result = original(self)
        sizes.add(self.size)
        return result

    monkeypatch.setattr(JpegImageFile, "load", load)
    return sizes


@pytest.mark.parametrize("draft", [True, False], ids=["draft", "no-draft"])
def test_large_jpeg_downscaled_to_max_side(large_jpeg, decoded_sizes, draft):
    out = prepare_image(large_jpeg, ImageConfig(max_side=1024, draft=draft))
    assert max(out.image.size) == 1024
    assert out.image.size == (1024, 683)
    assert (out.width, out.height) == (3000, 2000)
    # Draft decodes at 1/2 scale (still >= max_side on the long side); without it, every pixel.
    assert decoded_sizes == ({(1500, 1000)} if draft else {(3000, 2000)})


def test_draft_leaves_small_jpegs_alone(decoded_sizes):
    out = prepare_image(encode(photo_like(512, 384), "JPEG"))
    assert out.image.size == (512, 384)
    assert decoded_sizes == {(512, 384)}


def test_large_png_downscaled():
    out = prepare_image(encode(Image.new("RGB", (2100, 700), (1, 2, 3)), "PNG"), ImageConfig(max_side=700))
    assert out.image.size == (700, 233)
    assert (out.width, out.height) == (2100, 700)


@pytest.fixture
def converted(monkeypatch) -> list[tuple[str, tuple[int, int]]]:
    """(mode, size) of every image handed to the RGB conversion."""
    from dataset import images

    seen: list[tuple[str, tuple[int, int]]] = []
    original = images._to_rgb

    def spy(img: Image.Image) -> Image.Image:
        seen.append((img.mode, img.size))
        return original(img)

    monkeypatch.setattr(images, "_to_rgb", spy)
    return seen


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_wide_modes_downscaled_before_conversion(converted, mode):
    """16-bit and float frames are resized in their own mode; only the small copy is converted."""
    ramp = np.linspace(0, 1, 2000, dtype=np.float32)
    values = (ramp * 65535).astype(np.uint16) if mode == "I;16" else ramp
    data = encode(Image.fromarray(np.ascontiguousarray(np.broadcast_to(values, (1000, 2000)))),
                  "PNG" if mode == "I;16" else "TIFF")
    out = prepare_image(data, ImageConfig(max_side=200))
    assert converted == [(mode, (200, 100))]
    assert (out.width, out.height) == (2000, 1000) and out.image.size == (200, 100)
    row = [pixel(out, (x, 50))[0] for x in (0, 100, 199)]
    # A linear ramp survives bicubic resampling to within a grey level or two of x / 199 * 255.
    assert close(tuple(row), (0, 128, 255), 2), row


# --- size refusals (from the header, before any pixel is decoded) -------------------------------

@pytest.mark.parametrize("size,expected", [
    ((7, 300), "small"), ((300, 7), "small"), ((2100, 100), "aspect"), ((100, 2100), "aspect"),
    ((2000, 100), None), ((8, 8), None),
])
def test_small_and_elongated_images_refused_from_the_header(size, expected):
    data = encode(Image.new("RGB", size, (9, 9, 9)), "PNG")
    if expected is None:
        assert prepare_image(data).image.size[0] > 0
        return
    before = Image.core.get_stats()["new_count"]
    assert reason(data) == expected
    assert Image.core.get_stats()["new_count"] == before
    assert prepare_image(data, ANY_SIZE).width == size[0]  # both limits are settings


def test_size_limits_enter_the_config_record():
    config = ImageConfig(min_side=32, max_aspect_ratio=4.0)
    assert config.as_dict()["min_side"] == 32 and config.as_dict()["max_aspect_ratio"] == 4.0
