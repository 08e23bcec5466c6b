"""DigiFace-1M: reading it (unzipped folders, or straight from its zips) and downloading it.

DigiFace-1M (Microsoft, WACV 2023; Research Use of Data Agreement v1.0, non-commercial research) has 10,000
identities with 72 images each (ids 0-9999) and 99,999 identities with 5 images each (ids 100000-199998), shipped as
eight zips whose members are ``<id>/<k>.png`` with no wrapper folder. Unzipped, the same names become folders.

Reading from the zips avoids extracting 1.2 million small files. The zip reader parses each central directory once
(with :mod:`zipfile`, which handles zip64 and prefixed archives), keeps only a compact per-member index, and then
reads members with positional reads (``os.pread``), so any number of threads (or forked workers) can load images at
once without locks, without one parsed central directory per thread (about 85 MB and a second or more per 144,000
members), and without sharing a file position.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import http.client
import os
import re
import shutil
import struct
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Literal, NamedTuple

import numpy as np

from tqdm import tqdm

from digi2real import __version__
from digi2real.errors import BadImageError, Digi2RealError
from digi2real.imageio import BYTES_ENV, decode_image, max_image_bytes
from digi2real.sources.base import ImageSource, SourceItem, natural_key, take_first
from digi2real.sources.folder import FolderSource, is_hidden, is_image_name, list_subdirs

__all__ = [
    "DIGIFACE_BASE_URL",
    "DIGIFACE_PARTS",
    "PARTS_HELP",
    "DigiFaceFolderSource",
    "DigiFacePart",
    "DigiFaceZipSource",
    "Layout",
    "detect_layout",
    "download_digiface",
    "resolve_parts",
]

Layout = Literal["digiface-zip", "digiface-folder", "folder-tree"]

# ---------------------------------------------------------------------------------------------------------------------
# Layout detection
# ---------------------------------------------------------------------------------------------------------------------

_INT_PNG = re.compile(r"^\d+\.png$", re.IGNORECASE)
# How many identity folders detection opens: enough to tell the layouts apart, few enough to stay instant on a
# network file system holding 110,000 folders.
_DETECT_SAMPLE = 3


def _is_int_name(name: str) -> bool:
    # str.isdigit alone accepts non-ASCII digits such as "²", which int() then rejects.
    return name.isascii() and name.isdigit()


def _is_part_zip_name(name: str) -> bool:
    lower = name.lower()
    return lower.startswith("subjects_") and lower.endswith(".zip") and not is_hidden(name)


def _part_zips(directory: Path) -> list[Path]:
    """The DigiFace part zips (``subjects_*.zip``) directly inside ``directory``, in natural order."""
    try:
        with os.scandir(directory) as entries:
            found = [Path(e.path) for e in entries if _is_part_zip_name(e.name) and e.is_file()]
    except OSError:
        return []
    return sorted(found, key=lambda p: natural_key(p.name))


def _has_int_png(directory: Path) -> bool:
    try:
        with os.scandir(directory) as entries:
            return any(_INT_PNG.match(e.name) and e.is_file() for e in entries)
    except OSError:
        return False


def _is_digiface_tree(directory: Path) -> bool:
    """True when every visible sub-folder has an integer name and the first few hold ``<int>.png`` files."""
    subdirs = list_subdirs(directory)
    if not subdirs or not all(_is_int_name(name) for name in subdirs):
        return False
    return all(_has_int_png(directory / name) for name in subdirs[:_DETECT_SAMPLE])


def _digiface_part_dirs(directory: Path) -> list[Path]:
    """Part folders when each downloaded zip was extracted into its own folder (``root/<part>/<id>/<k>.png``)."""
    subdirs = list_subdirs(directory)
    if not subdirs or any(_is_int_name(name) for name in subdirs):
        return []
    candidates = [directory / name for name in subdirs]
    return candidates if all(_is_digiface_tree(p) for p in candidates) else []


def detect_layout(path: str | os.PathLike[str]) -> Layout:
    """Tell how a source path is laid out.

    * ``"digiface-zip"``: a ``.zip`` file, or a folder holding DigiFace part zips (``subjects_*.zip``);
    * ``"digiface-folder"``: a folder of integer-named identity folders holding ``<int>.png`` files (or a folder of
      such folders, one per extracted part);
    * ``"folder-tree"``: anything else (read as a generic folder-per-identity tree).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return "digiface-zip" if p.suffix.lower() == ".zip" else "folder-tree"
    if not p.is_dir():
        return "folder-tree"
    if _part_zips(p):
        return "digiface-zip"
    if _is_digiface_tree(p) or _digiface_part_dirs(p):
        return "digiface-folder"
    return "folder-tree"


# ---------------------------------------------------------------------------------------------------------------------
# Unzipped folders
# ---------------------------------------------------------------------------------------------------------------------


class DigiFaceFolderSource(FolderSource):
    """Unzipped DigiFace-1M: ``root/<id>/<k>.png`` with integer ids, listed in numeric order of ids and of ``k``.

    Also reads ``root/<part>/<id>/<k>.png`` (each zip extracted into its own folder); the parts are merged and an
    identity present in two parts is an error naming both. Items are ``<id>/<k>.png`` either way, the same as
    :class:`DigiFaceZipSource` gives for the same data.
    """

    kind = "digiface-folder"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._parts: list[str] = []
        super().__init__(root)

    def _scan(self) -> None:
        # natural_key orders integer names numerically, so the generic walk already gives numeric order; only where
        # identities live differs. A tree that matches neither DigiFace shape (forced with source.kind: digiface)
        # is still read as root/<identity>/<image>.
        part_dirs = [] if _is_digiface_tree(self.root) else _digiface_part_dirs(self.root)
        if not part_dirs:
            self._add_tree(self.root)
            return
        for part in part_dirs:
            self._parts.append(part.name)
            self._add_tree(part)

    def describe(self) -> dict:
        """Kind, absolute root, identity and image counts, and the part folders when the tree is split."""
        info = super().describe()
        if self._parts:
            info["parts"] = list(self._parts)
        return info


# ---------------------------------------------------------------------------------------------------------------------
# Zips
# ---------------------------------------------------------------------------------------------------------------------

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_REDOWNLOAD = "re-download it with `digi2real download digiface`"


@dataclass
class _ZipPart:
    """One zip: where it is and a compact index of its image members (parallel arrays, one slot per member)."""

    path: Path
    size: int
    prefix: str = ""  # the single wrapper folder ("wrap/") when the zip has one
    count: int = 0  # image members indexed
    offsets: array = field(default_factory=lambda: array("Q"))  # local header offsets
    compressed: array = field(default_factory=lambda: array("Q"))
    uncompressed: array = field(default_factory=lambda: array("Q"))
    crcs: array = field(default_factory=lambda: array("L"))
    methods: array = field(default_factory=lambda: array("H"))
    flags: array = field(default_factory=lambda: array("H"))
    ignored: int = 0  # members that are not <id>/<image> (stray files, other depths)


def _known_size(name: str) -> int | None:
    for part in DIGIFACE_PARTS.values():
        if part.filename == name:
            return part.size
    return None


def _corrupt_zip(path: Path, reason: object) -> Digi2RealError:
    size = path.stat().st_size if path.exists() else 0
    known = _known_size(path.name)
    detail = f"; it has {size} bytes but {known} are expected" if known is not None and size != known else ""
    return Digi2RealError(
        f"{path}: not a readable zip ({reason}){detail}; the file is incomplete or damaged: {_REDOWNLOAD}"
    )


def _index_zip(path: Path) -> tuple[_ZipPart, dict[str, list[tuple[str, int]]]]:
    """Read one central directory into a :class:`_ZipPart` and ``{identity: [(file name, member slot)]}``."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, struct.error) as exc:
        raise _corrupt_zip(path, exc) from None
    except OSError as exc:
        raise Digi2RealError(f"{path}: cannot be read ({exc.strerror or exc})") from None

    candidates: list[tuple[list[str], zipfile.ZipInfo]] = []
    ignored = 0
    for info in infos:
        if info.is_dir():
            continue
        pieces = info.filename.split("/")
        if any(is_hidden(piece) for piece in pieces) or not is_image_name(pieces[-1]):
            ignored += 1
            continue
        candidates.append((pieces, info))

    # DigiFace zips hold <id>/<k>.png; tolerate one wrapper folder (<wrap>/<id>/<k>.png) from re-zipped copies.
    prefix = ""
    if not any(len(pieces) == 2 for pieces, _ in candidates):
        wrappers = {pieces[0] for pieces, _ in candidates if len(pieces) == 3}
        if len(wrappers) == 1:
            prefix = wrappers.pop() + "/"
    depth = 3 if prefix else 2

    part = _ZipPart(path=path, size=path.stat().st_size, prefix=prefix)
    by_identity: dict[str, list[tuple[str, int]]] = {}
    for pieces, info in candidates:
        if len(pieces) != depth or (prefix and pieces[0] + "/" != prefix):
            ignored += 1
            continue
        slot = part.count
        part.count += 1
        part.offsets.append(info.header_offset)
        part.compressed.append(info.compress_size)
        part.uncompressed.append(info.file_size)
        part.crcs.append(info.CRC)
        part.methods.append(info.compress_type)
        part.flags.append(info.flag_bits)
        by_identity.setdefault(pieces[-2], []).append((pieces[-1], slot))
    part.ignored = ignored
    return part, by_identity


class DigiFaceZipSource(ImageSource):
    """DigiFace-1M read straight from its zips: one zip, or every ``subjects_*.zip`` in a folder.

    Members are ``<id>/<k>.png`` (one wrapper folder is tolerated). The listing comes from the central directories
    (nothing is extracted), in numeric order of ids and of ``k``; an identity found in two zips is an error naming
    both. :meth:`load` is safe to call from several threads at once.
    """

    kind = "digiface-zip"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().absolute()
        if self.path.is_file():
            zips = [self.path]
        elif self.path.is_dir():
            zips = _part_zips(self.path) or sorted(
                (p for p in self.path.glob("*.zip") if not is_hidden(p.name) and p.is_file()),
                key=lambda p: natural_key(p.name),
            )
            if not zips:
                raise Digi2RealError(
                    f"{self.path}: no DigiFace zips (subjects_*.zip) found; fetch them with "
                    f"`digi2real download digiface -o {self.path}`"
                )
        else:
            raise Digi2RealError(f"{self.path}: not found; pass a DigiFace zip or a folder of them")

        self._parts: list[_ZipPart] = []
        # identity -> (zip number, file names in order, member slots in the same order)
        self._index: dict[str, tuple[int, list[str], list[int]]] = {}
        for number, zpath in enumerate(zips):
            part, by_identity = _index_zip(zpath)
            self._parts.append(part)
            for identity, members in by_identity.items():
                if identity in self._index:
                    other = self._parts[self._index[identity][0]].path.name
                    raise Digi2RealError(
                        f"identity {identity} is present in both {other} and {zpath.name} (in {zpath.parent}); "
                        "keep only one copy of each DigiFace part"
                    )
                members.sort(key=lambda m: natural_key(m[0]))
                self._index[identity] = (number, [m[0] for m in members], [m[1] for m in members])
        if not self._index:
            raise Digi2RealError(
                f"{self.path}: no images found in the zip(s); expected members <id>/<k>.png: {_REDOWNLOAD}"
            )
        self._index = {identity: self._index[identity] for identity in sorted(self._index, key=natural_key)}

        self._init_handles()

    def _init_handles(self) -> None:
        # Raw read-only descriptors, opened lazily per zip. pread() does not move a shared file position, so one
        # descriptor serves every thread (and survives fork); the lock only guards opening and closing them.
        self._fds: dict[int, int] = {}
        self._files: dict[int, BinaryIO] = {}  # fallback file objects where os.pread does not exist (Windows)
        self._file_locks = [threading.Lock() for _ in self._parts]
        self._open_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for process pools: ship the index, not descriptors or locks; the copy reopens its own files.
        state = self.__dict__.copy()
        for key in ("_fds", "_files", "_file_locks", "_open_lock"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_handles()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- listing -------------------------------------------------------------------------------------------------------

    def describe(self) -> dict:
        """Kind, absolute path, identity and image counts, and the zips' names and byte sizes."""
        return {
            "kind": self.kind,
            "path": str(self.path),
            "identities": len(self._index),
            "images": sum(len(names) for _, names, _ in self._index.values()),
            "zips": [{"name": p.path.name, "bytes": p.size} for p in self._parts],
            "ignored_members": sum(p.ignored for p in self._parts),
        }

    def list_items(self, per_identity: int | None = None) -> list[SourceItem]:
        """Items ``<id>/<k>.png`` in numeric order; the first ``per_identity`` images of each identity."""
        if per_identity is not None and per_identity < 1:
            raise Digi2RealError(f"images per identity must be at least 1 (got {per_identity})")
        chosen = {
            identity: [f"{identity}/{name}" for name in (names if per_identity is None else names[:per_identity])]
            for identity, (_, names, _) in self._index.items()
        }
        return take_first(chosen, None)

    def content_fingerprint(self, items: list[SourceItem]) -> str:
        """Hash of each item's zip member CRC-32 and size (read from the central directories when the source was
        opened) and of each zip's size and modification time."""
        digest = hashlib.sha256()
        for part in self._parts:
            st = os.stat(part.path)
            digest.update(f"{part.path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        for item in items:
            entry = self._index.get(item.identity)
            name = item.path[len(item.identity) + 1 :]
            if entry is None or name not in entry[1]:
                digest.update(f"{item.path}\0missing\n".encode())
                continue
            number, names, slots = entry
            slot = slots[names.index(name)]
            part = self._parts[number]
            digest.update(f"{item.path}\0{part.crcs[slot]}\0{part.uncompressed[slot]}\n".encode())
        return digest.hexdigest()

    # -- reading -------------------------------------------------------------------------------------------------------

    def _read_at(self, number: int, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of zip ``number`` (fewer only at the end of the file)."""
        if hasattr(os, "pread"):
            fd = self._fds.get(number)
            if fd is None:
                with self._open_lock:
                    fd = self._fds.get(number)
                    if fd is None:
                        fd = os.open(self._parts[number].path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                        self._fds[number] = fd
            chunks: list[bytes] = []
            got = 0
            while got < length:
                chunk = os.pread(fd, length - got, offset + got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)
        # No positional reads: one file object per zip, seek+read under that zip's lock.
        with self._file_locks[number]:
            handle = self._files.get(number)
            if handle is None:
                handle = open(self._parts[number].path, "rb")  # noqa: SIM115 - kept open until close()
                self._files[number] = handle
            handle.seek(offset)
            return handle.read(length)

    def _member_bytes(self, number: int, slot: int, label: str) -> bytes:
        """The uncompressed bytes of one member, checked against its CRC-32."""
        part = self._parts[number]
        header = self._read_at(number, part.offsets[slot], _LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size:
            raise BadImageError(f"{label}: the zip is truncated at this member; {_REDOWNLOAD}")
        signature, _, _, _, _, _, _, _, _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        if signature != _LOCAL_SIGNATURE:
            raise BadImageError(f"{label}: damaged zip member (bad local header); {_REDOWNLOAD}")
        if part.flags[slot] & 0x1:
            raise BadImageError(f"{label}: the member is encrypted; DigiFace zips are not, so {_REDOWNLOAD}")
        # A member is hostile until checked: its declared size is checked before anything is read, and inflation
        # stops at the limit whatever the header says (700 MB of zeros deflate to 700 KB).
        limit = max_image_bytes()
        if part.uncompressed[slot] > limit or part.compressed[slot] > limit:
            raise BadImageError(f"{label}: the member declares {part.uncompressed[slot]:,} bytes, more than the limit "
                                f"of {limit:,} for one image; raise it with {BYTES_ENV}={part.uncompressed[slot]}")
        start = part.offsets[slot] + _LOCAL_HEADER.size + name_len + extra_len
        raw = self._read_at(number, start, part.compressed[slot])
        if len(raw) < part.compressed[slot]:
            raise BadImageError(f"{label}: the zip is truncated at this member; {_REDOWNLOAD}")
        method = part.methods[slot]
        try:
            if method == zipfile.ZIP_STORED:
                data = raw
            elif method == zipfile.ZIP_DEFLATED:
                data = zlib.decompressobj(-15).decompress(raw, limit + 1)  # raw deflate stream, no zlib header
            elif method == zipfile.ZIP_BZIP2:
                data = bz2.BZ2Decompressor().decompress(raw, max_length=limit + 1)
            else:
                raise BadImageError(f"{label}: zip compression method {method} is not supported (use deflate or store)")
        except (zlib.error, OSError, ValueError, EOFError) as exc:
            raise BadImageError(f"{label}: damaged zip member ({exc}); {_REDOWNLOAD}") from None
        if len(data) != part.uncompressed[slot] or zlib.crc32(data) != part.crcs[slot]:
            raise BadImageError(f"{label}: damaged zip member (CRC or size mismatch); {_REDOWNLOAD}")
        return data

    def load(self, item: SourceItem) -> np.ndarray:
        """RGB uint8 H x W x 3 decoded from the member bytes; BadImageError for a damaged member or image."""
        entry = self._index.get(item.identity)
        name = item.path[len(item.identity) + 1 :] if item.path.startswith(item.identity + "/") else item.path
        try:
            number, names, slots = entry  # type: ignore[misc]
            slot = slots[names.index(name)]  # at most 72 names: a scan costs less than a per-member dict
        except (TypeError, ValueError):
            raise BadImageError(f"{self.path}:{item.path}: no such image in this source") from None
        part = self._parts[number]
        # The member name is the wrapper prefix (if any) plus <id>/<file>; rebuilding it saves storing 1.2M names.
        label = f"{part.path}:{part.prefix}{item.identity}/{name}"
        try:
            data = self._member_bytes(number, slot, label)
        except OSError as exc:
            raise BadImageError(f"{label}: cannot be read ({exc.strerror or exc})") from None
        return decode_image(data, label)

    def close(self) -> None:
        """Close the zip descriptors; a later :meth:`load` reopens them."""
        with self._open_lock:
            fds, self._fds = self._fds, {}
            files, self._files = self._files, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        for handle in files.values():
            with contextlib.suppress(OSError):
                handle.close()


# ---------------------------------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------------------------------

DIGIFACE_BASE_URL = "https://facesyntheticspubwedata.z6.web.core.windows.net/wacv-2023/"


class DigiFacePart(NamedTuple):
    """One downloadable zip: its file name and its byte size (None when unknown: any complete download is taken)."""

    filename: str
    size: int | None

    @property
    def images_per_identity(self) -> int | None:
        """72 or 5 for the DigiFace zips (read from ``..._72_imgs.zip``); None for names without that tag."""
        match = re.search(r"_(\d+)_imgs\.zip$", self.filename, re.IGNORECASE)
        return int(match.group(1)) if match else None


#: Part name (the identity range it holds) -> zip. Read-only: tests and callers pass their own table instead.
DIGIFACE_PARTS: Mapping[str, DigiFacePart] = MappingProxyType(
    {
        "0-1999": DigiFacePart("subjects_0-1999_72_imgs.zip", 2938553163),
        "2000-3999": DigiFacePart("subjects_2000-3999_72_imgs.zip", 2936098225),
        "4000-5999": DigiFacePart("subjects_4000-5999_72_imgs.zip", 2936895527),
        "6000-7999": DigiFacePart("subjects_6000-7999_72_imgs.zip", 2940940004),
        "8000-9999": DigiFacePart("subjects_8000-9999_72_imgs.zip", 2927632784),
        "100000-133332": DigiFacePart("subjects_100000-133332_5_imgs.zip", None),
        "133333-166665": DigiFacePart("subjects_133333-166665_5_imgs.zip", None),
        "166666-199998": DigiFacePart("subjects_166666-199998_5_imgs.zip", None),
    }
)

PARTS_HELP = (
    "DigiFace parts to download (several allowed, comma or space separated): 'all'; '72' (ids 0-9999, 72 images "
    "each, 5 zips of ~2.9 GB) or '5' (ids 100000-199998, 5 images each, 3 zips of ~3.4 GB); one zip by its id range "
    "('0-1999', '2000-3999', '4000-5999', '6000-7999', '8000-9999', '100000-133332', '133333-166665', "
    "'166666-199998'), by position in its group ('72-0'..'72-4', '5-0'..'5-2'), or by file name "
    "('subjects_0-1999_72_imgs.zip')."
)

_CHUNK = 1 << 20
_USER_AGENT = f"digi2real/{__version__} (+python urllib)"


def _part_aliases(table: Mapping[str, DigiFacePart]) -> dict[str, list[str]]:
    """Every accepted spelling (lower-case) -> the part names it selects, in table order."""
    aliases: dict[str, list[str]] = {"all": list(table)}
    groups: dict[int, list[str]] = {}
    for key, part in table.items():
        aliases[key.lower()] = [key]
        aliases[part.filename.lower()] = [key]
        aliases[part.filename.lower().removesuffix(".zip")] = [key]
        if part.images_per_identity is not None:
            groups.setdefault(part.images_per_identity, []).append(key)
    for images, keys in groups.items():
        aliases.setdefault(str(images), list(keys))
        for position, key in enumerate(keys):
            aliases.setdefault(f"{images}-{position}", [key])
    return aliases


def resolve_parts(parts: str | Iterable[str] | None, table: Mapping[str, DigiFacePart] = DIGIFACE_PARTS) -> list[str]:
    """Part names (keys of ``table``, in table order, no repeats) selected by user spellings.

    Accepts a string or several; each may hold comma- or space-separated names (``"72-0,72-1"``). ``None`` or
    nothing selects ``all``. See :data:`PARTS_HELP` for the spellings.
    """
    words: list[str] = []
    for chunk in [parts] if isinstance(parts, str) else list(parts or []):
        words.extend(w for w in re.split(r"[,\s]+", chunk.strip()) if w)
    if not words:
        words = ["all"]
    aliases = _part_aliases(table)
    chosen: set[str] = set()
    for word in words:
        keys = aliases.get(word.lower())
        if keys is None:
            groups = sorted((a for a in aliases if a.isdigit()), key=int, reverse=True)
            positions = [f"{g}-0..{g}-{len(aliases[g]) - 1}" for g in groups]
            valid = ", ".join(["all", *groups, *table, *positions])
            raise Digi2RealError(f"unknown DigiFace part {word!r}; valid names: {valid}, or a zip file name")
        chosen.update(keys)
    return [key for key in table if key in chosen]


def _say(message: str, progress: bool) -> None:
    if progress:
        tqdm.write(message, file=sys.stderr)


def _unreachable(url: str, out_dir: Path, reason: object) -> Digi2RealError:
    host = urllib.parse.urlsplit(url).netloc or url
    text = getattr(reason, "strerror", None) or getattr(reason, "reason", None) or str(reason) or type(reason).__name__
    return Digi2RealError(
        f"cannot reach {host}: {text}; check your connection, or download {url} by hand into {out_dir}"
    )


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` (or ``bytes */TOTAL``) -> (START, TOTAL); None where absent or ``*``."""
    match = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _check_zip(path: Path, deep: bool) -> str | None:
    """None when ``path`` is a zip whose central directory opens (and, ``deep``, every CRC matches); else why not."""
    try:
        with zipfile.ZipFile(path) as zf:
            if not zf.infolist():
                return "the zip is empty"
            if deep:
                bad = zf.testzip()
                if bad is not None:
                    return f"member {bad} fails its CRC check"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, struct.error, OSError) as exc:
        return f"not a readable zip ({exc})"
    return None


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _fetch(
    url: str, part_path: Path, offset: int, expected: int | None, out_dir: Path, progress: bool, timeout: float
) -> Literal["done", "complete", "restart"]:
    """Stream ``url`` into ``part_path``, resuming at ``offset``.

    Returns "done" after streaming, "complete" when the server says the ``.part`` already holds the whole file, and
    "restart" when the ``.part`` cannot be continued (the caller deletes it and tries once more from zero). Raises
    Digi2RealError with the ``.part`` left in place when the network fails, so the next run resumes.
    """
    name = part_path.name.removesuffix(".part")
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - https/http URL we built
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            if exc.code == 416 and offset:
                # Range Not Satisfiable: the .part is as long as (or longer than) the file. Only trust it when the
                # server states that exact total and it agrees with what we expect.
                _, total = _content_range(exc.headers.get("Content-Range"))
                if total == offset and (expected is None or expected == total):
                    return "complete"
                return "restart"
            raise Digi2RealError(
                f"cannot download {url}: HTTP {exc.code} {exc.reason}; check the address, or download it by hand "
                f"into {out_dir}"
            ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _unreachable(url, out_dir, getattr(exc, "reason", exc)) from None

    with response:
        status = response.status
        if status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                return "restart"  # the server sent another range than asked: appending it would corrupt the file
            mode = "ab"
        elif status == 200:
            # A full body: either no .part existed or the server ignores Range. Either way start over cleanly.
            if offset:
                _say(f"{name}: the server does not support resuming; downloading from the start", progress)
            offset = 0
            mode = "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise Digi2RealError(f"cannot download {url}: unexpected HTTP {status}; download it by hand into {out_dir}")

        if expected is not None and total is not None and total != expected:
            _remove(part_path)
            raise Digi2RealError(
                f"{url} is {total} bytes but {expected} are expected; the file on the server differs from the one "
                f"digi2real knows, so nothing was kept; download it by hand into {out_dir} if you trust it"
            )
        size = expected if expected is not None else total
        if size is not None:
            free = shutil.disk_usage(out_dir).free
            if size - offset > free:
                raise Digi2RealError(
                    f"not enough disk space in {out_dir}: {name} needs {(size - offset) / 1e9:.2f} GB more, "
                    f"{free / 1e9:.2f} GB are free"
                )

        received = 0
        bar = tqdm(
            total=size,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=name,
            disable=not progress,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        try:
            with bar, open(part_path, mode) as handle:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        why = str(exc) or type(exc).__name__
                        raise Digi2RealError(
                            f"download of {name} interrupted after {offset + received} bytes ({why}); "
                            "run the same command again to resume"
                        ) from None
                    if not chunk:
                        break
                    handle.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:  # writing failed (disk full, permissions): the bytes so far stay resumable
            raise Digi2RealError(f"{part_path}: cannot be written ({exc.strerror or exc})") from None
    if total is not None and offset + received < total:
        # http.client returns an empty read when the connection drops early, so count the bytes ourselves.
        raise Digi2RealError(
            f"download of {name} interrupted after {offset + received} of {total} bytes (connection closed); "
            "run the same command again to resume"
        )
    return "done"


def _download_one(
    url: str, dest: Path, expected: int | None, progress: bool, timeout: float, verify: bool
) -> Path:
    """Fetch one zip to ``dest`` (resuming ``dest.part``), check it, and rename it into place."""
    out_dir = dest.parent
    if dest.exists():
        size = dest.stat().st_size
        if expected is not None and size != expected:
            raise Digi2RealError(
                f"{dest} has {size} bytes but {expected} are expected; delete it (or rename it to {dest.name}.part "
                "to resume it) and run again"
            )
        problem = _check_zip(dest, deep=verify)
        if problem is not None:
            raise Digi2RealError(f"{dest}: {problem}; delete it and run again to re-download it")
        _say(f"{dest.name}: already downloaded{' and verified' if verify else ''}", progress)
        return dest

    part_path = dest.with_name(dest.name + ".part")
    for attempt in range(2):
        offset = part_path.stat().st_size if part_path.exists() else 0
        if expected is not None and offset > expected:
            _remove(part_path)  # longer than the real file: cannot be a prefix of it
            offset = 0
        if expected is not None and offset == expected:
            break  # every byte is already here (interrupted between download and rename)
        if offset:
            _say(f"{dest.name}: resuming at {offset} bytes", progress)
        outcome = _fetch(url, part_path, offset, expected, out_dir, progress, timeout)
        if outcome != "restart":
            break
        _remove(part_path)
        if attempt:
            raise Digi2RealError(
                f"cannot resume {url}: the server refuses the byte range; download it by hand into {out_dir}"
            )
        _say(f"{dest.name}: the partial download cannot be continued; starting again", progress)

    size = part_path.stat().st_size if part_path.exists() else 0
    if expected is not None and size != expected:
        _remove(part_path)
        raise Digi2RealError(
            f"{dest.name}: downloaded {size} bytes but {expected} are expected; the damaged file was deleted, "
            "run the command again to re-download it"
        )
    problem = _check_zip(part_path, deep=verify)
    if problem is not None:
        _remove(part_path)
        raise Digi2RealError(
            f"{dest.name}: {problem}; the damaged download was deleted, run the command again to re-download it"
        )
    os.replace(part_path, dest)
    _say(f"{dest.name}: done ({size} bytes)", progress)
    return dest


def download_digiface(
    out_dir: str | os.PathLike[str],
    parts: str | Iterable[str] | None,
    base_url: str = DIGIFACE_BASE_URL,
    progress: bool = True,
    timeout: float = 60,
    *,
    parts_table: Mapping[str, DigiFacePart] = DIGIFACE_PARTS,
    verify: bool = False,
) -> list[Path]:
    """Download DigiFace-1M zips into ``out_dir`` and return their paths (in table order).

    ``parts`` uses the spellings of :data:`PARTS_HELP` (None means all). Each zip streams into ``<name>.part``; an
    existing ``.part`` is resumed with an HTTP Range request, files already complete are skipped, the final size is
    checked against the known size, the zip's central directory must open (``verify``: every member's CRC too),
    and only then is ``.part`` renamed to the final name. Network failures raise a one-line Digi2RealError and keep
    what was downloaded. The data is under Microsoft's Research Use of Data Agreement (non-commercial research).
    """
    names = resolve_parts(parts, parts_table)
    out = Path(out_dir).expanduser().absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Digi2RealError(f"{out}: cannot create the download folder ({exc.strerror or exc})") from None
    base = base_url if base_url.endswith("/") else base_url + "/"
    done: list[Path] = []
    for key in names:
        part = parts_table[key]
        url = base + urllib.parse.quote(part.filename)
        done.append(_download_one(url, out / part.filename, part.size, progress, timeout, verify))
    return done
