"""Typed settings for every stage and for a whole experiment, loaded from YAML.

Each stage reads one section; ``ExperimentConfig`` gathers them. Unknown keys, wrong types and out-of-range values are
refused with a one-line message naming the field (``plan.alpha``), the value and what is allowed. CLI flags override
values through :func:`apply_overrides` with dotted keys (``plan.alpha=1.5``), validated the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from digi2real.errors import ConfigError

DEFAULT_ARCFACE = "FoivosPar/Arc2Face:arcface.onnx"


class Section(BaseModel):
    """Base of every settings block: unknown keys are errors, values are validated on assignment too."""

    # NaN and infinities are refused everywhere: a NaN weight or threshold silently turns every comparison false.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[int, Field(gt=0)]
Rate = Annotated[float, Field(gt=0.0, le=1.0)]


class SourceConfig(Section):
    """Where the rendered identities come from (paper section 3, "Sampling Identities")."""

    kind: Literal["auto", "procedural", "digiface", "folder"] = Field(
        "auto",
        description="auto: DigiFace zips/folders or a folder-per-identity tree, detected from `path`; procedural: the "
        "built-in parametric face renderer (no files needed); digiface: DigiFace-1M folders or zips; folder: any "
        "folder-per-identity image set.",
    )
    path: Path | None = Field(None, description="Root of the images (required unless kind is procedural).")
    identities: int = Field(200, gt=0, description="procedural only: number of identities to render.")
    images_per_identity: int = Field(5, gt=0, description="procedural only: images rendered per identity.")
    seed: int = Field(0, ge=0, description="procedural only: seed of the identity parameters and nuisances.")
    style: Literal["rendered", "real"] = Field(
        "rendered", description="procedural only: rendered = flat synthetic renders (the DigiFace-1M stand-in); real = "
        "the same identities drawn like photographs (the miniature's real-image domain).")
    first_identity: int = Field(0, ge=0, description="procedural only: index of the first identity rendered "
                                "(disjoint ranges give disjoint identity sets: sources/domains.py).")

    @model_validator(mode="after")
    def _path_needed(self) -> "SourceConfig":
        if self.kind != "procedural" and self.path is None:
            raise ValueError(f"source.path is required when source.kind is {self.kind!r} (or set kind: procedural)")
        return self


class EncoderConfig(Section):
    """The ArcFace identity encoder (an ONNX model taking aligned 112 x 112 RGB crops)."""

    model: str = Field(
        DEFAULT_ARCFACE,
        description="A local .onnx path, or 'org/repo:file.onnx' on the Hugging Face hub (downloaded once into its "
        "cache). Default: Arc2Face's arcface.onnx, the encoder Arc2Face was trained with.",
    )
    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the ArcFace encoder runs: auto = the GPU when there is one (onnxruntime's CUDA "
        "provider, else the graph converted to torch, checked against onnxruntime's CPU result within 1e-4), else "
        "the CPU; cuda = a GPU or an error; cpu = onnxruntime on the CPU.")
    batch_size: int = Field(64, gt=0, description="Images per forward pass.")
    normalize: Literal["auto", "outside", "inside"] = Field(
        "auto",
        description="outside: feed (x - 127.5) / 127.5; inside: the graph normalises itself, feed raw 0..255; auto: "
        "detect from the graph's first nodes as insightface does.",
    )
    embedding_dim: int = Field(512, gt=0, description="Expected output size; a model with another size is refused.")


class EmbedConfig(Section):
    """`embed`: ArcFace embeddings of the source images (paper section 3: five images per identity)."""

    images_per_identity: int | None = Field(
        5, gt=0, description="Embed the first k images of each identity (the paper: 5); null embeds all."
    )
    chunk_size: int = Field(2048, gt=0, description="Images per resumable part written to disk.")
    workers: int = Field(2, ge=0, description="Threads decoding images ahead of the encoder (0: decode inline).")


class SelectConfig(Section):
    """`select`: identity prototypes and the paper's similarity filtering (section 4.1, Tables 3-4)."""

    method: Literal["least_similar", "greedy", "first"] = Field(
        "least_similar",
        description="least_similar: sort identities by their maximum cosine to any other prototype and keep the n "
        "lowest (the paper); first: the first n in source order, no filtering (the paper's unfiltered sets); greedy: walk identities from least to most similar and keep one only if its cosine "
        "to every kept identity is below `threshold`.",
    )
    n: int | None = Field(20000, gt=0, description="How many identities to keep (null: all that pass).")
    threshold: float | None = Field(
        None, gt=-1.0, le=1.0, description="greedy only: maximum allowed cosine between two kept prototypes."
    )
    min_images: int = Field(1, gt=0, description="Identities with fewer embedded images are not eligible.")
    block_size: int = Field(1024, gt=0, description="Rows of the similarity matrix computed at once (memory bound).")

    @model_validator(mode="after")
    def _greedy_needs_threshold(self) -> "SelectConfig":
        if self.method == "greedy" and self.threshold is None:
            raise ValueError("select.threshold is required when select.method is 'greedy' (e.g. 0.6)")
        return self


class PlanConfig(Section):
    """`plan`: the images to generate, one row each (paper section 3, eqs. 3-5, "Dataset Generation")."""

    images_per_identity: int = Field(20, gt=0, description="Images generated per identity (paper: 20).")
    images_per_latent: int = Field(5, gt=0, description="Images generated from each SLERP latent (paper: 5).")
    alpha: float = Field(2.0, gt=0.0, description="t ~ Beta(alpha, alpha) along the SLERP path (paper: 2; 1 = uniform).")
    seed: int = Field(0, ge=0, description="Run seed; every image's seed derives from (seed, identity, image index).")


class DetectorConfig(Section):
    """MTCNN face detection (FACTS 5)."""

    thresholds: tuple[Probability, Probability, Probability] = Field(
        (0.6, 0.7, 0.7), description="P-Net, R-Net, O-Net score thresholds (facenet-pytorch; AdaFace uses 0.6,0.7,0.9)."
    )
    factor: float = Field(0.709, gt=0.0, lt=1.0, description="Image pyramid scale step.")
    min_face_size: int = Field(20, gt=0, description="Smallest face searched for, in pixels.")
    pick: Literal["largest", "confident", "central"] = Field("largest", description="Which face to keep when several.")
    pad_retry: float = Field(
        0.5, ge=0.0, description="When no face is found, retry on a canvas padded by this fraction of the side (0: off)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device for the detector.")
    batch_size: int = Field(8, gt=0, description="Images of the same size detected together.")


class AlignConfig(Section):
    """`align`: 5-point similarity alignment to the ArcFace template (FACTS 3)."""

    size: int = Field(112, gt=0, description="Side of the aligned square crop (the template is scaled from 112).")
    format: Literal["png", "jpg"] = Field("png", description="File format of aligned crops.")
    input: Literal["photo", "aligned"] = Field(
        "photo", description="photo: detect the face with MTCNN and align its five landmarks (the paper's step); "
        "aligned: the images are already ArcFace-aligned square crops (the built-in renderer's framing, the shipped "
        "miniature generator's output, insightface-style datasets), scaled to `size` without detection.")
    detector: DetectorConfig = Field(default_factory=DetectorConfig)


DEFAULT_ARC2FACE = "FoivosPar/Arc2Face"
DEFAULT_SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class Arc2FaceConfig(Section):
    """The Arc2Face generator (FACTS 2): its UNet and ID encoder, plus the SD1.5 base's VAE, tokenizer and scheduler."""

    repo: str = Field(
        DEFAULT_ARC2FACE,
        description="Hub repo id (downloaded once into the hub cache) or a local directory in the same layout, "
        "holding arc2face/ (UNet) and encoder/ (the ArcFace-conditioned CLIP text encoder).",
    )
    base: str = Field(
        DEFAULT_SD15,
        description="Hub repo id or local directory of Stable Diffusion 1.5, holding vae/, tokenizer/ and scheduler/.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the generator runs; auto prefers CUDA.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto",
        description="UNet and VAE precision (also fp16/half, bf16, fp32/float, as diffusers takes them). auto: float16 "
        "on CUDA, float32 on CPU (bfloat16 pays off only on CPUs with AMX). The ID encoder and the conditioning "
        "always run in float32.",
    )

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        from digi2real.generation.dtypes import DTYPE_ALIASES

        if isinstance(value, str):
            return DTYPE_ALIASES.get(value.strip().lower().removeprefix("torch."), value)
        return value


class ShiftConfig(Section):
    """`shift`: the CLIP-space realism shift, Delta = mean C(real) - mean C(synthetic) (paper section 3)."""

    real: Path | None = Field(None, description="`run`: real faces (a folder of photos or aligned crops, or an "
                              "embeddings directory), e.g. FFHQ; null: no realism shift.")
    synthetic: Path | None = Field(None, description="`run`: rendered faces; null: the run's own embeddings.")
    images: int = Field(1000, gt=0, description="Images drawn from each side (paper: 1000 FFHQ, 1000 DigiFace).")
    seed: int = Field(0, ge=0, description="Seed of the random choice of images when a folder holds more.")
    batch_size: int = Field(64, gt=0, description="Identity embeddings encoded at once.")


class GateConfig(Section):
    """Identity-consistency gate: reject a generated face that drifted from its identity, and retry with a new seed."""

    min_similarity: float | None = Field(
        None, ge=-1.0, le=1.0,
        description="Reject an aligned result whose ArcFace cosine to its reference is below this (null: off; "
        "0.3-0.5 is typical for a matching identity).",
    )
    against: Literal["conditioning", "prototype"] = Field(
        "conditioning", description="Reference of the gate: the image's own conditioning embedding or its identity's "
        "prototype.",
    )
    max_retries: int = Field(
        2, ge=0, description="New seeds tried for an image that was rejected (no face, low similarity, NaN); 0: none.",
    )


class GenerateConfig(Section):
    """`generate`: Arc2Face sampling of every plan row (paper section 3, "Dataset Generation"; FACTS 2)."""

    steps: int = Field(25, gt=0, description="DPM-Solver++ multistep denoising steps (Arc2Face: 25).")
    guidance: float = Field(3.0, ge=1.0, description="Classifier-free guidance scale (Arc2Face: 3.0; 1.0 turns the "
                            "unconditional branch off).")
    size: int = Field(512, ge=64, multiple_of=8, description="Side of the generated image in pixels (Arc2Face: 512).")
    batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="Images denoised together (each is two UNet rows with guidance); auto: from the GPU's "
        "free memory on CUDA, 8 on the CPU. The batch fixes the work units, so it changes pixels: the resolved value "
        "is recorded in generation.json and a resume keeps it. Halved automatically on out-of-memory.")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the UNet on CUDA (auto: when it compiles here, with a clean fallback to "
        "eager; its warm-up is not counted as throughput); never on the CPU. Can change pixels in the last bits.")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="UNet and VAE in channels_last memory format on CUDA (auto: on); never on the CPU.")
    workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="Threads that detect, align, check and write the previous batch while the next one is "
        "denoised (0: in line, one after the other; auto: 2 on CUDA, 0 on the CPU, where the renderer already uses "
        "every core: 2 threads measured 1.3x slower there). Never changes pixels.")
    queue: int = Field(2, gt=0, description="Rendered batches waiting for those threads at most (bounds memory).")
    shift_weight: float = Field(1.0, description="lambda: weight of the realism shift Delta added to the conditional "
                                "branch (0: no shift).")
    keep_raw: bool = Field(False, description="Also keep the full generated image under raw/.")
    format: Literal["png", "jpg"] = Field("png", description="File format of the aligned crops.")
    gate: GateConfig = Field(default_factory=GateConfig)


VERIFICATION_SETS = ("lfw", "calfw", "cplfw", "agedb_30", "cfp_fp", "cfp_ff")
BENCHMARKS = VERIFICATION_SETS + ("ijbb", "ijbc", "rfw")


class EvalConfig(Section):
    """`eval`: face-verification benchmarks in insightface's protocols (FACTS 8, 9; paper Tables 5-7)."""

    data_root: Path | None = Field(None, description="`run`: folder holding the benchmark files (lfw.bin ..., IJBB/, "
                                   "IJBC/, RFW/); null: only `pairs` sets.")
    pairs: dict[str, Path] = Field(default_factory=dict, description="`run`: extra verification sets kept as image "
                                   "files plus a pairs file, by name.")

    benchmarks: list[Literal["lfw", "calfw", "cplfw", "agedb_30", "cfp_fp", "cfp_ff", "ijbb", "ijbc", "rfw"]] = Field(
        default_factory=lambda: ["lfw", "calfw", "cplfw", "agedb_30", "cfp_fp", "ijbb", "ijbc", "rfw"],
        description="Which benchmarks to run; a missing benchmark file is skipped with a warning naming its path.",
    )
    batch_size: int = Field(128, gt=0, description="Images per forward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast precision of the backbone (fp16 only on CUDA); embeddings are summed in fp32."
    )
    flip: bool = Field(True, description="Embedding = sum of the image's and its horizontal flip's embeddings.")
    folds: int = Field(10, ge=2, description="Folds of the verification protocol (insightface: 10).")
    ijb_faceness: bool = Field(True, description="IJB: weight each image's feature by its detector (faceness) score.")
    ijb_far: list[Rate] = Field(
        default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1], min_length=1,
        description="IJB: false accept rates at which TAR is reported (the paper reports 1e-4).",
    )
    ijb_chunk_pairs: int = Field(2_000_000, gt=0, description="IJB: template pairs whose features are gathered at "
                                 "once (memory bound); never changes a score.")


class DataConfig(Section):
    """Training data: a folder-per-identity set (our generated dataset or any other), or insightface RecordIO."""

    path: Path | None = Field(None, description="Training set: a folder-per-identity tree, a dataset written by "
                              "`generate`, or a RecordIO folder (train.rec, train.idx, property).")
    real_path: Path | None = Field(None, description="Optional real set to mix in (paper Table 8).")
    real_identities: int = Field(0, ge=0, description="How many real identities to add (0: none).")
    real_pick: Literal["first", "random"] = Field("first", description="Which real identities: the first K or K at "
                                                  "random (seeded by train.seed).")
    workers: int = Field(2, ge=0, description="DataLoader worker processes.")


class TrainConfig(Section):
    """`train`: IResNet + margin head (paper section 4: IResNet50, AdaFace, 30 epochs, batch 256, cosine schedule)."""

    backbone: Literal["r18", "r34", "r50", "r100"] = Field("r50", description="IResNet depth (paper: r50).")
    widths: tuple[Positive, Positive, Positive, Positive] = Field(
        (64, 128, 256, 512), description="Stage widths (miniature nets: smaller).")
    stem_stride: int = Field(1, ge=1, le=2, description="Stride of the first conv (2 for miniature CPU nets).")
    depths: tuple[Positive, Positive, Positive, Positive] | None = Field(
        None, description="Blocks per stage, overriding `backbone`.")
    embedding_dim: int = Field(512, gt=0, description="Embedding size.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the embedding layer.")
    head: Literal["adaface", "arcface", "cosface"] = Field("adaface", description="Margin head (paper: adaface).")
    margin: float | None = Field(None, description="Head margin m (default: AdaFace 0.4, ArcFace 0.5, CosFace 0.4).")
    scale: float = Field(64.0, gt=0.0, description="Logit scale s.")
    h: float = Field(0.333, ge=0.0, description="AdaFace h (paper default 0.333).")
    epochs: int = Field(30, gt=0, description="Training epochs (paper: 30).")
    batch_size: int = Field(256, gt=0, description="Global batch size, split across processes (paper: 256).")
    lr: float = Field(0.1, gt=0.0, description="Peak SGD learning rate (scaled with nothing: set it for your batch).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    weight_decay: float = Field(5e-4, ge=0.0, description="Weight decay.")
    no_decay_on_bn_and_bias: bool = Field(True, description="No weight decay on BatchNorm/PReLU parameters and biases.")
    warmup_epochs: float = Field(0.0, ge=0.0, description="Linear warm-up before the cosine schedule (per iteration).")
    grad_clip: float = Field(5.0, gt=0.0, description="Gradient-norm clip.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast: fp16 with grad scaling on "
                                                       "CUDA, bf16 on CPU or CUDA, fp32 off.")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="channels_last memory format for the convolutions. auto or true: on CUDA (with fp16 "
        "autocast, 2.9x the plain fp32 step on an H200); on the CPU training always runs NCHW, whatever this says "
        "(BENCHMARKS.md: channels_last gained 1.14-1.22x there, and torch's CPU backward of 1x1 stride-2 convolutions "
        "with fewer than 16 input channels corrupts memory in that layout). false: NCHW everywhere.")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the backbone on CUDA (auto: where it compiles, with a fallback to eager; "
        "the loss trajectory stays within 1e-3 of eager); never on the CPU.")
    augment: Literal["flip", "flip+photometric", "flip+photometric+lowres"] = Field(
        "flip", description="Training augmentation: horizontal flip, plus colour jitter, plus random down-up scaling.")
    seed: int = Field(0, ge=0, description="Seed of initialisation, sampling order and augmentation.")
    log_every: int = Field(50, gt=0, description="Iterations between log lines.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    verify_sets: list[Path] = Field(
        default_factory=list,
        description="insightface verification .bin files (lfw.bin, cfp_fp.bin, ...) scored during training on the "
        "main process, each named by its file stem; checked when training starts.")
    verify_every: int | None = Field(
        None, gt=0, description="Iterations between verifications (and at the last step); null: at each epoch end.")
    data: DataConfig = Field(default_factory=DataConfig)


class PackConfig(Section):
    """`pack` inside `run`: the generated dataset as insightface RecordIO."""

    enabled: bool = Field(True, description="Train from the packed set (false: train from the image folder).")
    quality: int = Field(95, ge=1, le=100, description="JPEG quality of the packed images.")
    keep_png: bool = Field(False, description="Store PNG losslessly instead of JPEG.")


class AuditConfig(Section):
    """`audit`: leakage, contamination, distinctness and quality of the generated set (issue 14)."""

    enabled: bool = Field(True, description="`run`: audit the generated dataset after `generate`.")
    against: list[Path] = Field(default_factory=list, description="Reference sets searched for the dataset's "
                                "identities besides the run's own (`run` adds the benchmarks of eval.data_root and "
                                "eval.pairs, and the real faces of shift.real): image folders, RecordIO folders, "
                                ".bin benchmarks, pairs lists, IJB folders.")
    far: float = Field(1e-4, gt=0.0, lt=1.0, description="False-accept rate the match threshold is set at, on the "
                       "impostor scores of a real reference (see calibration).")
    calibration: Literal["search", "pairs"] = Field(
        "search", description="Which impostor scores: 'search', each reference identity's cosine to its nearest other "
        "identity (FAR = the share of identities a search wrongly matches, so about FAR x identities chance matches "
        "whatever the reference's size); 'pairs', every pair of different identities (FAR per pair: FAR x pairs "
        "compared chance matches). A .bin or pairs list always gives its listed non-match pairs.")
    threshold: float | None = Field(None, ge=-1.0, le=1.0, description="A fixed match cosine instead of the "
                                    "calibrated one (null: calibrate).")
    fixed_threshold: float = Field(0.4, ge=-1.0, le=1.0, description="The match cosine used when no real "
                                   "reference can calibrate one (stated as fixed in the report).")
    calibrate: str | None = Field(None, description="Name of the reference whose impostors set the threshold "
                                  "(null: every real reference's threshold, the highest used).")
    neighbours: int = Field(10, gt=0, description="Nearest reference identities (by prototype) searched image by "
                            "image for each dataset identity.")
    impostor_pairs: int = Field(2_000_000, gt=0, description="Impostor pairs sampled at most (calibration, d').")
    shown: int = Field(6, ge=0, description="Image pairs shown side by side per list in the HTML.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the similarity products run.")
    seed: int = Field(0, ge=0, description="Seed of the sampled pairs.")


class ReportConfig(Section):
    """`report`: the HTML page of a run."""

    identities: int = Field(8, gt=0, description="Identities shown in the sample grids.")
    samples: int = Field(6, gt=0, description="Generated images shown per identity.")
    pairs: int = Field(3000, gt=0, description="Genuine and impostor pairs drawn for the similarity histograms.")
    seed: int = Field(0, ge=0, description="Seed of every random choice in the report.")
    training_identities: int | None = Field(
        None, gt=0, description="Miniature runs: compare the generated faces with the first this many of the "
        "generator's training identities in the not-copying section (null: all of them; embedded once per run).")


class ExperimentConfig(Section):
    """A whole experiment: one section per stage."""

    name: str = Field("experiment", min_length=1, description="Name used in reports and dataset cards.")
    miniature: bool = Field(False, description="`run`: use the miniature models shipped with the package (trained "
                            "here on procedural real-style faces; Arc2Face layout and ArcFace ONNX), real-style "
                            "procedural photos for the shift and a verification set of held-out real-style people, "
                            "instead of real weights, FFHQ and benchmarks: the demo.")
    output_dir: Path = Field(Path("runs/experiment"), description="Where every stage writes its artifacts.")
    source: SourceConfig = Field(default_factory=lambda: SourceConfig(kind="procedural"))
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    arc2face: Arc2FaceConfig = Field(default_factory=Arc2FaceConfig)
    shift: ShiftConfig = Field(default_factory=ShiftConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)


def settings_diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every setting that differs between two nested dicts: how a stage
    explains why it refuses to resume work made with other settings."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def _allowed(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel]:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return model


def _format_error(err: dict, model: type[BaseModel], origin: str) -> str:
    loc = tuple(str(p) for p in err.get("loc", ()))
    where = ".".join(loc) or "(top level)"
    prefix = f"{origin}: " if origin else ""
    if err["type"] == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        return f"{prefix}{where}: unknown key; allowed keys here: {_allowed(parent)}"
    if err["type"] == "missing":
        return f"{prefix}{where}: required value is missing"
    if err["type"] == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{prefix}{where}: {err.get('input')!r} is not allowed; choose one of {expected}"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and not isinstance(err["input"], dict):
        return f"{prefix}{where}: {msg} (got {err['input']!r})"
    return f"{prefix}{where}: {msg}" if loc else f"{prefix}{msg}"


def validate_config(model: type[Section], data: Any, origin: str = "") -> Any:
    """Build ``model`` from plain data, turning validation failures into one-line :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin or 'config'}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = _format_error(errors[0], model, origin)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(first + more) from None


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key written twice in one mapping (YAML keeps the last silently)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is written twice",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)
MAX_CONFIG_BYTES = 1 << 20


def load_yaml(path: str | os.PathLike[str]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file or a shipped config's name "
                          "(`digi2real config list`)")
    try:
        raw = path.read_bytes()
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {len(raw):,} bytes is not a config file (over 1 MiB); pass the experiment YAML")
        data = yaml.load(raw.decode("utf-8"), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); pass the experiment YAML (`digi2real config list`)"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return data if data is not None else {}


def parse_override(text: str) -> tuple[list[str], Any]:
    """``plan.alpha=1.5`` -> (["plan", "alpha"], 1.5); the value is parsed as YAML (numbers, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE with a dotted key, e.g. --set plan.alpha=1.5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return [k for k in key.strip().split(".") if k], value


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Return a copy of ``data`` with dotted-key overrides set (a None value sets the key to null)."""
    import copy

    out = copy.deepcopy(data) if data else {}
    for dotted, value in overrides.items():
        keys = dotted.split(".")
        node = out
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return out


def section_overrides(flags: dict[str, Any], sets: list[str] | None, section: str) -> dict[str, Any]:
    """Overrides of one section: the CLI flags that were given (None = not given), then ``--set`` items, whose
    keys may be written with or without the section name (``eval.folds=5`` or ``folds=5``); the last one wins."""
    out = {k: v for k, v in flags.items() if v is not None}
    for item in sets or []:
        keys, value = parse_override(item)
        if keys and keys[0] == section:
            keys = keys[1:]
        out[".".join(keys)] = value
    return out


def _merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


#: The experiment configs shipped inside the package (the repository's ``configs/`` links here), so a plain
#: ``pip install .`` can run ``digi2real run demo`` or the paper's recipe from any folder.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> dict[str, Path]:
    """Every shipped config by name: its path under the configs folder without ``.yaml`` (``demo``,
    ``digi2real-20k``, ``ablations/t2-alpha-1``), top-level configs first."""
    paths = sorted(PACKAGED_CONFIGS.rglob("*.yaml"), key=lambda p: (len(p.relative_to(PACKAGED_CONFIGS).parts), p))
    return {p.relative_to(PACKAGED_CONFIGS).with_suffix("").as_posix(): p for p in paths}


def config_description(path: str | os.PathLike[str]) -> str:
    """A config's first comment line: what it is, as `digi2real config list` shows it."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and line.lstrip("# ").strip():
            return line.lstrip("# ").strip()
    return ""


def _shipped_names() -> str:
    # The pointer first: the CLI cuts a very long line, and then only the end of the list is lost.
    return f"shipped configs (`digi2real config list` describes them): {', '.join(packaged_configs())}"


def packaged_config(name: str) -> Path:
    """The shipped config called ``name``; ``demo.yaml`` and the clone's ``configs/demo.yaml`` name it too. An unknown
    name is a one-line error listing every name (one lookup, one error, like a model registry)."""
    key = name.strip().replace("\\", "/").removeprefix("./").removeprefix("configs/").removesuffix(".yaml")
    shipped = packaged_configs()
    if key not in shipped:
        raise ConfigError(f"{name}: config file not found, and no shipped config has that name; {_shipped_names()}")
    return shipped[key]


def resolve_config(ref: str | os.PathLike[str]) -> Path:
    """The YAML file that ``ref`` names: an existing file always wins, else the shipped config of that name."""
    path = Path(ref)
    if path.is_file():
        return path
    try:
        return packaged_config(os.fspath(ref))
    except ConfigError:
        if path.is_dir():  # `run demo` beside a folder called demo still means the shipped config
            raise ConfigError(f"{path}: is a folder, not a config file; pass an experiment YAML or a shipped config's "
                              "name (`digi2real config list`)") from None
        raise


def is_packaged(path: str | os.PathLike[str]) -> bool:
    """Whether a config file is one of the shipped ones (its relative paths are the user's, not the package's)."""
    return PACKAGED_CONFIGS in Path(path).resolve().parents


def _extended(path: Path, parent: Any) -> Path:
    """What ``extends: parent`` in ``path`` names: a file relative to ``path`` (never ``path`` itself), else a shipped
    config by name, so a user's own file can say ``extends: digi2real-20k`` from any folder."""
    relative = (path.parent / str(parent)).resolve()
    if relative.is_file() and relative != path.resolve():
        return relative
    try:
        return packaged_config(str(parent)).resolve()
    except ConfigError:
        raise ConfigError(f"{path}: extends {parent!r}, but {relative} does not exist and no shipped config has that "
                          f"name; {_shipped_names()}") from None


def load_layered(path: str | os.PathLike[str], seen: tuple[Path, ...] = ()) -> dict:
    """A YAML whose ``extends: other.yaml`` (relative to the file, or a shipped config's name) is deep-merged over that
    base: ablation configs are small overlays on the recipe they vary."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base_path = _extended(path, parent)
    if base_path in seen or base_path == path.resolve():
        raise ConfigError(f"{path}: `extends` loops back to {base_path}")
    return _merge(load_layered(base_path, seen + (path.resolve(), base_path)), data)


def load_experiment(path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Load an experiment YAML, or a shipped config by name (:func:`resolve_config`), or the defaults when ``path`` is
    None; ``extends:`` overlays resolved, then the overrides applied."""
    file = resolve_config(path) if path is not None else None
    data = load_layered(file) if file is not None else {}
    data = apply_overrides(data, overrides or {})
    cfg = validate_config(ExperimentConfig, data, origin=str(path) if path else "")
    if file is not None and not is_packaged(file) and cfg.source.path is not None and not cfg.source.path.is_absolute():
        # Relative data paths in a user's config file are relative to the file, so configs travel with their data; a
        # shipped config's are the user's working directory's (`digi2real run demo` in an empty folder writes there).
        candidate = (file.parent / cfg.source.path)
        if candidate.exists() and not cfg.source.path.exists():
            cfg.source.path = candidate
    return cfg


def load_section(model: type[Section], path: str | os.PathLike[str] | None, section: str,
                 overrides: dict[str, Any] | None = None) -> Any:
    """One stage's section of an experiment YAML loaded exactly as `run` loads it (``extends:`` resolved, every
    section validated, so a misspelt section or key is an error, never silently the defaults), with flag overrides
    (dotted keys relative to the section) applied."""
    if model is not ExperimentConfig.model_fields[section].annotation:
        raise ValueError(f"{model.__name__} is not the model of the {section!r} section")
    cfg = load_experiment(path, {f"{section}.{k}": v for k, v in (overrides or {}).items()})
    return getattr(cfg, section)
