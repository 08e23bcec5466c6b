"""`generate`: every plan row rendered by Arc2Face, aligned, checked and written as a training set (paper section 3,
"Dataset Generation"; DESIGN "dataset").

The dataset directory holds ``images/<identity>/<k>.png`` (112 x 112 ArcFace crops), ``manifest/*.jsonl`` (one row
per attempt at an image: its plan row, seeds, detection, identity similarities and status), ``generation.json`` (the
settings and inputs every image depends on) and ``card.md``.

Reproducibility rests on two rules:

* every image's latent noise comes from its own seed (the plan's, or one derived from it for a retry), never from a
  shared stream;
* images are computed in *work units* fixed by the plan and the batch size alone: whole identities packed in plan
  order up to ``batch_size`` images (a larger identity is cut into ``batch_size`` chunks). A kernel's result can depend
  on the batch it runs in, so a unit is always computed whole, whatever the shard count and however often the run was
  interrupted. Shards own units (``unit % N``), so they own whole identities.

Crash safety: an image is written under a temporary name and renamed, then its manifest row is appended; a unit
with any image lacking a final row is recomputed whole on the next run, writing only what is missing.
"""

from __future__ import annotations

import hashlib
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
from digi2real.fileio import check_apart, clean_temporaries, confine, sha256_file, write_json
from digi2real.generation.manifest import (  # noqa: F401 - re-exported: the dataset's files, read through one module
    CARD_FILE,
    IMAGES_DIR,
    MANIFEST_DIR,
    RAW_DIR,
    SETTINGS_FILE,
    ManifestWriter,
    final_keys,
    manifest_name,
    read_record,
    read_rows,
)
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
DISK_BYTES = {"png": 24_000, "jpg": 5_000, "raw": 420_000}


# ------------------------------------------------------------------------------------------------------ seeds, units


def attempt_seed(seed: int, attempt: int) -> int:
    """The noise seed of an image's ``attempt``-th try: the plan's seed first, then seeds derived from it."""
    if attempt == 0:
        return int(seed)
    text = f"digi2real|retry|{int(seed)}|{attempt}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def work_units(identities: list[str], batch_size: int) -> list[np.ndarray]:
    """Plan rows grouped into the batches they are always computed in (see the module doc).

    Consecutive rows of one identity form a block; blocks are packed in order while they fit in ``batch_size``; a
    block larger than ``batch_size`` is cut into chunks of ``batch_size`` rows, each a unit of its own.
    """
    blocks: list[list[int]] = []
    for row, ident in enumerate(identities):
        if blocks and identities[blocks[-1][0]] == ident:
            blocks[-1].append(row)
        else:
            blocks.append([row])
    units: list[list[int]] = []
    current: list[int] = []
    for block in blocks:
        if len(block) > batch_size:
            if current:
                units.append(current)
                current = []
            units.extend(block[i : i + batch_size] for i in range(0, len(block), batch_size))
        elif len(current) + len(block) > batch_size:
            units.append(current)
            current = list(block)
        else:
            current.extend(block)
    if current:
        units.append(current)
    return [np.asarray(u, dtype=np.int64) for u in units]


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

    def __call__(self, images: np.ndarray, finite: np.ndarray, cond: np.ndarray, protos: np.ndarray,
                 names: list[str]) -> list[Verdict]:
        from digi2real.faces.detect import detect_and_align

        inputs: list[Any] = [img if ok else ValueError(f"{name}: the generated image has NaN or infinite values")
                             for img, ok, name in zip(images, finite, names)]
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
                v.id_similarity = round(float(emb[j] @ cond[i]), 6)
                v.proto_similarity = round(float(emb[j] @ protos[i]), 6)
                ref = v.id_similarity if self.against == "conditioning" else v.proto_similarity
                if self.min_similarity is not None and ref < self.min_similarity:
                    v.status = LOW_SIMILARITY
                    v.reason = (f"{names[i]}: ArcFace cosine {ref:.3f} to its {self.against} is below the gate's "
                                f"{self.min_similarity}")
        return verdicts


# ------------------------------------------------------------------------------------------------------ the job


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
    settings. Built by :func:`prepare_job`; :meth:`unit_events` is the algorithm for one work unit."""

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
    units: list[np.ndarray]
    embeddings_dir: Path | None = None

    _columns: dict[str, list] = field(default_factory=dict, repr=False)

    def column(self, name: str) -> list:
        """A plan column as a Python list, converted once (the runner reads rows by index for every image)."""
        if name not in self._columns:
            self._columns[name] = self.plan.table.column(name).to_pylist()
        return self._columns[name]

    def unit_events(self, unit: np.ndarray) -> Iterator[Event]:
        """Render the unit, check every image, retry the rejected ones with their next seeds (together, in order).

        The rows of an attempt are exactly the rows rejected at the previous one, so the batches, and hence the
        pixels, are the same in every run.
        """
        keys, seeds = self.column("key"), self.column("seed")
        pending = [int(r) for r in unit]
        for attempt in range(self.cfg.gate.max_retries + 1):
            if not pending:
                return
            tries = [attempt_seed(seeds[r], attempt) for r in pending]
            images, finite, batches = render(self.model, self.latents[pending], tries, self.cfg, self.delta)
            verdicts = self.checker(images, finite, self.latents[pending], self.protos[pending],
                                    [f"{keys[r]} (attempt {attempt})" for r in pending])
            last = attempt == self.cfg.gate.max_retries
            for r, s, v, img in zip(pending, tries, verdicts, images):
                yield Event(r, attempt, s, v, v.ok or last, img, batches)
            pending = [r for r, v in zip(pending, verdicts) if not v.ok]


def run_settings(plan: Plan, plan_path: Path, store: EmbeddingStore, cfg: GenerateConfig, align: AlignConfig,
                 model_info: dict, encoder_hash: str, shift: "RealismShift | None", shift_path: Path | None,
                 device: str, dtype: str) -> dict:
    """What every image depends on; a resumed run must match it exactly."""
    from digi2real.faces.align_stage import _settings as align_settings

    return {
        "plan_sha256": sha256_file(plan_path),
        "embeddings_sha256": store.fingerprint(),
        "generate": cfg.model_dump(mode="json"),
        "align": align_settings(align),
        "arc2face": {k: model_info.get(k) for k in ("repo", "base", "revision", "base_revision")},
        "arcface_sha256": encoder_hash,
        "shift_sha256": None if shift is None or cfg.shift_weight == 0 else sha256_file(shift_path),
        "device": device,
        "dtype": dtype,
    }


def check_or_write_settings(out_dir: Path, record: dict) -> None:
    """Start a dataset, or refuse to resume one made with other settings (it would mix two kinds of images)."""
    path = out_dir / SETTINGS_FILE
    if path.exists():
        old = read_record(out_dir, "resume")
        diff = [f"{k} was {a!r}, now {b!r}" for k, a, b in settings_diff(old["settings"], record["settings"])]
        if diff:
            raise ConfigError(f"{out_dir}: this dataset was generated with other settings ({'; '.join(diff[:3])}); "
                              "use a new output folder, or the same settings to resume")
        return
    write_json(path, record)


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

    def lines(self) -> list[str]:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        return [
            f"{self.out_dir}: {self.written} images written ({rate:.2f}/s), {self.rejected} rejected after retries, "
            f"{self.retried} retries; {self.already_done} of this shard's {self.shard_images} were already done",
            f"card: {self.out_dir / CARD_FILE}",
        ]


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
    """Remove what killed writers left (``generation.json`` and ``card.md`` temporaries in the root, images in this
    shard's identity folders); a running shard's temporaries are never touched, even in a shared folder."""
    folders = [out_dir] + [out_dir / sub / ident for sub in (IMAGES_DIR, RAW_DIR) for ident in identities]
    clean_temporaries(folders)


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


def dry_run_lines(job: GenerationJob, pending: int, shard_images: int, cfg: GenerateConfig,
                  timing: dict | None) -> list[str]:
    branches = 2 if cfg.guidance != 1.0 else 1
    evals = pending * cfg.steps * branches
    disk = pending * (DISK_BYTES[cfg.format] + (DISK_BYTES["raw"] if cfg.keep_raw else 0))
    lines = [
        f"plan: {len(job.plan)} images; this shard: {shard_images} in {len(job.units)} work units in all; "
        f"to make: {pending}",
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
    """The job: ``inputs`` from :func:`load_inputs` when the caller checked them already (before loading models)."""
    plan, store, latents, protos = inputs or load_inputs(plan_path, embeddings)
    delta = None
    if shift is not None and cfg.shift_weight != 0:
        delta = shift.delta
        if model is not None and tuple(delta.shape) != (77, model.hidden_size):
            raise Digi2RealError(f"{shift_path}: the shift has shape {tuple(delta.shape)}, this Arc2Face's "
                                 f"conditioning is 77 x {model.hidden_size}; re-create it with `digi2real shift` for "
                                 "this model")
    info = model.info if model is not None else {}
    device = model.device.type if model is not None else "cpu"
    dtype = str(model.dtype).replace("torch.", "") if model is not None else "float32"
    settings = run_settings(plan, plan_path, store, cfg, align, info, encoder_hash, shift, shift_path, device, dtype)
    units = work_units(plan.table.column("identity").to_pylist(), cfg.batch_size if cfg.batch_size != "auto" else 8)
    job = GenerationJob(plan, plan_path, latents, protos, cfg, align, model, checker, delta, settings, units,
                        store.root)
    return job, store


def generate_dataset(job: GenerationJob, out_dir: Path, *, shard: Shard = Shard(), progress: bool = True,
                     dry_run: bool = False, fresh: bool = False, extra: dict | None = None,
                     shift_path: Path | None = None, embeddings: Path | None = None) -> GenerateSummary | list[str]:
    """Make (or finish) this shard's part of the dataset; write the card. ``dry_run`` returns the forecast instead
    (``fresh``: as if ``out_dir`` were empty, for a dataset about to be replaced)."""
    from tqdm.auto import tqdm

    from digi2real.dataset.card import write_card

    start = time.perf_counter()
    keys = job.column("key")
    mine = [(i, u) for i, u in enumerate(job.units) if shard.owns(i)]
    shard_images = sum(len(u) for _, u in mine)
    rows = read_rows(out_dir) if (out_dir / MANIFEST_DIR).is_dir() and not fresh else []
    done = final_keys(rows)
    todo = [(i, u) for i, u in mine if any(keys[r] not in done for r in u)]
    pending = sum(sum(keys[r] not in done for r in u) for _, u in todo)
    already = shard_images - pending
    if dry_run:
        timing = estimate(job.model, job.cfg, pending, len(job.units[0]) if job.units else 1) \
            if job.model is not None else None
        return dry_run_lines(job, pending, shard_images, job.cfg, timing)

    source = Path(embeddings or job.embeddings_dir or job.plan.meta.get("embeddings"))
    check_output(out_dir, [job.plan_path, source, shift_path if job.delta is not None else None])
    out_dir.mkdir(parents=True, exist_ok=True)
    idents = job.column("identity")
    _clean_temporaries(out_dir, list(dict.fromkeys(idents[r] for _, u in mine for r in u)))
    record = {
        "settings": job.settings,
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
    check_or_write_settings(out_dir, record)
    recorded = {(r["key"], r["attempt"]) for r in rows}
    writer = ManifestWriter(out_dir / MANIFEST_DIR / manifest_name(shard))
    written = rejected = retried = 0
    bar = tqdm(total=shard_images, initial=already, unit="img", desc=f"generate {shard}", disable=not progress,
               dynamic_ncols=True, smoothing=0.05)
    try:
        for unit_index, unit in todo:
            out_rows: list[dict] = []
            for ev in job.unit_events(unit):
                key = keys[ev.row]
                if key in done or (key, ev.attempt) in recorded:
                    continue  # computed only so that the unit's batches are the same as in the first run
                row = manifest_row(job, ev, unit_index, shard)
                if ev.verdict.ok:
                    _write_outputs(job, out_dir, row, ev)
                out_rows.append(row)
                if ev.final:
                    done.add(key)
                    written += ev.verdict.ok
                    rejected += not ev.verdict.ok
                    bar.update(1)
                else:
                    retried += 1
            writer.append(out_rows)
            bar.set_postfix(rejected=rejected, retries=retried, refresh=False)
    finally:
        bar.close()
        writer.close()
    write_card(out_dir)
    return GenerateSummary(len(job.plan), shard_images, already, written, rejected, retried,
                           time.perf_counter() - start, out_dir)


def regenerate(job: GenerationJob, key: str) -> tuple[np.ndarray | None, Event]:
    """Recompute one image exactly: its whole work unit, through the attempts, until the key's final attempt.

    Returns (the aligned crop or None when the image was rejected, its final event)."""
    keys = job.column("key")
    try:
        row = keys.index(key)
    except ValueError:
        raise Digi2RealError(f"{key!r} is not a key of the plan {job.plan_path}; keys look like "
                             f"{keys[0]!r}") from None
    unit = next(u for u in job.units if row in set(u.tolist()))
    for ev in job.unit_events(unit):
        if ev.row == row and ev.final:
            return (ev.verdict.crop if ev.verdict.ok else None), ev
    raise AssertionError("every row of a unit ends in a final attempt")
