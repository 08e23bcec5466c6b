"""Training sets as the trainer sees them: ``len``, ``[i] -> (RGB uint8 112x112x3, label)``, ``num_classes``,
``labels`` and ``identities``.

Three kinds of input are read:

* a folder-per-identity tree of aligned 112 x 112 images, ``root/<identity>/<image>``;
* a dataset written by ``generate``: ``root/images/<identity>/<k>.png`` with ``root/manifest/*.jsonl``. Each manifest
  row has a ``status`` ("ok" or the reason it was rejected) and the image's ``path`` relative to ``root/images``
  (``<identity>/<k>.png``; a leading ``images/`` is accepted, and so is ``identity`` + ``file``). Only "ok" rows
  count: a rejected image is left out even when its file exists, and an ok row whose file is missing is an error;
* an insightface RecordIO folder (``train.rec``, ``train.idx``, ``property``), e.g. written by ``digi2real pack``.

:class:`MixedDataset` adds K real identities to a synthetic set (the paper's Table 8) and :func:`open_training_set`
builds whatever a :class:`~digi2real.config.DataConfig` describes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from digi2real.dataset.recordio import InsightFaceRecordDataset
from digi2real.errors import BadImageError, Digi2RealError
from digi2real.fileio import confine
from digi2real.imageio import decode_image, max_image_bytes
from digi2real.sources.base import natural_key
from digi2real.sources.folder import list_subdirs, scan_identity_tree

if TYPE_CHECKING:
    from digi2real.config import DataConfig

__all__ = [
    "IMAGE_SIZE",
    "TrainingSet",
    "ImageFolderDataset",
    "RecordFolderDataset",
    "MixedDataset",
    "open_dataset",
    "open_training_set",
    "is_recordio_dir",
]

#: (height, width) every training image must have: the ArcFace template crop.
IMAGE_SIZE = (112, 112)
OK = "ok"


class TrainingSet(Protocol):
    """What every dataset returned by :func:`open_training_set` provides."""

    num_classes: int

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...

    @property
    def labels(self) -> np.ndarray: ...

    @property
    def identities(self) -> list[str]: ...


# ------------------------------------------------------------------------------------------------------ manifest


def _row_path(row: dict[str, Any], where: str) -> str | None:
    """The image path of a manifest row relative to ``images/`` (``<identity>/<file>``), or None when it has none."""
    path = row.get("path")
    if path is None and row.get("identity") is not None and row.get("file") is not None:
        path = f"{row['identity']}/{row['file']}"
    if path is None:
        return None
    if not isinstance(path, str):
        raise Digi2RealError(f"{where}: 'path' must be a string like '<identity>/<k>.png', got {path!r}")
    path = path.replace("\\", "/")
    if path.startswith("images/"):
        path = path[len("images/") :]
    parts = path.split("/")
    # Exactly <identity>/<file>: anything else could point outside the images tree or at a nested folder.
    if len(parts) != 2 or not all(parts) or ".." in parts:
        raise Digi2RealError(f"{where}: image path {path!r} is not of the form '<identity>/<file>'")
    return path


def read_manifest(manifest_dir: Path, images_dir: Path | None = None) -> dict[str, str]:
    """``{image path relative to images/: status}`` from every ``*.jsonl`` in ``manifest_dir``.

    Files are read in name order and lines in file order; when one image has several rows (a resumed or retried
    generation appends a new row) the last one wins. A truncated last line, as a killed writer leaves, is skipped;
    any other malformed line is an error naming file and line. With ``images_dir``, every row's path is confined to
    it (DESIGN "Safety": a manifest is data, and data never leads outside its folder, not even through a link).
    """
    files = sorted(manifest_dir.glob("*.jsonl"), key=lambda p: natural_key(p.name))
    status: dict[str, str] = {}
    for file in files:
        try:
            text = file.read_bytes().decode("utf-8")
        except OSError as exc:
            raise Digi2RealError(f"{file}: cannot be read ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise Digi2RealError(f"{file}: not UTF-8 text, so not a manifest written by generate; move it out of "
                                 f"{manifest_dir}") from None
        lines = text.split("\n")
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: "[[[[..." nested beyond the parser
                if lineno == len(lines):  # no newline after it: the writer was killed mid-row
                    continue
                raise Digi2RealError(f"{where}: not a JSON object; the manifest is corrupt") from None
            if not isinstance(row, dict) or "status" not in row:
                raise Digi2RealError(f"{where}: a manifest row needs a 'status' field")
            path = _row_path(row, where)
            if path is not None and images_dir is not None:
                confine(images_dir, path, where)
            if path is None:
                if row["status"] == OK:
                    raise Digi2RealError(f"{where}: an ok row needs the image 'path' ('<identity>/<k>.png')")
                continue  # a rejection may have no file at all
            status[path] = str(row["status"])
    return status


# ------------------------------------------------------------------------------------------------------ folder

# Characters that would break "one identity per line" (identities.txt) or a log line: ASCII controls (newline,
# carriage return, escape, ...) and DEL. Spaces, accents, other scripts and a leading '-' are ordinary names.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_identity_name(name: str, tree: Path) -> None:
    """Refuse an identity folder name that cannot be written as one line of UTF-8 text (``identities.txt``, labels,
    reports): one with a control character, or bytes that are not UTF-8 (Python holds them as surrogates)."""
    problem = None
    if _CONTROL.search(name):
        problem = "contains a control character (newline, tab, escape, ...)"
    else:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            problem = "is not valid UTF-8"
    if problem:
        raise Digi2RealError(f"{tree}: the identity folder name {name!r} {problem}; rename the folder")


class _Labelled:
    """``len``, ``labels`` (the int64 class of every image, known without decoding) and ``identities`` (the name of
    every label) of a set that keeps them in ``_labels`` and ``_identities``."""

    _labels: np.ndarray
    _identities: list[str]

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def identities(self) -> list[str]:
        return self._identities


class ImageFolderDataset(_Labelled):
    """Aligned face images in one folder per identity (or a generated dataset with a manifest; see the module doc).

    Labels are ``0..C-1`` in natural identity order (``id2`` before ``id10``), images within an identity in natural
    file order; identity folders without a usable image are left out. Only file names are held (no open files), so
    the dataset pickles cheaply into DataLoader workers.
    """

    def __init__(self, root: str | os.PathLike[str], image_size: tuple[int, int] = IMAGE_SIZE) -> None:
        root = Path(root).expanduser().absolute()
        if not root.is_dir():
            raise Digi2RealError(f"{root}: not found or not a folder; expected <identity>/<image> folders")
        self.root = root
        self.image_size = tuple(image_size)
        manifest_dir = root / "manifest"
        images_dir = root / "images"
        self.has_manifest = manifest_dir.is_dir()
        if self.has_manifest:
            self.tree = images_dir
            files = self._from_manifest(manifest_dir)
        else:
            # A generated dataset copied without its manifest still has images/<identity>/...; an identity that
            # happens to be called "images" holds image files directly, not sub-folders, so it is not mistaken.
            self.tree = images_dir if images_dir.is_dir() and list_subdirs(images_dir) else root
            files, _ = scan_identity_tree(self.tree)
        if not files:
            what = "no image has status 'ok' in the manifest" if self.has_manifest else "no identity folder holds images"
            raise Digi2RealError(f"{root}: empty training set: {what}; expected {self.tree}/<identity>/<image>.png")
        for identity in files:
            _check_identity_name(identity, self.tree)
        self._identities = list(files)
        self._files: list[str] = []
        counts = []
        for identity, names in files.items():
            self._files.extend(f"{identity}/{name}" for name in names)
            counts.append(len(names))
        self._labels = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        self.num_classes = len(self._identities)

    def _from_manifest(self, manifest_dir: Path) -> dict[str, list[str]]:
        """Identities and file names of the ok rows, in natural order; a missing ok file is an error."""
        if not any(manifest_dir.glob("*.jsonl")):
            raise Digi2RealError(f"{manifest_dir}: holds no *.jsonl manifest; is the dataset still being generated?")
        by_identity: dict[str, list[str]] = {}
        for path, status in read_manifest(manifest_dir, self.tree).items():
            if status != OK:
                continue
            if not (self.tree / path).is_file():
                raise Digi2RealError(
                    f"{self.tree / path}: listed as ok in {manifest_dir} but the file is missing; "
                    "restore it or re-run generate to make it again"
                )
            identity, name = path.split("/")
            by_identity.setdefault(identity, []).append(name)
        return {
            identity: sorted(by_identity[identity], key=natural_key)
            for identity in sorted(by_identity, key=natural_key)
        }

    def relpath(self, i: int) -> str:
        """``<identity>/<file>`` of image ``i``."""
        return self._files[i]

    def file_path(self, i: int) -> Path:
        """Absolute path of image ``i``."""
        return self.tree / self._files[i]

    def read_bytes(self, i: int) -> bytes:
        """The encoded file of image ``i`` as stored."""
        path = self.file_path(i)
        try:
            with open(path, "rb") as handle:  # at most one byte past the limit: decode_image names the limit
                return handle.read(max_image_bytes() + 1)
        except FileNotFoundError:
            raise BadImageError(f"{path}: file not found (it was there when the dataset was listed)") from None
        except OSError as exc:
            raise BadImageError(f"{path}: cannot be read ({exc.strerror or exc})") from None

    def decode(self, data: bytes, i: int) -> np.ndarray:
        """Decode image ``i``'s bytes and check its size."""
        path = self.file_path(i)
        rgb = decode_image(data, str(path))
        if rgb.shape[:2] != self.image_size:
            h, w = self.image_size
            raise BadImageError(
                f"{path}: image is {rgb.shape[1]}x{rgb.shape[0]} px, expected an aligned {w}x{h} crop; "
                "align it with `digi2real align` first"
            )
        return rgb

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        n = len(self._files)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} images")
        i = int(i) % n
        return self.decode(self.read_bytes(i), i), int(self._labels[i])

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, images={len(self)}, classes={self.num_classes})"


# ------------------------------------------------------------------------------------------------------ RecordIO


def is_recordio_dir(path: Path) -> bool:
    """True for a folder holding an insightface ``train.rec``."""
    return path.is_dir() and (path / "train.rec").is_file()


def _read_identities(path: Path, num_classes: int) -> list[str]:
    """The lines of ``identities.txt`` (one identity per class), split on newlines only: names may hold any other
    character (``str.splitlines`` would also split at U+2028 and friends, and shift every later name)."""
    limit = (num_classes + 1) * 4096  # names are folder names: at most 255 bytes each in practice
    try:
        with open(path, "rb") as handle:
            raw = handle.read(limit + 1)
        if len(raw) > limit:
            raise ValueError(f"larger than {limit:,} bytes for {num_classes} names")
        text = raw.decode("utf-8")
    except (OSError, ValueError) as exc:
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(getattr(exc, "strerror", "") or exc)
        raise Digi2RealError(f"{path}: unreadable ({reason}); it must hold one identity name per line: pack the set "
                             "again, or delete the file to use the labels as names") from None
    if text.endswith("\n"):
        text = text[:-1]
    return text.split("\n") if text else []


class RecordFolderDataset(InsightFaceRecordDataset):
    """An insightface RecordIO folder with identity names: from ``identities.txt`` (written by ``digi2real pack``)
    when it has one line per class, else the label as a string."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        names_file = self.root / "identities.txt"
        names: list[str] | None = None
        if names_file.is_file():
            lines = _read_identities(names_file, self.num_classes)
            if len(lines) == self.num_classes:
                names = lines
        #: True when the names came from identities.txt (not made up from the labels).
        self.named = names is not None
        self._identities = names if names is not None else [str(c) for c in range(self.num_classes)]

    @property
    def identities(self) -> list[str]:
        """Identity name of every label."""
        return self._identities

    def __repr__(self) -> str:
        return f"RecordFolderDataset({str(self.root)!r}, images={len(self)}, classes={self.num_classes})"


# ------------------------------------------------------------------------------------------------------ mixing


class MixedDataset(_Labelled):
    """A synthetic set plus K identities of a real set (paper Table 8), with labels remapped contiguously.

    Synthetic labels are unchanged (``0..S-1``); the chosen real identities follow as ``S..S+K-1`` in their original
    label order. ``pick="first"`` takes the K lowest real labels, ``"random"`` K labels drawn without replacement by
    ``numpy.random.default_rng(seed)``, so the same seed always picks the same identities. Real identity names are
    prefixed with ``real/`` (folder names cannot contain ``/``, so they never collide with synthetic ones).
    """

    def __init__(self, synthetic: TrainingSet, real: TrainingSet, k: int, pick: str = "first", seed: int = 0) -> None:
        if pick not in ("first", "random"):
            raise Digi2RealError(f"real identity pick must be 'first' or 'random', got {pick!r}")
        real_labels = np.asarray(real.labels, dtype=np.int64)
        # Classes that actually have images: an im2rec set may declare classes it holds no image of.
        present = np.unique(real_labels)
        if k < 1:
            raise Digi2RealError(f"the number of real identities to mix in must be at least 1, got {k}")
        if k > len(present):
            raise Digi2RealError(
                f"asked for {k} real identities but the real set has only {len(present)}; lower data.real_identities"
            )
        if pick == "first":
            chosen = present[:k]
        else:
            chosen = np.sort(np.random.default_rng(seed).choice(present, size=k, replace=False))
        self.synthetic = synthetic
        self.real = real
        self.pick = pick
        self.seed = seed
        self.real_classes = chosen  # original real labels, in the order of their new labels
        offset = int(synthetic.num_classes)
        remap = np.full(int(max(real_labels.max(), chosen.max())) + 1, -1, dtype=np.int64)
        remap[chosen] = offset + np.arange(k, dtype=np.int64)
        self.real_indices = np.flatnonzero(remap[real_labels] >= 0).astype(np.int64)
        self._real_new_labels = remap[real_labels[self.real_indices]]
        self._n_syn = len(synthetic)
        self._labels = np.concatenate([np.asarray(synthetic.labels, dtype=np.int64), self._real_new_labels])
        real_names = real.identities
        self._identities = list(synthetic.identities) + [f"real/{real_names[int(c)]}" for c in chosen]
        self.num_classes = offset + k

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        n = len(self._labels)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} images")
        i = int(i) % n
        if i < self._n_syn:
            return self.synthetic[i]
        j = i - self._n_syn
        rgb, _ = self.real[int(self.real_indices[j])]
        return rgb, int(self._real_new_labels[j])

    def __repr__(self) -> str:
        return (f"MixedDataset(synthetic={self.synthetic!r}, real={self.real!r}, k={len(self.real_classes)}, "
                f"pick={self.pick!r}, seed={self.seed})")


# ------------------------------------------------------------------------------------------------------ opening


def open_dataset(path: str | os.PathLike[str], what: str = "dataset") -> ImageFolderDataset | RecordFolderDataset:
    """Open ``path`` as a RecordIO folder (it holds ``train.rec``) or else as an image folder / generated dataset.

    ``what`` names the setting in errors (e.g. ``data.path``). A path to ``train.rec`` itself opens its folder.
    """
    p = Path(path).expanduser()
    if p.is_file() and p.name in ("train.rec", "train.idx", "property"):
        p = p.parent
    if not p.exists():
        raise Digi2RealError(f"{what}: {p} does not exist")
    if not p.is_dir():
        raise Digi2RealError(f"{what}: {p} is not a folder; give an image folder, a generated dataset or a RecordIO "
                             "folder (train.rec, train.idx, property)")
    if is_recordio_dir(p):
        ds = RecordFolderDataset(p)
        if (ds.height, ds.width) != IMAGE_SIZE:
            raise Digi2RealError(f"{what}: {p}/property says {ds.width}x{ds.height} images; training needs "
                                 f"{IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} aligned crops")
        if len(ds) == 0:
            raise Digi2RealError(f"{what}: {p} holds no images")
        return ds
    return ImageFolderDataset(p)


def open_training_set(cfg: DataConfig, seed: int) -> TrainingSet:
    """The training set ``cfg`` describes: ``cfg.path`` alone, or mixed with ``cfg.real_identities`` identities of
    ``cfg.real_path`` (picked by ``cfg.real_pick``, seeded by ``seed``) when that is above 0."""
    if cfg.path is None:
        raise Digi2RealError("data.path is not set; give the training set (image folder, generated dataset or "
                             "RecordIO folder)")
    if cfg.real_identities > 0 and cfg.real_path is None:
        raise Digi2RealError(f"data.real_identities is {cfg.real_identities} but data.real_path is not set; give the "
                             "real set to mix in, or set real_identities to 0")
    synthetic = open_dataset(cfg.path, "data.path")
    if cfg.real_identities == 0:
        return synthetic
    assert cfg.real_path is not None  # checked above
    real = open_dataset(cfg.real_path, "data.real_path")
    try:
        return MixedDataset(synthetic, real, cfg.real_identities, cfg.real_pick, seed)
    except Digi2RealError as exc:
        raise Digi2RealError(f"data.real_identities: {exc} ({cfg.real_path})") from None
