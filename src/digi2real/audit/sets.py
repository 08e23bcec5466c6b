"""The face sets an audit compares, each as ArcFace vectors grouped in identities (:class:`AuditSet`).

A generated dataset brings the vectors `generate` kept (``embeddings/``, :mod:`digi2real.generation.vectors`); any
other set is embedded here once with the audit's ArcFace, in chunks of :data:`CHUNK` images, each chunk cached under
the SHA-256 of the model and of its images' bytes, so a second audit (or one resumed after a kill) embeds nothing it
has embedded before. What a set is, is read from its path:

- a generated dataset (a folder with ``generation.json``), its identities the plan's;
- a RecordIO folder (``train.rec``, ``train.idx``, ``property``; FACTS 7), its classes;
- an insightface ``.bin`` benchmark (FACTS 8) or a pairs list (``path_a path_b label`` lines), whose identities are
  the groups its genuine pairs join (the same image bytes counted once) and whose listed non-match pairs are its known
  impostors;
- an IJB folder (``IJBB``/``IJBC`` with ``loose_crop/`` and ``meta/``; FACTS 9), aligned with its given landmarks,
  each template an identity and the protocol's non-match template pairs its impostors;
- any other folder: one sub-folder per identity, or, when it holds image files only, each image its own identity.

A 112 x 112 image is an aligned crop already (the convention of the shift stage); a ``.bin``'s other sizes are resized
as insightface's ``load_bin`` does; any other image is a photograph, detected and aligned with MTCNN, and left out
(counted) when no face is found (:class:`Cropper`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from digi2real.audit.measures import Embedded, crop_stats
from digi2real.config import AlignConfig
from digi2real.errors import BadImageError, Digi2RealError
from digi2real.fileio import atomic_path

#: Images embedded (and cached) together: bounded memory, full encoder batches, little lost to a kill.
CHUNK = 1024
SIZE = 112  # the ArcFace crop (FACTS 3)
CACHE_FORMAT = "digi2real-audit-chunk/1"
#: A file that is not a .bin is read as a pairs list (``path_a path_b label`` lines) when it is named like one.
PAIRS_SUFFIXES = (".txt", ".lst", ".list", ".pairs", "")


@dataclass
class Model:
    """The embedding every vector of a set came from: the ArcFace file's SHA-256 and where it was."""

    sha256: str
    name: str
    dim: int

    def describe(self) -> str:
        return f"{self.name} (sha256 {self.sha256[:12]}, {self.dim}-d)"


@dataclass
class AuditSet:
    """One face set, embedded: its vectors by identity (:class:`Embedded`), what it is, and its images (for the
    report's side-by-side pairs)."""

    embedded: Embedded
    path: Path
    kind: str  # generated, recordio, bin, pairs, ijb, folder
    real: bool  # real faces (a benchmark, photographs): its impostors may calibrate the threshold
    model: Model
    image: Callable[[int], np.ndarray] = field(repr=False)  # row -> 112 x 112 x 3 uint8 crop
    label: Callable[[int], str] = field(repr=False)  # row -> where the image is (file, record, pair)
    note: str = ""

    @property
    def name(self) -> str:
        return self.embedded.name


# ------------------------------------------------------------------------------------------------------ images


def _resized(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((SIZE, SIZE), Image.BILINEAR))


@dataclass
class Cropper:
    """How a set's images become ArcFace's 112 x 112 crops, as the shift stage takes real faces: a 112 x 112 image is
    an aligned crop already; a ``.bin`` benchmark's other sizes are resized (insightface's ``load_bin``); any other
    image is a photograph, detected and aligned with MTCNN (FACTS 1, 3; the experiment's ``align.detector``), and
    left out when no face is found."""

    align: AlignConfig | None = None
    resize_only: bool = False
    _detector: object = field(default=None, repr=False)

    def tag(self) -> str:
        """What the crops depend on besides the image bytes (part of the cache key)."""
        if self.resize_only:
            return "resize"
        return "mtcnn:" + json.dumps(self._align().detector.model_dump(mode="json"), sort_keys=True)

    def _align(self) -> AlignConfig:
        base = self.align or AlignConfig()
        return base.model_copy(update={"size": SIZE, "input": "photo"})

    def __call__(self, blobs: Sequence[bytes], names: Sequence[str]) -> list[np.ndarray | None]:
        """The crop of each image, None where no face was found; an unreadable image is refused (one line)."""
        from digi2real.imageio import decode_image

        out: list[np.ndarray | None] = []
        photos: dict[int, np.ndarray] = {}
        for i, (blob, where) in enumerate(zip(blobs, names)):
            rgb = decode_image(blob, where)
            if rgb.shape[:2] == (SIZE, SIZE):
                out.append(rgb)
            elif self.resize_only:
                out.append(_resized(rgb))
            else:
                out.append(None)
                photos[i] = rgb
        if photos:
            from digi2real.faces.detect import detect_and_align

            if self._detector is None:
                from digi2real.faces.mtcnn import MTCNN

                self._detector = MTCNN.from_package(self._align().detector)
            found = detect_and_align(list(photos.values()), self._detector, self._align(),
                                     names=[names[i] for i in photos])
            for i, face in zip(photos, found):
                out[i] = face.crop if face.ok else None
        return out


def _read(path: Path) -> bytes:
    from digi2real.imageio import max_image_bytes

    try:
        with open(path, "rb") as handle:
            return handle.read(max_image_bytes() + 1)
    except OSError as exc:
        raise BadImageError(f"{path}: cannot be read ({exc.strerror or exc})") from None


@dataclass
class Images:
    """A set's images before embedding: ``blob(i)`` the encoded bytes of image ``i``, ``where(i)`` its name."""

    labels: np.ndarray
    identities: list[str]
    blob: Callable[[int], bytes]
    where: Callable[[int], str]

    def __len__(self) -> int:
        return len(self.labels)


def _chunk_key(model: Model, tag: str, blobs: Sequence[bytes]) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}|{model.sha256}|{SIZE}|{tag}|".encode())
    for b in blobs:
        h.update(hashlib.sha256(b).digest())
    return h.hexdigest()


def _load_chunk(path: Path, n: int, dim: int) -> dict[str, np.ndarray] | None:
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except Exception:  # a damaged cache entry is recomputed, never trusted
        return None
    v = arrays.get("vectors")
    if v is None or v.shape != (n, dim) or v.dtype != np.float32 or np.isinf(v).any():
        return None
    if arrays.get("brightness", np.zeros(0)).shape != (n,) or arrays.get("contrast", np.zeros(0)).shape != (n,):
        return None
    return arrays


def embed_images(images: Images, encoder, model: Model, cache: Path, name: str, crop: Cropper,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Every image's vector, brightness and contrast (NaN rows for photographs without a face), chunk by chunk
    through the cache. Returns them with the number of chunks reused."""
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    n = len(images)
    vectors = np.empty((n, model.dim), np.float32)
    brightness = np.empty(n, np.float32)
    contrast = np.empty(n, np.float32)
    reused = 0
    tag = crop.tag()
    bar = tqdm(total=n, unit="img", desc=f"embed {name}", disable=not progress, dynamic_ncols=True)
    for start in range(0, n, CHUNK):
        idx = range(start, min(n, start + CHUNK))
        blobs = [images.blob(i) for i in idx]
        key = _chunk_key(model, tag, blobs)
        path = cache / key[:2] / f"{key}.safetensors"
        got = _load_chunk(path, len(blobs), model.dim) if path.is_file() else None
        if got is None:
            got = _embed_chunk(crop(blobs, [images.where(i) for i in idx]), encoder, model.dim)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(got, str(tmp), metadata={"format": CACHE_FORMAT, "model_sha256": model.sha256})
        else:
            reused += 1
        sl = slice(idx.start, idx.stop)
        vectors[sl], brightness[sl], contrast[sl] = got["vectors"], got["brightness"], got["contrast"]
        bar.update(len(blobs))
    bar.close()
    return vectors, brightness, contrast, reused


def _embed_chunk(crops: list[np.ndarray | None], encoder, dim: int) -> dict[str, np.ndarray]:
    n = len(crops)
    got = {"vectors": np.full((n, dim), np.nan, np.float32), "brightness": np.full(n, np.nan, np.float32),
           "contrast": np.full(n, np.nan, np.float32)}
    ok = [i for i, c in enumerate(crops) if c is not None]
    if ok:
        stack = np.stack([crops[i] for i in ok])
        b, c = crop_stats(stack)
        got["vectors"][ok], got["brightness"][ok], got["contrast"][ok] = encoder(stack), b, c
    return got


def _with_faces(images: Images, vectors: np.ndarray, brightness: np.ndarray, contrast: np.ndarray,
                impostors: np.ndarray | None) -> tuple[Images, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None,
                                                       int]:
    """The set without the photographs in which no face was found (and without identities left with no image;
    impostor pairs that named one are dropped). Returns them and how many images were left out."""
    keep = np.flatnonzero(np.isfinite(vectors).all(axis=1))
    dropped = len(vectors) - len(keep)
    if not dropped:
        return images, vectors, brightness, contrast, impostors, 0
    if not len(keep):
        raise Digi2RealError(f"{images.where(0)}: no face found in any of the set's {len(vectors)} images; give face "
                             "photographs or 112 x 112 aligned crops")
    present, labels = np.unique(images.labels[keep], return_inverse=True)
    if impostors is not None:
        new = np.full(len(images.identities), -1, np.int64)
        new[present] = np.arange(len(present))
        impostors = new[impostors]
        impostors = impostors[(impostors >= 0).all(axis=1)]
    kept = Images(labels.astype(np.int64), [images.identities[c] for c in present],
                  lambda i: images.blob(int(keep[i])), lambda i: images.where(int(keep[i])))
    return kept, vectors[keep], brightness[keep], contrast[keep], impostors, dropped


# ------------------------------------------------------------------------------------------------------ kinds


def _union_find_labels(pairs: np.ndarray, issame: np.ndarray, n: int) -> np.ndarray:
    """Identity labels 0..m-1 of ``n`` images: the groups the genuine pairs join."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for (a, b), same in zip(pairs.tolist(), issame.tolist()):
        if same:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)])
    _, labels = np.unique(roots, return_inverse=True)
    return labels.astype(np.int64)


def _pair_images(blobs: list[bytes], issame: np.ndarray, where: Callable[[int], str], stem: str,
                 folders: list[str] | None = None) -> tuple[Images, np.ndarray, np.ndarray]:
    """A pairs benchmark's distinct images (by bytes), their identity groups (joined by its genuine pairs, and by
    their folder when ``folders`` names each image's), and its impostor identity pairs.
    Returns (images, the row of each listed image, impostor pairs)."""
    first: dict[bytes, int] = {}
    rows = np.empty(len(blobs), np.int64)
    keep: list[int] = []
    for i, b in enumerate(blobs):
        d = hashlib.sha256(b).digest()
        if d not in first:
            first[d] = len(keep)
            keep.append(i)
        rows[i] = first[d]
    pairs = rows.reshape(-1, 2)
    links, same = pairs, issame
    if folders is not None:  # images of one folder are one person (an LFW-style layout: <name>/<name>_0001.jpg)
        first_of: dict[str, int] = {}
        extra = [(first_of.setdefault(f, int(r)), int(r)) for f, r in zip(folders, rows)]
        links = np.concatenate([pairs, np.array(extra, np.int64).reshape(-1, 2)])
        same = np.concatenate([issame, np.ones(len(extra), bool)])
    labels = _union_find_labels(links, same, len(keep))
    lp = labels[pairs]
    impostors = lp[~issame & (lp[:, 0] != lp[:, 1])]
    impostors = np.unique(np.sort(impostors, axis=1), axis=0) if len(impostors) else np.zeros((0, 2), np.int64)
    m = int(labels.max()) + 1 if len(labels) else 0
    names = [f"{stem}:{j}" for j in range(m)]
    if folders is not None:  # named by the folder of the group's first image
        for row in range(len(keep) - 1, -1, -1):
            names[labels[row]] = f"{stem}:{Path(folders[keep[row]]).name}"
    images = Images(labels, names, lambda j: blobs[keep[j]], lambda j: where(keep[j]))
    return images, labels, impostors


def _bin_images(path: Path) -> tuple[Images, np.ndarray]:
    from digi2real.evaluation.bins import read_bin

    blobs, issame = read_bin(path)
    images, _, impostors = _pair_images(list(blobs), np.asarray(issame, bool),
                                        lambda i: f"{path}: image {i} (pair {i // 2})", path.stem)
    return images, impostors


def _pairs_images(path: Path) -> tuple[Images, np.ndarray]:
    from digi2real.evaluation.bins import read_pairs_folder

    paths, issame = read_pairs_folder(path.parent, path)
    by_path: dict[Path, bytes] = {}
    blobs = [by_path.setdefault(p, _read(p)) for p in paths]
    root = path.parent
    nested = all(p.parent != root for p in paths)
    images, _, impostors = _pair_images(blobs, issame, lambda i: str(paths[i]), root.name or path.stem,
                                        [str(p.parent) for p in paths] if nested else None)
    return images, impostors


def _folder_images(root: Path) -> Images:
    from digi2real.sources.folder import list_images, scan_identity_tree

    tree, _ = scan_identity_tree(root)
    if tree:
        files = [root / ident / f for ident, names in tree.items() for f in names]
        identities = list(tree)
        labels = np.repeat(np.arange(len(tree), dtype=np.int64), [len(v) for v in tree.values()])
    else:
        names = list_images(root)
        if not names:
            raise Digi2RealError(f"{root}: no images (expected <identity>/<image> folders, or image files each of "
                                 "its own person)")
        files = [root / f for f in names]
        identities = [Path(f).stem for f in names]
        labels = np.arange(len(files), dtype=np.int64)
    return Images(labels, identities, lambda i: _read(files[i]), lambda i: str(files[i]))


def _record_images(root: Path) -> Images:
    from digi2real.dataset.imagefolder import RecordFolderDataset
    from digi2real.dataset.recordio import unpack_header

    ds = RecordFolderDataset(root)
    keys = ds.image_keys

    def blob(i: int) -> bytes:
        return unpack_header(ds.reader.read(int(keys[i])))[1]

    order = np.argsort(ds.labels, kind="stable")
    labels = ds.labels[order]
    _, labels = np.unique(labels, return_inverse=True)
    names = ds.identities
    present = sorted(set(ds.labels.tolist()))
    return Images(labels.astype(np.int64), [names[c] for c in present], lambda i: blob(int(order[i])),
                  lambda i: f"{ds.reader.rec_path} record {int(keys[order[i]])}")


def is_ijb(path: Path) -> bool:
    return path.is_dir() and (path / "loose_crop").is_dir() and (path / "meta").is_dir()


# ------------------------------------------------------------------------------------------------------ opening


def is_generated(path: Path) -> bool:
    from digi2real.generation.manifest import SETTINGS_FILE

    return path.is_dir() and (path / SETTINGS_FILE).is_file()


def generated_model(path: Path) -> str | None:
    """The ArcFace file a generated dataset's record names (its identity check), when it names one."""
    from digi2real.generation.manifest import SETTINGS_FILE

    try:
        record = json.loads((path / SETTINGS_FILE).read_text(encoding="utf-8"))
        model = record.get("encoder", {}).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def _generated(path: Path, name: str) -> AuditSet:
    from digi2real.generation.manifest import IMAGES_DIR, read_rows
    from digi2real.generation.vectors import read_vectors

    stored = read_vectors(path, read_rows(path))
    rows = stored.rows
    if not len(rows):
        raise Digi2RealError(f"{path}: the dataset has no accepted image yet; generate it first")
    identities = list(dict.fromkeys(stored.identities))
    index = {ident: i for i, ident in enumerate(identities)}
    labels = np.array([index[i] for i in stored.identities], np.int64)
    landmarks = rows.landmarks if np.isfinite(rows.landmarks).all() else None
    emb = Embedded(name, rows.vectors, labels, identities, landmarks=landmarks, brightness=rows.brightness,
                   contrast=rows.contrast)
    model = Model(rows.model_sha256, generated_model(path) or "the dataset's ArcFace", rows.vectors.shape[1])
    from digi2real.fileio import confine

    manifest = f"the manifest of {path}"  # a row's path may not lead outside images/ (read into the report)
    files = [confine(path / IMAGES_DIR, p, manifest) for p in stored.paths]
    note = "vectors stored by generate" + ("" if landmarks is not None else
                                           "; landmarks not measured (the images were taken as aligned crops)")
    show = Cropper(resize_only=True)  # the dataset's own aligned crops, whatever size they were written at
    return AuditSet(emb, path, "generated", False, model, lambda i: show([_read(files[i])], [str(files[i])])[0],
                    lambda i: str(files[i]), note)


def open_set(path: str | os.PathLike[str], *, encoder=None, model: Model | None = None, cache: Path,
             name: str | None = None, real: bool | None = None, embed_generated: bool = False,
             align: AlignConfig | None = None, progress: bool = True) -> AuditSet:
    """Open the set at ``path`` and embed it (or read its stored vectors). ``encoder`` and ``model`` are needed for
    every set but a generated dataset read from its stored vectors; ``align`` holds the MTCNN settings photographs
    are aligned with (:class:`Cropper`)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise Digi2RealError(f"{p}: not found; give a generated dataset, an image folder, a RecordIO folder, a .bin "
                             "benchmark, a pairs list or an IJB folder")
    if p.is_file() and p.name in ("train.rec", "train.idx", "property"):
        p = p.parent  # a RecordIO file names its folder
    name = name or p.name or str(p)
    if is_generated(p) and not embed_generated:
        return _generated(p, name)
    if encoder is None or model is None:
        raise Digi2RealError(f"{p}: this set has no stored vectors and no ArcFace model was given to embed it; "
                             "pass --model ARCFACE.onnx")
    if is_ijb(p):
        return _ijb(p, name, encoder, model, cache, progress)
    impostors = None
    if p.is_file() and p.suffix == ".bin":
        images, impostors = _bin_images(p)
        kind = "bin"
    elif p.is_file():
        if p.suffix.lower() not in PAIRS_SUFFIXES:
            raise Digi2RealError(f"{p}: not a face set this audit reads (a .bin benchmark, a pairs list .txt, or a "
                                 "folder: generated dataset, RecordIO, IJB, images per identity)")
        images, impostors = _pairs_images(p)
        kind = "pairs"
    elif is_generated(p):
        from digi2real.dataset.imagefolder import ImageFolderDataset

        ds = ImageFolderDataset(p)
        images = Images(ds.labels, ds.identities, lambda i: ds.read_bytes(i), lambda i: str(ds.file_path(i)))
        kind = "generated"
    elif (p / "train.rec").is_file():
        images, kind = _record_images(p), "recordio"
    else:
        images, kind = _folder_images(p), "folder"
    crop = Cropper(align, resize_only=kind == "bin")
    vectors, brightness, contrast, reused = embed_images(images, encoder, model, cache, name, crop, progress)
    chunks = -(-len(images) // CHUNK)
    images, vectors, brightness, contrast, impostors, faceless = _with_faces(images, vectors, brightness, contrast,
                                                                             impostors)
    emb = Embedded(name, vectors, images.labels, images.identities, impostor_pairs=impostors,
                   brightness=brightness, contrast=contrast)
    note = f"embedded with {model.name}: {reused} of {chunks} chunks from the cache"
    if faceless:
        note += f"; {faceless} photographs without a face found left out"

    def image(i: int) -> np.ndarray:
        got = crop([images.blob(i)], [images.where(i)])[0]
        if got is None:
            raise BadImageError(f"{images.where(i)}: no face found")
        return got

    return AuditSet(emb, p, kind, kind != "generated" if real is None else real, model, image, images.where, note)


def _ijb(p: Path, name: str, encoder, model: Model, cache: Path, progress: bool) -> AuditSet:
    """An IJB set: every image aligned with its given five landmarks (FACTS 9) and embedded (cached per model by
    the evaluation's own IJB cache), each template an identity, the protocol's non-match template pairs its
    impostors."""
    from digi2real.evaluation.ijb import _load_batch, ijb_features, read_ijb_meta
    from digi2real.fileio import sha256_json

    meta = read_ijb_meta(p, p.name)
    # the IJB cache knows neither the model nor the copy of the data: both go into its folder's name
    stamps = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted((p / "meta").glob("*.txt"))]
    key = sha256_json({"model": model.sha256, "data": stamps, "crops": (p / "loose_crop").stat().st_mtime_ns})
    features, _ = ijb_features(p, p.name, encoder, progress=progress, cache_dir=cache / f"ijb-{key[:16]}",
                               meta=meta)
    vectors = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    templates, labels = np.unique(meta.templates, return_inverse=True)
    t_index = {int(t): i for i, t in enumerate(templates.tolist())}
    pairs = np.array([(t_index.get(int(a), -1), t_index.get(int(b), -1))
                      for a, b, same in zip(meta.pair_t1, meta.pair_t2, meta.labels) if not same], np.int64)
    pairs = pairs[(pairs >= 0).all(axis=1)] if len(pairs) else np.zeros((0, 2), np.int64)
    emb = Embedded(name, vectors.astype(np.float32), labels.astype(np.int64), [f"template {t}" for t in templates],
                   impostor_pairs=pairs)

    def image(i: int) -> np.ndarray:
        return _load_batch(meta.folder, [meta.images[i]], meta.landmarks[i:i + 1])[0]

    return AuditSet(emb, p, "ijb", True, model, image, lambda i: str(meta.folder / "loose_crop" / meta.images[i]),
                    f"embedded with {model.name}; templates as identities")
