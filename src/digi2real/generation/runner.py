"""`generate`: every plan row rendered by Arc2Face, aligned, checked and written as a training set (paper section 3,
"Dataset Generation"; DESIGN "dataset").

The dataset directory holds ``images/<identity>/<k>.png`` (112 x 112 ArcFace crops), ``manifest/*.jsonl`` (one row
per attempt at an image: its plan row, seeds, detection, identity similarities and status), ``generation.json`` (the
settings and inputs every image depends on) and ``card.md``; ``manifest/shard-*.run.json`` say where each shard's
models ran.

Reproducibility rests on two rules:

* every image's latent noise comes from its own seed (the plan's, or one derived from it for a retry), never from a
  shared stream;
* images are computed in *work units* fixed by the plan and the batch size alone: the plan's rows in plan order, cut
  into consecutive chunks of ``batch_size`` rows (scheme :data:`UNIT_SCHEME`; an identity may span two units). A
  kernel's result can depend on the batch it runs in, so a unit is always computed whole, whatever the shard count
  and however often the run was interrupted; a retry renders exactly the rows its unit's previous attempt rejected.

Shards own units (``unit % N``). Every unit but the last is a full batch, so shards differ by at most one unit: the
largest over the mean is at most ``1 + N * batch_size / images``, whatever the plan's shape (issue 12). Two
shards may therefore write into the same identity folder: every file is written under a temporary name that carries
its writer's host and process, and a starting shard removes only temporaries whose writer is dead
(:func:`digi2real.fileio.clean_temporaries`), never a running shard's.

Crash safety: an image is written under a temporary name and renamed, then its manifest row is appended; a unit
with any image lacking a final row is recomputed whole on the next run, writing only what is missing. The batches are
rendered and finished by :mod:`digi2real.generation.engine` (rendering on this thread, checking and writing on
worker threads), which changes when an image appears, never its pixels.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import digi2real
from digi2real.config import AlignConfig, GenerateConfig, settings_diff
from digi2real.errors import ConfigError, Digi2RealError
from digi2real.fileio import check_apart, clean_temporaries, confine, sha256_file
from digi2real.generation.engine import Engine
from digi2real.generation.manifest import (  # noqa: F401 - re-exported: the dataset's files, read through one module
    CARD_FILE,
    IMAGES_DIR,
    MANIFEST_DIR,
    RAW_DIR,
    SETTINGS_FILE,
    ManifestWriter,
    create_record,
    final_keys,
    manifest_name,
    read_record,
    read_rows,
    read_run_records,
    write_run_record,
)
from digi2real.generation.vectors import (PARTS_DIR, VECTORS_DIR, VectorRows, aligned_landmarks, merge_shard,
                                          write_part)
from digi2real.identity.plan import Plan, plan_latents, read_plan
from digi2real.identity.select import prototypes
from digi2real.identity.store import EmbeddingStore, read_store
from digi2real.imageio import write_image
from digi2real.sharding import Shard

if TYPE_CHECKING:  # pragma: no cover
    from digi2real.faces.arcface import ArcFaceEncoder
    from digi2real.faces.mtcnn import MTCNN
    from digi2real.generation.arc2face import Arc2Face
    from digi2real.generation.shift import RealismShift

OK = "ok"
NAN = "nan"
LOW_SIMILARITY = "low_similarity"

#: Rough on-disk sizes used by ``--dry-run`` (bytes): a 112 x 112 PNG / JPEG crop and a raw 512 x 512 PNG.
#: Bytes per image on disk: the crop (png or jpg), the raw image, the kept ArcFace vector (512 float32, five
#: landmarks, brightness, contrast, attempt: generation/vectors.py).
DISK_BYTES = {"png": 24_000, "jpg": 5_000, "raw": 420_000, "vectors": 512 * 4 + 5 * 2 * 4 + 3 * 4}


# ------------------------------------------------------------------------------------------------------ seeds, units


def attempt_seed(seed: int, attempt: int) -> int:
    """The noise seed of an image's ``attempt``-th try: the plan's seed first, then seeds derived from it."""
    if attempt == 0:
        return int(seed)
    text = f"digi2real|retry|{int(seed)}|{attempt}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


#: How plan rows are cut into work units, recorded in ``generation.json``: a dataset made with another scheme (before
#: issue 12: whole identities packed up to ``batch_size``) is never resumed with this one, whose batches differ.
UNIT_SCHEME = "consecutive-v2"
#: The batch of ``batch_size: auto`` when the model cannot say (no model, as in a dry run without weights; a model
#: without ``auto_batch_size``). The CPU's choice too (config.GenerateConfig.batch_size).
FALLBACK_BATCH = 8


def work_units(rows: int, batch_size: int) -> list[np.ndarray]:
    """Plan rows ``0 .. rows - 1`` in the batches they are always computed in (see the module doc): consecutive chunks
    of ``batch_size`` rows, every one full but the last, whatever the plan's identities look like."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [np.arange(start, min(start + batch_size, rows), dtype=np.int64) for start in range(0, rows, batch_size)]


def shard_images(units: list[np.ndarray], count: int) -> list[int]:
    """Images of each of ``count`` shards (shard ``i`` owns the units ``u % count == i``; sharding.Shard.owns)."""
    loads = [0] * count
    for index, unit in enumerate(units):
        loads[index % count] += len(unit)
    return loads


# ------------------------------------------------------------------------------------------------------ rendering


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def render(model: "Arc2Face", embeddings: np.ndarray, seeds: list[int], cfg: GenerateConfig,
           delta: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Paper section 3, "Dataset Generation": conditioning C(e) + lambda * Delta (the realism shift on the conditional
    branch only), DPM-Solver++ denoising from each image's own noise, VAE decode.

    Returns (images B x size x size x 3 uint8, finite flags, the batch sizes actually run). On out-of-memory the batch
    is halved and each half rendered alone (recorded, since the kernels may then round differently).
    """
    from digi2real.generation.arc2face import apply_shift

    try:
        cond = apply_shift(model.encode(embeddings), delta, cfg.shift_weight)
        latents = model.denoise(cond, model.initial_noise(seeds, cfg.size), cfg.steps, cfg.guidance)
        images, finite = model.decode(latents)
        return images, finite, [len(seeds)]
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        if not is_out_of_memory(exc) or len(seeds) == 1:
            raise
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    half = len(seeds) // 2
    a = render(model, embeddings[:half], seeds[:half], cfg, delta)
    b = render(model, embeddings[half:], seeds[half:], cfg, delta)
    return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]), a[2] + b[2]


@dataclass
class Verdict:
    """What became of one generated image: ``status`` ok, or why it was rejected (nan, no_face, bad_image, error,
    low_similarity), with its aligned crop, detection and ArcFace cosines."""

    status: str
    reason: str | None = None
    crop: np.ndarray | None = field(default=None, repr=False)
    detection: dict | None = None
    id_similarity: float | None = None
    proto_similarity: float | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)  # the gate's ArcFace vector, kept (issue 14)

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass
class FaceChecker:
    """MTCNN detection + 5-point alignment of each generated image, then the identity-consistency gate: the aligned
    crop is embedded with the same ArcFace and compared with its conditioning embedding and its prototype."""

    detector: "MTCNN"
    encoder: "ArcFaceEncoder"
    align: AlignConfig
    min_similarity: float | None = None
    against: str = "conditioning"
    _detecting: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __call__(self, images: np.ndarray, finite: np.ndarray, cond: np.ndarray, protos: np.ndarray,
                 names: list[str]) -> list[Verdict]:
        from digi2real.faces.detect import detect_and_align

        inputs: list[Any] = [img if ok else ValueError(f"{name}: the generated image has NaN or infinite values")
                             for img, ok, name in zip(images, finite, names)]
        with self._one_detection_at_a_time():
            faces = detect_and_align(inputs, self.detector, self.align, names=names)
        verdicts = []
        for ok, face in zip(finite, faces):
            detection = {k: v for k, v in face.to_dict().items() if k not in ("status", "reason")}
            if not ok:
                verdicts.append(Verdict(NAN, face.reason))
            elif not face.ok:
                verdicts.append(Verdict(face.status, face.reason, detection=detection))
            else:
                verdicts.append(Verdict(OK, None, face.crop, detection))
        good = [i for i, v in enumerate(verdicts) if v.ok]
        if good:
            crops = np.stack([verdicts[i].crop for i in good])
            if crops.shape[1:3] != (112, 112):  # ArcFace sees 112 x 112 whatever size is written
                from PIL import Image

                crops = np.stack([np.asarray(Image.fromarray(c).resize((112, 112), Image.BILINEAR)) for c in crops])
            emb = self.encoder(crops)
            for j, i in enumerate(good):
                v = verdicts[i]
                v.embedding = emb[j]
                v.id_similarity = round(float(emb[j] @ cond[i]), 6)
                v.proto_similarity = round(float(emb[j] @ protos[i]), 6)
                ref = v.id_similarity if self.against == "conditioning" else v.proto_similarity
                if self.min_similarity is not None and ref < self.min_similarity:
                    v.status = LOW_SIMILARITY
                    v.reason = (f"{names[i]}: ArcFace cosine {ref:.3f} to its {self.against} is below the gate's "
                                f"{self.min_similarity}")
        return verdicts

    def _one_detection_at_a_time(self) -> Any:
        """On the CPU, MTCNN runs its work on its own threads and changes torch's process-wide thread count while it
        does (MTCNN._run_task, detect_tensor): a second detection at the same moment can leave one of its threads
        computing with another count, which rounds differently. On CUDA detections may overlap."""
        cuda = getattr(getattr(self.detector, "device", None), "type", "cpu") == "cuda"
        return contextlib.nullcontext() if cuda else self._detecting


# ------------------------------------------------------------------------------------------------------ the job


@dataclass
class Attempt:
    """One batch to render: work unit ``unit``'s ``attempt``-th try at ``rows`` (all its rows at attempt 0, then
    exactly the rows its previous attempt rejected), each with its own seed."""

    unit: int
    attempt: int
    rows: list[int]
    seeds: list[int]


@dataclass
class Rendered:
    """An attempt's images (B x size x size x 3 uint8), their finite flags and the batch sizes actually run."""

    task: Attempt
    images: np.ndarray
    finite: np.ndarray
    batches: list[int]


@dataclass
class Event:
    """One attempt at one image, as the unit loop produces them."""

    row: int
    attempt: int
    seed: int
    verdict: Verdict
    final: bool
    image: np.ndarray | None
    batch: list[int]


@dataclass
class GenerationJob:
    """Everything one run needs: the plan with each row's conditioning embedding and prototype, the models and the
    settings (``cfg.batch_size`` resolved to a number, ``batch_source`` saying how). Built by :func:`prepare_job`; a
    work unit's algorithm is :meth:`first_attempt`, then :meth:`render`, :meth:`check` and :meth:`next_attempt` until
    none is left (:meth:`unit_events` runs them in a row; the engine runs them overlapped)."""

    plan: Plan
    plan_path: Path
    latents: np.ndarray  # N x 512: the SLERP embedding of each plan row (eqs. 3-4)
    protos: np.ndarray  # N x 512: each row's identity prototype
    cfg: GenerateConfig
    align: AlignConfig
    model: "Arc2Face | None"
    checker: FaceChecker | None
    delta: torch.Tensor | None
    settings: dict
    batch_source: str = "set"
    embeddings_dir: Path | None = None
    units: list[np.ndarray] = field(init=False, repr=False)
    optimized: dict | None = field(default=None, repr=False)

    _columns: dict[str, list] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.units = work_units(len(self.plan), self.batch)

    @property
    def batch(self) -> int:
        return int(self.cfg.batch_size)

    @property
    def embedding_dim(self) -> int:
        """The ArcFace vectors' dimension (512 for the recipe's model)."""
        encoder = getattr(self.checker, "encoder", None)
        return int(getattr(encoder, "embedding_dim", self.latents.shape[1]))

    def use_batch(self, batch: int, source: str) -> None:
        """Work in batches of ``batch`` (the one a dataset being resumed was made with): units and settings follow."""
        self.cfg = self.cfg.model_copy(update={"batch_size": int(batch)})
        self.settings["generate"]["batch_size"] = int(batch)
        self.batch_source = source
        self.units = work_units(len(self.plan), self.batch)

    def column(self, name: str) -> list:
        """A plan column as a Python list, converted once (the runner reads rows by index for every image)."""
        if name not in self._columns:
            self._columns[name] = self.plan.table.column(name).to_pylist()
        return self._columns[name]

    # -- one work unit ---------------------------------------------------------------------------------------------

    def first_attempt(self, unit: int) -> Attempt:
        rows = [int(r) for r in self.units[unit]]
        seeds = self.column("seed")
        return Attempt(unit, 0, rows, [attempt_seed(seeds[r], 0) for r in rows])

    def render(self, task: Attempt) -> Rendered:
        images, finite, batches = render(self.model, self.latents[task.rows], task.seeds, self.cfg, self.delta)
        return Rendered(task, images, finite, batches)

    def check(self, done: Rendered) -> list[Event]:
        """Detect, align and check every image of a rendered attempt; at the last attempt every verdict is final."""
        task, keys = done.task, self.column("key")
        verdicts = self.checker(done.images, done.finite, self.latents[task.rows], self.protos[task.rows],
                                [f"{keys[r]} (attempt {task.attempt})" for r in task.rows])
        last = task.attempt == self.cfg.gate.max_retries
        return [Event(r, task.attempt, s, v, v.ok or last, img, done.batches)
                for r, s, v, img in zip(task.rows, task.seeds, verdicts, done.images)]

    def next_attempt(self, task: Attempt, events: list[Event]) -> Attempt | None:
        """The rows rejected at this attempt, together, with their next seeds (None when none is left)."""
        rows = [ev.row for ev in events if not ev.final]
        if not rows:
            return None
        seeds = self.column("seed")
        return Attempt(task.unit, task.attempt + 1, rows, [attempt_seed(seeds[r], task.attempt + 1) for r in rows])

    def unit_events(self, unit: int) -> Iterator[Event]:
        """Render the unit, check every image, retry the rejected ones with their next seeds (together, in order).

        The rows of an attempt are exactly the rows rejected at the previous one, so the batches, and hence the
        pixels, are the same in every run.
        """
        task: Attempt | None = self.first_attempt(unit)
        while task is not None:
            events = self.check(self.render(task))
            yield from events
            task = self.next_attempt(task, events)

    # -- the models ------------------------------------------------------------------------------------------------

    def optimize(self) -> dict | None:
        """Apply the generator's speed settings once, before the first batch (Arc2Face.optimize: torch.compile,
        channels_last, warm-up); returns its record of what was applied (None without a model)."""
        if self.optimized is None and self.model is not None:
            apply = getattr(self.model, "optimize", None)
            if apply is None:
                self.optimized = {"applied": "none (this generator has no optimize step)"}
            else:
                c = self.cfg
                result = apply(compile=c.compile, channels_last=c.channels_last, batch=self.batch, size=c.size,
                               steps=c.steps, guidance=c.guidance)
                self.optimized = dict(result) if isinstance(result, dict) else {"applied": str(result)}
        return self.optimized

    def placements(self) -> dict[str, str]:
        """Where each model runs (issue 12: "never silently on the CPU of a GPU run"): from each model's ``where``
        when it has one, else from its device or onnxruntime provider."""
        out: dict[str, str] = {}
        if self.model is not None:
            dtype = str(self.model.dtype).replace("torch.", "")
            out["arc2face"] = str(getattr(self.model, "where", None) or f"torch {self.model.device} ({dtype})")
        if self.checker is not None:
            encoder, detector = self.checker.encoder, self.checker.detector
            provider = getattr(encoder, "provider", None)
            out["arcface"] = str(getattr(encoder, "where", None)
                                 or (f"onnxruntime {provider}" if provider else type(encoder).__name__))
            out["mtcnn"] = f"torch {getattr(detector, 'device', 'unknown')}"
        return out

    @property
    def workers(self) -> int:
        """Post-processing threads: ``generate.workers``, where auto is 2 with the generator on CUDA and 0 on the CPU
        (there the renderer already uses every core; 2 threads measured 1.3x slower on 2 cores)."""
        if self.cfg.workers != "auto":
            return int(self.cfg.workers)
        device = getattr(self.model, "device", None)
        return 2 if isinstance(device, torch.device) and device.type == "cuda" else 0

    def worker_device(self) -> torch.device | None:
        """The CUDA device whose streams the post-processing threads use (the detector's, else the generator's)."""
        candidates = [getattr(self.checker, "detector", None), self.model]
        for thing in candidates:
            device = getattr(thing, "device", None)
            if isinstance(device, torch.device) and device.type == "cuda":
                return device
        return None


#: `generate` settings that never change a pixel (how the finishing work is spread over threads): left out of the
#: settings a resume compares, so they may differ between runs and shards. Everything else may change pixels.
PIXEL_NEUTRAL = ("workers", "queue")


def pixel_settings(cfg: GenerateConfig) -> dict:
    """The ``generate`` settings images depend on (all but :data:`PIXEL_NEUTRAL`), as recorded and compared."""
    dump = cfg.model_dump(mode="json")
    for key in PIXEL_NEUTRAL:
        dump.pop(key, None)
    return dump


def run_settings(plan: Plan, plan_path: Path, store: EmbeddingStore, cfg: GenerateConfig, align: AlignConfig,
                 model_info: dict, encoder_hash: str, shift: "RealismShift | None", shift_path: Path | None,
                 device: str, dtype: str) -> dict:
    """What every image depends on; a resumed run must match it exactly (``cfg.batch_size`` already a number)."""
    from digi2real.faces.align_stage import _settings as align_settings

    return {
        "plan_sha256": sha256_file(plan_path),
        "embeddings_sha256": store.fingerprint(),
        "generate": pixel_settings(cfg),
        "units": UNIT_SCHEME,
        "align": align_settings(align),
        "arc2face": {k: model_info.get(k) for k in ("repo", "base", "revision", "base_revision")},
        "arcface_sha256": encoder_hash,
        "shift_sha256": None if shift is None or cfg.shift_weight == 0 else sha256_file(shift_path),
        "device": device,
        "dtype": dtype,
    }


def check_units(out_dir: Path, old: dict, fix: str) -> None:
    """Refuse a dataset cut into other work units (an earlier version's: whole identities packed per batch), whose
    images this version would compute in other batches."""
    if old.get("units") != UNIT_SCHEME:
        was = old.get("units") or "whole identities packed per batch"
        raise ConfigError(f"{out_dir}: this dataset was started by an earlier digi2real with other work units ({was}; "
                          f"now {UNIT_SCHEME}), so its images cannot be computed again the same way; {fix}")


def check_settings(out_dir: Path, old: dict, new: dict) -> None:
    """Refuse to resume a dataset made with other settings (it would mix two kinds of images) or other units."""
    check_units(out_dir, old, "finish it with that version, or generate into a new output folder")
    diff = [f"{k} was {a!r}, now {b!r}" for k, a, b in settings_diff(old, new)]
    if diff:
        raise ConfigError(f"{out_dir}: this dataset was generated with other settings ({'; '.join(diff[:3])}); "
                          "use a new output folder, or the same settings to resume")


def recorded_batch(settings: dict) -> int | None:
    """The batch size a dataset's ``generation.json`` settings record (None when absent or not a positive number)."""
    generate = settings.get("generate")
    batch = generate.get("batch_size") if isinstance(generate, dict) else None
    return batch if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0 else None


def resolve_batch(model: "Arc2Face | None", cfg: GenerateConfig) -> tuple[int, str]:
    """``generate.batch_size`` as a number and where it came from: ``set`` in the config, ``auto`` from the model's
    free memory (Arc2Face.auto_batch_size), or ``fallback`` (:data:`FALLBACK_BATCH`: no model, or one that cannot
    say)."""
    if cfg.batch_size != "auto":
        return int(cfg.batch_size), "set"
    choose = getattr(model, "auto_batch_size", None) if model is not None else None
    if choose is None:
        return FALLBACK_BATCH, "fallback"
    return max(1, int(choose(cfg.size, cfg.guidance))), "auto"


#: The plan columns a manifest row copies.
ROW_COLUMNS = ("key", "identity", "image_index", "latent_index", "sample_row", "sample_path", "t", "seed")


def manifest_row(job: GenerationJob, ev: Event, unit_index: int, shard: Shard) -> dict:
    r = ev.row
    ident = job.column("identity")[r]
    k = job.column("image_index")[r]
    v = ev.verdict
    name = f"{ident}/{k}.{job.cfg.format}"
    return {
        "key": job.column("key")[r],
        "identity": ident,
        "image_index": k,
        "latent_index": job.column("latent_index")[r],
        "sample_row": job.column("sample_row")[r],
        "sample_path": job.column("sample_path")[r],
        "t": job.column("t")[r],
        "seed": job.column("seed")[r],
        "attempt": ev.attempt,
        "attempt_seed": ev.seed,
        "status": v.status,
        "reason": v.reason,
        "final": ev.final,
        "path": name if v.ok else None,
        "raw_path": f"{RAW_DIR}/{ident}/{k}.png" if v.ok and job.cfg.keep_raw else None,
        "shift_weight": job.cfg.shift_weight if job.delta is not None else 0.0,
        "detection": v.detection,
        "id_similarity": v.id_similarity,
        "proto_similarity": v.proto_similarity,
        "unit": unit_index,
        "batch": ev.batch,
        "shard": str(shard),
    }


# ------------------------------------------------------------------------------------------------------ the stage


@dataclass
class GenerateSummary:
    planned: int
    shard_images: int
    already_done: int
    written: int
    rejected: int
    retried: int
    seconds: float
    out_dir: Path
    run: dict = field(default_factory=dict)
    vectors: int = 0  # ArcFace vectors this shard's file keeps (embeddings/, read by `digi2real audit`)

    def lines(self) -> list[str]:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        return [
            f"{self.out_dir}: {self.written} images written ({rate:.2f}/s), {self.rejected} rejected after retries, "
            f"{self.retried} retries; {self.already_done} of this shard's {self.shard_images} were already done",
            *run_lines(self.run),
            f"ArcFace vectors kept: {self.vectors} in {self.out_dir / VECTORS_DIR} (for `digi2real audit`)",
            f"card: {self.out_dir / CARD_FILE}",
        ]


def run_lines(run: dict) -> list[str]:
    """Where the models ran and how the engine was set up, for the summary (the card says it per shard)."""
    if not run:
        return []
    models = run.get("models", {})
    engine = run.get("engine", {})
    workers = engine.get("workers")
    finishing = "finished in line" if workers == 0 else f"{workers} finishing threads"
    lines = [f"models: Arc2Face {models.get('arc2face', 'n/a')}; ArcFace {models.get('arcface', 'n/a')}; "
             f"MTCNN {models.get('mtcnn', 'n/a')}; batch {run.get('batch')} ({run.get('batch_source')}), "
             f"{finishing}"]
    generator, checker = str(models.get("arc2face", "")), str(models.get("arcface", ""))
    if "cuda" in generator and not any(word in checker.lower() for word in ("cuda", "gpu", "tensorrt")):
        lines.append(f"warning: Arc2Face ran on the GPU but the identity check on the CPU ({checker}): it may be "
                     "the bottleneck; install onnxruntime-gpu (see the README)")
    return lines


def embeddings_dir(plan: Plan, plan_path: Path, explicit: Path | None) -> Path:
    """The plan's embeddings: ``explicit`` (``--embeddings``), else the directory the plan records (relative to the
    plan file, see :func:`~digi2real.identity.plan.write_plan`)."""
    if explicit is not None:
        if not Path(explicit).is_dir():
            raise Digi2RealError(f"--embeddings {explicit}: directory not found; pass the embeddings directory the "
                                 "plan was made from (written by `digi2real embed`)")
        return Path(explicit)
    recorded = plan.meta.get("embeddings")
    if not recorded:
        raise Digi2RealError(f"{plan_path}: the plan does not say which embeddings it was made from; pass them with "
                             "--embeddings DIR")
    if not Path(recorded).is_dir():
        raise Digi2RealError(f"{recorded}: the embeddings directory recorded in the plan {plan_path} is not there; "
                             "pass its current location with --embeddings DIR")
    return Path(recorded)


def load_inputs(plan_path: Path, embeddings: Path | None) -> tuple[Plan, EmbeddingStore, np.ndarray, np.ndarray]:
    """The plan, its embeddings, and each row's SLERP conditioning embedding and prototype. Everything is checked
    here, before any model loads: a bad plan or store costs a second, not a model download."""
    plan = read_plan(plan_path)
    if len(plan) == 0:
        raise Digi2RealError(f"{plan_path}: the plan holds no rows; re-create it with `digi2real plan` from a "
                             "non-empty identity list")
    store = read_store(embeddings_dir(plan, plan_path, embeddings))
    latents = plan_latents(plan, store)
    protos = prototypes(store.embeddings, store.identities)
    index = {label: i for i, label in enumerate(protos.labels)}
    rows = protos.vectors[[index[i] for i in plan.table.column("identity").to_pylist()]].astype(np.float32)
    return plan, store, latents, rows


def check_output(out_dir: Path, inputs: list[Path | None], flag: str = "-o") -> None:
    """Refuse an output folder that overlaps an input (DESIGN "Safety"), is a file, or is an existing folder that
    `generate` did not make (its files could be overwritten by ours): before anything is loaded or written."""
    check_apart(out_dir, inputs, flag=flag)
    if out_dir.exists() and not out_dir.is_dir():
        raise Digi2RealError(f"{flag} {out_dir}: is a file, not a dataset folder; choose a new folder")
    if out_dir.is_dir() and not (out_dir / SETTINGS_FILE).exists():
        # generation.json is the first thing a run writes: without it, anything but a temporary or a lock is not ours.
        foreign = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))
        if foreign:
            raise Digi2RealError(f"{flag} {out_dir}: an existing folder that is not a digi2real dataset (it holds "
                                 f"{foreign[0]!r}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, and "
                                 f"no {SETTINGS_FILE}); choose a new or empty folder")


def _clean_temporaries(out_dir: Path, identities: list[str]) -> None:
    """Remove what killed writers left (``generation.json`` and ``card.md`` temporaries in the root, images in the
    identity folders this shard writes to). Other shards may write into the same folders at this moment: only
    temporaries whose writer process is dead (or, from another host, untouched for an hour) are removed
    (:func:`digi2real.fileio.clean_temporaries`), never a running shard's."""
    folders = [out_dir, out_dir / VECTORS_DIR, out_dir / VECTORS_DIR / PARTS_DIR]
    folders += [out_dir / sub / ident for sub in (IMAGES_DIR, RAW_DIR) for ident in identities]
    clean_temporaries(folders)


def attempt_vectors(job: GenerationJob, events: list[Event]) -> VectorRows:
    """The gate's ArcFace vector of every image an attempt accepted, with the variation measures the audit reads
    (landmarks in the aligned crop, the crop's brightness and contrast)."""
    from digi2real.audit.measures import crop_stats

    keys = job.column("key")
    good = [ev for ev in events if ev.verdict.ok and ev.verdict.embedding is not None]
    if not good:
        return VectorRows.concat([], job.embedding_dim, str(job.settings["arcface_sha256"]))
    brightness, contrast = crop_stats(np.stack([ev.verdict.crop for ev in good]))
    detections = [ev.verdict.detection or {} for ev in good]
    return VectorRows([keys[ev.row] for ev in good], np.array([ev.attempt for ev in good], np.int32),
                      np.stack([ev.verdict.embedding for ev in good]).astype(np.float32),
                      np.stack([aligned_landmarks(d.get("landmarks"), d.get("attempt")) for d in detections]),
                      brightness.astype(np.float32), contrast.astype(np.float32), str(job.settings["arcface_sha256"]))


def _write_outputs(job: GenerationJob, out_dir: Path, row: dict, ev: Event) -> None:
    # The plan's names were checked when it was read; confining them again guards against a symbolic link too.
    write_image(confine(out_dir / IMAGES_DIR, row["path"], f"plan {job.plan_path}"), ev.verdict.crop)
    if row["raw_path"]:
        write_image(confine(out_dir, row["raw_path"], f"plan {job.plan_path}"), ev.image)


def estimate(model: "Arc2Face", cfg: GenerateConfig, n_images: int, batch: int) -> dict:
    """Seconds per image on this device, from timing one guided UNet step and one VAE decode at the batch size."""
    batch = max(1, min(batch, n_images or 1))
    noise = model.initial_noise(list(range(batch)), cfg.size).to(model.device)
    cond = model.encode(np.eye(batch, 512, dtype=np.float32))
    scheduler = model.make_scheduler(cfg.steps)
    t = scheduler.timesteps[0]

    with torch.no_grad():  # warm-up on one image: lazy initialisation and kernel selection are not per-image costs
        model.unet_eps(noise[:1], t, cond[:1], cfg.guidance)
        model.decode(noise[:1])

    def timed(fn: Callable[[], Any]) -> float:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        step = timed(lambda: model.unet_eps(noise, t, cond, cfg.guidance))
        decode = timed(lambda: model.decode(noise))
    per_image = (step * cfg.steps + decode) / batch
    return {"step_seconds": step, "decode_seconds": decode, "batch": batch, "seconds_per_image": per_image}


def balance_line(loads: list[int]) -> str:
    """Each shard's images (all of them up to 16 shards, else the range) and the largest over the mean."""
    mean = sum(loads) / len(loads)
    ratio = max(loads) / mean if mean else 1.0
    shown = str(loads) if len(loads) <= 16 else f"{min(loads)} to {max(loads)}"
    return f"images per shard ({len(loads)} shards): {shown}; largest / mean = {ratio:.2f}"


def dry_run_lines(job: GenerationJob, shard: Shard, pending: int, shard_total: int, cfg: GenerateConfig,
                  timing: dict | None) -> list[str]:
    branches = 2 if cfg.guidance != 1.0 else 1
    evals = pending * cfg.steps * branches
    disk = pending * (DISK_BYTES[cfg.format] + DISK_BYTES["vectors"] + (DISK_BYTES["raw"] if cfg.keep_raw else 0))
    units = sum(shard.owns(i) for i in range(len(job.units)))
    lines = [
        f"plan: {len(job.plan)} images in {len(job.units)} work units of {job.batch} (batch {job.batch_source}); "
        f"this shard ({shard}): {shard_total} in {units} units; to make: {pending}",
    ]
    if shard.count > 1:
        lines.append(balance_line(shard_images(job.units, shard.count)))
    lines += [
        f"UNet evaluations: {evals:,} ({cfg.steps} steps x {branches} branches per image; retries add up to "
        f"{cfg.gate.max_retries}x that for rejected images)",
        f"disk: about {disk / 1e9:.2f} GB",
    ]
    if timing:
        total = timing["seconds_per_image"] * pending
        lines.append(f"time: about {timing['seconds_per_image']:.2f} s per image on {job.model.device} "
                     f"(one step of a batch of {timing['batch']}: {timing['step_seconds']:.2f} s, decode "
                     f"{timing['decode_seconds']:.2f} s) -> {total / 3600:.2f} h for this shard")
    return lines


def prepare_job(plan_path: Path, out_dir: Path | None, *, model: "Arc2Face | None", checker: FaceChecker | None,
                cfg: GenerateConfig, align: AlignConfig, shift: "RealismShift | None", shift_path: Path | None,
                embeddings: Path | None, encoder_hash: str,
                inputs: tuple[Plan, EmbeddingStore, np.ndarray, np.ndarray] | None = None,
                ) -> tuple[GenerationJob, EmbeddingStore]:
    """The job: ``inputs`` from :func:`load_inputs` when the caller checked them already (before loading models).

    ``batch_size: auto`` becomes the batch ``out_dir``'s ``generation.json`` records when the dataset is being
    resumed (its units must not change with the free memory of the machine that resumes it), else the model's
    choice (:func:`resolve_batch`); ``out_dir`` None: resolved afresh."""
    plan, store, latents, protos = inputs or load_inputs(plan_path, embeddings)
    delta = None
    if shift is not None and cfg.shift_weight != 0:
        delta = shift.delta
        if model is not None and tuple(delta.shape) != (77, model.hidden_size):
            raise Digi2RealError(f"{shift_path}: the shift has shape {tuple(delta.shape)}, this Arc2Face's "
                                 f"conditioning is 77 x {model.hidden_size}; re-create it with `digi2real shift` for "
                                 "this model")
    recorded = None
    if cfg.batch_size == "auto" and out_dir is not None and (Path(out_dir) / SETTINGS_FILE).is_file():
        recorded = recorded_batch(read_record(Path(out_dir), "resume")["settings"])
    batch, source = (recorded, "recorded") if recorded else resolve_batch(model, cfg)
    cfg = cfg.model_copy(update={"batch_size": batch})
    info = model.info if model is not None else {}
    device = model.device.type if model is not None else "cpu"
    dtype = str(model.dtype).replace("torch.", "") if model is not None else "float32"
    settings = run_settings(plan, plan_path, store, cfg, align, info, encoder_hash, shift, shift_path, device, dtype)
    job = GenerationJob(plan, plan_path, latents, protos, cfg, align, model, checker, delta, settings, source,
                        store.root)
    return job, store


def forecast(job: GenerationJob, out_dir: Path, shard: Shard, fresh: bool = False) -> list[str]:
    """The dry run's lines: this shard's images, the balance of all shards, the work, disk and time (timed here)."""
    keys = job.column("key")
    rows = read_rows(out_dir) if (out_dir / MANIFEST_DIR).is_dir() and not fresh else []
    done = final_keys(rows)
    mine = [u for i, u in enumerate(job.units) if shard.owns(i)]
    shard_total = sum(len(u) for u in mine)
    pending = sum(keys[r] not in done for u in mine for r in u)
    timing = estimate(job.model, job.cfg, pending, job.batch) if job.model is not None else None
    return dry_run_lines(job, shard, pending, shard_total, job.cfg, timing)


def _adopt_record(job: GenerationJob, out_dir: Path) -> None:
    """Resume a dataset: keep the batch it records when ours was not set by hand, then refuse other settings."""
    old = read_record(out_dir, "resume")["settings"]
    recorded = recorded_batch(old)
    if recorded and job.batch_source in ("auto", "fallback") and recorded != job.batch:
        job.use_batch(recorded, "recorded")
    check_settings(out_dir, old, job.settings)


def _run_record(job: GenerationJob) -> dict:
    """Where this run's models ran and how its engine was set up (not compared on resume: never changes pixels)."""
    return {
        "models": job.placements(),
        "optimize": job.optimize(),
        "engine": {"workers": job.workers, "queue": job.cfg.queue},
        "batch": job.batch,
        "batch_source": job.batch_source,
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _start_dataset(job: GenerationJob, out_dir: Path, record: dict, resuming: bool) -> dict:
    """Start the dataset or join it: ``generation.json`` created by the first shard (with where its models ran),
    checked by every other (``resuming``: checked already). Returns this run's record."""
    run = _run_record(job)
    if not resuming and not create_record(out_dir, {**record, "settings": job.settings, "engine": run}):
        batch = job.batch  # another shard started the dataset meanwhile: join it
        _adopt_record(job, out_dir)
        if job.batch != batch:
            job.optimized = None  # optimized for a batch no longer used
            run = _run_record(job)
    return run


class _Finisher:
    """The workers' half of an attempt: check its images, write the accepted ones, then append its manifest rows
    (under one lock, so appends never interleave; a unit's next attempt is scheduled only after, so its rows stay in
    order). Returns the unit's next attempt."""

    def __init__(self, job: GenerationJob, out_dir: Path, shard: Shard, rows: list[dict], writer: ManifestWriter,
                 bar: Any) -> None:
        self.job, self.out_dir, self.shard, self.writer, self.bar = job, out_dir, shard, writer, bar
        self.done = frozenset(final_keys(rows))  # read-only from here: a key is finalised by its own unit alone
        self.recorded = frozenset((r["key"], r["attempt"]) for r in rows)
        self.lock = threading.Lock()
        self.written = self.rejected = self.retried = 0

    def __call__(self, rendered: Rendered) -> Attempt | None:
        job, keys = self.job, self.job.column("key")
        events = job.check(rendered)
        rows: list[dict] = []
        for ev in events:
            key = keys[ev.row]
            if key in self.done or (key, ev.attempt) in self.recorded:
                continue  # computed only so that the unit's batches are the same as in the first run
            row = manifest_row(job, ev, rendered.task.unit, self.shard)
            if ev.verdict.ok:
                _write_outputs(job, self.out_dir, row, ev)
            rows.append(row)
        if rows:  # like the images, before the rows that name them
            write_part(self.out_dir, rendered.task.unit, rendered.task.attempt, attempt_vectors(job, events))
        with self.lock:
            self.writer.append(rows)  # after the images: a row never names a file that is not there
            for row in rows:
                if row["final"]:
                    self.written += row["status"] == OK
                    self.rejected += row["status"] != OK
                    self.bar.update(1)
                else:
                    self.retried += 1
            self.bar.set_postfix(rejected=self.rejected, retries=self.retried, refresh=False)
        return job.next_attempt(rendered.task, events)


def generate_dataset(job: GenerationJob, out_dir: Path, *, shard: Shard = Shard(), progress: bool = True,
                     dry_run: bool = False, fresh: bool = False, extra: dict | None = None,
                     shift_path: Path | None = None, embeddings: Path | None = None) -> GenerateSummary | list[str]:
    """Make (or finish) this shard's part of the dataset; write the card. ``dry_run`` returns the forecast instead
    (``fresh``: as if ``out_dir`` were empty, for a dataset about to be replaced)."""
    from digi2real.dataset.card import write_card

    start = time.perf_counter()
    if dry_run:
        return forecast(job, out_dir, shard, fresh)
    source = Path(embeddings or job.embeddings_dir or job.plan.meta.get("embeddings"))
    check_output(out_dir, [job.plan_path, source, shift_path if job.delta is not None else None])
    resuming = (out_dir / SETTINGS_FILE).exists()
    if resuming:  # refused here, before anything is written or optimized: other settings, a damaged run record
        _adopt_record(job, out_dir)
        read_run_records(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "plan": str(job.plan_path.resolve()),
        "embeddings": str(source.resolve()),
        "shift": str(shift_path.resolve()) if shift_path and job.delta is not None else None,
        "planned_images": len(job.plan),
        "identities": len(set(job.column("identity"))),
        "plan_meta": job.plan.meta,
        "digi2real_version": digi2real.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "align_config": job.align.model_dump(mode="json"),
        **(extra or {}),
    }
    run = _start_dataset(job, out_dir, record, resuming)  # generation.json first: it marks the folder as ours
    writer = ManifestWriter(out_dir / MANIFEST_DIR / manifest_name(shard))  # a second process on this shard: refused
    try:
        rows = read_rows(out_dir)  # under the lock, so exact; a corrupt row is refused before anything is written
        write_run_record(out_dir, shard, run)
        summary = _generate_shard(job, out_dir, shard, rows, writer, progress)
    finally:
        writer.close()
    # this shard's vectors merged into its file only once its run ended normally; parts a kill leaves are merged
    # by the next run of the shard
    summary.vectors = merge_shard(out_dir, manifest_name(shard), shard.owns, read_rows(out_dir),
                                  str(job.settings["arcface_sha256"]), job.embedding_dim)
    write_card(out_dir)
    summary.seconds, summary.run = time.perf_counter() - start, run
    return summary


def _generate_shard(job: GenerationJob, out_dir: Path, shard: Shard, rows: list[dict], writer: ManifestWriter,
                    progress: bool) -> GenerateSummary:
    """This shard's units that lack a final row for any image, rendered and finished by the engine."""
    from tqdm.auto import tqdm

    for name in ROW_COLUMNS:  # converted here, once, rather than by two workers at a time
        job.column(name)
    keys, idents = job.column("key"), job.column("identity")
    mine = [(i, u) for i, u in enumerate(job.units) if shard.owns(i)]
    shard_total = sum(len(u) for _, u in mine)
    _clean_temporaries(out_dir, list(dict.fromkeys(idents[r] for _, u in mine for r in u)))
    done = final_keys(rows)
    todo = [i for i, u in mine if any(keys[r] not in done for r in u)]
    already = shard_total - sum(keys[r] not in done for _, u in mine for r in u)
    bar = tqdm(total=shard_total, initial=already, unit="img", desc=f"generate {shard}", disable=not progress,
               dynamic_ncols=True, smoothing=0.05)
    finisher = _Finisher(job, out_dir, shard, rows, writer, bar)
    try:
        Engine(job.render, finisher, job.workers, job.cfg.queue, job.worker_device()).run(
            job.first_attempt(i) for i in todo)
    finally:
        bar.close()
    return GenerateSummary(len(job.plan), shard_total, already, finisher.written, finisher.rejected,
                           finisher.retried, 0.0, out_dir)


def regenerate(job: GenerationJob, key: str) -> tuple[np.ndarray | None, Event]:
    """Recompute one image exactly: its whole work unit, through the attempts, until the key's final attempt.

    Returns (the aligned crop or None when the image was rejected, its final event)."""
    keys = job.column("key")
    try:
        row = keys.index(key)
    except ValueError:
        raise Digi2RealError(f"{key!r} is not a key of the plan {job.plan_path}; keys look like "
                             f"{keys[0]!r}") from None
    job.optimize()  # the same kernels as the run that made it
    for ev in job.unit_events(row // job.batch):  # consecutive units: row r is in unit r // batch
        if ev.row == row and ev.final:
            return (ev.verdict.crop if ev.verdict.ok else None), ev
    raise AssertionError("every row of a unit ends in a final attempt")
