"""Reading face images into one canonical form: RGB, uint8, H x W x 3.

Photos arrive as grayscale, palette, RGBA, 16-bit or CMYK files; every stage wants the same array, so the conversion
lives here once. Anything that cannot become such an array raises :class:`BadImageError` naming the file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from digi2real.errors import BadImageError
from digi2real.fileio import atomic_open

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MIN_SIDE = 8


def _to_rgb_array(img: Image.Image, name: str) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit or 32-bit grayscale: scale the full range to 8 bits rather than clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on black: DigiFace and aligned crops use a zero border, so transparent means black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ...) into an RGB uint8 array; ``name`` is used in errors."""
    if not data:
        raise BadImageError(f"{name}: the file is empty; delete it or replace it with a valid image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            arr = _to_rgb_array(img, name)
    except UnidentifiedImageError:
        raise BadImageError(f"{name}: not a readable image (unknown or damaged format); delete or replace the file") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImageError(f"{name}: not a readable image ({exc}); delete or replace the file") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadImageError(f"{name}: unexpected image layout {arr.shape}; expected H x W x 3")
    if min(arr.shape[:2]) < MIN_SIDE:
        raise BadImageError(f"{name}: image is {arr.shape[1]}x{arr.shape[0]} px, too small for a face (< {MIN_SIDE} px)")
    return np.ascontiguousarray(arr)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file into an RGB uint8 array (H x W x 3)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found") from None
    except OSError as exc:
        raise BadImageError(f"{path}: cannot be read ({exc.strerror})") from None
    return decode_image(data, str(path))


def write_image(path: str | os.PathLike[str], rgb: np.ndarray, quality: int = 95) -> None:
    """Write an RGB uint8 array atomically; the format follows the suffix (.png lossless, .jpg with ``quality``)."""
    path = Path(path)
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with atomic_open(path, "wb") as handle:
        if fmt == "JPEG":
            img.save(handle, format=fmt, quality=quality)
        else:
            img.save(handle, format=fmt, compress_level=1)
