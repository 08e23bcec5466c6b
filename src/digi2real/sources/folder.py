"""Any folder-per-identity image set: ``root/<identity>/<image files>``.

The walk here is shared with the unzipped DigiFace reader (:class:`digi2real.sources.digiface.DigiFaceFolderSource`),
which is the same tree with integer names, possibly split over one folder per downloaded part.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from digi2real.errors import Digi2RealError
from digi2real.imageio import IMAGE_SUFFIXES, read_image
from digi2real.sources.base import ImageSource, SourceItem, natural_key, take_first

# Folders that archivers and operating systems drop into image trees; never identities.
_JUNK_DIRS = frozenset({"__MACOSX", "$RECYCLE.BIN", "System Volume Information"})


def is_hidden(name: str) -> bool:
    """Dot-files (``.DS_Store``, macOS ``._x.png`` resource forks) and archiver junk folders are never data."""
    return name.startswith(".") or name in _JUNK_DIRS


def is_image_name(name: str) -> bool:
    """True for a visible file whose suffix is a known image type (case-insensitive: ``.PNG`` counts)."""
    return not is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def list_images(directory: Path) -> list[str]:
    """Image file names directly inside ``directory``, in natural order (``9.png`` before ``10.png``)."""
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if is_image_name(e.name) and e.is_file()]
    except OSError as exc:
        raise Digi2RealError(f"{directory}: cannot be listed ({exc.strerror or exc})") from None
    names.sort(key=natural_key)
    return names


def list_subdirs(directory: Path) -> list[str]:
    """Visible sub-folder names of ``directory`` in natural order."""
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if not is_hidden(e.name) and e.is_dir()]
    except OSError as exc:
        raise Digi2RealError(f"{directory}: cannot be listed ({exc.strerror or exc})") from None
    names.sort(key=natural_key)
    return names


def scan_identity_tree(root: Path) -> tuple[dict[str, list[str]], int]:
    """Walk ``root/<identity>/<image>``.

    Returns ``({identity: [file names in natural order]}, number of identity folders without images)``; identities
    are in natural order and folders without images are left out (they carry no identity to learn from).
    """
    found: dict[str, list[str]] = {}
    empty = 0
    for identity in list_subdirs(root):
        files = list_images(root / identity)
        if files:
            found[identity] = files
        else:
            empty += 1
    return found, empty


class FolderSource(ImageSource):
    """Identities from any ``root/<identity>/<image>`` tree; hidden files and non-images are ignored.

    The tree is listed once, when the source is opened, so every later :meth:`list_items` is the same snapshot.
    """

    kind = "folder"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        if not self.root.is_dir():
            raise Digi2RealError(f"{self.root}: not a folder; expected {self.root}/<identity>/<image>.png")
        # identity -> the folder that holds its images; one folder per identity, but subclasses may merge
        # identities from several part folders, so loading never assumes root/<identity>.
        self._dirs: dict[str, Path] = {}
        self._files: dict[str, list[str]] = {}
        self._empty_folders = 0
        self._scan()
        if not self._files:
            raise Digi2RealError(
                f"{self.root}: no identity folders with images found; expected {self.root}/<identity>/<image>.png"
            )

    def _scan(self) -> None:
        """Fill ``_dirs``, ``_files`` and ``_empty_folders``; subclasses change where identities are looked for."""
        self._add_tree(self.root)

    def _add_tree(self, tree: Path) -> None:
        """Add every identity of ``tree``; an identity already added from another tree is an error naming both."""
        files, empty = scan_identity_tree(tree)
        self._empty_folders += empty
        for identity, names in files.items():
            if identity in self._dirs:
                raise Digi2RealError(
                    f"identity {identity} is present in both {self._dirs[identity]} and {tree / identity}; "
                    "keep one copy of each identity"
                )
            self._dirs[identity] = tree / identity
            self._files[identity] = names
        if len(self._dirs) > len(files):
            # Several trees were merged: keep the natural order of identities across all of them.
            order = sorted(self._files, key=natural_key)
            self._files = {identity: self._files[identity] for identity in order}

    def describe(self) -> dict:
        """Kind, absolute root, identity and image counts (and how many folders held no image)."""
        return {
            "kind": self.kind,
            "path": str(self.root),
            "identities": len(self._files),
            "images": sum(len(names) for names in self._files.values()),
            "empty_folders": self._empty_folders,
        }

    def list_items(self, per_identity: int | None = None) -> list[SourceItem]:
        """Items ``<identity>/<file>`` in natural order; the first ``per_identity`` files of each identity."""
        if per_identity is not None and per_identity < 1:
            raise Digi2RealError(f"images per identity must be at least 1 (got {per_identity})")
        chosen = {
            identity: [f"{identity}/{name}" for name in (names if per_identity is None else names[:per_identity])]
            for identity, names in self._files.items()
        }
        return take_first(chosen, None)

    def file_path(self, item: SourceItem) -> Path:
        """Absolute path of an item's image file."""
        name = item.path[len(item.identity) + 1 :] if item.path.startswith(item.identity + "/") else item.path
        folder = self._dirs.get(item.identity)
        return folder / name if folder is not None else self.root / item.path

    def content_fingerprint(self, items: list[SourceItem]) -> str:
        """Hash of each item's path, byte size and modification time (nanoseconds): a file replaced under the same
        name changes it without reading any pixel."""
        digest = hashlib.sha256()
        for item in items:
            try:
                st = os.stat(self.file_path(item))
                digest.update(f"{item.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{item.path}\0missing\n".encode())
        return digest.hexdigest()

    def load(self, item: SourceItem) -> np.ndarray:
        """RGB uint8 H x W x 3; raises BadImageError for a missing, empty or corrupt file."""
        return read_image(self.file_path(item))
