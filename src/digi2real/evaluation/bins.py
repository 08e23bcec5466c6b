"""Verification benchmark files: insightface ``.bin`` pickles and a plain folder + pairs-file layout (FACTS 8).

A ``.bin`` is a pickle of ``(bins, issame_list)``: 2N encoded images (pair i is items 2i and 2i+1) and N booleans.
Pickles run code while they load, so these files are never given to the plain unpickler: :class:`_BinUnpickler`
resolves only the handful of globals such files legitimately contain and refuses everything else *before* it can be
called. What is allowed, and why:

* nothing at all for the common case: lists, tuples, bools, bytes and (Python 2) ``str`` are pickle opcodes, not
  globals. Python 2 pickles are read with ``encoding="bytes"`` so their ``str`` images arrive as ``bytes``.
* ``_codecs.encode``, only as ``encode(text, "latin1")``: that is how Python 3 writes non-empty ``bytes`` at pickle
  protocols 0-2; and ``builtins.bytes`` / ``__builtin__.bytes`` only with no arguments (empty ``bytes`` at protocols
  0-2). Both are replaced by wrappers that refuse any other call, so no codec or allocation can be chosen by the file.
* numpy arrays, because some published ``.bin`` files keep each encoded image as a 1-D ``uint8`` array:
  ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` (wrapped to build only a plain
  ``numpy.ndarray``), ``numpy.ndarray``, ``numpy.dtype``, and ``numpy.core.numeric._frombuffer`` /
  ``numpy._core.numeric._frombuffer`` (how numpy pickles arrays at protocol 5). The loaded structure is checked
  afterwards: an image array must be 1-D ``uint8``, a label array must be boolean.
* numpy booleans, because some ``.bin`` files keep ``issame`` as a list of ``numpy.bool_``: numpy pickles each as
  ``numpy.core.multiarray.scalar(dtype, raw_bytes)`` (numpy 1.x; ``numpy._core.multiarray.scalar`` in numpy 2).
  That global is replaced by a wrapper that builds only a ``numpy.bool_`` from a boolean dtype and one byte 0 or 1,
  and refuses any other dtype (an object dtype would hand back whatever the stream built).

The folder layout (:func:`read_pairs_folder`) is for benchmarks that are not shipped as ``.bin``: a root folder of
images and a text file whose lines are ``path_a path_b label``.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from digi2real.errors import Digi2RealError
from digi2real.fileio import atomic_open
from digi2real.imageio import decode_image

__all__ = ["decode_pairs", "read_bin", "read_pairs_folder", "write_bin"]

_REPLACE = "the file is damaged or not a benchmark: download it again (insightface's .bin files)"
# Protocol 4: readable by every Python 3 since 3.4 and writes bytes with opcodes only (no ``_codecs`` global).
WRITE_PROTOCOL = 4


class _RefusedGlobal(Exception):
    """Raised inside the unpickler when the stream names a global outside the allow-list."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _latin1_encode(text: object, encoding: object = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode`` that only undoes Python 3's protocol 0-2 pickling of ``bytes``."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower().replace("_", "-") not in (
        "latin1",
        "latin-1",
        "iso-8859-1",
    ):
        raise _RefusedGlobal("_codecs.encode (with arguments other than (str, 'latin1'))")
    return text.encode("latin-1")


def _empty_bytes(*args: object) -> bytes:
    """Stand-in for ``bytes`` that only builds ``b""`` (Python 3's protocol 0-2 pickling of empty bytes)."""
    if args:
        raise _RefusedGlobal("builtins.bytes (with arguments)")
    return b""


def _numpy_attr(modules: Sequence[str], name: str) -> Any:
    """The first of ``module.name`` that imports; numpy 2 moved ``numpy.core`` to ``numpy._core``."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise _RefusedGlobal(f"{modules[0]}.{name} (not available in this numpy)")


def _safe_reconstruct(subtype: object, shape: object, dtype: object) -> Any:
    """numpy's ``_reconstruct``, restricted to building a plain ndarray (a subclass could run its own code)."""
    if subtype is not np.ndarray:
        raise _RefusedGlobal("numpy _reconstruct of something other than numpy.ndarray")
    return _numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")(subtype, shape, dtype)


def _safe_frombuffer(buf: object, dtype: object, shape: object, order: object) -> Any:
    """numpy's ``_frombuffer`` (protocol-5 arrays); it only views a buffer, checked to be bytes-like here."""
    if not isinstance(buf, (bytes, bytearray, memoryview, pickle.PickleBuffer)) or not isinstance(dtype, np.dtype):
        raise _RefusedGlobal("numpy _frombuffer with a non-buffer argument")
    return _numpy_attr(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")(buf, dtype, shape, order)


def _safe_scalar(dtype: object, data: object = None) -> np.bool_:
    """numpy's ``multiarray.scalar``, restricted to rebuilding a ``numpy.bool_`` (how numpy pickles one)."""
    if not isinstance(dtype, np.dtype) or dtype != np.dtype(np.bool_):
        raise _RefusedGlobal(f"numpy scalar of dtype {dtype!s:.40} (only numpy booleans are allowed)")
    if not isinstance(data, (bytes, bytearray)) or bytes(data) not in (b"\x00", b"\x01"):
        raise _RefusedGlobal("numpy boolean scalar whose value is not one byte 0 or 1")
    return np.bool_(bytes(data) == b"\x01")


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any] | type]:
    # Built per call rather than kept as a module-level table, so nothing global can be mutated to widen it.
    return {
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): _empty_bytes,
        ("__builtin__", "bytes"): _empty_bytes,
        ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
        ("numpy.core.multiarray", "scalar"): _safe_scalar,
        ("numpy._core.multiarray", "scalar"): _safe_scalar,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _BinUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals listed in the module docstring; anything else is refused."""

    def __init__(self, file: io.BufferedIOBase) -> None:
        # encoding="bytes": a Python 2 ``str`` (an encoded image) must stay raw bytes, never be decoded as text.
        super().__init__(file, encoding="bytes")
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 pickles can name the module as bytes under encoding="bytes"; compare as text.
        module_s = module.decode("latin-1") if isinstance(module, bytes) else str(module)
        name_s = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        try:
            return self._allowed[(module_s, name_s)]
        except KeyError:
            raise _RefusedGlobal(f"{module_s}.{name_s}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal("a persistent id")


def _as_image_bytes(item: object, index: int, path: Path) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, bytearray):
        return bytes(item)
    if isinstance(item, np.ndarray):
        if item.ndim == 1 and item.dtype == np.uint8:
            return item.tobytes()
        raise Digi2RealError(
            f"{path}: image {index} is a {item.dtype} array of shape {item.shape}; a .bin image must be encoded bytes "
            "(or a 1-D uint8 array of them)"
        )
    raise Digi2RealError(f"{path}: image {index} is a {type(item).__name__}; a .bin image must be encoded bytes")


def _as_labels(raw: object, path: Path) -> np.ndarray:
    if isinstance(raw, np.ndarray):
        if raw.ndim != 1 or raw.dtype != np.bool_:
            raise Digi2RealError(
                f"{path}: issame is a {raw.dtype} array of shape {raw.shape}; expected a 1-D boolean array or list"
            )
        return raw.astype(bool, copy=True)
    if not isinstance(raw, (list, tuple)):
        raise Digi2RealError(f"{path}: issame is a {type(raw).__name__}; expected a list of booleans")
    out = np.empty(len(raw), dtype=bool)
    for i, value in enumerate(raw):
        # bool (and numpy bool) as written by insightface; 0/1 ints are unambiguous, anything else is not a label.
        if isinstance(value, (bool, np.bool_)):
            out[i] = bool(value)
        elif isinstance(value, int) and value in (0, 1):
            out[i] = bool(value)
        else:
            raise Digi2RealError(f"{path}: issame[{i}] is {value!r}; every label must be True/False (or 1/0)")
    return out


def read_bin(path: str | os.PathLike[str]) -> tuple[list[bytes], np.ndarray]:
    """Read an insightface verification ``.bin`` safely (FACTS 8).

    Returns the 2N encoded images (pair i = items 2i and 2i+1) and a boolean array of the N ``issame`` labels. The
    pickle is loaded with a restricted unpickler (see the module docstring); a file that names any other global, such
    as ``os.system``, is refused with :class:`Digi2RealError` before anything it names is called.
    """
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO or device would block or never end
        raise Digi2RealError(f"{path}: not a regular file; pass the benchmark .bin file itself")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Digi2RealError(f"{path}: benchmark file not found; check the path or download the .bin") from None
    except IsADirectoryError:
        raise Digi2RealError(f"{path}: is a directory, expected a benchmark .bin file") from None
    except OSError as exc:
        raise Digi2RealError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    try:
        obj = _BinUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as exc:
        raise Digi2RealError(
            f"refusing to load {path}: the pickle references {exc.name}, not a benchmark .bin; {_REPLACE}"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError, OverflowError, MemoryError, RecursionError) as exc:
        detail = " ".join(str(exc).split())[:120]
        raise Digi2RealError(f"{path}: not a readable benchmark .bin pickle ({type(exc).__name__}: {detail}); "
                             f"{_REPLACE}") from None
    try:
        return _check_structure(obj, path)
    except Digi2RealError as exc:
        raise Digi2RealError(f"{exc}; {_REPLACE}") from None


def _check_structure(obj: object, path: Path) -> tuple[list[bytes], np.ndarray]:
    """The (images, labels) of an unpickled .bin, checked to be 2N encoded images and N booleans."""
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise Digi2RealError(
            f"{path}: a benchmark .bin must hold a pair (images, issame); found a {type(obj).__name__}"
            + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else "")
        )
    raw_images, raw_labels = obj
    if not isinstance(raw_images, (list, tuple)):
        raise Digi2RealError(f"{path}: the images entry is a {type(raw_images).__name__}; expected a list")
    labels = _as_labels(raw_labels, path)
    if len(raw_images) != 2 * len(labels):
        raise Digi2RealError(
            f"{path}: {len(raw_images)} images for {len(labels)} pairs; a .bin holds exactly 2 images per pair"
        )
    if len(labels) == 0:
        raise Digi2RealError(f"{path}: the benchmark holds no pairs")
    images = [_as_image_bytes(item, i, path) for i, item in enumerate(raw_images)]
    return images, labels


def write_bin(path: str | os.PathLike[str], images: Sequence[bytes], issame: Sequence[bool] | np.ndarray) -> None:
    """Write ``(images, issame)`` as a ``.bin`` that :func:`read_bin` (and insightface) can read, atomically.

    ``images`` are 2N encoded images (pair i = items 2i, 2i+1), ``issame`` N booleans. Stored as a list of ``bytes``
    and a list of Python ``bool`` at pickle protocol 4, so reading it back needs no global at all.
    """
    path = Path(path)
    labels = [bool(v) for v in np.asarray(issame, dtype=bool).reshape(-1)]
    blobs = [bytes(b) for b in images]
    if len(blobs) != 2 * len(labels):
        raise Digi2RealError(f"{path}: {len(blobs)} images for {len(labels)} pairs; need exactly 2 images per pair")
    with atomic_open(path, "wb") as handle:
        pickle.dump((blobs, labels), handle, protocol=WRITE_PROTOCOL)


def decode_pairs(images: Sequence[bytes], size: int = 112, name: str = "bin", first: int = 0,
                 names: Sequence[str] | None = None) -> np.ndarray:
    """Decode 2N encoded images into a (2N, size, size, 3) uint8 RGB array.

    An image that is not ``size`` x ``size`` is resized with PIL bilinear, as insightface's ``load_bin`` does.
    Errors name the bad image: ``"<name>: image <first + i> (pair <k>)"`` (``name`` is e.g. the .bin path and
    ``first`` the index of ``images[0]`` in it), or ``names[i]`` when the images came from files of those names.
    """
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, blob in enumerate(images):
        index = first + i
        label = names[i] if names is not None else f"{name}: image {index} (pair {index // 2})"
        rgb = decode_image(blob, label)
        if rgb.shape[0] != size or rgb.shape[1] != size:
            rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
        out[i] = rgb
    return out


def read_pairs_folder(
    root: str | os.PathLike[str], pairs_file: str | os.PathLike[str]
) -> tuple[list[Path], np.ndarray]:
    """Read a benchmark stored as image files plus a pairs list.

    Format of ``pairs_file`` (UTF-8 text): one pair per line, ``path_a path_b label``, separated by whitespace;
    paths are relative to ``root`` (so they cannot contain spaces); ``label`` is ``1`` (same identity) or ``0``
    (different). Blank lines and lines starting with ``#`` are skipped. Returns the 2N image paths in pair order
    (pair i = items 2i, 2i+1, as in a ``.bin``) and the N labels as a boolean array.
    """
    root = Path(root)
    pairs_file = Path(pairs_file)
    if not root.is_dir():
        raise Digi2RealError(f"{root}: benchmark image folder not found")
    if pairs_file.exists() and not pairs_file.is_file():
        raise Digi2RealError(f"{pairs_file}: not a regular file; pass the pairs text file itself")
    try:
        text = pairs_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Digi2RealError(f"{pairs_file}: pairs file not found") from None
    except UnicodeDecodeError:
        raise Digi2RealError(f"{pairs_file}: not UTF-8 text; expected lines 'path_a path_b label'") from None
    except OSError as exc:
        raise Digi2RealError(f"{pairs_file}: cannot be read ({exc.strerror})") from None
    paths: list[Path] = []
    labels: list[bool] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) != 3:
            raise Digi2RealError(
                f"{pairs_file}:{lineno}: expected 'path_a path_b label' (3 fields), found {len(fields)}: {stripped!r}"
            )
        a, b, label = fields
        if label not in ("0", "1"):
            raise Digi2RealError(f"{pairs_file}:{lineno}: label must be 1 (same) or 0 (different), found {label!r}")
        for rel in (a, b):
            full = root / rel
            if not full.is_file():
                raise Digi2RealError(f"{pairs_file}:{lineno}: image {full} not found; restore it, or remove the line "
                                     "(paths are relative to the pairs file's folder)")
            paths.append(full)
        labels.append(label == "1")
    if not labels:
        raise Digi2RealError(f"{pairs_file}: no pairs found; expected lines 'path_a path_b label'")
    return paths, np.asarray(labels, dtype=bool)
