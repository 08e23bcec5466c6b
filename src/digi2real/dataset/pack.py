"""Pack an image folder (or a generated dataset) into insightface RecordIO, and verify a packed set.

``pack`` writes ``train.rec``, ``train.idx`` and ``property`` (FACTS 7) with images in label order, plus
``identities.txt`` (line ``c`` is the identity of label ``c``) and ``labels.json`` (identities, images per class,
encoding, source). PNG (and other non-JPEG) sources are re-encoded as JPEG at ``quality`` unless ``keep_png``;
JPEG sources are stored byte for byte. Everything is written into a temporary folder beside ``out_dir`` and renamed
into place at the end, so an interrupted pack never leaves a half-written set under the final name.

``verify`` reopens a packed set and checks it against its own ``labels.json`` and, given the source, against the
source: counts, the label of every record, and a seeded sample of decoded images.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from digi2real.dataset.imagefolder import ImageFolderDataset, RecordFolderDataset
from digi2real.dataset.recordio import unpack_header, write_insightface_rec
from digi2real.errors import Digi2RealError
from digi2real.fileio import write_json, write_text
from digi2real.imageio import decode_image

__all__ = ["pack", "verify", "JPEG_TOLERANCE"]

#: Largest mean absolute pixel difference (0-255 scale) accepted between a JPEG-re-encoded record and its source.
#: Used only when the stored JPEG is not byte-identical to re-encoding the source (another JPEG library): the
#: pixels of the two encodings then differ by well under 1 grey level, while another image differs by tens.
JPEG_TOLERANCE = 3.0
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# Images encoded per batch: threads overlap decode/encode (PIL releases the GIL) while memory stays bounded.
_CHUNK = 256


def _encode(ds: ImageFolderDataset, i: int, quality: int, keep_png: bool) -> bytes:
    """The bytes to store for image ``i``: JPEG and (with ``keep_png``) PNG files as they are, else re-encoded."""
    data = ds.read_bytes(i)
    rgb = ds.decode(data, i)  # always decoded: a corrupt or wrongly sized file must fail here, not in training
    if data.startswith(_JPEG_MAGIC) or (keep_png and data.startswith(_PNG_MAGIC)):
        return data
    buf = io.BytesIO()
    if keep_png:
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=6)
    else:
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pack(
    dataset_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    quality: int = 95,
    progress: bool = True,
    keep_png: bool = False,
    overwrite: bool = False,
    workers: int = 2,
) -> dict[str, Any]:
    """Write ``dataset_path`` (image folder or generated dataset) as an insightface RecordIO set in ``out_dir``.

    Returns a summary (images, classes, bytes, encoding). ``out_dir`` must not exist or be empty unless
    ``overwrite``, in which case the old contents are replaced only once the new set is complete.
    """
    if not 1 <= quality <= 100:
        raise Digi2RealError(f"JPEG quality must be 1..100, got {quality}")
    ds = ImageFolderDataset(dataset_path)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise Digi2RealError(f"{out}: already exists and is not empty; choose another folder or replace it (--force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        bar = tqdm(total=len(ds), unit="img", desc="pack", disable=not progress)

        def samples() -> Iterator[tuple[bytes, int]]:
            labels = ds.labels
            with ThreadPoolExecutor(max(1, workers)) as pool:
                for start in range(0, len(ds), _CHUNK):
                    idx = range(start, min(start + _CHUNK, len(ds)))
                    for i, data in zip(idx, pool.map(lambda j: _encode(ds, j, quality, keep_png), idx)):
                        bar.update(1)
                        yield data, int(labels[i])

        try:
            n = write_insightface_rec(tmp, samples(), ds.num_classes, ds.image_size)  # type: ignore[arg-type]
        finally:
            bar.close()
        counts = np.bincount(ds.labels, minlength=ds.num_classes).tolist()
        write_text(tmp / "identities.txt", "".join(f"{name}\n" for name in ds.identities))
        info = {
            "source": str(ds.root),
            "images": n,
            "classes": ds.num_classes,
            "identities": ds.identities,
            "counts": counts,
            "encoding": "png" if keep_png else "jpeg",
            "quality": None if keep_png else quality,
        }
        write_json(tmp / "labels.json", info)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {"path": str(out), "source": str(ds.root), "images": n, "classes": ds.num_classes, "bytes": size,
            "encoding": info["encoding"], "quality": info["quality"]}


def _replace_dir(new: Path, dest: Path) -> None:
    """Move the finished folder ``new`` to ``dest``; an existing ``dest`` is set aside first and deleted after."""
    if not dest.exists():
        os.replace(new, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.rmdir(old)
    os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(old, dest)  # put the previous set back rather than leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ verify


def _load_info(root: Path) -> dict[str, Any] | None:
    path = root / "labels.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise Digi2RealError(f"{path}: unreadable ({exc}); re-run digi2real pack") from None
    if not isinstance(info, dict):
        raise Digi2RealError(f"{path}: expected a JSON object; re-run digi2real pack")
    return info


def verify(
    packed_dir: str | os.PathLike[str],
    source: str | os.PathLike[str] | None = None,
    sample: int = 200,
    seed: int = 0,
    tolerance: float = JPEG_TOLERANCE,
) -> dict[str, Any]:
    """Check a packed RecordIO set; return a report dict, or raise :class:`Digi2RealError` at the first mismatch.

    Always: the set opens, every record header is readable, labels are sorted and their per-class counts, the
    class ranges of the meta records and ``property`` agree with ``labels.json`` (when present), and ``sample``
    seeded random records decode to images of the property's size. With ``source``: image and class counts and
    identity names equal the source's, every record's label equals the source image's label at the same position,
    and the sampled images equal the source images (exactly when the stored bytes are PNG or the source file's own
    bytes, else within a mean absolute difference of ``tolerance``).
    """
    root = Path(packed_dir).expanduser()
    if not root.is_dir():
        raise Digi2RealError(f"{root}: not a folder; expected a packed set with train.rec, train.idx, property")
    rec = RecordFolderDataset(root)
    name = str(root)
    labels = rec.labels  # reads every header: a broken record fails here
    n, c = len(rec), rec.num_classes
    if n == 0:
        raise Digi2RealError(f"{name}: holds no images")
    if labels.min() < 0 or labels.max() >= c:
        bad = int(np.flatnonzero((labels < 0) | (labels >= c))[0])
        raise Digi2RealError(f"{name}: record {int(rec.image_keys[bad])} has label {int(labels[bad])}, outside "
                             f"0..{c - 1} (property says {c} classes)")
    # Against a source, the per-record comparison names the exact record, so it runs before the internal checks.
    src: ImageFolderDataset | None = None
    if source is not None:
        src = ImageFolderDataset(source)
        if len(src) != n or src.num_classes != c:
            raise Digi2RealError(f"{name}: holds {n} images of {c} classes but the source {src.root} has "
                                 f"{len(src)} images of {src.num_classes} classes")
        # Sets packed elsewhere have no identities.txt; their made-up names ("0", "1", ...) are not compared.
        if rec.named and rec.identities != src.identities:
            cls = next(i for i, (a, b) in enumerate(zip(rec.identities, src.identities)) if a != b)
            raise Digi2RealError(f"{name}: label {cls} is identity {rec.identities[cls]!r} but {src.identities[cls]!r} "
                                 "in the source")
        if not np.array_equal(labels, src.labels):
            bad = int(np.flatnonzero(labels != src.labels)[0])
            raise Digi2RealError(f"{name}: record {int(rec.image_keys[bad])} has label {int(labels[bad])} but its "
                                 f"source image {src.relpath(bad)} has label {int(src.labels[bad])}")

    if np.any(np.diff(labels) < 0):
        bad = int(np.flatnonzero(np.diff(labels) < 0)[0]) + 1
        raise Digi2RealError(f"{name}: record {int(rec.image_keys[bad])} has label {int(labels[bad])} after "
                             f"{int(labels[bad - 1])}; packed labels must be sorted")
    counts = np.bincount(labels, minlength=c)
    if rec.class_ranges is not None:
        if len(rec.class_ranges) != c:
            raise Digi2RealError(f"{name}: {len(rec.class_ranges)} class-range records but {c} classes")
        sizes = rec.class_ranges[:, 1] - rec.class_ranges[:, 0]
        if not np.array_equal(sizes, counts):
            cls = int(np.flatnonzero(sizes != counts)[0])
            raise Digi2RealError(f"{name}: class {cls} has {int(counts[cls])} records labelled with it but its range "
                                 f"record says {int(sizes[cls])}")
    info = _load_info(root)
    if info is not None:
        if info.get("images") != n or info.get("classes") != c:
            raise Digi2RealError(f"{name}: holds {n} images of {c} classes but labels.json says "
                                 f"{info.get('images')} of {info.get('classes')}")
        expected = np.asarray(info.get("counts", []), dtype=np.int64)
        if not np.array_equal(expected, counts):
            cls = int(np.flatnonzero(expected != counts)[0]) if len(expected) == c else -1
            where = f"class {cls}" if cls >= 0 else "the per-class counts"
            raise Digi2RealError(f"{name}: {where} does not match labels.json (a record's label was changed?)")

    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(n, size=min(sample, n), replace=False)) if sample > 0 else np.empty(0, np.int64)
    worst = 0.0
    exact = 0
    for i in picked.tolist():
        key = int(rec.image_keys[i])
        _, stored = unpack_header(rec.reader.read(key))
        rgb = decode_image(stored, f"{name} record {key}")
        if rgb.shape[:2] != (rec.height, rec.width):
            raise Digi2RealError(f"{name}: record {key} is {rgb.shape[1]}x{rgb.shape[0]} px but property says "
                                 f"{rec.width}x{rec.height}")
        if src is None:
            continue
        original = src.read_bytes(i)
        ref = src.decode(original, i)
        if stored.startswith(_PNG_MAGIC) or stored == original:
            exact += 1
            if not np.array_equal(rgb, ref):
                raise Digi2RealError(f"{name}: record {key} is stored losslessly but differs from its source image "
                                     f"{src.relpath(i)}")
        else:
            # Re-encode the source as pack did: with the same codec the bytes match exactly; otherwise the pixels of
            # the two encodings are compared, which separates "another JPEG encoder" (tiny) from "another image".
            quality = (info or {}).get("quality")
            if quality:
                buf = io.BytesIO()
                Image.fromarray(ref).save(buf, format="JPEG", quality=int(quality))
                if buf.getvalue() == stored:
                    exact += 1
                    continue
                ref = decode_image(buf.getvalue(), src.relpath(i))
            diff = float(np.mean(np.abs(rgb.astype(np.int16) - ref.astype(np.int16))))
            worst = max(worst, diff)
            if diff > tolerance:
                raise Digi2RealError(f"{name}: record {key} differs from its source image {src.relpath(i)} by a mean "
                                     f"of {diff:.2f} grey levels (JPEG tolerance {tolerance}); wrong image?")
    return {
        "path": str(root.absolute()),
        "source": str(src.root) if src is not None else None,
        "images": n,
        "classes": c,
        "labels_checked": n if src is not None else 0,
        "sampled": len(picked),
        "exact": exact,
        "max_mean_abs_diff": round(worst, 3),
        "ok": True,
    }
