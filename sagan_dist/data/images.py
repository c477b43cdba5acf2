"""Any image file -> 8-bit RGB by one rule, shared by make-shards and the reader.

* A pixel cap checked from the header, before anything is decoded: a 97 KB PNG can declare
  ~1 GB of pixels, and PIL's DecompressionBombWarning only warns (its error starts at ~179 Mpx).
* Modes. ``RGB`` as is; ``L``, ``1``, ``CMYK``, ``YCbCr``, ``RGBX``, ``LAB``, ``HSV`` by PIL's
  conversion; 16- and 32-bit integer grayscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I``)
  scaled by their bit depth (PIL's own conversion clips them, so a 16-bit PNG became all white);
  32-bit float grayscale (``F``) is taken as [0, 1] and refused when its values are outside that
  range (its scale is unknown). Transparency (``RGBA``, ``RGBa``, ``LA``, ``La``, ``PA``, and
  ``P``/``L``/``RGB`` with a transparent colour) is composited onto mid-grey: 128 is 0 on the
  model's [-1, 1] scale, so a transparent pixel carries no signal either way. Dropping the alpha
  instead would show whatever colour the encoder left under it (often black, sometimes noise).
  Any other mode is refused with its name.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

NEUTRAL = (128, 128, 128)  # background of transparent pixels
PLAIN_MODES = frozenset({"RGB", "L", "1", "CMYK", "YCbCr", "RGBX", "LAB", "HSV"})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
GRAY16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


class ImageRejected(ValueError):
    """An image that is not converted: over the pixel cap, or of an unusable mode or range."""


def open_capped(data: bytes, max_pixels: int, cap_name: str) -> Image.Image:
    """``Image.open`` (reads the header only) that refuses more than ``max_pixels`` pixels.

    ``cap_name`` is where the cap is set (``data.max_pixels``, ``--max-pixels``), for the message.
    """
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own limit, met before ours could be checked
        raise ImageRejected(f"{e}; over {cap_name} = {max_pixels}") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageRejected(f"{w} x {h} pixels ({w * h / 1e6:.1f} Mpx) is over {cap_name} = {max_pixels}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """The image as 8-bit RGB (see the module docstring for each mode)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        return _composite(img)
    if mode in PLAIN_MODES or mode == "P":
        return img.convert("RGB")
    if mode in GRAY16_MODES or mode in ("I", "F"):
        return Image.fromarray(gray_to_uint8(img), "L").convert("RGB")
    raise ImageRejected(f"image mode {mode!r} is not supported")


def _composite(img: Image.Image) -> Image.Image:
    if img.mode == "La":  # premultiplied; PIL converts it to LA only
        img = img.convert("LA")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, NEUTRAL + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def gray_to_uint8(img: Image.Image) -> np.ndarray:
    """Integer or float grayscale -> uint8, full scale of its bit depth -> 255 (rounded)."""
    pixels = np.asarray(img)
    if img.mode == "F":
        finite = pixels[np.isfinite(pixels)]
        if finite.size != pixels.size or (finite.size and (finite.min() < 0 or finite.max() > 1)):
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (np.nan, np.nan)
            raise ImageRejected(f"32-bit float image with values outside [0, 1] (min {low:g}, max {high:g}, "
                                f"{pixels.size - finite.size} not finite): its scale is unknown")
        return np.rint(pixels * np.float32(255)).astype(np.uint8)
    bits = bit_depth(img)
    if bits <= 16:
        # Integer arithmetic, exactly rounded: (v * 255 + full / 2) // full.
        full = (1 << bits) - 1
        values = np.clip(pixels.astype(np.int64), 0, full)
        return ((values * 255 + full // 2) // full).astype(np.uint8)
    full = float((1 << (bits - 1)) - 1)  # mode I is signed 32-bit; below 0 is black
    return np.clip(np.rint(pixels.astype(np.float64) * (255.0 / full)), 0, 255).astype(np.uint8)


def bit_depth(img: Image.Image) -> int:
    """Bits per sample of an integer grayscale image: 16 for I;16*, else as the file says."""
    if img.mode in GRAY16_MODES:
        return 16
    tag = getattr(img, "tag_v2", None)  # TIFF: BitsPerSample
    if tag is not None and 258 in tag:
        bits = tag[258]
        return int(bits[0] if isinstance(bits, tuple) else bits)
    # PNG and PGM store at most 16 bits per sample (older Pillows open them as I).
    return 16 if img.format in ("PNG", "PPM") else 32
