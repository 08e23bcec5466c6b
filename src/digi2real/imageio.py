"""Reading face images into one canonical form: RGB, uint8, H x W x 3.

Photos arrive as grayscale, palette, RGBA, 16-bit or CMYK files; every stage wants the same array, so the conversion
lives here once. Anything that cannot become such an array raises :class:`BadImageError` naming the file.

Every image file is hostile until checked: its declared size is checked against a pixel limit *before* it is decoded
(a 15 KB PNG can declare 10000 x 10000 pixels and take gigabytes once decoded and detected), and files are read only
up to a byte limit. Both limits can be raised by the user through the environment, as the error says.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from digi2real.errors import BadImageError

# Our own limit (checked before decoding, raisable by the user) replaces Pillow's warning between 89 M and 179 M pixels.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
from digi2real.fileio import atomic_open

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MIN_SIDE = 8
PIXELS_ENV = "DIGI2REAL_MAX_IMAGE_PIXELS"
BYTES_ENV = "DIGI2REAL_MAX_IMAGE_BYTES"
#: 40 megapixels: a 7300 x 5500 photo; MTCNN detection on it stays within a few GB.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 256 << 20


def _limit(env: str, default: int) -> int:
    raw = os.environ.get(env)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(float(raw))
    except ValueError:
        raise BadImageError(f"{env}={raw!r}: expected a whole number (e.g. {env}={default})") from None
    if value <= 0:
        raise BadImageError(f"{env}={raw!r}: must be positive (e.g. {env}={default})")
    return value


def max_image_pixels() -> int:
    """Largest width x height decoded (``DIGI2REAL_MAX_IMAGE_PIXELS``, default 40 million)."""
    return _limit(PIXELS_ENV, DEFAULT_MAX_PIXELS)


def max_image_bytes() -> int:
    """Largest image file read (``DIGI2REAL_MAX_IMAGE_BYTES``, default 256 MiB)."""
    return _limit(BYTES_ENV, DEFAULT_MAX_BYTES)


def check_declared_size(width: int, height: int, name: str) -> None:
    """Refuse an image whose declared size exceeds the pixel limit, before any pixel is decoded."""
    limit = max_image_pixels()
    if width * height > limit:
        raise BadImageError(f"{name}: the image declares {width} x {height} pixels, more than the limit of {limit:,}; "
                            f"resize it, or raise the limit with {PIXELS_ENV}={width * height}")


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
    if len(data) > max_image_bytes():
        raise BadImageError(f"{name}: {len(data):,} bytes, more than the limit of {max_image_bytes():,} for one image; "
                            f"shrink it, or raise the limit with {BYTES_ENV}={len(data)}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_declared_size(img.size[0], img.size[1], name)
            img.load()
            arr = _to_rgb_array(img, name)
    except Image.DecompressionBombError:
        # PIL's own guard fires inside open(), before our check, for more than twice its 89 M pixel limit.
        raise BadImageError(f"{name}: the image declares more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels, "
                            "beyond what Pillow decodes; resize it") from None
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
    limit = max_image_bytes()
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found") from None
    except OSError as exc:
        raise BadImageError(f"{path}: cannot be read ({exc.strerror or exc})") from None
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
