"""`digi2real run`: every stage of the method in order, from identities to the benchmark table (DESIGN "stages").

Each stage has a *fingerprint*: a hash of the settings it reads and of the fingerprints of the stages it consumes.
``pipeline.json`` records, per stage, the fingerprint its outputs were made with and whether it completed. A stage is
skipped when its recorded fingerprint matches and it completed; resumed (its own resume logic continues the work) when
it matches but did not complete; and re-run from scratch when the fingerprint changed, its old outputs moved aside to
``stale/`` first so that old and new results are never mixed. A changed setting thus re-runs its stage and, through
the fingerprints, every stage after it, and nothing else.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from digi2real.config import ExperimentConfig
from digi2real.errors import Digi2RealError
from digi2real.fileio import clean_temporaries, read_json, sha256_json, write_json, write_text
from digi2real.layout import RunLayout
from digi2real.liveness import START_TIMEOUT, WAIT_TIMEOUT, Heartbeat, Waiter, Watch
from digi2real.sources.domains import REAL_TEST, REAL_TRAIN

STAGES = ("embed", "select", "plan", "shift", "generate", "audit", "pack", "train", "eval", "report")
#: Stages every process takes part in when `run` is launched by torchrun/Slurm: generation (each process its shard)
#: and training (DDP). The others run on rank 0 while the rest wait for them in pipeline.json.
COLLECTIVE = ("generate", "train")
#: How often rank 0 counts the finished images of the other shards (reading every manifest is not free at 400K rows).
SHARD_POLL_SECONDS = 10.0


# ------------------------------------------------------------------------------------------------------ settings


def resolved_config(cfg: ExperimentConfig, layout: RunLayout) -> ExperimentConfig:
    """The config with the run's own paths filled in: the miniature models (demo), the training data (the packed set,
    or the generated folder) and, in miniature runs, the procedural verification set and real photos."""
    cfg = cfg.model_copy(deep=True)
    if cfg.miniature:
        from digi2real.miniature import shipped_models

        repo, base = shipped_models()
        cfg.encoder.model = str(repo / "arcface.onnx")
        cfg.arc2face.repo = str(repo)
        cfg.arc2face.base = str(base)
        cfg.eval.pairs = {"procedural": layout.benchmarks / "procedural" / "pairs.txt", **cfg.eval.pairs}
        if cfg.shift.real is None:
            cfg.shift.real = layout.models / "real"
    cfg.train.data.path = layout.packed if cfg.pack.enabled else layout.dataset
    return cfg


def _dump(section: Any) -> Any:
    return section.model_dump(mode="json")


def stage_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """What each stage reads from the config (and nothing else, so an unrelated change does not re-run it)."""
    return {
        "embed": {"source": _dump(cfg.source), "encoder": _dump(cfg.encoder), "embed": _dump(cfg.embed)},
        "select": {"select": _dump(cfg.select)},
        "plan": {"plan": _dump(cfg.plan)},
        "shift": {"shift": _dump(cfg.shift), "arc2face": _dump(cfg.arc2face), "align": _dump(cfg.align)},
        # workers and queue never change an image: changing them must not re-run generation
        "generate": {"generate": {k: v for k, v in _dump(cfg.generate).items() if k not in ("workers", "queue")},
                     "align": _dump(cfg.align), "arc2face": _dump(cfg.arc2face)},
        "audit": {"audit": _dump(cfg.audit), "references": [str(p) for p in audit_references(cfg)],
                  "encoder": _dump(cfg.encoder)},
        "pack": {"pack": _dump(cfg.pack)},
        "train": {"train": _dump(cfg.train)},
        "eval": {"eval": _dump(cfg.eval)},
        "report": {"report": _dump(cfg.report), "name": cfg.name},
    }


UPSTREAM = {
    "embed": (), "select": ("embed",), "plan": ("select",), "shift": ("embed",), "generate": ("plan", "shift"),
    "audit": ("generate",), "pack": ("generate",), "train": ("pack",), "eval": ("train",),
    "report": ("embed", "select", "plan", "shift", "generate", "audit", "pack", "train", "eval"),
}


def _run_relative(obj: Any, root: str) -> Any:
    """Paths inside the run directory written relative to it, so a moved or copied run keeps its fingerprints."""
    if isinstance(obj, dict):
        return {k: _run_relative(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_run_relative(v, root) for v in obj]
    if isinstance(obj, str) and (obj == root or obj.startswith(root + "/")):
        return "<run>" + obj[len(root):]
    return obj


def fingerprints(cfg: ExperimentConfig) -> dict[str, str]:
    """Each stage's fingerprint: its settings plus its inputs' fingerprints (so changes flow downstream)."""
    settings = _run_relative(stage_settings(cfg), str(Path(cfg.output_dir)))
    out: dict[str, str] = {}
    for stage in STAGES:
        out[stage] = sha256_json({"settings": settings[stage], "inputs": [out[u] for u in UPSTREAM[stage]],
                                  "miniature": cfg.miniature})[:16]
    return out


# ------------------------------------------------------------------------------------------------------ state


STATE_FIX = ("delete it to redo every stage (outputs made before are moved to stale/, never deleted), or restore it "
             "from a backup")
#: The fields of a stage record that decisions read, with their types.
RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {"fingerprint": str, "complete": bool, "session": str,
                                                     "finished_session": str, "action": str}


@dataclass
class RunState:
    path: Path
    stages: dict[str, dict]

    @classmethod
    def load(cls, path: Path) -> "RunState":
        """The recorded state, checked: a file that is not JSON, not ``{"stages": {name: {...}}}``, or whose records
        have fields of the wrong type is refused in one line naming it (never a traceback)."""
        if not path.exists():
            return cls(path, {})
        data = read_json(path, fix=STATE_FIX, keys={"stages": dict})
        for name, rec in data["stages"].items():
            if not isinstance(rec, dict):
                raise Digi2RealError(f"{path}: corrupt (the record of stage {str(name)[:40]!r} is a "
                                     f"{type(rec).__name__}, not an object); {STATE_FIX}")
            for key, kind in RECORD_FIELDS.items():
                if key in rec and not isinstance(rec[key], kind):
                    raise Digi2RealError(f"{path}: corrupt ({key!r} of stage {str(name)[:40]!r} is a "
                                         f"{type(rec[key]).__name__}); {STATE_FIX}")
        return cls(path, dict(data["stages"]))

    def save(self) -> None:
        write_json(self.path, {"stages": self.stages})

    def status(self, stage: str, fingerprint: str) -> str:
        """skip (done with these settings), resume (started with them), rerun (other settings) or run (never ran)."""
        rec = self.stages.get(stage)
        if rec is None:
            return "run"
        if rec.get("fingerprint") != fingerprint:
            return "rerun"
        return "skip" if rec.get("complete") else "resume"


def stage_outputs(layout: RunLayout, stage: str) -> list[Path]:
    from digi2real.generation.shift import features_path
    from digi2real.identity.select import meta_path_for

    return {
        "embed": [layout.embeddings], "select": [layout.ids, meta_path_for(layout.ids)], "plan": [layout.plan],
        "shift": [layout.shift, features_path(layout.shift)], "generate": [layout.dataset], "audit": [layout.audit],
        "pack": [layout.packed],
        "train": [layout.train], "eval": [layout.eval], "report": [layout.report],
    }[stage]


def move_aside(layout: RunLayout, stage: str, old_fingerprint: str | None) -> Path | None:
    """Move a stage's outputs made with other settings to ``stale/<stage>-<fingerprint>/`` (never deleted here)."""
    present = [p for p in stage_outputs(layout, stage) if p.exists()]
    if not present:
        return None
    dest = layout.root / "stale" / f"{stage}-{(old_fingerprint or 'unknown')[:8]}-{time.strftime('%Y%m%d%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in present:
        shutil.move(str(p), str(dest / p.name))
    return dest


# ------------------------------------------------------------------------------------------------------ stages


@dataclass
class Context:
    cfg: ExperimentConfig
    layout: RunLayout
    progress: bool
    say: Callable[[str], None]
    rank: int = 0
    world: int = 1
    session: str = ""
    start_timeout: float = START_TIMEOUT
    wait_timeout: float = WAIT_TIMEOUT

    @property
    def main(self) -> bool:
        return self.rank == 0


def _encoder(ctx: Context):
    from digi2real.faces.arcface import ArcFaceEncoder

    return ArcFaceEncoder.load(ctx.cfg.encoder)


def _generator(ctx: Context):
    from digi2real.generation.arc2face import Arc2Face

    a = ctx.cfg.arc2face
    return Arc2Face.from_pretrained(a.repo, a.base, a.device, a.dtype)


def run_embed(ctx: Context) -> bool:
    from digi2real.identity.embed import embed_source
    from digi2real.sources import open_source

    s = embed_source(open_source(ctx.cfg.source), _encoder(ctx), ctx.layout.embeddings, ctx.cfg.embed,
                     progress=ctx.progress)
    ctx.say(f"embedded {s.embedded} images of {s.identities} identities -> {ctx.layout.embeddings}")
    return True


def run_select(ctx: Context) -> bool:
    from digi2real.identity.select import select_identities, write_selection
    from digi2real.identity.store import read_store

    selection = select_identities(read_store(ctx.layout.embeddings), ctx.cfg.select)
    write_selection(ctx.layout.ids, selection)
    ctx.say(f"selected {len(selection.identities)} identities -> {ctx.layout.ids}")
    return True


def run_plan(ctx: Context) -> bool:
    from digi2real.fileio import sha256_file
    from digi2real.identity.plan import make_plan, write_plan
    from digi2real.identity.select import read_selection
    from digi2real.identity.store import read_store

    ids = read_selection(ctx.layout.ids)
    plan = make_plan(read_store(ctx.layout.embeddings), ids, ctx.cfg.plan,
                     inputs={"ids_file": str(ctx.layout.ids), "ids_sha256": sha256_file(ctx.layout.ids)})
    write_plan(ctx.layout.plan, plan)
    ctx.say(f"planned {len(plan)} images -> {ctx.layout.plan}")
    return True


def run_shift(ctx: Context) -> bool:
    from digi2real.generation.shift import format_gap, make_shift

    if ctx.cfg.shift.real is None:
        ctx.say("no shift.real configured: generating without the realism shift")
        return True
    synthetic = ctx.cfg.shift.synthetic or ctx.layout.embeddings
    shift = make_shift(ctx.cfg.shift.real, synthetic, ctx.layout.shift, _generator(ctx), _encoder(ctx),
                       ctx.cfg.shift, ctx.cfg.align, progress=ctx.progress)
    ctx.say(f"realism shift from {shift.meta.get('n_real')} real and {shift.meta.get('n_synthetic')} synthetic faces "
            f"-> {ctx.layout.shift}")
    for line in format_gap(shift.meta):
        ctx.say(f"  {line}")
    return True


def _generation_job(ctx: Context, dry_run: bool = False, fresh: bool = False):
    """The generation job of this run (``fresh``: for a dataset about to be replaced, whose recorded batch size a
    ``batch_size: auto`` does not keep)."""
    from digi2real.faces.mtcnn import MTCNN
    from digi2real.generation.runner import FaceChecker, prepare_job
    from digi2real.generation.shift import read_shift

    model, encoder = _generator(ctx), _encoder(ctx)
    shift_path = ctx.layout.shift if ctx.layout.shift.is_file() else None
    shift = read_shift(shift_path, hidden=model.hidden_size) if shift_path else None
    gate = ctx.cfg.generate.gate
    checker = None if dry_run else FaceChecker(MTCNN.from_package(ctx.cfg.align.detector), encoder, ctx.cfg.align,
                                               gate.min_similarity, gate.against)
    job, _ = prepare_job(ctx.layout.plan, None if fresh else ctx.layout.dataset, model=model, checker=checker,
                         cfg=ctx.cfg.generate, align=ctx.cfg.align, shift=shift, shift_path=shift_path,
                         embeddings=ctx.layout.embeddings, encoder_hash=encoder.file_hash())
    return job, shift_path


def run_generate(ctx: Context) -> bool:
    from digi2real.generation.runner import final_keys, generate_dataset, read_rows
    from digi2real.sharding import shard_from_env

    job, shift_path = _generation_job(ctx)
    shard = shard_from_env()
    summary = generate_dataset(job, ctx.layout.dataset, shard=shard, progress=ctx.progress, shift_path=shift_path,
                               embeddings=ctx.layout.embeddings,
                               extra={"encoder": ctx.cfg.encoder.model_dump(mode="json"),
                                      "arc2face_config": ctx.cfg.arc2face.model_dump(mode="json")})
    for line in summary.lines():
        ctx.say(line)
    done = len(final_keys(read_rows(ctx.layout.dataset)))
    if ctx.world > 1 and ctx.main and done < len(job.plan):
        done = _wait_for_shards(ctx, len(job.plan))
    if done < len(job.plan):
        ctx.say(f"generate: {done} of {len(job.plan)} images finished (other shards still running?); the stages "
                "after it wait until every shard is done")
        return False
    return True


def _wait_for_shards(ctx: Context, planned: int) -> int:
    """Rank 0, its own shard done: wait until every shard's images are final (the other ranks write their own
    manifests); give up when a rank never started, exited, or stopped beating (digi2real.liveness)."""
    from digi2real.generation.manifest import final_keys, read_rows

    def finished() -> int | None:
        done = len(final_keys(read_rows(ctx.layout.dataset)))
        return done if done >= planned else None

    watches = {f"rank {r}": Watch(ctx.layout.heartbeat(r), ctx.session) for r in range(1, ctx.world)}
    waiter = Waiter(watches, "rank 0", ctx.layout.dataset / "manifest", ctx.start_timeout, ctx.wait_timeout, ctx.say)
    return waiter.until(finished, f"the other {ctx.world - 1} processes' shards of the {planned} images",
                        poll=SHARD_POLL_SECONDS)


def audit_references(cfg: ExperimentConfig) -> list[Path]:
    """What `run` audits the generated set against: the real faces of the shift, the verification sets of
    ``eval.pairs``, the benchmarks of ``eval.data_root`` that are there (.bin files, IJB folders, RFW), and
    ``audit.against``."""
    from digi2real.evaluation.rfw import find_rfw_bins
    from digi2real.evaluation.run import IJB_DIRS, VERIFICATION_SETS

    refs: list[Path] = []
    if cfg.shift.real is not None:
        refs.append(Path(cfg.shift.real))
    refs += [Path(p) for p in cfg.eval.pairs.values()]
    root = cfg.eval.data_root
    if root is not None and Path(root).is_dir():
        for bench in dict.fromkeys(cfg.eval.benchmarks):
            if bench in VERIFICATION_SETS and (Path(root) / f"{bench}.bin").is_file():
                refs.append(Path(root) / f"{bench}.bin")
            elif bench in IJB_DIRS and (Path(root) / IJB_DIRS[bench]).is_dir():
                refs.append(Path(root) / IJB_DIRS[bench])
            elif bench == "rfw":
                refs += [p for p in find_rfw_bins(Path(root)).values() if p is not None]
    refs += [Path(p) for p in cfg.audit.against]
    return list(dict.fromkeys(refs))


def run_audit(ctx: Context) -> bool:
    if not ctx.cfg.audit.enabled:
        ctx.say("audit disabled (audit.enabled: false)")
        return True
    from digi2real.audit.run import audit

    refs = [p for p in audit_references(ctx.cfg) if p.exists()]
    audit([ctx.layout.dataset], refs, ctx.layout.audit, ctx.cfg.audit, model=ctx.cfg.encoder.model,
          cache=ctx.layout.audit / "cache", progress=ctx.progress, encoder_cfg=ctx.cfg.encoder,
          align_cfg=ctx.cfg.align, say=ctx.say)
    return True


def run_pack(ctx: Context) -> bool:
    if not ctx.cfg.pack.enabled:
        ctx.say("pack disabled: training reads the generated image folder")
        return True
    from digi2real.dataset.pack import pack

    result = pack(ctx.layout.dataset, ctx.layout.packed, quality=ctx.cfg.pack.quality, progress=ctx.progress,
                  keep_png=ctx.cfg.pack.keep_png, overwrite=True)
    ctx.say(f"packed {result.get('images')} images of {result.get('classes')} identities -> {ctx.layout.packed}")
    return True


def run_train(ctx: Context) -> bool:
    from digi2real.dataset.imagefolder import open_training_set
    from digi2real.training.loop import train

    dataset = open_training_set(ctx.cfg.train.data, ctx.cfg.train.seed)
    summary = train(ctx.cfg.train, dataset, ctx.layout.train, progress=ctx.progress)
    ctx.say(f"trained {ctx.cfg.train.backbone} + {ctx.cfg.train.head} on {len(dataset)} images of "
            f"{dataset.num_classes} identities -> {ctx.layout.train}")
    return bool(summary.finished)


def run_eval_stage(ctx: Context) -> bool:
    from digi2real.evaluation.run import run_eval
    from digi2real.evaluation.tables import markdown_tables

    results = run_eval(ctx.layout.train, ctx.cfg.eval.data_root, ctx.layout.eval, ctx.cfg.eval,
                       progress=ctx.progress, pairs=dict(ctx.cfg.eval.pairs))
    ctx.say(markdown_tables([results]))
    return True


def run_report(ctx: Context) -> bool:
    from digi2real.report import build_report

    path = build_report(ctx.layout.root, ctx.layout.report)
    ctx.say(f"report: {path}")
    return True


RUNNERS: dict[str, Callable[[Context], bool]] = {
    "embed": run_embed, "select": run_select, "plan": run_plan, "shift": run_shift, "generate": run_generate,
    "audit": run_audit, "pack": run_pack, "train": run_train, "eval": run_eval_stage, "report": run_report,
}


# ------------------------------------------------------------------------------------------------------ miniature


#: Written once the miniature run's stand-ins exist (the ``.ready`` of earlier versions marked random models).
MINIATURE_READY = ".ready-trained"
#: The miniature's real photographs (the realism shift's real side, FFHQ's part in the paper): real-style faces of
#: people neither the shipped models were trained on (their first identities) nor anyone is evaluated on.
MINIATURE_REAL_PHOTOS = (REAL_TRAIN.first + 90_000, 100)


def prepare_miniature(layout: RunLayout, cfg: ExperimentConfig, say: Callable[[str], None]) -> None:
    """The demo's stand-ins, made once: the shipped trained miniature models (checked), real-style photographs for
    the shift's real side, and a verification set of held-out real-style identities (sources/domains.REAL_TEST:
    image files + pairs file), the miniature's LFW."""
    from digi2real.imageio import write_image
    from digi2real.miniature import shipped_models, write_procedural_pairs
    from digi2real.sources.procedural import render_item

    ready = layout.models / MINIATURE_READY
    if ready.is_file():
        return
    repo, _ = shipped_models()
    say(f"miniature Arc2Face, SD1.5 parts and ArcFace (trained, shipped) <- {repo.parent}")
    real = layout.models / "real"
    first, count = MINIATURE_REAL_PHOTOS
    for i in range(count):
        path = real / f"{first + i}.png"
        if not path.is_file():
            write_image(path, render_item(cfg.source.seed, first + i, 0, style="real"))
    pairs = layout.benchmarks / "procedural" / "pairs.txt"
    if not pairs.is_file():
        write_procedural_pairs(pairs.parent, identities=60, images=4, seed=cfg.source.seed, style="real",
                               first_identity=REAL_TEST.first)
        say(f"verification set of held-out real-style identities -> {pairs}")
    write_text(ready, "miniature models checked, real photos and verification set are complete\n")


# ------------------------------------------------------------------------------------------------------ run


def select_stages(start: str | None, until: str | None) -> list[str]:
    for name, value in (("--from", start), ("--until", until)):
        if value is not None and value not in STAGES:
            raise Digi2RealError(f"{name} {value!r}: not a stage; stages are {', '.join(STAGES)}")
    i = STAGES.index(start) if start else 0
    j = STAGES.index(until) + 1 if until else len(STAGES)
    if i >= j:
        raise Digi2RealError(f"--from {start} comes after --until {until}; nothing to run")
    return list(STAGES[i:j])


def write_resolved_config(layout: RunLayout, cfg: ExperimentConfig) -> None:
    write_text(layout.config, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def process_rank() -> tuple[int, int, str]:
    """(rank, world size, session) of this process under torchrun or Slurm; (0, 1, "") when launched alone. The
    session names this launch, so the other ranks never act on what rank 0 recorded in an earlier one."""
    from digi2real.sharding import shard_from_env

    shard = shard_from_env()
    env = os.environ
    session = env.get("TORCHELASTIC_RUN_ID") or (
        f"slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}" if "SLURM_JOB_ID" in env else
        f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}")
    return shard.index, shard.count, f"{session}#{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def stage_statuses(state: RunState, layout: RunLayout, stages: list[str], fps: dict[str, str]) -> dict[str, str]:
    """What `run` will do with each selected stage: skip (done with these settings and its output is there), resume,
    rerun (other settings) or run (never ran)."""
    out = {}
    for stage in STAGES:
        if stage in stages:
            status = state.status(stage, fps[stage])
            if status == "skip" and not all(p.exists() for p in stage_outputs(layout, stage)[:1]):
                status = "resume"  # recorded done but its output is gone: the stage's own resume logic redoes it
            out[stage] = status
    return out


def _timed_generation(resolved: ExperimentConfig, layout: RunLayout, statuses: dict[str, str]):
    """The generation forecast timed on this machine (runner.estimate: one guided UNet step and one decode), used
    by the dry run when the weights are at hand: exact pending counts from the plan when it is done, else the
    planned count."""
    def lines(status: str, planned: int) -> list[str]:
        from digi2real.generation.runner import DISK_BYTES, estimate, generate_dataset, resolve_batch
        from digi2real.sharding import shard_from_env

        ctx = Context(resolved, layout, False, lambda text: None)
        try:
            if layout.plan.is_file() and statuses.get("plan", "skip") == "skip":
                fresh = status == "rerun"
                job, _ = _generation_job(ctx, dry_run=True, fresh=fresh)
                return list(generate_dataset(job, layout.dataset, shard=shard_from_env(), dry_run=True, fresh=fresh))
            g = resolved.generate
            model = _generator(ctx)
            timing = estimate(model, g, planned, resolve_batch(model, g)[0] if model.device.type == "cuda" else 1)
        except Digi2RealError as exc:
            return [f"time: cannot be measured ({exc})"]
        branches = 2 if g.guidance != 1.0 else 1
        total = timing["seconds_per_image"] * planned
        disk = planned * (DISK_BYTES[g.format] + DISK_BYTES["vectors"] + (DISK_BYTES["raw"] if g.keep_raw else 0))
        return [f"{planned:,} images planned; UNet evaluations: {planned * g.steps * branches:,} ({g.steps} steps x "
                f"{branches} branches per image; retries add up to {g.gate.max_retries}x that for rejected images)",
                f"disk: about {disk / 1e9:.2f} GB",
                f"time: about {timing['seconds_per_image']:.2f} s per image on {model.device} (one step of a batch of "
                f"{timing['batch']}: {timing['step_seconds']:.2f} s, decode {timing['decode_seconds']:.2f} s) -> "
                f"{total / 3600:,.1f} h in one process"]
    return lines


def dry_run(cfg: ExperimentConfig, layout: RunLayout, statuses: dict[str, str], origin: str,
            say: Callable[[str], None]) -> None:
    """Print the preflight (every input, the hardware, the disk) and each stage's forecast; write nothing. Raises
    :class:`~digi2real.preflight.PreflightError` after printing when inputs are missing."""
    from digi2real.preflight import OK, run_preflight

    resolved = resolved_config(cfg, layout)

    def generation(weights):
        ready = (layout.models / MINIATURE_READY).is_file() if cfg.miniature else all(c.status == OK for c in weights)
        return _timed_generation(resolved, layout, statuses) if ready else None

    report = run_preflight(cfg, layout, statuses, origin, forecast=True, generation=generation)
    for line in report.lines():
        say(line)
    if report.missing:
        raise report.error(dry=True)
    say("ready: every input is there")


def run_pipeline(cfg: ExperimentConfig, *, start: str | None = None, until: str | None = None,
                 dry: bool = False, progress: bool = True, say: Callable[[str], None] = print,
                 origin: str | None = None, start_timeout: float = START_TIMEOUT,
                 wait_timeout: float = WAIT_TIMEOUT) -> dict[str, str]:
    """Run (or skip, resume, re-run) the stages; returns what happened to each.

    First the preflight (digi2real.preflight): every input of the stages to run is checked, and a missing one stops
    the run before anything is created, with the whole list (``dry``: print it and each stage's forecast, write
    nothing). Then temporaries a killed run left in the run folder are removed.

    Launched by torchrun (or srun) with N processes, rank 0 runs the single-process stages and records them in
    pipeline.json while the other ranks wait; every rank generates its shard of the images and joins DDP training.
    Waits are bounded (digi2real.liveness): a rank that never starts (``start_timeout``) or stops beating
    (``wait_timeout``) ends the others' waits with a one-line error.
    """
    from digi2real.preflight import FETCH, WARNING, run_preflight

    layout = RunLayout(Path(cfg.output_dir))
    origin = origin or str(layout.root)
    stages = select_stages(start, until)
    rank, world, session = process_rank()
    main = rank == 0
    fps = fingerprints(resolved_config(cfg, layout))
    statuses = stage_statuses(RunState.load(layout.state), layout, stages, fps)
    if dry:
        dry_run(cfg, layout, statuses, origin, say)
        return {}
    report = run_preflight(cfg, layout, statuses, origin, count=main)
    if report.missing:
        raise report.error(dry=False)
    if main:
        for check in report.checks:
            if check.status in (FETCH, WARNING):
                say(f"[run] {check.status}: {check.text()}")
    ctx = Context(resolved_config(cfg, layout), layout, progress and main, say if main else (lambda text: None),
                  rank, world, session, start_timeout, wait_timeout)
    if not main:
        return _follow_all(ctx, cfg, stages, fps, say)
    layout.root.mkdir(parents=True, exist_ok=True)
    removed = clean_temporaries([layout.root])
    if removed:
        say(f"[run] removed {removed} temporary file(s) left in {layout.root} by a killed run")
    if world == 1:
        return _run_stages(ctx, cfg, stages, fps)
    with Heartbeat(layout.heartbeat(0), session, 0):
        return _run_stages(ctx, cfg, stages, fps)


def _run_stages(ctx: Context, cfg: ExperimentConfig, stages: list[str], fps: dict[str, str]) -> dict[str, str]:
    """Rank 0 (or the only process): each selected stage in order, recorded in pipeline.json."""
    layout, say, session = ctx.layout, ctx.say, ctx.session
    if cfg.miniature:
        prepare_miniature(layout, cfg, say)
    write_resolved_config(layout, ctx.cfg)
    state = RunState.load(layout.state)
    outcome: dict[str, str] = {}

    def record(stage: str, **fields: Any) -> None:
        state.stages.setdefault(stage, {}).update(session=session, **fields)
        state.save()

    for stage in STAGES:
        if stage not in stages:
            continue
        for up in UPSTREAM[stage]:
            if state.status(up, fps[up]) != "skip":
                record(stage, action="failed", finished_session=session)
                raise Digi2RealError(f"stage {stage} needs {up}, which is not complete with these settings; run "
                                     f"without --from, or with --from {up}")
        status = state.status(stage, fps[stage])
        if status == "skip" and all(p.exists() for p in stage_outputs(layout, stage)[:1]):
            outcome[stage] = "skipped"
            record(stage, action="skipped", finished_session=session)
            say(f"[{stage}] up to date, skipped")
            continue
        if status in ("rerun", "run"):
            moved = move_aside(layout, stage, state.stages.get(stage, {}).get("fingerprint"))
            if moved:
                say(f"[{stage}] outputs made with other settings moved to {moved}")
        say(f"[{stage}] {'resuming' if status == 'resume' else 'running'}")
        state.stages[stage] = {"fingerprint": fps[stage], "complete": False,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        record(stage, action="running")
        start_t = time.perf_counter()
        try:
            complete = RUNNERS[stage](ctx)
        except BaseException:
            record(stage, action="failed", finished_session=session)
            raise
        state.stages[stage].update(complete=complete, seconds=round(time.perf_counter() - start_t, 2),
                                   finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        record(stage, action="ran", finished_session=session)
        outcome[stage] = "ran" if complete else "incomplete"
        if not complete:
            say(f"[{stage}] not complete yet; run the same command again to continue")
            break
    return outcome


def _follow_all(ctx: Context, cfg: ExperimentConfig, stages: list[str], fps: dict[str, str],
                say: Callable[[str], None]) -> dict[str, str]:
    """A rank > 0: wait for rank 0 to start, then follow it through pipeline.json, stage by stage; take part in
    generation (this rank's shard) and training (DDP); wait for the others. Every wait is bounded (see
    digi2real.liveness); this rank's own heartbeat tells rank 0 it is alive while rank 0 waits for its shard."""
    layout, session = ctx.layout, ctx.session
    me = f"rank {ctx.rank}"
    waiter = Waiter({"rank 0": Watch(layout.heartbeat(0), session)}, me, layout.state, ctx.start_timeout,
                    ctx.wait_timeout, say)

    def records(test: Callable[[dict], bool]) -> Callable[[], RunState | None]:
        def ready() -> RunState | None:
            state = RunState.load(layout.state)
            return state if test(state.stages) else None
        return ready

    waiter.until(lambda: waiter.watches["rank 0"].started or None, "rank 0 to start this launch")
    with Heartbeat(layout.heartbeat(ctx.rank), session, ctx.rank):
        if cfg.miniature:
            waiter.until(lambda: (layout.models / MINIATURE_READY).is_file() or None,
                         f"rank 0 to build the miniature models in {layout.models}")
        outcome: dict[str, str] = {}
        for stage in STAGES:
            if stage not in stages:
                continue
            state = waiter.until(records(lambda st, s=stage: st.get(s, {}).get("session") == session),
                                 f"rank 0 to start stage {stage}")
            rec = state.stages[stage]
            if stage in COLLECTIVE and rec.get("action") == "running" and rec.get("fingerprint") == fps[stage]:
                RUNNERS[stage](ctx)
            state = waiter.until(records(lambda st, s=stage: st.get(s, {}).get("finished_session") == session),
                                 f"rank 0 to finish stage {stage}")
            rec = state.stages[stage]
            if rec.get("action") == "failed":
                raise Digi2RealError(f"rank 0 failed in stage {stage}; see its output")
            outcome[stage] = rec["action"] if rec.get("complete") or rec["action"] == "skipped" else "incomplete"
            if outcome[stage] == "incomplete":
                break
        return outcome
