"""MXNet/insightface RecordIO files (``train.rec`` / ``train.idx`` / ``property``), written from the format description.

Format (FACTS 7):

* ``.rec``: a sequence of *parts*. Each part is the uint32 magic ``0xced7230a``, a uint32 ``lrec`` word whose lower
  29 bits are the part's length and upper 3 bits a continuation flag, the part's bytes, then zero padding to a
  multiple of 4 bytes. All integers are little-endian.
* ``.idx``: text lines ``key<TAB>byte_offset`` giving the offset of the first part of each logical record.
* A logical record (payload) is stored as one part with flag 0, unless the payload contains the magic word at a
  4-byte-aligned offset (relative to the payload start). A reader that scans for the magic word could then lose
  sync, so dmlc-core's ``RecordIOWriter::WriteRecord`` splits the payload at every such occurrence:

  - the bytes before the first aligned magic become a part with flag 1 (start);
  - the bytes between two aligned magics become parts with flag 2 (middle);
  - the bytes after the last aligned magic become a part with flag 3 (end);
  - the four magic bytes at each split point are *not* written; the reader re-inserts one magic word after every
    part whose flag is 1 or 2, and stops after a part with flag 0 or 3.

  Parts can be empty (magic at offset 0, two adjacent magics, or magic as the last 4 bytes, which gives an empty
  flag-3 part). Because splits happen only at aligned offsets, every part but the last has a length that is a
  multiple of 4, so only the last part carries padding. Payloads must be shorter than 2**29 bytes.
* Payload of an image record: header struct ``IfQQ`` (flag uint32, label float32, id uint64, id2 uint64; 24 bytes);
  if ``flag > 0`` then ``flag`` float32 labels follow (and the scalar ``label`` field is 0); then the encoded image.
* insightface layout: record 0 has flag 2 and labels ``(N + 1, end)``; records ``1..N`` are images labelled with
  their class; records ``N+1 .. end-1`` hold each class's ``(start, end)`` key range (end exclusive), with no image.
  ``property`` holds ``num_classes,112,112``. Files made by im2rec have no meta record: every key is an image.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import struct
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from digi2real.errors import BadImageError, Digi2RealError
from digi2real.fileio import temporary_prefix, write_text
from digi2real.imageio import decode_image

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
MAX_RECORD_BYTES = 1 << 29
_PART_HEAD = struct.Struct("<II")
_HEADER = struct.Struct("<IfQQ")
HEADER_SIZE = _HEADER.size  # 24
# float32 labels represent integers exactly only up to 2**24; keys and class ids stored as labels must stay below it.
_FLOAT32_EXACT = 1 << 24
#: Largest key accepted in an ``.idx`` (MXNet keys are uint64; numpy holds them as int64).
MAX_KEY = (1 << 63) - 1
# One index line is "key<TAB>offset": two decimal numbers of at most 19 digits each. Longer lines are garbage, and
# reading them whole would let a binary file without newlines take any amount of memory.
_IDX_LINE = re.compile(r"^([0-9]{1,19})\t([0-9]{1,19})$")
_IDX_LINE_MAX = 64
# insightface headers carry at most a handful of extra labels (2 for meta and range records); a count in the millions
# is a damaged header, not a label list.
_MAX_HEADER_LABELS = 4096
#: Largest image side a ``property`` file may declare; face training sets are 112 x 112 (FACTS 7).
MAX_PROPERTY_SIDE = 4096

__all__ = [
    "MAGIC",
    "HEADER_SIZE",
    "RecordHeader",
    "pack_header",
    "unpack_header",
    "RecordWriter",
    "RecordReader",
    "InsightFaceRecordDataset",
    "write_insightface_rec",
]


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _paths(target: str | os.PathLike[str] | tuple[str | os.PathLike[str], str | os.PathLike[str]]) -> tuple[Path, Path]:
    """``prefix`` -> (prefix.rec, prefix.idx); a (rec, idx) pair is used as is."""
    if isinstance(target, tuple):
        rec, idx = target
        return Path(rec), Path(idx)
    prefix = Path(target)
    return prefix.with_name(prefix.name + ".rec"), prefix.with_name(prefix.name + ".idx")


# ----------------------------------------------------------------------------------------------------------- header


class RecordHeader(NamedTuple):
    """The ``IfQQ`` record header (FACTS 7). ``label`` is a float when ``flag == 0``, else a float32 array."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_header(label: float | Sequence[float] | np.ndarray, id: int, id2: int = 0) -> bytes:  # noqa: A002
    """Pack the ``IfQQ`` header (FACTS 7); append the encoded image to the result to form a record payload.

    A scalar label goes into the header's ``label`` field with ``flag = 0``. A sequence of labels sets ``flag`` to its
    length, writes 0 into the scalar field and appends the labels as float32, as MXNet's ``recordio.pack`` does.
    """
    if np.ndim(label) == 0:
        return _HEADER.pack(0, float(label), int(id), int(id2))  # type: ignore[arg-type]
    labels = np.asarray(label, dtype="<f4").ravel()
    if labels.size == 0:
        # flag 0 would mean "scalar label", so an empty label list cannot be represented.
        raise Digi2RealError("pack_header: the label sequence is empty; give a scalar label or at least one value")
    return _HEADER.pack(labels.size, 0.0, int(id), int(id2)) + labels.tobytes()


def unpack_header(payload: bytes) -> tuple[RecordHeader, bytes]:
    """Split a record payload into its ``IfQQ`` header (with the ``flag`` extra float32 labels) and the image bytes."""
    if len(payload) < HEADER_SIZE:
        raise Digi2RealError(
            f"record payload is {len(payload)} bytes, shorter than the {HEADER_SIZE}-byte IfQQ header; the file is corrupt"
        )
    flag, label, rid, rid2 = _HEADER.unpack_from(payload, 0)
    rest = payload[HEADER_SIZE:]
    if flag > 0:
        need = 4 * flag
        if len(rest) < need:
            raise Digi2RealError(
                f"record header announces {flag} labels but only {len(rest)} bytes follow; the file is corrupt"
            )
        labels = np.frombuffer(rest, dtype="<f4", count=flag).astype(np.float32)
        return RecordHeader(flag, labels, rid, rid2), rest[need:]
    return RecordHeader(flag, float(label), rid, rid2), rest


# ----------------------------------------------------------------------------------------------------------- writer


class RecordWriter:
    """Write an indexed RecordIO pair (``.rec`` + ``.idx``) framed exactly like MXNet/dmlc-core (FACTS 7).

    Both files are written under temporary names beside their destinations and renamed into place by :meth:`close`
    (or on leaving a ``with`` block without an exception); on an exception the temporary files are deleted, so a
    crash never leaves a half-written dataset under the final names.
    """

    def __init__(self, target: str | os.PathLike[str] | tuple[str | os.PathLike[str], str | os.PathLike[str]]) -> None:
        self.rec_path, self.idx_path = _paths(target)
        self._tmp: list[Path] = []
        self._rec = self._open_tmp(self.rec_path)
        self._idx = self._open_tmp(self.idx_path)
        self._offset = 0
        self._keys: dict[int, tuple[int, int]] = {}  # key -> (offset, framed size) for duplicate checks and overwrite
        self._closed = False

    def _open_tmp(self, path: Path) -> Any:
        """A new temporary file beside ``path``. Named with :func:`~digi2real.fileio.temporary_prefix` so a later
        run can tell a killed writer's leftover from a live one's; created with mode 0666 so the kernel applies the
        umask and the finished file has the ordinary permissions of a plain ``open()`` (mkstemp's 0600 would keep
        a shared dataset unreadable to others)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = path.parent / f"{temporary_prefix(path.name)}{secrets.token_hex(4)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            except FileExistsError:
                continue
            self._tmp.append(tmp)
            return os.fdopen(fd, "wb")

    @staticmethod
    def frame(payload: bytes) -> bytes:
        """The bytes dmlc-core's ``RecordIOWriter::WriteRecord`` emits for one payload (see the module docstring)."""
        size = len(payload)
        if size >= MAX_RECORD_BYTES:
            raise Digi2RealError(f"a RecordIO record must be shorter than 2**29 bytes; this one is {size} bytes")
        out: list[bytes] = []
        start = 0  # start of the part being built; always 4-byte aligned
        view = memoryview(payload)
        # Only aligned occurrences matter: the reader re-syncs on aligned magic words, unaligned ones are harmless.
        pos = payload.find(MAGIC_BYTES)
        while pos != -1 and pos + 4 <= size:
            if pos % 4 == 0:
                out.append(_PART_HEAD.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (pos - start)))
                out.append(view[start:pos].tobytes())
                start = pos + 4  # the magic word itself is dropped; the reader re-inserts it
                pos = payload.find(MAGIC_BYTES, start)
            else:
                pos = payload.find(MAGIC_BYTES, pos + 1)
        out.append(_PART_HEAD.pack(MAGIC, ((3 if start != 0 else 0) << 29) | (size - start)))
        out.append(view[start:].tobytes())
        out.append(b"\0" * (_align4(size) - size))
        return b"".join(out)

    def write(self, key: int, payload: bytes) -> None:
        """Append one record under integer ``key`` and add ``key<TAB>offset`` to the index."""
        if self._closed:
            raise Digi2RealError(f"{self.rec_path}: the writer is closed")
        key = int(key)
        if key < 0:
            raise Digi2RealError(f"{self.rec_path}: record key {key} is negative; keys must be >= 0")
        if key in self._keys:
            raise Digi2RealError(f"{self.rec_path}: record key {key} written twice; keys must be unique")
        framed = self.frame(bytes(payload))
        self._rec.write(framed)
        self._idx.write(f"{key}\t{self._offset}\n".encode())
        self._keys[key] = (self._offset, len(framed))
        self._offset += len(framed)

    def overwrite(self, key: int, payload: bytes) -> None:
        """Replace an already written record with one whose framed size is identical (used to fill in a meta record
        whose contents are only known after all images are written)."""
        if self._closed:
            raise Digi2RealError(f"{self.rec_path}: the writer is closed")
        if key not in self._keys:
            raise Digi2RealError(f"{self.rec_path}: cannot overwrite record {key}: it was not written")
        offset, size = self._keys[key]
        framed = self.frame(bytes(payload))
        if len(framed) != size:
            raise Digi2RealError(f"{self.rec_path}: replacement for record {key} is {len(framed)} bytes, not {size}")
        self._rec.flush()
        os.pwrite(self._rec.fileno(), framed, offset)

    def close(self) -> None:
        """Flush, fsync and rename both files into place."""
        if self._closed:
            return
        self._closed = True
        try:
            for handle in (self._rec, self._idx):
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
            os.replace(self._tmp[0], self.rec_path)
            os.replace(self._tmp[1], self.idx_path)
        except BaseException:
            self._discard()
            raise

    def abort(self) -> None:
        """Delete the temporary files; nothing appears under the final names."""
        if self._closed:
            return
        self._closed = True
        self._discard()

    def _discard(self) -> None:
        for handle in (self._rec, self._idx):
            try:
                handle.close()
            except OSError:
                pass
        for tmp in self._tmp:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----------------------------------------------------------------------------------------------------------- reader


class RecordReader:
    """Random access to a RecordIO file by key (FACTS 7).

    Uses the ``.idx`` when given (or when ``<rec minus .rec>.idx`` exists and ``idx_path`` is None); otherwise scans
    the ``.rec`` once and numbers the records 0, 1, 2, ... in file order. Reads use ``os.pread`` so threads can share
    one reader without a shared file position, and the reader is picklable: the file descriptor is not pickled but
    reopened lazily in the new process (the index, as two int64 arrays, travels with it).
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None) -> None:
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise Digi2RealError(f"{self.rec_path}: RecordIO file not found")
        if idx_path is None:
            guess = self.rec_path.with_suffix(".idx")
            idx_path = guess if guess.is_file() else None
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._fd: int | None = None
        self._pid = -1
        self._lock = threading.Lock()
        self._size = self.rec_path.stat().st_size
        if self.idx_path is not None:
            keys, offsets = self._load_index(self.idx_path)
        else:
            keys, offsets = self._scan()
        self._keys = keys  # file order
        order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[order]
        self._sorted_offsets = offsets[order]
        if len(keys) > 1 and np.any(self._sorted_keys[1:] == self._sorted_keys[:-1]):
            dup = int(self._sorted_keys[1:][self._sorted_keys[1:] == self._sorted_keys[:-1]][0])
            raise Digi2RealError(f"{self.idx_path}: key {dup} appears more than once; rebuild the index")

    # -- index ----------------------------------------------------------------------------------------------------

    def _load_index(self, idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
        """Parse ``key<TAB>offset`` lines (FACTS 7). Every line must be two decimal numbers, the key at most
        :data:`MAX_KEY`, and the offset a 4-byte-aligned position inside the ``.rec`` (records are padded to 4
        bytes, so no record starts elsewhere); a damaged line is an error naming file and line, never a guess."""
        if not idx_path.is_file():
            raise Digi2RealError(f"{idx_path}: index file not found; pass idx_path=None to scan the .rec instead")
        keys: list[int] = []
        offsets: list[int] = []
        fix = "the index is damaged: rebuild it, or delete it to have the .rec scanned"
        with open(idx_path, "rb") as handle:
            lineno = 0
            while raw := handle.readline(_IDX_LINE_MAX + 1):
                lineno += 1
                if len(raw) > _IDX_LINE_MAX:
                    raise Digi2RealError(f"{idx_path}:{lineno}: a line longer than {_IDX_LINE_MAX} bytes, not "
                                         f"'key<TAB>offset'; {fix}")
                line = raw.decode("ascii", errors="replace").strip(" \r\n")
                if not line:
                    continue
                match = _IDX_LINE.match(line)
                if match is None:
                    raise Digi2RealError(f"{idx_path}:{lineno}: expected 'key<TAB>offset' (two whole numbers), got "
                                         f"{line[:40]!r}; {fix}")
                key, offset = int(match[1]), int(match[2])
                if key > MAX_KEY:
                    raise Digi2RealError(f"{idx_path}:{lineno}: key {key} is larger than 2**63 - 1; {fix}")
                if offset >= self._size or offset % 4:
                    where = "past the end of" if offset >= self._size else "not on a record boundary in"
                    raise Digi2RealError(f"{idx_path}:{lineno}: offset {offset} of key {key} is {where} "
                                         f"{self.rec_path} ({self._size} bytes); the .rec is truncated or {fix}")
                keys.append(key)
                offsets.append(offset)
        return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)

    def _scan(self) -> tuple[np.ndarray, np.ndarray]:
        """Walk the part headers once (without reading payloads) to find where each logical record starts."""
        offsets: list[int] = []
        pos = 0
        fd = self._file()
        while pos < self._size:
            offsets.append(pos)
            first = True
            while True:
                flag, length = self._part_head(fd, pos, first)
                pos += 8 + _align4(length)
                if pos > self._size:
                    raise Digi2RealError(
                        f"{self.rec_path}: record at offset {offsets[-1]} runs past the end of the file; it is truncated"
                    )
                if flag in (0, 3):
                    break
                first = False
        return np.arange(len(offsets), dtype=np.int64), np.asarray(offsets, dtype=np.int64)

    # -- file access ----------------------------------------------------------------------------------------------

    def _file(self) -> int:
        # Reopen after fork/unpickle: the pid check makes a forked worker get its own descriptor.
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            with self._lock:
                if self._fd is None or self._pid != pid:
                    self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    self._pid = pid
        return self._fd

    def _pread(self, fd: int, n: int, offset: int, what: str) -> bytes:
        data = os.pread(fd, n, offset)
        if len(data) != n:
            raise Digi2RealError(
                f"{self.rec_path}: {what} at offset {offset} needs {n} bytes but the file ends after {len(data)}; "
                "the file is truncated"
            )
        return data

    def _part_head(self, fd: int, pos: int, first: bool) -> tuple[int, int]:
        magic, lrec = _PART_HEAD.unpack(self._pread(fd, 8, pos, "record header"))
        if magic != MAGIC:
            raise Digi2RealError(
                f"{self.rec_path}: bad magic 0x{magic:08x} at offset {pos} (expected 0x{MAGIC:08x}); "
                "the file is corrupt or the index does not match it"
            )
        flag, length = lrec >> 29, lrec & _LEN_MASK
        # A logical record starts with flag 0 or 1 and continues with 2 or 3; anything else means lost sync.
        if (first and flag not in (0, 1)) or (not first and flag not in (2, 3)):
            raise Digi2RealError(
                f"{self.rec_path}: unexpected continuation flag {flag} at offset {pos}; the file is corrupt"
            )
        return flag, length

    def read_at(self, offset: int, limit: int | None = None) -> bytes:
        """Read the logical record starting at byte ``offset``, rejoining continuation parts; stop after ``limit``
        bytes if given (used to read headers without the image)."""
        fd = self._file()
        chunks: list[bytes] = []
        total = 0
        pos = offset
        first = True
        while True:
            flag, length = self._part_head(fd, pos, first)
            want = length if limit is None else min(length, limit - total)
            if want > 0:
                chunks.append(self._pread(fd, want, pos + 8, "record payload"))
                total += want
            if flag in (0, 3) or (limit is not None and total >= limit):
                break
            chunks.append(MAGIC_BYTES)  # dropped by the writer at the split point
            total += 4
            pos += 8 + length  # parts before the last have lengths that are multiples of 4: no padding
            first = False
        data = b"".join(chunks)
        return data if limit is None else data[:limit]

    def offset(self, key: int) -> int:
        """Byte offset of record ``key``."""
        i = int(np.searchsorted(self._sorted_keys, key))
        if i >= len(self._sorted_keys) or self._sorted_keys[i] != key:
            where = self.idx_path if self.idx_path is not None else self.rec_path
            raise Digi2RealError(f"{where}: record key {key} is not in the index")
        return int(self._sorted_offsets[i])

    def read(self, key: int, limit: int | None = None) -> bytes:
        """The payload of record ``key`` (all of it, or its first ``limit`` bytes)."""
        return self.read_at(self.offset(key), limit)

    @property
    def keys(self) -> np.ndarray:
        """Record keys in index (file) order."""
        return self._keys

    def __contains__(self, key: object) -> bool:
        try:
            self.offset(int(key))  # type: ignore[call-overload]
        except (Digi2RealError, TypeError, ValueError):
            return False
        return True

    def __len__(self) -> int:
        return len(self._keys)

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down os
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fd"] = None  # descriptors and locks do not survive pickling; reopened lazily
        state["_pid"] = -1
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


# -------------------------------------------------------------------------------------------------------- insightface


def _read_property(path: Path) -> tuple[int, int, int]:
    """``num_classes,height,width`` (FACTS 7), each a whole number: classes 1..2**24 (class ids are stored as float32
    labels, exact only up to 2**24), sides 8..:data:`MAX_PROPERTY_SIDE` px."""
    fix = "it must hold one line 'num_classes,height,width', e.g. '1000,112,112'"
    if not path.is_file():
        raise Digi2RealError(f"{path}: property file not found; create it with one line 'num_classes,112,112'")
    with open(path, "rb") as handle:
        raw = handle.read(256)
    text = raw.decode("ascii", errors="replace").strip()
    match = re.fullmatch(r"(\d{1,12})\s*,\s*(\d{1,12})\s*,\s*(\d{1,12})", text)
    if match is None or len(raw) == 256:
        raise Digi2RealError(f"{path}: expected 'num_classes,height,width', got {text[:40]!r}; {fix}")
    classes, height, width = (int(g) for g in match.groups())
    if not 1 <= classes <= _FLOAT32_EXACT:
        raise Digi2RealError(f"{path}: {classes} classes is outside 1..{_FLOAT32_EXACT}; {fix}")
    if not (8 <= height <= MAX_PROPERTY_SIDE and 8 <= width <= MAX_PROPERTY_SIDE):
        raise Digi2RealError(f"{path}: image size {width}x{height} is outside 8..{MAX_PROPERTY_SIDE} px; {fix}")
    return classes, height, width


def _whole(value: float, lo: int, hi: int) -> int | None:
    """``value`` as an int when it is a finite whole number in ``lo..hi``, else None."""
    if not math.isfinite(value) or value != int(value) or not lo <= int(value) <= hi:
        return None
    return int(value)


class InsightFaceRecordDataset:
    """An insightface training set ``root/train.rec`` + ``train.idx`` + ``property`` (FACTS 7).

    Handles both layouts: with the meta record (key 0 with ``flag > 0`` and labels ``(N + 1, end)``; images are keys
    ``1..N``) and without it (im2rec files: every key in the index, in index order, is an image whose header label is
    its class). ``dataset[i]`` is ``(rgb uint8 H x W x 3, int label)``; when a header carries several labels the
    first is the class, as insightface does. Every number read from the files is checked before it is used (a
    damaged header must not announce a billion images or a NaN class): damage is a :class:`Digi2RealError` naming
    the file and the record.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        rec, idx = self.root / "train.rec", self.root / "train.idx"
        if not rec.is_file():
            raise Digi2RealError(f"{rec}: not found; {self.root} is not an insightface RecordIO dataset")
        self.num_classes, self.height, self.width = _read_property(self.root / "property")
        self.reader = RecordReader(rec, idx if idx.is_file() else None)
        self.has_meta = False
        self.class_ranges: np.ndarray | None = None  # (C, 2) [start, end) image keys, from the meta layout
        self._labels: np.ndarray | None = None
        self.image_keys = self.reader.keys.copy()
        if 0 in self.reader:
            header = self._header(0)
            if header.flag > 0:  # insightface's own test for the meta record
                self._init_meta(header)

    def _corrupt(self, what: str) -> Digi2RealError:
        return Digi2RealError(f"{self.reader.rec_path}: {what}; the file is damaged: pack or download it again")

    def _init_meta(self, header: RecordHeader) -> None:
        labels = np.asarray(header.label, dtype=np.float64).ravel()
        if labels.size < 2:
            raise self._corrupt(f"meta record 0 has {labels.size} labels, expected (N + 1, end)")
        keys = self.reader.keys
        top = int(keys.max()) + 1 if len(keys) else 1
        n_plus_1 = _whole(labels[0], 1, top)
        end = _whole(labels[1], n_plus_1 or 1, MAX_KEY)
        # The meta record's keys must exist in this index: bounding them by it keeps a damaged header from
        # announcing more images than there are (and from allocating, or looping over, what it announces).
        if n_plus_1 is None or end is None or end < n_plus_1:
            raise self._corrupt(f"meta record 0 holds ({labels[0]:g}, {labels[1]:g}), not a valid (N + 1, end) for "
                                f"an index of {len(keys)} records with keys up to {top - 1}")
        image_keys = np.arange(1, n_plus_1, dtype=np.int64)
        missing = np.setdiff1d(image_keys, keys, assume_unique=True)
        if len(missing):
            raise self._corrupt(f"meta record 0 announces images 1..{n_plus_1 - 1} but key {int(missing[0])} is "
                                f"not in {self.reader.idx_path or 'the file'}")
        if top > end:
            raise self._corrupt(f"meta record 0 says the set ends before key {end} but "
                                f"{self.reader.idx_path or 'the file'} lists key {top - 1}")
        self.has_meta = True
        self.image_keys = image_keys
        ranges = []
        for key in range(n_plus_1, end):
            if key not in self.reader:
                ranges = []  # some published sets index only the images; the ranges are optional
                break
            h = self._header(key)
            lab = np.atleast_1d(np.asarray(h.label, dtype=np.float64))
            if lab.size < 2:
                ranges = []
                break
            start, stop = _whole(lab[0], 1, n_plus_1), _whole(lab[1], 1, n_plus_1)
            if start is None or stop is None or stop < start:
                raise self._corrupt(f"record {key} holds the class range ({lab[0]:g}, {lab[1]:g}), outside the image "
                                    f"keys 1..{n_plus_1 - 1}")
            ranges.append((start, stop))
        self.class_ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 2) if ranges else None

    def _header(self, key: int) -> RecordHeader:
        """The header of record ``key`` (with its extra labels), read without the image bytes."""
        # One read covers the header and the two labels of meta and range records; more labels need a second.
        head = self.reader.read(key, limit=HEADER_SIZE + 8)
        flag = _HEADER.unpack(head[:HEADER_SIZE].ljust(HEADER_SIZE, b"\0"))[0]
        if flag > _MAX_HEADER_LABELS:
            raise self._corrupt(f"record {key} announces {flag} header labels")
        if 4 * flag > 8:
            head = self.reader.read(key, limit=HEADER_SIZE + 4 * flag)
        try:
            header, _ = unpack_header(head[: HEADER_SIZE + 4 * flag])
        except Digi2RealError as exc:
            raise self._corrupt(f"record {key}: {exc}") from None
        return header

    def __len__(self) -> int:
        return len(self.image_keys)

    def _class_of(self, header: RecordHeader, key: int) -> int:
        """The class of an image record: its scalar label, or the first of its labels; a finite whole number in
        ``0..num_classes - 1`` (a NaN or 2.5 is damage, never truncated to a class)."""
        value = float(header.label) if header.flag == 0 else float(np.asarray(header.label).ravel()[0])  # type: ignore[arg-type]
        label = _whole(value, 0, self.num_classes - 1)
        if label is None:
            raise self._corrupt(f"record {key} has label {value:g}, not a class number 0..{self.num_classes - 1} "
                                f"(property says {self.num_classes} classes)")
        return label

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        n = len(self.image_keys)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} images")
        key = int(self.image_keys[i])
        header, image = unpack_header(self.reader.read(key))
        name = f"{self.reader.rec_path} record {key}"
        rgb = decode_image(image, name)
        if rgb.shape[:2] != (self.height, self.width):
            raise BadImageError(
                f"{name}: image is {rgb.shape[1]}x{rgb.shape[0]} px but property says {self.width}x{self.height}"
            )
        return rgb, self._class_of(header, key)

    @property
    def labels(self) -> np.ndarray:
        """Class of every image (int64), read from the record headers only; computed once and cached."""
        if self._labels is None:
            out = np.empty(len(self.image_keys), dtype=np.int64)
            for j, key in enumerate(self.image_keys.tolist()):
                out[j] = self._class_of(self._header(key), key)
            self._labels = out
        return self._labels

    def check_index(self) -> None:
        """Check that every index entry leads to the record written under its key: the ``id`` field of the record's
        ``IfQQ`` header equals the key (FACTS 7; im2rec, insightface and :func:`write_insightface_rec` all write the
        key there). Catches what framing and labels cannot: two index lines with one offset, or a key whose offset
        is another, well-formed record (of the same class, so its label looks right). Without an ``.idx`` the
        records are numbered by position and there is nothing to check. Labels are read (and cached) on the way."""
        idx = self.reader.idx_path
        if idx is None:
            _ = self.labels
            return
        images = set(self.image_keys.tolist())
        labels = np.empty(len(self.image_keys), dtype=np.int64)
        position = {key: j for j, key in enumerate(self.image_keys.tolist())}
        for key in self.reader.keys.tolist():
            header = self._header(key)
            if header.id != key:
                offset = self.reader.offset(key)
                raise Digi2RealError(
                    f"{idx}: key {key} points at offset {offset}, which holds the record written as key {header.id}; "
                    f"the index does not match {self.reader.rec_path.name}: rebuild it (pack again) or replace both"
                )
            if key in images:
                labels[position[key]] = self._class_of(header, key)
        self._labels = labels


def write_insightface_rec(
    root: str | os.PathLike[str],
    samples: Iterable[tuple[bytes, int]],
    num_classes: int,
    image_size: tuple[int, int] = (112, 112),
) -> int:
    """Write ``root/train.rec``, ``train.idx`` and ``property`` in insightface's layout (FACTS 7); return N images.

    ``samples`` yields ``(encoded image bytes, class label)`` and is consumed once (streamed, never held in memory).
    Labels must be sorted ascending with no gaps: 0, 0, ..., 1, ..., num_classes - 1, so that class ``c``'s range
    record is key ``N + 1 + c``. Layout: key 0 is the meta record (labels ``(N + 1, N + 1 + C)``), keys ``1..N`` the
    images (scalar label = class, id = key), keys ``N + 1 + c`` the ``(start, end)`` image-key range of class ``c``
    (header only, no image). The meta record is written first as a same-size placeholder and filled in at the end.
    """
    root = Path(root)
    if num_classes < 1:
        raise Digi2RealError(f"write_insightface_rec: num_classes must be >= 1, got {num_classes}")
    placeholder = pack_header([0.0, 0.0], 0)
    ranges: list[tuple[int, int]] = []
    key = 0
    with RecordWriter(root / "train") as writer:
        writer.write(0, placeholder)
        current = -1
        for image, label in samples:
            label_i = int(label)
            if label_i != label or not (label_i == current or label_i == current + 1):
                raise Digi2RealError(
                    f"write_insightface_rec: sample {key} has label {label} after label {current}; labels must be "
                    "integers sorted ascending without gaps (0, 0, 1, ...); sort the samples by class"
                )
            if label_i >= num_classes:
                raise Digi2RealError(f"write_insightface_rec: label {label_i} >= num_classes {num_classes}")
            if not image:
                raise Digi2RealError(f"write_insightface_rec: sample {key} has empty image bytes")
            key += 1
            if key + num_classes + 1 >= _FLOAT32_EXACT:
                raise Digi2RealError("write_insightface_rec: more than 2**24 records cannot be indexed by float32 labels")
            if label_i != current:
                if ranges:
                    ranges[-1] = (ranges[-1][0], key)
                ranges.append((key, key))
                current = label_i
            writer.write(key, pack_header(float(label_i), key) + bytes(image))
        if current != num_classes - 1:
            raise Digi2RealError(
                f"write_insightface_rec: the samples cover classes 0..{current} but num_classes is {num_classes}; "
                "every class needs at least one image"
            )
        n = key
        ranges[-1] = (ranges[-1][0], n + 1)
        for c, (start, end) in enumerate(ranges):
            writer.write(n + 1 + c, pack_header([float(start), float(end)], n + 1 + c))
        writer.overwrite(0, pack_header([float(n + 1), float(n + 1 + num_classes)], 0))
    h, w = image_size
    write_text(root / "property", f"{num_classes},{h},{w}\n")
    return n

