"""MTCNN face detector (Zhang et al. 2016) in plain PyTorch: P-Net, R-Net, O-Net and the detection cascade.

The cascade:

1. **P-Net** runs fully convolutionally over an image pyramid (scales ``12 / min_face_size * factor**k`` while the
   image's short side stays >= 12 px). Every heat-map cell whose face probability reaches ``thresholds[0]`` proposes
   the 12 x 12 window under it; proposals are thinned by NMS (IoU 0.5) within each scale and (IoU 0.7) across scales,
   moved by P-Net's box regression and made square.
2. **R-Net** scores a 24 x 24 crop of every proposal; those above ``thresholds[1]`` are thinned by NMS (0.7), moved by
   R-Net's regression and made square.
3. **O-Net** scores a 48 x 48 crop of every survivor and predicts five landmarks; those above ``thresholds[2]`` are
   moved by O-Net's regression and thinned by NMS (0.7 of the smaller box's area).

Images are processed as a batch: a list or array of many same-size images (the generator's 512 x 512 outputs) runs
through each network together, every crop of every image going through R-Net and O-Net in a few large passes. The
batch is first turned into a 2x mip-map (full, 1/2, 1/4, ... resolution, 2 x 2 averages) that feeds both the
pyramid (each level area-resampled, as the original MTCNN does, from the mip level at or above it) and the crops
(bilinear from the level where the box is nearest the crop size: an area-like filter for large faces). Parts of a box
outside the image read as black, as in the original MTCNN. On a CPU the heavy parts run as tasks on worker threads
with one intra-op thread each (see ``MTCNN._map``); on CUDA everything stays on the device but the box bookkeeping.

Coordinates: boxes are ``(x1, y1, x2, y2)`` with pixel ``j`` spanning ``[j, j + 1)``; landmarks are the box corner
plus O-Net's relative position times the box size, the convention every MTCNN port reports and ArcFace templates were
fitted to. Both are in the input image's pixels.

The weights are the published MTCNN weights as shipped in the facenet-pytorch 2.6.0 wheel (MIT), converted to
safetensors (``weights/``, see ``weights/README.md``); :meth:`MTCNN.from_package` verifies their sha256 before use.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from digi2real.errors import ModelError
from digi2real.fileio import sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from digi2real.config import DetectorConfig

WEIGHTS_FILE = Path(__file__).resolve().parent / "weights" / "mtcnn.safetensors"
WEIGHTS_SHA256 = "cb309130ba14789bf562c4862f4926f20637df8dfcd6d7f0f3eb1c81bcf2328b"

_NORM_SCALE = 1.0 / 128.0  # the networks see (pixel - 127.5) / 128
_NORM_SHIFT = 127.5 / 128.0
_CROP_SAMPLES = 1 << 18  # crop pixels cut and sent through R-Net / O-Net at once (bounds memory)
_PNET_PIXELS = 120_000  # CPU: P-Net input pixels per forward pass (images of one level are chunked)
_MIN_TASK_PIXELS = 9216  # crops with fewer pixels than this in all are not worth a task of their own
_NMS_MATRIX_MAX = 2000  # up to this many boxes, NMS computes all pairwise overlaps at once
#: Pixels of same-size images detected together: a batch of 8 photos of 40 MP would need about 24 GB.
BATCH_PIXEL_BUDGET = 16_000_000


# --------------------------------------------------------------------------------------------------------------------
# Networks. Layer names match the published state dicts; the dense layers expect their input flattened in
# (width, height, channel) order, as in the Caffe/TensorFlow models these weights descend from.
# --------------------------------------------------------------------------------------------------------------------


class PNet(nn.Module):
    """Proposal net: fully convolutional, a 12 x 12 receptive field, stride 2. Returns (face prob, box regression)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        logits = self.conv4_1(x)
        # softmax over two classes == sigmoid of the logit difference
        prob = torch.sigmoid(logits[:, 1] - logits[:, 0])
        return prob, self.conv4_2(x)


def _flatten_whc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """Refine net on 24 x 24 crops. Returns (face prob, box regression)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_whc(x)))
        logits = self.dense5_1(x)
        return torch.sigmoid(logits[:, 1] - logits[:, 0]), self.dense5_2(x)


class ONet(nn.Module):
    """Output net on 48 x 48 crops. Returns (face prob, box regression, landmarks: 5 x then 5 y, relative to box)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_whc(x)))
        logits = self.dense6_1(x)
        return torch.sigmoid(logits[:, 1] - logits[:, 0]), self.dense6_2(x), self.dense6_3(x)


# --------------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Detections:
    """The faces found in one image, most confident first.

    ``boxes``: K x 4 float32 ``(x1, y1, x2, y2)``; ``scores``: K float32 O-Net face probabilities; ``landmarks``:
    K x 5 x 2 float32 (x, y) of left eye, right eye, nose tip, left mouth corner, right mouth corner.
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 5, 2), np.float32))

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def shifted(self, dx: float, dy: float) -> "Detections":
        """The same detections with coordinates moved by (dx, dy) (e.g. from a padded canvas back to the image)."""
        off = np.array([dx, dy], np.float32)
        return Detections(self.boxes + np.tile(off, 2), self.scores.copy(), self.landmarks + off)


# --------------------------------------------------------------------------------------------------------------------
# Box arithmetic (numpy; boxes are tiny compared with images)
# --------------------------------------------------------------------------------------------------------------------


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; returns indices kept, best score first.

    ``mode="union"`` suppresses a box whose IoU with a kept box exceeds ``threshold``; ``mode="min"`` uses the
    intersection over the smaller box's area (removes boxes nested inside a kept one).
    """
    k = boxes.shape[0]
    if k == 0:
        return np.zeros((0,), np.int64)
    order = np.argsort(-scores, kind="stable")
    if k == 1:
        return order.astype(np.int64)
    b = boxes[order].astype(np.float64)
    areas = np.maximum(b[:, 2] - b[:, 0], 0.0) * np.maximum(b[:, 3] - b[:, 1], 0.0)
    use_min = mode == "min"
    if k <= _NMS_MATRIX_MAX:
        # all pairwise overlaps at once, then one cheap pass over the rows in score order
        iw = np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0])
        ih = np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1])
        inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
        denom = (np.minimum(areas[:, None], areas[None, :]) if use_min
                 else areas[:, None] + areas[None, :] - inter)
        suppress = inter > threshold * np.maximum(denom, 1e-12)
        alive = np.ones(k, dtype=bool)
        for i in range(k):
            if alive[i]:
                alive[i + 1:] &= ~suppress[i, i + 1:]
        return order[alive].astype(np.int64)
    keep: list[int] = []
    rest = np.arange(k)
    while rest.size:
        i = int(rest[0])
        keep.append(i)
        rest = rest[1:]
        if rest.size == 0:
            break
        iw = np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0])
        ih = np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1])
        inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
        denom = np.minimum(areas[i], areas[rest]) if use_min else areas[i] + areas[rest] - inter
        rest = rest[inter <= threshold * np.maximum(denom, 1e-12)]
    return order[np.asarray(keep, np.int64)]


def batched_nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float,
                mode: str = "union") -> np.ndarray:
    """NMS within each group (image) separately; returns kept indices sorted by group, then score."""
    if boxes.shape[0] == 0:
        return np.zeros((0,), np.int64)
    first = groups[0]
    if np.all(groups == first):
        return nms(boxes, scores, threshold, mode)
    out = []
    order = np.argsort(groups, kind="stable")
    cuts = np.flatnonzero(np.diff(groups[order])) + 1
    for idx in np.split(order, cuts):
        out.append(idx[nms(boxes[idx], scores[idx], threshold, mode)])
    return np.concatenate(out)


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    w = (boxes[:, 2] - boxes[:, 0])[:, None]
    h = (boxes[:, 3] - boxes[:, 1])[:, None]
    return boxes + reg * np.concatenate([w, h, w, h], axis=1)


def _square(boxes: np.ndarray) -> np.ndarray:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    cx = boxes[:, 0] + 0.5 * w
    cy = boxes[:, 1] + 0.5 * h
    return np.stack([cx - 0.5 * side, cy - 0.5 * side, cx + 0.5 * side, cy + 0.5 * side], axis=1)


# --------------------------------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; anything else as given (a clear error if unavailable)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was requested but torch sees no CUDA GPU; use --device cpu (or auto)")
    return dev


_VERIFIED: set[tuple[str, float, int]] = set()
_VERIFY_LOCK = threading.Lock()


def verify_weights(path: str | Path = WEIGHTS_FILE, sha256: str = WEIGHTS_SHA256) -> None:
    """Raise :class:`ModelError` naming ``path`` unless the file exists and its sha256 is ``sha256``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: MTCNN weights file not found; reinstall digi2real (the file ships with the package) "
                         "or rebuild it with tools/convert_mtcnn_weights.py")
    stat = path.stat()
    key = (str(path), stat.st_mtime, stat.st_size)
    with _VERIFY_LOCK:
        if key in _VERIFIED:
            return
        actual = sha256_file(path)
        if actual != sha256:
            raise ModelError(f"{path}: sha256 {actual} does not match the expected {sha256}; the MTCNN weights are "
                             "corrupt or were replaced: reinstall digi2real or rebuild the file with "
                             "tools/convert_mtcnn_weights.py")
        _VERIFIED.add(key)


class MTCNN:
    """The three networks and the detection cascade.

    Build it with :meth:`from_package` (the shipped, checksum-verified weights). :meth:`detect` takes one image or a
    batch and returns :class:`Detections` per image.
    """

    def __init__(
        self,
        pnet: PNet,
        rnet: RNet,
        onet: ONet,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        min_face_size: int = 20,
        device: str | torch.device | None = "cpu",
        batch_size: int = 8,
        cpu_workers: int | None = None,
    ) -> None:
        if len(thresholds) != 3 or not all(0.0 <= float(t) <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds: expected three probabilities in [0, 1], got {tuple(thresholds)!r}")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor: the pyramid step must be in (0, 1), got {factor}")
        if min_face_size <= 0:
            raise ValueError(f"min_face_size must be positive, got {min_face_size}")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)
        self.min_face_size = int(min_face_size)
        self.batch_size = max(1, int(batch_size))
        # On a CPU the heavy parts of the cascade run as tasks on this many worker threads with one intra-op thread
        # each (see "CPU task parallelism" below). None: torch's intra-op thread count; 1: plain torch threading.
        self.cpu_workers = cpu_workers
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.device = resolve_device(device)
        self.pnet = pnet.eval().requires_grad_(False)
        self.rnet = rnet.eval().requires_grad_(False)
        self.onet = onet.eval().requires_grad_(False)
        self.to(self.device)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_file(
        cls,
        path: str | Path,
        cfg: "DetectorConfig | None" = None,
        device: str | torch.device | None = None,
        sha256: str | None = WEIGHTS_SHA256,
        cpu_workers: int | None = None,
    ) -> "MTCNN":
        """Load weights from a safetensors file (``pnet.*``, ``rnet.*``, ``onet.*``), checking ``sha256`` unless None.

        Settings (thresholds, pyramid factor, minimum face size, batch size, device) come from ``cfg``; ``device``
        overrides ``cfg.device``.
        """
        from safetensors.torch import load_file

        from digi2real.config import DetectorConfig

        cfg = cfg or DetectorConfig()
        path = Path(path)
        if sha256 is not None:
            verify_weights(path, sha256)
        elif not path.is_file():
            raise ModelError(f"{path}: MTCNN weights file not found")
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
            raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None
        nets = {"pnet": PNet(), "rnet": RNet(), "onet": ONet()}
        for name, net in nets.items():
            state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise ModelError(f"{path}: the {name} weights do not fit the network ({first})") from None
        return cls(
            nets["pnet"], nets["rnet"], nets["onet"],
            thresholds=cfg.thresholds, factor=cfg.factor, min_face_size=cfg.min_face_size,
            device=device if device is not None else cfg.device, batch_size=cfg.batch_size, cpu_workers=cpu_workers,
        )

    @classmethod
    def from_package(cls, cfg: "DetectorConfig | None" = None, device: str | torch.device | None = None,
                     cpu_workers: int | None = None) -> "MTCNN":
        """The detector with the weights shipped in ``digi2real/faces/weights`` (sha256-verified).

        ``device`` overrides ``cfg.device`` (``"auto"`` picks CUDA when available). ``cpu_workers``: worker threads
        for the CPU cascade (default: torch's thread count; 1 runs everything in the calling thread).
        """
        return cls.from_file(WEIGHTS_FILE, cfg, device=device, sha256=WEIGHTS_SHA256, cpu_workers=cpu_workers)

    def to(self, device: str | torch.device) -> "MTCNN":
        self.device = resolve_device(device)
        for net in (self.pnet, self.rnet, self.onet):
            net.to(self.device)
        return self

    # ---------------------------------------------------------------- public API
    def scales(self, height: int, width: int) -> list[float]:
        """Pyramid scales for an image of this size (empty when the image is smaller than ``min_face_size``)."""
        m = 12.0 / self.min_face_size
        short = min(height, width) * m
        out = []
        s = m
        while short >= 12.0:
            out.append(s)
            s *= self.factor
            short *= self.factor
        return out

    def detect(self, images: Any) -> "Detections | list[Detections]":
        """Detect faces.

        ``images``: one RGB image (numpy ``H x W x 3``, uint8 or float in 0..255, or a torch tensor ``3 x H x W``)
        -> one :class:`Detections`; or a batch -- a list of such images (sizes may differ: same-size images are run
        together, ``batch_size`` at a time) or an ``N x H x W x 3`` array / ``N x 3 x H x W`` tensor -> a list of
        :class:`Detections`, one per image, in order.
        """
        single, batch = _normalise_input(images)
        results: list[Detections | None] = [None] * len(batch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(batch):
            groups.setdefault(tuple(img.shape[1:]), []).append(i)
        for (h, w), idxs in groups.items():
            # Large photos go fewer at a time: one 40 MP image alone peaks at about 3 GB (measured), so a batch of
            # eight would not fit a laptop. Small images (generated 512 x 512 faces) keep the full batch.
            per = max(1, min(self.batch_size, BATCH_PIXEL_BUDGET // max(h * w, 1)))
            for start in range(0, len(idxs), per):
                chunk = idxs[start:start + per]
                for i, det in zip(chunk, self.detect_tensor(_stack(batch, chunk, self.device))):
                    results[i] = det
        out = [r if r is not None else Detections() for r in results]
        return out[0] if single else out

    # ---------------------------------------------------------------- CPU task parallelism
    # These networks are small: inside one op, threads spend much of their time at barriers, and when other
    # processes compete for the cores a barrier waits for a descheduled thread (a single image then takes several
    # times longer). So on a CPU the work is split into independent tasks for a few worker threads that each use
    # one intra-op thread: several images -> one image per task, through the whole cascade (its data stays in
    # cache); one image -> its pyramid levels and chunks of its crops, with the calling thread dropping to one
    # intra-op thread while it runs the light glue in between.

    def _workers(self) -> int:
        if self.device.type != "cpu":
            return 1
        wanted = self.cpu_workers if self.cpu_workers is not None else torch.get_num_threads()
        return max(1, int(wanted))

    def _get_pool(self, workers: int) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None or self._pool._max_workers != workers:  # noqa: SLF001
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mtcnn")
            return self._pool

    @staticmethod
    def _run_task(fn: Any, item: Any) -> Any:
        # torch sets a thread's intra-op count lazily, at its first parallel call, from a process-wide value: read it
        # first, so this worker's own setting below never becomes another new thread's default (landmarks then
        # moved by 2e-5 px between runs in the generation engine's threads).
        torch.get_num_threads()
        torch.set_num_threads(1)  # this worker thread's OpenMP setting
        with torch.inference_mode():
            return fn(item)

    def _map(self, fn: Any, items: list, workers: int) -> list:
        """``[fn(x) for x in items]``, on ``workers`` worker threads when there are several tasks and workers."""
        if workers <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        pool = self._get_pool(workers)
        return [f.result() for f in [pool.submit(self._run_task, fn, x) for x in items]]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool"] = None
        state["_pool_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pool_lock = threading.Lock()

    def close(self) -> None:
        """Stop the worker threads (they also stop when the detector is garbage-collected)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    # ---------------------------------------------------------------- cascade
    def detect_tensor(self, images: torch.Tensor) -> list[Detections]:
        """Run the cascade on an ``N x 3 x H x W`` tensor of 0..255 RGB values (any dtype, memory layout, device)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected an N x 3 x H x W tensor, got shape {tuple(images.shape)}")
        # resolved once, here: inside the cascade this thread runs with one intra-op thread
        workers = self._workers()
        n = images.shape[0]
        if workers <= 1:
            with torch.inference_mode():
                return self._cascade(images, 1)
        if n > 1:
            # several images on a CPU: each worker thread takes whole images, one at a time, through the whole
            # cascade (an image's data stays in that core's cache; no waiting on other threads)
            return self._map(lambda i: self._cascade(images[i:i + 1], 1)[0], list(range(n)), workers)
        caller_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                return self._cascade(images, workers)
        finally:
            torch.set_num_threads(caller_threads)

    def _cascade(self, images: torch.Tensor, workers: int) -> list[Detections]:
        n, _, h, w = images.shape
        scales = self.scales(h, w)
        if n == 0 or not scales:
            return [Detections() for _ in range(n)]
        # One float copy of the batch, scaled so that black is 0 (x / 128), held as level 0 of a 2x mip-map that
        # feeds both the pyramid and the crops. The networks' normalisation (x - 127.5) / 128 is this minus
        # 127.5 / 128, applied after resampling.
        images = images.to(self.device, non_blocking=True)
        mips = _MipMap(images)
        spans = np.linspace(0, n, min(n, workers) + 1).round().astype(int)
        self._map(lambda span: mips.fill(images, *span), [(int(a), int(b)) for a, b in zip(spans[:-1], spans[1:])],
                  workers)
        # ---- stage 1: P-Net over the pyramid
        boxes, scores, regs, img_idx = self._stage_pnet(mips, scales, workers)
        if boxes.shape[0] == 0:
            return [Detections() for _ in range(n)]
        keep = batched_nms(boxes, scores, img_idx, 0.7)
        boxes, scores, regs, img_idx = boxes[keep], scores[keep], regs[keep], img_idx[keep]
        boxes = _square(_regress(boxes, regs))
        # ---- stage 2: R-Net on 24 x 24 crops
        probs, regs = self._run_crops(self.rnet, mips, boxes, img_idx, 24, workers)
        ok = probs[:, 0] > self.thresholds[1]
        boxes, scores, regs, img_idx = boxes[ok], probs[ok, 0], regs[ok], img_idx[ok]
        if boxes.shape[0] == 0:
            return [Detections() for _ in range(n)]
        keep = batched_nms(boxes, scores, img_idx, 0.7)
        boxes, regs, img_idx = boxes[keep], regs[keep], img_idx[keep]
        boxes = _square(_regress(boxes, regs))
        # ---- stage 3: O-Net on 48 x 48 crops
        probs, regs, marks = self._run_crops(self.onet, mips, boxes, img_idx, 48, workers)
        ok = probs[:, 0] > self.thresholds[2]
        boxes, scores, regs, marks, img_idx = boxes[ok], probs[ok, 0], regs[ok], marks[ok], img_idx[ok]
        if boxes.shape[0] == 0:
            return [Detections() for _ in range(n)]
        bw = (boxes[:, 2] - boxes[:, 0])[:, None]
        bh = (boxes[:, 3] - boxes[:, 1])[:, None]
        lm = np.stack([boxes[:, 0:1] + bw * marks[:, :5], boxes[:, 1:2] + bh * marks[:, 5:]], axis=2)
        boxes = _regress(boxes, regs)
        keep = batched_nms(boxes, scores, img_idx, 0.7, mode="min")
        boxes, scores, lm, img_idx = boxes[keep], scores[keep], lm[keep], img_idx[keep]
        out = []
        for i in range(n):
            sel = np.flatnonzero(img_idx == i)
            sel = sel[np.argsort(-scores[sel], kind="stable")]
            out.append(Detections(boxes[sel].astype(np.float32), scores[sel].astype(np.float32),
                                  lm[sel].astype(np.float32)))
        return out

    def _stage_pnet(self, mips: "_MipMap", scales: list[float], workers: int):
        """P-Net proposals over the image pyramid, NMS'd within each scale and image."""
        n = mips.n
        h, w = mips.sizes[0]
        cpu = self.device.type == "cpu"
        levels = []
        for s in scales:
            hs, ws = max(int(math.ceil(h * s)), 12), max(int(math.ceil(w * s)), 12)
            # on a CPU big levels go through a few images at a time (feature maps stay in cache); a GPU takes the
            # whole batch at once
            step = max(1, (_PNET_PIXELS if cpu else 1 << 26) // (hs * ws))
            levels.append((s, hs, ws, step))
        # one task per level (and group of images), largest first for balance across the workers
        tasks = [(s, hs, ws, i0, min(n, i0 + step)) for s, hs, ws, step in levels for i0 in range(0, n, step)]
        tasks.sort(key=lambda t: -(t[1] * t[2] * (t[4] - t[3])))
        results = [r for r in self._map(lambda t: self._pnet_task(mips, *t), tasks, workers) if r is not None]
        if not results:
            z = np.zeros((0, 4))
            return z, np.zeros((0,)), z, np.zeros((0,), np.int64)
        return tuple(np.concatenate([r[j] for r in results]) for j in range(4))

    def _pnet_task(self, mips: "_MipMap", s: float, hs: int, ws: int, i0: int, i1: int):
        # Area resampling (as the original MTCNN) from the 2x mip level at or above this scale: the same filter as
        # from the full image, on a smaller input. (Bilinear resampling, even from the mip levels, aliases enough
        # to raise false positives.)
        k = max(0, min(int(math.floor(math.log2(1.0 / s) + 1e-9)), len(mips.sizes) - 1))
        lh, lw = mips.sizes[k]
        level = F.interpolate(mips.level(k)[i0:i1], size=(hs, ws), mode="area").sub_(_NORM_SHIFT)
        prob, reg = self.pnet(level)
        mask = prob >= self.thresholds[0]
        hits = mask.nonzero()
        if hits.shape[0] == 0:
            return None
        sc = prob[mask].float().cpu().numpy().astype(np.float64)
        rg = reg.permute(0, 2, 3, 1)[mask].float().cpu().numpy().astype(np.float64)
        hits = hits.cpu().numpy()
        # geometry: P-Net cell (x, y) sees the 12 x 12 level pixels from (2x, 2y); a level pixel is
        # lw * 2**k / ws image pixels wide (exact, whatever the rounding of the level's size)
        sx, sy = ws / (lw * 2.0**k), hs / (lh * 2.0**k)
        yy = hits[:, 1].astype(np.float64)
        xx = hits[:, 2].astype(np.float64)
        bx = np.stack([2 * xx / sx, 2 * yy / sy, (2 * xx + 12) / sx, (2 * yy + 12) / sy], axis=1)
        img = hits[:, 0] + i0
        keep = batched_nms(bx, sc, img, 0.5)
        return bx[keep], sc[keep], rg[keep], img[keep]

    def _run_crops(self, net: nn.Module, mips: "_MipMap", boxes: np.ndarray, img_idx: np.ndarray, size: int,
                   workers: int):
        k = boxes.shape[0]
        chunk = max(1, _CROP_SAMPLES // (size * size))
        min_per_task = max(2, _MIN_TASK_PIXELS // (size * size))  # 16 R-Net crops, 4 O-Net crops
        pieces = max(-(-k // chunk), min(workers, -(-k // min_per_task)))
        bounds = np.linspace(0, k, pieces + 1).round().astype(int)

        def task(span: tuple[int, int]) -> list[np.ndarray]:
            a, b = span
            # oneDNN builds a new convolution for every new batch size (about 10 ms for R-Net, whose batch size
            # changes with every image): pad R-Net's batch to a multiple of 8 so that a few sizes are built once
            pad = (-(b - a)) % 8 if self.device.type == "cpu" and size == 24 else 0
            res = net(mips.crop(boxes[a:b], img_idx[a:b], size, extra=pad))
            return [r[: b - a].float().reshape(b - a, -1).cpu().numpy().astype(np.float64) for r in res]

        outs = self._map(task, [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a], workers)
        return tuple(np.concatenate([o[j] for o in outs]) for j in range(len(outs[0])))


class _MipMap:
    """The batch at full, 1/2, 1/4, ... resolution (2 x 2 averages), all levels in one (pixels, 3) table.

    A box is cut from the level where its size is closest to the crop size, with bilinear sampling (an area-like
    filter for large faces); samples outside the image read zero, i.e. black (pixel value 0).
    """

    def __init__(self, images: torch.Tensor) -> None:
        """Allocate for ``images`` (N x 3 x H x W, 0..255, any dtype and layout); :meth:`fill` fills it."""
        n, _, h, w = images.shape
        sizes = [(h, w)]
        while min(sizes[-1]) >= 16:
            sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
        self.sizes = sizes
        rows = [n * lh * lw for lh, lw in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
        self.table = torch.empty((int(sum(rows)), 3), dtype=torch.float32, device=images.device)
        self.device = images.device
        self.n = n

    def level(self, k: int) -> torch.Tensor:
        """Level ``k`` as a channels-last N x 3 x h x w view into the table (one row per pixel)."""
        lh, lw = self.sizes[k]
        off = int(self.offsets[k])
        return self.table[off:off + self.n * lh * lw].view(self.n, lh, lw, 3).permute(0, 3, 1, 2)

    def fill(self, images: torch.Tensor, i0: int, i1: int) -> None:
        """Fill every level for images ``i0:i1``: level 0 = pixel / 128, then 2 x 2 averages of the level above."""
        top = self.level(0)[i0:i1]
        top.copy_(images[i0:i1])
        top.mul_(_NORM_SCALE)
        for k in range(1, len(self.sizes)):
            src = self.level(k - 1)[i0:i1]
            lh, lw = src.shape[2], src.shape[3]
            if lh % 2 or lw % 2:  # repeat the last row / column so every output averages a full 2 x 2 block
                src = F.pad(src, (0, lw % 2, 0, lh % 2), mode="replicate")
            dst = self.level(k)[i0:i1]
            dst.copy_(src[:, :, 0::2, 0::2]).add_(src[:, :, 1::2, 0::2])
            dst.add_(src[:, :, 0::2, 1::2]).add_(src[:, :, 1::2, 1::2]).mul_(0.25)

    def crop(self, boxes: np.ndarray, img_idx: np.ndarray, size: int, extra: int = 0) -> torch.Tensor:
        """Crops of ``boxes`` (K x 4, image pixels) from images ``img_idx``, as (K + extra) x 3 x size x size network
        input (channels-last); the ``extra`` crops at the end are black padding."""
        k = boxes.shape[0]
        bw = np.maximum(boxes[:, 2] - boxes[:, 0], 1e-6)
        bh = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-6)
        lvl = np.clip(np.floor(np.log2(np.maximum(bw, bh) / size) + 0.5), 0, len(self.sizes) - 1).astype(np.int64)
        step = (np.arange(size, dtype=np.float64) + 0.5) / size  # sample centres across the box
        out = torch.empty((k + extra, size, size, 3), dtype=self.table.dtype, device=self.device)
        if extra:
            out[k:].zero_()
        key = img_idx.astype(np.int64) * len(self.sizes) + lvl
        order = np.argsort(key, kind="stable")
        cuts = np.flatnonzero(np.diff(key[order])) + 1
        for sel in np.split(order, cuts):
            i, lv = int(img_idx[sel[0]]), int(lvl[sel[0]])
            lh, lw = self.sizes[lv]
            scale = 0.5**lv
            # sample positions in the level's [-1, 1] grid coordinates (align_corners=False: -1 and 1 are the
            # outer edges of the first and last pixels); outside the image reads zero, i.e. black
            gx = (boxes[sel, 0:1] + step * bw[sel, None]) * (scale * 2.0 / lw) - 1.0  # m x S
            gy = (boxes[sel, 1:2] + step * bh[sel, None]) * (scale * 2.0 / lh) - 1.0
            m = sel.shape[0]
            grid = np.empty((1, m * size, size, 2), np.float32)
            grid[0, :, :, 0] = np.broadcast_to(gx[:, None, :], (m, size, size)).reshape(m * size, size)
            grid[0, :, :, 1] = np.broadcast_to(gy[:, :, None], (m, size, size)).reshape(m * size, size)
            level = self.level(lv)[i:i + 1]
            res = F.grid_sample(level, torch.from_numpy(grid).to(self.device, non_blocking=True), mode="bilinear",
                                padding_mode="zeros", align_corners=False)  # 1 x 3 x (m S) x S
            out[torch.from_numpy(sel).to(self.device)] = res[0].permute(1, 2, 0).reshape(m, size, size, 3)
        return out.sub_(_NORM_SHIFT).permute(0, 3, 1, 2)  # a channels-last K x 3 x S x S view


# --------------------------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------------------------


def _is_tensor(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor)


def _one_image(img: Any, where: str) -> torch.Tensor:
    """One image as a torch tensor, H x W x 3 (numpy input) or 3 x H x W (tensor input), unchanged values."""
    if _is_tensor(img):
        if img.dim() == 3 and img.shape[0] == 3:
            return img
        if img.dim() == 3 and img.shape[2] == 3:
            return img.permute(2, 0, 1)
        raise ValueError(f"{where}: expected a 3 x H x W RGB tensor, got shape {tuple(img.shape)}")
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{where}: expected an H x W x 3 RGB array, got shape {arr.shape} "
                         "(convert grayscale/RGBA first, e.g. with digi2real.faces.detect.to_rgb)")
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{where}: expected uint8 (or float 0..255) pixels, got {arr.dtype}")
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # torch wants writable memory; this is only read, but copy to keep torch quiet
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1)


def _normalise_input(images: Any) -> tuple[bool, list[torch.Tensor]]:
    if _is_tensor(images):
        if images.dim() == 3:
            return True, [_one_image(images, "image")]
        if images.dim() == 4:
            if images.shape[1] != 3 and images.shape[3] == 3:
                images = images.permute(0, 3, 1, 2)
            return False, [images[i] for i in range(images.shape[0])]
        raise ValueError(f"images: expected a 3 x H x W or N x 3 x H x W tensor, got shape {tuple(images.shape)}")
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            return True, [_one_image(images, "image")]
        if images.ndim == 4:
            return False, [_one_image(images[i], f"images[{i}]") for i in range(images.shape[0])]
        raise ValueError(f"images: expected H x W x 3 or N x H x W x 3, got shape {images.shape}")
    if isinstance(images, (list, tuple)):
        return False, [_one_image(img, f"images[{i}]") for i, img in enumerate(images)]
    raise ValueError(f"images: expected an array, a tensor or a list of them, got {type(images).__name__}")


def _stack(batch: list[torch.Tensor], idxs: list[int], device: torch.device) -> torch.Tensor:
    parts = [batch[i] for i in idxs]
    if len(parts) == 1:
        x = parts[0].unsqueeze(0)
    else:
        x = torch.stack(parts)  # channels-last input stays channels-last in memory after stacking permuted views
    if not (x.dtype == torch.uint8 or x.dtype.is_floating_point):
        x = x.to(torch.float32)
    return x.to(device=device, non_blocking=True)
