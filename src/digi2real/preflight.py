"""The preflight of `digi2real run`: every input of the stages about to run, checked before anything is made.

A run of the paper's recipe takes days; one that stops at its fifth stage because the benchmarks were never
downloaded wastes them. So `run` first looks at everything it will need, without writing a byte: the source images
(DigiFace-1M, with identity and image counts), the real faces of the realism shift, the weights (Arc2Face, the SD1.5
parts and the ArcFace encoder: in the hub cache or in local directories), the benchmark files under
``eval.data_root``, the GPUs a setting asks for and the free disk against the run's estimated size. ``--dry-run``
prints all of it with each stage's forecast (images, UNet evaluations, hours, disk); a real run stops on the whole
list of what is missing, each with how to get it, before it creates anything.

Statuses: ``ok``; ``missing`` (the run cannot succeed without it: it stops before starting); ``fetch`` (weights not
cached yet but the hub is reachable: fetched on first use, as every stage does); ``warning`` (the run can go on, e.g.
one benchmark absent, which `eval` skips with a warning as it always has).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from digi2real.config import DEFAULT_ARC2FACE, DEFAULT_SD15, VERIFICATION_SETS, ExperimentConfig
from digi2real.errors import Digi2RealError

if TYPE_CHECKING:  # pragma: no cover
    from digi2real.layout import RunLayout

OK, MISSING, FETCH, WARNING = "ok", "missing", "fetch", "warning"
_LABEL = {OK: "ok", MISSING: "MISSING", FETCH: "fetch", WARNING: "warning"}

# ------------------------------------------------------------------------------------------------ known figures

#: DigiFace-1M (FACTS 4): 10,000 identities x 72 images and 99,999 x 5.
DIGIFACE_GROUPS = ((10_000, 72), (99_999, 5))
#: Its zips: five of 2.94 GB and three of about 3.4 GB (FACTS 4).
DIGIFACE_BYTES = 5 * 2.936e9 + 3 * 3.4e9
#: Download sizes of the default weights. Arc2Face (FACTS 2): arc2face/ UNet 3.44 GB fp32 + encoder/ 492 MB, and
#: arcface.onnx 261 MB. The SD1.5 parts used (the fp32 VAE and the tokenizer) are about 0.34 GB: not in FACTS, an
#: approximate figure.
WEIGHT_BYTES = {DEFAULT_ARC2FACE: 3.44e9 + 0.492e9, DEFAULT_SD15: 0.34e9}
ARCFACE_BYTES = 0.261e9
#: IJB-B / IJB-C image counts (FACTS 9): `eval` caches one 512-d float32 feature per image.
IJB_IMAGES = {"ijbb": 227_630, "ijbc": 469_375}
#: Reference speeds measured on the project's 2-core x86-64 CPU VM (BENCHMARKS.md): `embed` end to end with a real-size
#: IResNet100 ONNX, images/s; one guided DPM-Solver++ step of the SD1.5 UNet (both branches) and one VAE decode at
#: 512 x 512 fp32, seconds per image; IResNet50 + AdaFace fp32 NCHW training, images/s.
CPU_REFERENCE_CORES = 2
CPU_EMBED_IMAGES_PER_S = 3.22
CPU_UNET_GUIDED_STEP_S = 14.74
CPU_VAE_DECODE_S = 23.37
CPU_TRAIN_R50_IMAGES_PER_S = 1.78
#: Reference speeds measured on one NVIDIA H200 (shared/gpu/README.md, BENCHMARKS.md "The recipe at GPU scale"):
#: Arc2Face render + MTCNN alignment at 512 x 512, 25 steps, fp16, batch 32, images/s (the code of 6d96cc7; the
#: identity check not included); `train` of IResNet50 + AdaFace, fp16, batch 256, steady images/s.
H200_GENERATE_IMAGES_PER_S = 5.52
H200_TRAIN_R50_IMAGES_PER_S = 5700.0
#: The training step's speed by precision there, relative to fp16 (5,788 / 4,791 / 2,007 images/s for the bare step).
H200_TRAIN_PRECISION = {"fp16": 1.0, "bf16": 4791 / 5788, "fp32": 2007 / 5788}
#: IResNet50's forward pass at 112 x 112: 6.3 G multiply-adds (FACTS 6), i.e. 12.6 GFLOP; a training step costs about
#: three forward passes (forward, and a backward of twice its cost).
R50_FORWARD_FLOP = 12.6e9
_HUB_FILE = re.compile(r"^([\w.-]+/[\w.-]+):([^:]+)$")  # encoder.model as org/repo:file (faces/arcface.py)

_BENCHMARK_SOURCES = {
    "bin": "insightface .bin files; they ship inside insightface's training-set folders (e.g. MS1MV2 faces_emore)",
    "ijb": "insightface's IJB release layout (loose_crop/, meta/); IJB-B/C are licensed by NIST",
    "rfw": "RFW's <Race>_test.bin files, available from its authors on request",
}


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Check:
    """One input or requirement: what it is, its status, what was found, how to get it, and which stages need it."""

    name: str
    status: str
    detail: str
    fix: str = ""
    stages: tuple[str, ...] = ()

    @property
    def blocking(self) -> bool:
        return self.status == MISSING

    def text(self) -> str:
        """``name: detail; fix`` (one line)."""
        return f"{self.name}: {self.detail}" + (f"; {self.fix}" if self.fix else "")

    def line(self) -> str:
        needed = f" [{', '.join(self.stages)}]" if self.stages else ""
        return f"  {_LABEL[self.status]:8s} {self.text()}{needed}"


class PreflightError(Digi2RealError):
    """Inputs the run needs are missing. ``str()`` is one line; :meth:`lines` is the header and one line each."""

    def __init__(self, origin: str, problems: list[Check], dry: bool) -> None:
        self.problems = problems
        plural = "s" if len(problems) != 1 else ""
        what = f"{len(problems)} input{plural} or requirement{plural}"
        if dry:
            self.header = f"{origin}: {what} missing; the run would stop before starting. Get each, then run again"
        else:
            self.header = f"{origin}: {what} missing; nothing was started or written. Get each, then run again"
        super().__init__(f"{self.header}: " + " | ".join(p.text() for p in problems))

    def lines(self) -> list[str]:
        return [f"{self.header}:"] + [f"  - {p.text()}" for p in self.problems]


@dataclass(frozen=True)
class Hardware:
    """What this machine offers the run: CUDA devices seen by torch, CPU cores, onnxruntime's CUDA provider."""

    gpus: tuple[str, ...]
    cpus: int
    torch: str
    onnx_cuda: bool

    @property
    def cuda(self) -> bool:
        return bool(self.gpus)

    @classmethod
    def detect(cls, names: bool = True) -> "Hardware":
        """``names``: also each GPU's name and memory (rank 0 only: the other processes of a launch only count them,
        touching no device before training assigns each its own)."""
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = tuple(f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f}"
                     " GiB)" if names else f"cuda:{i}" for i in range(count))
        try:
            import onnxruntime as ort

            onnx_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        except ImportError:  # pragma: no cover - a dependency
            onnx_cuda = False
        return cls(gpus, os.cpu_count() or 1, torch.__version__, onnx_cuda)

    def line(self) -> str:
        if self.gpus:
            return f"  GPUs     {len(self.gpus)}: {', '.join(self.gpus)}; {self.cpus} CPU cores"
        return (f"  GPUs     none found (torch {self.torch} sees no CUDA device); {self.cpus} CPU cores: generation "
                "and training would run on the CPU")


@dataclass
class Counts:
    """How much work the run has: identities in the source, images embedded, identities selected, images planned.
    ``basis`` says where the figures come from (the files, or the config and DigiFace's known size)."""

    identities: int | None = None
    embed_images: int | None = None
    selected: int | None = None
    planned: int | None = None
    basis: str = ""


@dataclass
class Report:
    """The whole preflight: checks, hardware, counts, disk, and each stage's forecast."""

    origin: str
    statuses: dict[str, str]
    checks: list[Check] = field(default_factory=list)
    hardware: Hardware | None = None
    counts: Counts = field(default_factory=Counts)
    forecast: list[str] = field(default_factory=list)

    @property
    def missing(self) -> list[Check]:
        return [c for c in self.checks if c.blocking]

    def error(self, dry: bool) -> PreflightError:
        return PreflightError(self.origin, self.missing, dry)

    def lines(self) -> list[str]:
        todo = [s for s, st in self.statuses.items() if st != "skip"]
        out = [f"checks for the stages that will run ({', '.join(todo) or 'none'}); nothing is written:"]
        out += [c.line() for c in self.checks]
        if self.hardware is not None:
            out.append(self.hardware.line())
        out.append("stages:")
        out += self.forecast
        return out


# ------------------------------------------------------------------------------------------------ helpers


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n < 10e9 else f"{n / 1e9:.0f} GB"


def _hours(seconds: float) -> str:
    """A duration as people read it: seconds, minutes, hours, or hours and days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    h = seconds / 3600
    return f"{h:,.1f} h" if h < 48 else f"{h:,.0f} h ({h / 24:,.0f} days)"


def _quote(patterns: Iterable[str]) -> str:
    return " ".join(f"'{p}'" if any(ch in p for ch in "*?[") else p for p in patterns)


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (where the run's output folder will be created)."""
    path = path.expanduser().absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


# ------------------------------------------------------------------------------------------------ the source


def _digiface_embed_images(k: int | None) -> int:
    return sum(ids * (per if k is None else min(k, per)) for ids, per in DIGIFACE_GROUPS)


def _source_fix(cfg: ExperimentConfig) -> str:
    path = cfg.source.path
    if cfg.source.kind == "folder":
        return f"create it as {path}/<identity>/<image> (aligned 112 x 112 crops), or point source.path at your images"
    return (f"get DigiFace-1M (about {_gb(DIGIFACE_BYTES)}; Microsoft's non-commercial research licence): "
            f"`digi2real download digiface -o {path}` (resumable), or point source.path at your copy")


def check_source(cfg: ExperimentConfig, count: bool = True) -> tuple[Check, Counts]:
    """The identities `embed` reads: the procedural renderer, or a path whose identities and images are counted."""
    src, k = cfg.source, cfg.embed.images_per_identity
    if src.kind == "procedural":
        per = src.images_per_identity
        return (Check("source", OK, f"procedural faces rendered on the fly: {src.identities:,} identities x {per} "
                      "images", stages=("embed",)),
                Counts(src.identities, src.identities * (per if k is None else min(k, per)), basis="the config"))
    assert src.path is not None
    digiface = Counts(sum(i for i, _ in DIGIFACE_GROUPS), _digiface_embed_images(k),
                      basis="DigiFace-1M's known size, FACTS 4") if src.kind in ("digiface", "auto") else Counts()
    if not src.path.exists():
        return Check("source", MISSING, f"{src.path}: not found", _source_fix(cfg), ("embed",)), digiface
    if not count:
        return Check("source", OK, f"{src.path}: present (not counted)", stages=("embed",)), digiface
    from digi2real.sources import open_source

    try:
        with open_source(src) as source:
            info = source.describe()
            embed_images = len(source.list_items(k))
    except Digi2RealError as exc:
        return Check("source", MISSING, str(exc), stages=("embed",)), digiface
    kind = {"digiface-zip": "DigiFace-1M zips", "digiface-folder": "DigiFace-1M folders"}.get(info.get("kind", ""),
                                                                                              "image folders")
    ids, images = int(info.get("identities", 0)), int(info.get("images", 0))
    detail = f"{src.path}: {kind}, {ids:,} identities, {images:,} images ({embed_images:,} to embed)"
    return Check("source", OK, detail, stages=("embed",)), Counts(ids, embed_images, basis="the source files")


# ------------------------------------------------------------------------------------------------ weights


class _Hub:
    """Whether the hub can be reached, asked once (a DNS lookup, as the loaders do before downloading)."""

    def __init__(self) -> None:
        self._reason: str | None | bool = False

    def unreachable(self) -> str | None:
        if self._reason is False:
            from digi2real.faces.arcface import hub_unreachable

            self._reason = hub_unreachable()
        return self._reason  # type: ignore[return-value]


def _cached_snapshot(repo: str, layout: dict[str, tuple[tuple[str, ...], ...]]) -> tuple[Path | None, list[str]]:
    """The cached snapshot folder of ``repo`` (read only: never downloads or writes) and the layout files it lacks."""
    from huggingface_hub import try_to_load_from_cache

    from digi2real.generation.arc2face import missing_files

    sub, groups = next(iter(layout.items()))
    probe = f"{sub}/{groups[0][0]}"
    try:
        hit = try_to_load_from_cache(repo, probe)
    except Exception:  # a malformed repo id: the loader will say so
        hit = None
    if not isinstance(hit, str):
        return None, [f"{s}/{g[0]}" for s, gs in layout.items() for g in gs]
    root = Path(hit).parents[len(Path(probe).parts) - 1]
    return root, missing_files(root, layout)


def check_model_dir(name: str, spec: str, hub_repo: str, layout: dict, patterns: list[str], hub: _Hub,
                    stages: tuple[str, ...]) -> Check:
    """A generator part (``arc2face.repo`` or ``arc2face.base``): a local directory in the hub layout, or a hub repo
    in the cache; else how to get it (and its size when known)."""
    from digi2real.generation.arc2face import is_local_spec, missing_files

    files = _quote(patterns)
    if is_local_spec(spec):
        local = Path(spec).expanduser()
        fix = f"fetch it in the hub layout: `hf download {hub_repo} {files} --local-dir {local}`"
        if not local.is_dir():
            return Check(name, MISSING, f"{spec}: model directory not found", fix, stages)
        lacks = missing_files(local, layout)
        if lacks:
            return Check(name, MISSING, f"{local}: lacks {', '.join(lacks)}", fix, stages)
        return Check(name, OK, f"{local}: local directory", stages=stages)
    root, lacks = _cached_snapshot(spec, layout)
    if root is not None and not lacks:
        return Check(name, OK, f"{spec}: in the hub cache ({root})", stages=stages)
    size = WEIGHT_BYTES.get(spec)
    about = f"about {_gb(size)}" if size else "size unknown offline"
    what = "not in the hub cache" if root is None else f"the cached copy lacks {', '.join(lacks)}"
    fix = f"`hf download {spec} {files}` ({about})"
    reason = hub.unreachable()
    if reason is None:
        return Check(name, FETCH, f"{spec}: {what}; downloaded on first use", f"or now: {fix}", stages)
    return Check(name, MISSING, f"{spec}: {what} and the hub cannot be reached ({reason})",
                 f"where the hub is reachable: {fix} fills the hub cache (copy it here), or add --local-dir DIR and "
                 f"set {name}: DIR", stages)


def check_encoder(spec: str, hub: _Hub, stages: tuple[str, ...]) -> Check:
    """The ArcFace ONNX (``encoder.model``): a local file, or ``org/repo:file`` in the hub cache."""
    local = Path(spec).expanduser()
    if local.is_file():
        return Check("encoder.model", OK, f"{local}: local file", stages=stages)
    hub_file = _HUB_FILE.match(spec)
    if not hub_file:
        return Check("encoder.model", MISSING, f"{spec}: encoder model file not found",
                     f"fetch Arc2Face's: `hf download {DEFAULT_ARC2FACE} arcface.onnx --local-dir DIR` (about "
                     f"{_gb(ARCFACE_BYTES)}) and set encoder.model: DIR/arcface.onnx", stages)
    from huggingface_hub import try_to_load_from_cache

    repo, filename = hub_file.groups()
    try:
        hit = try_to_load_from_cache(repo, filename)
    except Exception:
        hit = None
    if isinstance(hit, str):
        return Check("encoder.model", OK, f"{spec}: in the hub cache ({hit})", stages=stages)
    about = f"about {_gb(ARCFACE_BYTES)}" if (repo, filename) == (DEFAULT_ARC2FACE, "arcface.onnx") else \
        "size unknown offline"
    fix = f"`hf download {repo} {filename}` ({about})"
    reason = hub.unreachable()
    if reason is None:
        return Check("encoder.model", FETCH, f"{spec}: not in the hub cache; downloaded on first use",
                     f"or now: {fix}", stages)
    return Check("encoder.model", MISSING, f"{spec}: not in the hub cache and the hub cannot be reached ({reason})",
                 f"where the hub is reachable: {fix} fills the hub cache (copy it here), or add --local-dir DIR and "
                 f"set encoder.model: DIR/{filename}", stages)


def check_weights(cfg: ExperimentConfig, layout: "RunLayout", needed: set[str], hub: _Hub) -> list[Check]:
    from digi2real.generation.arc2face import ARC2FACE_FILES, ARC2FACE_PATTERNS, BASE_FILES, BASE_PATTERNS

    out: list[Check] = []
    enc_stages = tuple(s for s in ("embed", "shift", "generate") if s in needed)
    gen_stages = tuple(s for s in ("shift", "generate") if s in needed)
    if cfg.shift.real is None and not cfg.miniature:  # no realism shift: the stage loads nothing
        enc_stages = tuple(s for s in enc_stages if s != "shift")
        gen_stages = tuple(s for s in gen_stages if s != "shift")
    if cfg.miniature:
        if enc_stages or gen_stages:
            from digi2real.miniature import SHIPPED

            out.append(Check("weights", OK, f"the miniature models trained and shipped with the package ({SHIPPED})",
                             stages=tuple(dict.fromkeys(enc_stages + gen_stages))))
        return out
    if enc_stages:
        out.append(check_encoder(cfg.encoder.model, hub, enc_stages))
    if gen_stages:
        out.append(check_model_dir("arc2face.repo", cfg.arc2face.repo, DEFAULT_ARC2FACE, ARC2FACE_FILES,
                                   ARC2FACE_PATTERNS, hub, gen_stages))
        out.append(check_model_dir("arc2face.base", cfg.arc2face.base, DEFAULT_SD15, BASE_FILES, BASE_PATTERNS,
                                   hub, gen_stages))
    return out


# ------------------------------------------------------------------------------------------------ other inputs


def _count_images(folder: Path) -> int:
    from digi2real.imageio import IMAGE_SUFFIXES

    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
               and not any(part.startswith(".") for part in p.relative_to(folder).parts) and p.is_file())


def check_shift_inputs(cfg: ExperimentConfig, layout: "RunLayout") -> list[Check]:
    """The realism shift's real faces (``shift.real``) and, when given, its synthetic ones (``shift.synthetic``)."""
    from digi2real.generation.shift import is_embeddings_dir

    if cfg.shift.real is None:
        what = ("the demo's real-style photographs, rendered into the run's models/real" if cfg.miniature else
                "null: generating without the realism shift")
        return [Check("shift.real", OK, what, stages=("shift",))]
    out = []
    for name, path in (("shift.real", cfg.shift.real), ("shift.synthetic", cfg.shift.synthetic)):
        if path is None:
            continue
        if not path.exists():
            fix = ("put real face photos there (any photos: they are detected and aligned; the paper used 1000 FFHQ "
                   "images, github.com/NVlabs/ffhq-dataset), or set shift.real: null to generate without the realism "
                   "shift") if name == "shift.real" else "point it at rendered faces or an embeddings directory, or " \
                                                         "set it to null to use the run's own embeddings"
            out.append(Check(name, MISSING, f"{path}: not found", fix, ("shift",)))
        elif is_embeddings_dir(path):
            out.append(Check(name, OK, f"{path}: an embeddings directory", stages=("shift",)))
        elif not path.is_dir():
            out.append(Check(name, MISSING, f"{path}: not a folder", "pass a folder of face images or an embeddings "
                             "directory made by `digi2real embed`", ("shift",)))
        else:
            n = _count_images(path)
            if n == 0:
                out.append(Check(name, MISSING, f"{path}: no images found", "put face photos there", ("shift",)))
            else:
                status = OK if n >= cfg.shift.images else WARNING
                note = "" if status == OK else f" (fewer than shift.images = {cfg.shift.images}: all are used)"
                out.append(Check(name, status, f"{path}: {n:,} images{note}", stages=("shift",)))
    return out


def check_train_inputs(cfg: ExperimentConfig) -> list[Check]:
    """Files training reads besides the generated set: the real set to mix in, and the verification .bin files."""
    out = []
    data = cfg.train.data
    if data.real_path is not None and data.real_identities > 0:
        ok = data.real_path.exists()
        out.append(Check("train.data.real_path", OK if ok else MISSING, f"{data.real_path}: "
                         + ("present" if ok else "not found"), "" if ok else
                         "point it at a real face set (folder per identity, or RecordIO), or set "
                         "train.data.real_identities: 0", ("train",)))
    for path in cfg.train.verify_sets:
        ok = path.is_file()
        out.append(Check("train.verify_sets", OK if ok else MISSING, f"{path}: " + ("present" if ok else "not found"),
                         "" if ok else f"{_BENCHMARK_SOURCES['bin']}; or remove it from train.verify_sets",
                         ("train",)))
    return out


def _benchmark_paths(root: Path, bench: str) -> tuple[list[Path], str]:
    """The files `eval` looks for (evaluation/run.py), and where they come from."""
    from digi2real.evaluation.rfw import RACES, find_rfw_bins

    if bench in VERIFICATION_SETS:
        return [root / f"{bench}.bin"], _BENCHMARK_SOURCES["bin"]
    if bench in ("ijbb", "ijbc"):
        folder = root / bench.upper()
        return [folder / "loose_crop", *(folder / "meta" / f"{bench}_{m}.txt" for m in
                                          ("face_tid_mid", "template_pair_label", "name_5pts_score"))], \
            _BENCHMARK_SOURCES["ijb"]
    found = find_rfw_bins(root)
    return [found[r] or root / "RFW" / f"{r}_test.bin" for r in RACES], _BENCHMARK_SOURCES["rfw"]


def _expected(root: Path, benches: list[str]) -> str:
    """What eval.data_root should hold for ``benches``, and where each kind comes from, in one phrase."""
    bins = [f"{b}.bin" for b in benches if b in VERIFICATION_SETS]
    parts = [f"{' '.join(bins)}: {_BENCHMARK_SOURCES['bin']}"] if bins else []
    ijb = [f"{b.upper()}/" for b in benches if b in ("ijbb", "ijbc")]
    if ijb:
        parts.append(f"{' '.join(ijb)}: {_BENCHMARK_SOURCES['ijb']}")
    if "rfw" in benches:
        parts.append(f"RFW/<Race>_test.bin: {_BENCHMARK_SOURCES['rfw']}")
    return "; ".join(parts) or "list benchmarks in eval.benchmarks"


def check_benchmarks(cfg: ExperimentConfig, layout: "RunLayout") -> list[Check]:
    """Every benchmark of ``eval.benchmarks`` under ``eval.data_root``, by file; ``eval.pairs`` files. A missing
    benchmark is a warning (`eval` skips it); nothing at all to evaluate stops the run, as `eval` would."""
    ev = cfg.eval
    out: list[Check] = []
    present = 0
    if cfg.miniature:  # resolved_config adds it: unseen procedural identities, written by the run
        out.append(Check("eval.pairs procedural", OK, f"procedural verification set, made by the run in "
                         f"{layout.benchmarks / 'procedural'}", stages=("eval",)))
        present += 1
    for name, path in ev.pairs.items():
        if path.is_file():
            out.append(Check(f"eval.pairs {name}", OK, f"{path}", stages=("eval",)))
            present += 1
        else:
            out.append(Check(f"eval.pairs {name}", MISSING, f"{path}: pairs file not found", "expected lines "
                             "'image_a image_b 1|0', image paths relative to its folder", ("eval",)))
    root = ev.data_root
    benches = list(dict.fromkeys(ev.benchmarks)) if root is not None else []
    for bench in benches:
        assert root is not None
        paths, source = _benchmark_paths(root, bench)
        absent = [p for p in paths if not p.exists()]
        if not absent:
            present += 1
            out.append(Check(f"benchmark {bench}", OK, ", ".join(str(p) for p in paths), stages=("eval",)))
        else:
            shown = ", ".join(str(p) for p in absent[:4]) + (f" (+{len(absent) - 4})" if len(absent) > 4 else "")
            partial = bench == "rfw" and len(absent) < len(paths)
            present += partial
            out.append(Check(f"benchmark {bench}", WARNING, f"absent: {shown}; eval skips it", source, ("eval",)))
    if present == 0:
        if root is None:
            detail, fix = "nothing to evaluate (no eval.data_root and no eval.pairs)", \
                "set eval.data_root to the folder of the benchmark files, or stop before eval with --until train"
        else:
            detail = (f"{root}: benchmark folder not found" if not root.is_dir() else
                      f"{root}: none of eval.benchmarks ({', '.join(benches) or 'empty'}) is there")
            fix = f"put at least one there ({_expected(root, benches)}), or stop before eval with --until train"
        out.append(Check("eval.data_root", MISSING, detail, fix, ("eval",)))
    return out


def _on_cpu(device: str, hw: Hardware) -> bool:
    return device == "cpu" or (device == "auto" and not hw.cuda)


def check_devices(cfg: ExperimentConfig, hw: Hardware, needed: set[str]) -> list[Check]:
    """Settings that cannot run on this machine (CUDA asked for and absent, fp16 where the device resolves to the
    CPU), found now rather than when their stage starts, days later."""
    gen = tuple(s for s in ("shift", "generate") if s in needed and (s != "shift" or cfg.shift.real is not None))
    a, t, e = cfg.arc2face, cfg.train, cfg.eval
    rules = [  # (setting, fails here, stages, fix)
        ("arc2face.device", a.device == "cuda" and not hw.cuda, gen, "use auto or cpu"),
        ("arc2face.dtype", a.dtype == "float16" and _on_cpu(a.device, hw), gen,
         "float16 runs on CUDA only: use auto, float32 or bfloat16 on the CPU"),
        ("align.detector.device", cfg.align.detector.device == "cuda" and not hw.cuda, gen, "use auto or cpu"),
        ("train.device", t.device == "cuda" and not hw.cuda, ("train",), "use auto or cpu"),
        ("train.precision", t.precision == "fp16" and _on_cpu(t.device, hw), ("train",),
         "fp16 training (gradient scaling) needs CUDA: use bf16 or fp32 on the CPU"),
        ("eval.device", e.device == "cuda" and not hw.cuda, ("eval",), "use auto or cpu"),
        ("eval.precision", e.precision == "fp16" and _on_cpu(e.device, hw), ("eval",),
         "fp16 autocast needs CUDA: use bf16 or fp32 on the CPU"),
    ]
    out = []
    for name, fails, stages, fix in rules:
        stages = tuple(s for s in stages if s in needed)
        if fails and stages:
            value = getattr(cfg, name.split(".")[0])
            for part in name.split(".")[1:]:
                value = getattr(value, part)
            out.append(Check(name, MISSING, f"{value!r} needs a CUDA GPU and torch sees none", f"{fix}, or run on a "
                             "GPU machine", stages))
    enc = tuple(s for s in ("embed", "shift", "generate") if s in needed)
    if cfg.encoder.provider == "cuda" and not hw.onnx_cuda and not hw.cuda and enc and not cfg.miniature:
        out.append(Check("encoder.provider", MISSING, "'cuda' but neither onnxruntime nor torch sees a CUDA device",
                         "pip install onnxruntime-gpu or a CUDA build of torch, or set encoder.provider: auto", enc))
    return out


# ------------------------------------------------------------------------------------------------ sizes and times


def backbone_cost(cfg: ExperimentConfig) -> tuple[float, int]:
    """Forward FLOP of one 112 x 112 image and parameter count of the configured backbone, counted on torch's meta
    device (no memory, no compute). IResNet50 gives 12.6 GFLOP, FACTS 6's 6.3 G multiply-adds."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from digi2real.training.loop import build_backbone_from

    with torch.device("meta"):
        net = build_backbone_from(cfg.train).eval()
        x = torch.empty(1, 3, 112, 112)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return float(counter.get_total_flops()), sum(p.numel() for p in net.parameters())


def plan_counts(cfg: ExperimentConfig, counts: Counts, layout: "RunLayout", statuses: dict[str, str]) -> Counts:
    """Identities kept by `select` and images planned: read from ids.csv / plan.parquet when those are done, else
    from the settings (select.n capped by the source's identities)."""
    out = Counts(counts.identities, counts.embed_images, basis=counts.basis)
    ids = counts.identities
    out.selected = ids if cfg.select.n is None else (min(cfg.select.n, ids) if ids is not None else cfg.select.n)
    if layout.ids.is_file() and statuses.get("select", "skip") == "skip":
        with open(layout.ids, "rb") as handle:
            out.selected = max(sum(1 for _ in handle) - 1, 0)
    if out.selected is not None:
        out.planned = out.selected * cfg.plan.images_per_identity
    if layout.plan.is_file() and statuses.get("plan", "skip") == "skip":
        import pyarrow.parquet as pq

        out.planned, out.basis = pq.read_metadata(layout.plan).num_rows, f"{layout.plan}"
    return out


def stage_bytes(cfg: ExperimentConfig, counts: Counts, stage: str, params: int) -> float:
    """Rough disk use of each stage's outputs (the per-image sizes are generation/runner.py's ``DISK_BYTES``)."""
    from digi2real.generation.runner import DISK_BYTES

    planned, embedded = counts.planned or 0, counts.embed_images or 0
    if stage == "embed":
        return embedded * (512 * 4 + 100)  # float32 rows + an index row
    if stage == "generate":  # + the ArcFace vector kept for each (float32, landmarks, brightness, contrast)
        return planned * (DISK_BYTES[cfg.generate.format] + (DISK_BYTES["raw"] if cfg.generate.keep_raw else 0)
                          + DISK_BYTES["vectors"])
    if stage == "audit":  # the references' cached vectors: IJB's dominate
        if not cfg.audit.enabled:
            return 0.0
        return 1e6 + (sum(IJB_IMAGES.get(b, 0) for b in cfg.eval.benchmarks) * DISK_BYTES["vectors"]
                      if cfg.eval.data_root else 0.0)
    if stage == "pack" and cfg.pack.enabled:
        return planned * DISK_BYTES["png" if cfg.pack.keep_png else "jpg"]
    if stage == "train":  # weights, SGD momentum and a checkpoint of each, backbone and head (classes x dim)
        return 3 * 4 * (params + (counts.selected or 0) * cfg.train.embedding_dim)
    if stage == "eval":  # IJB features are cached, one 512-d float32 row per image
        return sum(IJB_IMAGES.get(b, 0) for b in cfg.eval.benchmarks) * 512 * 4 if cfg.eval.data_root else 0.0
    return 1e6 if stage in ("plan", "shift", "report") else 0.0


def check_disk(cfg: ExperimentConfig, counts: Counts, needed: set[str], params: int) -> Check:
    """Free space where the run writes against what the stages to run will write (old outputs are moved to stale/,
    never deleted, so a re-run frees nothing)."""
    where = nearest_existing(Path(cfg.output_dir))
    free = shutil.disk_usage(where).free
    parts = {s: stage_bytes(cfg, counts, s, params) for s in needed}
    need = sum(parts.values())
    big = ", ".join(f"{s} {_gb(b)}" for s, b in sorted(parts.items(), key=lambda kv: -kv[1]) if b >= 0.05e9)
    detail = f"{_gb(free)} free at {where}; the stages to run write about {_gb(need)}" + (f" ({big})" if big else "")
    if free < need:
        return Check("disk", MISSING, detail, "free space, or set output_dir on a larger disk")
    return Check("disk", OK, detail)


def _cpu_scale(hw: Hardware) -> tuple[float, str]:
    """Factor from the 2-core reference figures to this CPU, assuming work spreads over every core (optimistic)."""
    factor = CPU_REFERENCE_CORES / max(hw.cpus, 1)
    note = "BENCHMARKS.md, 2 cores" + (f", scaled to {hw.cpus} cores" if hw.cpus != CPU_REFERENCE_CORES else "")
    return factor, note


def generation_cpu_seconds(cfg: ExperimentConfig) -> float:
    """Seconds per image on the 2-core reference CPU: ``steps`` guided UNet steps (half the cost without guidance)
    and one VAE decode (BENCHMARKS.md, Generation; 512 x 512, fp32); scaled by the pixel count for other sizes."""
    g = cfg.generate
    branches = 2 if g.guidance != 1.0 else 1
    return (g.steps * CPU_UNET_GUIDED_STEP_S * branches / 2 + CPU_VAE_DECODE_S) * (g.size / 512) ** 2


@dataclass
class StageForecast:
    """What the forecast of each stage needs besides the config: counts, hardware, the backbone's cost, and a timed
    generation forecast when the weights can be loaded (``generation(status, planned)`` returns its lines)."""

    counts: Counts
    hardware: Hardware
    flop: float
    params: int
    generation: Callable[[str, int], list[str]] | None = None


def forecast_lines(cfg: ExperimentConfig, statuses: dict[str, str], f: StageForecast) -> list[str]:
    words = {"skip": "skip (done, same settings)", "resume": "resume", "rerun": "re-run (settings or inputs changed)",
             "run": "run"}
    out = []
    for stage, status in statuses.items():
        out.append(f"  {stage:9s} {words[status]}")
        if status != "skip":
            out += [f"            {line}" for line in _stage_work(cfg, stage, status, f)]
    return out


def _stage_work(cfg: ExperimentConfig, stage: str, status: str, f: StageForecast) -> list[str]:
    c, hw = f.counts, f.hardware
    scale, ref = _cpu_scale(hw)
    disk = stage_bytes(cfg, c, stage, f.params)
    disk_text = f"; disk about {_gb(disk)}" if disk >= 0.01e9 else ""
    if stage == "embed":
        n = c.embed_images
        if n is None:
            return ["images: unknown until the source is there"]
        where = "GPU (onnxruntime CUDA)" if hw.onnx_cuda and cfg.encoder.provider != "cpu" else "CPU"
        time = ("time: seconds (a miniature encoder)" if cfg.miniature else
                "time: no GPU figure in BENCHMARKS.md" if where != "CPU" else
                f"about {_hours(n / CPU_EMBED_IMAGES_PER_S * scale)} on this CPU ({ref})")
        return [f"{n:,} images to embed ({c.basis}); {time}{disk_text}"]
    if stage == "select":
        return [f"{c.identities:,} identities -> keep {c.selected:,} ({cfg.select.method})" if c.identities else
                f"keep {cfg.select.n} identities ({cfg.select.method})"]
    if stage == "plan":
        return [f"{c.planned:,} images: {cfg.plan.images_per_identity} per identity, {cfg.plan.images_per_latent} per "
                f"latent, alpha {cfg.plan.alpha}" if c.planned else "images: unknown until select has run"]
    if stage == "shift":
        if cfg.shift.real is None and not cfg.miniature:
            return ["nothing to do (shift.real is null)"]
        return [f"up to {cfg.shift.images:,} real and {cfg.shift.images:,} synthetic faces: detected, aligned, "
                "embedded and encoded by Arc2Face's ID encoder"]
    if stage == "generate":
        return _generate_work(cfg, status, f)
    if stage == "audit":
        if not cfg.audit.enabled:
            return ["disabled (audit.enabled: false)"]
        return [f"the {c.planned or 0:,} generated images' kept vectors against the benchmarks present, "
                f"eval.pairs, shift.real and audit.against (references embedded once, cached){disk_text}"]
    if stage == "pack":
        return [f"{c.planned or 0:,} images -> RecordIO{disk_text}" if cfg.pack.enabled else "disabled"]
    if stage == "train":
        return _train_work(cfg, f)
    if stage == "eval":
        return [f"benchmarks: {', '.join(cfg.eval.benchmarks) or 'none'}" +
                (f"; pairs sets: {', '.join(cfg.eval.pairs)}" if cfg.eval.pairs else "") + "; see the checks above "
                "for which are present" + (f"{disk_text} of cached IJB features" if disk_text else "")]
    return ["one self-contained HTML page"]


def _generate_work(cfg: ExperimentConfig, status: str, f: StageForecast) -> list[str]:
    g, planned = cfg.generate, f.counts.planned
    if planned is None:
        return ["images: unknown until the plan exists"]
    if f.generation is not None:
        return f.generation(status, planned)
    branches = 2 if g.guidance != 1.0 else 1
    lines = [f"{planned:,} images planned; UNet evaluations: {planned * g.steps * branches:,} ({g.steps} steps x "
             f"{branches} branches per image; retries add up to {g.gate.max_retries}x that for rejected images)",
             f"disk: about {_gb(stage_bytes(cfg, f.counts, 'generate', f.params))}"]
    if cfg.miniature:
        lines.append("time: the miniature models are timed here once the run has built them (seconds in all)")
    elif f.hardware.cuda and cfg.arc2face.device != "cpu":
        # per-image work scales with the UNet steps and the pixels; the H200 figure is at 25 steps and 512 x 512
        rate = H200_GENERATE_IMAGES_PER_S * (25 / g.steps) * (512 / g.size) ** 2
        seconds = planned / rate
        lines.append(f"time: about {_hours(seconds)} on one H200 ({rate:.2f} images/s, from render + alignment "
                     f"measured there at {H200_GENERATE_IMAGES_PER_S} images/s at 25 steps, 512 px, fp16: "
                     f"BENCHMARKS.md), {_hours(seconds / 8)} on 8 (balanced shards); "
                     "other GPUs differ, and with the weights cached the forecast times one UNet step here")
    else:
        scale, ref = _cpu_scale(f.hardware)
        per = generation_cpu_seconds(cfg) * scale
        lines.append(f"time: about {per:,.0f} s per image on this CPU ({ref}, fp32) -> {_hours(per * planned)}; "
                     "with the weights cached the forecast times it here")
    return lines


def _train_work(cfg: ExperimentConfig, f: StageForecast) -> list[str]:
    t, planned = cfg.train, f.counts.planned
    work = f"{t.epochs} epochs of {t.backbone} + {t.head}, global batch {t.batch_size}"
    if not planned:
        return [work]
    steps = t.epochs * math.ceil(planned / t.batch_size)
    flop = 3 * f.flop * steps * t.batch_size
    lines = [f"{work}: about {steps:,} steps over the {planned:,} planned images (fewer if some are rejected); "
             f"{flop:.2e} FLOP ({f.flop / 1e9:.1f} GFLOP per image forward, x3 for training)"]
    if f.hardware.cuda and t.device != "cpu":
        # FLOP-scaled from the measured r50 run, and by the precision's measured speed
        rate = H200_TRAIN_R50_IMAGES_PER_S * R50_FORWARD_FLOP / f.flop * H200_TRAIN_PRECISION[t.precision]
        seconds = steps * t.batch_size / rate
        lines.append(f"time: about {_hours(seconds)} on one H200 (r50 + adaface fp16 measured there at "
                     f"{H200_TRAIN_R50_IMAGES_PER_S:,.0f} images/s, BENCHMARKS.md; scaled by FLOP and precision), about "
                     f"{_hours(seconds / 8)} on 8 with DDP if it scales linearly (not yet measured)")
    else:
        scale, ref = _cpu_scale(f.hardware)
        rate = CPU_TRAIN_R50_IMAGES_PER_S * 3 * R50_FORWARD_FLOP  # FLOP/s of the measured r50 run
        lines.append(f"time: about {_hours(flop / rate * scale)} on this CPU (r50 at {CPU_TRAIN_R50_IMAGES_PER_S} "
                     f"images/s, {ref}, scaled by FLOP)")
    return lines


# ------------------------------------------------------------------------------------------------ the preflight


def run_preflight(cfg: ExperimentConfig, layout: "RunLayout", statuses: dict[str, str], origin: str, *,
                  count: bool = True, forecast: bool = False,
                  generation: Callable[[list[Check]], Callable[[str, int], list[str]] | None] | None = None) -> Report:
    """Check every input of the stages in ``statuses`` that will not be skipped (``count``: count the source's
    identities and images; ``forecast``: also each stage's forecast, ``generation`` giving a timed generation forecast
    when the weight checks allow loading the model). Reads only: nothing is created or changed."""
    needed = {s for s, st in statuses.items() if st != "skip"}
    report = Report(origin, statuses)
    hw = Hardware.detect(names=count)
    report.hardware = hw
    counts = Counts()
    if "embed" in needed or forecast:
        source_check, counts = check_source(cfg, count=count and "embed" in needed)
        if "embed" in needed:
            report.checks.append(source_check)
    hub = _Hub()
    weights = check_weights(cfg, layout, needed, hub)
    report.checks += weights
    if needed & {"shift"}:
        report.checks += check_shift_inputs(cfg, layout)
    if "train" in needed:
        report.checks += check_train_inputs(cfg)
    if "eval" in needed:
        report.checks += check_benchmarks(cfg, layout)
    report.checks += check_devices(cfg, hw, needed)
    counts = plan_counts(cfg, counts, layout, statuses)
    report.counts = counts
    flop, params = backbone_cost(cfg) if needed & {"train"} or forecast else (0.0, 0)
    report.checks.append(check_disk(cfg, counts, needed, params))
    if forecast:
        timed = generation(weights) if generation is not None and "generate" in needed else None
        report.forecast = forecast_lines(cfg, statuses, StageForecast(counts, hw, flop, params, timed))
    return report
