"""Pack an image folder (or a generated dataset) into insightface RecordIO, and verify a packed set.

``pack`` writes ``train.rec``, ``train.idx`` and ``property`` (FACTS 7) with images in label order, plus
``identities.txt`` (line ``c`` is the identity of label ``c``) and ``labels.json`` (identities, images per class,
encoding, source). PNG (and other non-JPEG) sources are re-encoded as JPEG at ``quality`` unless ``keep_png``;
JPEG sources are stored byte for byte. Everything is written into a temporary folder beside ``out_dir`` and renamed
into place at the end, so an interrupted pack never leaves a half-written set under the final name.

Safety (DESIGN "Safety"): the output never is, lies inside, or holds the source; ``overwrite`` (``--force``) replaces
only a folder that holds a set pack wrote (the files of :data:`PACK_FILES`, with pack's ``labels.json``) and nothing
else, and it deletes those files by name, never a folder tree. Files get the ordinary permissions of the umask.
Temporary names carry host and process id (:func:`digi2real.fileio.temporary_prefix`), so the next pack removes what a
killed pack left beside its output, and puts back a previous set that a kill left set aside.

``verify`` reopens a packed set and checks it against its own ``labels.json`` and, given the source, against the
source: counts, the label of every record, and a seeded sample of decoded images.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import sys
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
from digi2real.fileio import (
    check_apart,
    is_orphaned_temporary,
    temporary_prefix,
    write_json,
    write_text,
)
from digi2real.imageio import decode_image

__all__ = ["pack", "verify", "JPEG_TOLERANCE", "PACK_FILES"]

#: Every file ``pack`` writes into its output folder, and all that ``--force`` ever deletes there.
PACK_FILES = ("train.rec", "train.idx", "property", "identities.txt", "labels.json")
WRITTEN_BY = "digi2real pack"
# labels.json of sets packed before it named its writer: these keys, all present, identify it.
_LEGACY_KEYS = frozenset({"source", "images", "classes", "identities", "counts", "encoding"})
_LABELS_MAX_BYTES = 1 << 30

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

    Returns a summary (images, classes, bytes, encoding). ``out_dir`` must not exist or be empty; with
    ``overwrite`` it may also hold a set pack wrote, which is replaced only once the new set is complete. Anything
    else in it (or ``out_dir`` overlapping the source) is refused with one line before anything is written.
    """
    if not 1 <= quality <= 100:
        raise Digi2RealError(f"--quality {quality}: JPEG quality must be 1..100")
    out = Path(out_dir).expanduser().absolute()
    # A link to a folder is followed: the set lands where it points and the link stays.
    dest = _resolve(out, "-o")
    _resolve(Path(dataset_path), "DATASET")
    check_apart(out, [dataset_path], flag="-o")
    _recover(dest)
    _check_replaceable(out, dest, overwrite)
    ds = ImageFolderDataset(dataset_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_folder(dest, "partial")
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
            "written_by": WRITTEN_BY,
            "files": list(PACK_FILES),
            "source": str(ds.root),
            "images": n,
            "classes": ds.num_classes,
            "identities": ds.identities,
            "counts": counts,
            "encoding": "png" if keep_png else "jpeg",
            "quality": None if keep_png else quality,
        }
        write_json(tmp / "labels.json", info)
        _install(tmp, out, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    return {"path": str(out), "source": str(ds.root), "images": n, "classes": ds.num_classes, "bytes": size,
            "encoding": info["encoding"], "quality": info["quality"]}


# ------------------------------------------------------------------------------------------------------ output


def _resolve(path: Path, flag: str) -> Path:
    """``path`` with every symbolic link resolved; a link loop is a one-line error (Python < 3.13 raises
    RuntimeError for it, which no caller expects)."""
    try:
        return path.expanduser().resolve()
    except RuntimeError:
        raise Digi2RealError(f"{flag} {path}: a symbolic link loop (a link that leads back to itself); remove the "
                             "link or give another path") from None


def _is_pack_labels(path: Path) -> bool:
    """Whether ``path`` is a labels.json that pack wrote (it names pack, or has the keys pack always wrote)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _LABELS_MAX_BYTES:
            return False
        info = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(info, dict) and (info.get("written_by") == WRITTEN_BY or _LEGACY_KEYS <= info.keys())


def _contents(dest: Path) -> tuple[str, list[str]]:
    """What is at ``dest``: ("none" | "file" | "empty" | "pack" | "other", names in the way). "pack" means only
    files of :data:`PACK_FILES`, regular files (no links or folders), with a labels.json pack wrote."""
    if not dest.exists() and not dest.is_symlink():
        return "none", []
    if not dest.is_dir():
        return "file", [dest.name]
    names = sorted(os.listdir(dest))
    if not names:
        return "empty", []
    foreign = [n for n in names if n not in PACK_FILES or (dest / n).is_symlink() or not (dest / n).is_file()]
    if foreign or not _is_pack_labels(dest / "labels.json"):
        return "other", foreign or names
    return "pack", []


def _in_the_way(out: Path, names: list[str]) -> Digi2RealError:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return Digi2RealError(f"-o {out}: holds {shown}, which digi2real pack did not write; pack (even with --force) "
                          "replaces only a set it wrote: move them away or choose a new folder")


def _check_replaceable(out: Path, dest: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output pack may not write: a file, a folder of other files, or (without
    ``overwrite``) an earlier set."""
    state, names = _contents(dest)
    if state == "file":
        raise Digi2RealError(f"-o {out}: is a file, not a folder; give a folder for train.rec, train.idx and property")
    if state == "other":
        raise _in_the_way(out, names)
    if state == "pack" and not overwrite:
        raise Digi2RealError(f"-o {out}: already holds a packed set; replace it with --force, or choose a new folder")


def _unused_name(dest: Path, kind: str) -> Path:
    """A free temporary name beside ``dest`` that tells who wrote it (see :func:`_recover`)."""
    while True:
        path = dest.parent / f"{temporary_prefix(dest.name)}{secrets.token_hex(4)}.{kind}.tmp"
        if not path.exists() and not path.is_symlink():
            return path


def _new_folder(dest: Path, kind: str) -> Path:
    """Create a temporary folder beside ``dest`` with the ordinary mode (0777 less the umask, unlike mkdtemp's
    0700, which would keep a finished set unreadable to other users)."""
    while True:
        path = _unused_name(dest, kind)
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path


def _install(new: Path, out: Path, dest: Path, overwrite: bool) -> None:
    """Move the finished folder ``new`` to ``dest``. An earlier set pack wrote is set aside first, then its files
    are deleted by name once the new set is in place; anything else at ``dest`` is never touched."""
    _check_replaceable(out, dest, overwrite)  # again: the folder may have changed while we packed
    state, _ = _contents(dest)
    if state in ("none", "empty"):
        os.replace(new, dest)  # rename(2) onto an empty folder replaces it in one step
        return
    old = _unused_name(dest, "old")
    os.rename(dest, old)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(old, dest)  # put the previous set back rather than leave nothing
        raise
    _remove_set(old, dest)


def _remove_set(folder: Path, dest: Path) -> None:
    """Delete a set pack wrote, file by file (never a tree): what pack did not write survives."""
    for name in PACK_FILES:
        (folder / name).unlink(missing_ok=True)
    try:
        os.rmdir(folder)
    except OSError:
        # Something appeared in it while we packed: keep it under a visible name, never under a temporary one
        # (temporaries are deleted by the next run).
        keep = dest.parent / f"{dest.name}.kept-{secrets.token_hex(3)}"
        os.rename(folder, keep)
        print(f"digi2real: note: files that appeared in {dest} while packing were kept in {keep}", file=sys.stderr)


def _recover(dest: Path) -> None:
    """Clean what a killed pack left beside ``dest``: its temporary folders (``.<name>.~host~pid~X.partial.tmp``,
    ``.old.tmp``; the older ``.<name>.XXXXXXXX.partial/.old``) once their writer is gone (a dead process on this
    host, or untouched for an hour: :func:`digi2real.fileio.is_orphaned_temporary`). A previous set that a kill left
    set aside while ``dest`` is missing is put back instead of deleted. Nothing else is touched."""
    if not dest.parent.is_dir():
        return
    own = re.compile(rf"^\.{re.escape(dest.name)}\.(~[^~/]*~\d+~[^~/]*\.tmp|[A-Za-z0-9_]{{8}}\.(partial|old))$")
    entries = [e for e in dest.parent.iterdir() if own.match(e.name) and not e.is_symlink()]
    entries.sort(key=lambda e: e.lstat().st_mtime, reverse=True)  # the newest set aside is the one to put back
    for entry in entries:
        if not is_orphaned_temporary(entry):
            continue
        if entry.name.endswith((".old.tmp", ".old")) and entry.is_dir():
            state = _contents(entry)[0]
            if state == "empty":
                os.rmdir(entry)
                continue
            if state != "pack":
                continue  # not (only) a set pack wrote: leave it for its owner
            if not dest.exists() and not dest.is_symlink():
                os.rename(entry, dest)
            else:
                _remove_set(entry, dest)
        elif entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)  # a partial set: only pack writes in it
        else:
            entry.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------ verify


def _load_info(root: Path) -> dict[str, Any] | None:
    """labels.json (written by pack), checked: an object whose ``images``/``classes`` are whole numbers and whose
    ``counts`` is a list of them; None when the set has none (packed by another tool)."""
    path = root / "labels.json"
    if not path.is_file():
        return None
    fix = "pack the set again, or delete labels.json to check the set without it"
    try:
        if path.stat().st_size > _LABELS_MAX_BYTES:
            raise ValueError(f"larger than {_LABELS_MAX_BYTES:,} bytes")
        info = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise Digi2RealError(f"{path}: cannot be read ({exc.strerror or exc}); {fix}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Digi2RealError(f"{path}: not valid JSON ({str(exc)[:80]}); {fix}") from None
    if not isinstance(info, dict):
        raise Digi2RealError(f"{path}: expected a JSON object, got a {type(info).__name__}; {fix}")

    def whole(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62

    for key in ("images", "classes"):
        if key in info and not whole(info[key]):
            raise Digi2RealError(f"{path}: {key!r} is {str(info[key])[:40]}, not a whole number; {fix}")
    counts = info.get("counts", [])
    if not isinstance(counts, list) or not all(whole(c) for c in counts):
        raise Digi2RealError(f"{path}: 'counts' must be a list of whole numbers (images per class); {fix}")
    quality = info.get("quality")
    if quality is not None and not (whole(quality) and 1 <= quality <= 100):
        raise Digi2RealError(f"{path}: 'quality' is {str(quality)[:40]}, not a JPEG quality 1..100; {fix}")
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
    if sample < 0:
        raise Digi2RealError(f"--sample {sample}: the number of records to decode must be 0 or more")
    if seed < 0:
        raise Digi2RealError(f"--seed {seed}: the seed must be 0 or more")
    root = Path(packed_dir).expanduser()
    if not root.is_dir():
        raise Digi2RealError(f"{root}: not a folder; expected a packed set with train.rec, train.idx, property")
    rec = RecordFolderDataset(root)
    name = str(root)
    rec.check_index()  # reads every header: a broken record, or an index entry leading to another record, fails here
    labels = rec.labels
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
