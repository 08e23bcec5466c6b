"""The `shift`, `generate` and `regenerate` sub-commands. ``register(subparsers)`` adds them to the main CLI.

Importing this module is cheap: torch, diffusers and the models load only when a command runs.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

from digi2real.cli_common import add_common, formatter, given, load_config


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--arc2face", metavar="REPO|DIR",
                   help="Arc2Face hub repo or local directory with arc2face/ and encoder/ (default FoivosPar/Arc2Face)")
    g.add_argument("--base", metavar="REPO|DIR", help="SD1.5 hub repo or local directory with vae/, tokenizer/, "
                   "scheduler/ (default stable-diffusion-v1-5/stable-diffusion-v1-5)")
    g.add_argument("--encoder", metavar="ONNX", help="ArcFace model: local .onnx or org/repo:file.onnx "
                   "(default FoivosPar/Arc2Face:arcface.onnx, the one Arc2Face was trained with)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the generator runs (default auto)")
    g.add_argument("--dtype", type=_dtype_flag, metavar="DTYPE",
                   help="UNet/VAE precision: auto, float16 (fp16), bfloat16 (bf16), float32 (fp32) (default auto: "
                        "float16 on CUDA, float32 on CPU)")


def _dtype_flag(text: str) -> str:
    """``--dtype`` in any spelling diffusers accepts, as the config's canonical name."""
    from digi2real.errors import ConfigError
    from digi2real.generation.dtypes import canonical_dtype

    try:
        return canonical_dtype(text, "--dtype")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return given(arc2face__repo=args.arc2face, arc2face__base=args.base, encoder__model=args.encoder,
                  arc2face__device=args.device, arc2face__dtype=args.dtype)


def _load_models(cfg: Any, need_detector: bool = True) -> tuple[Any, Any, Any]:
    from digi2real.faces.arcface import ArcFaceEncoder
    from digi2real.generation.arc2face import Arc2Face

    model = Arc2Face.from_pretrained(cfg.arc2face.repo, cfg.arc2face.base, cfg.arc2face.device, cfg.arc2face.dtype)
    encoder = ArcFaceEncoder.load(cfg.encoder)
    detector = None
    if need_detector:
        from digi2real.faces.mtcnn import MTCNN

        detector = MTCNN.from_package(cfg.align.detector)
    return model, encoder, detector


# ------------------------------------------------------------------------------------------------------------ shift
SHIFT_DESCRIPTION = textwrap.dedent("""\
    Compute the paper's realism shift (section 3): Delta = mean C(real) - mean C(synthetic), where C is the
    Arc2Face ID encoder's conditioning (77 x 768) of a face's ArcFace embedding. `generate --shift` adds
    lambda * Delta to the conditional branch of every image, moving the synthetic identities toward the
    statistics of real faces (the paper: 1000 FFHQ and 1000 DigiFace images).

    --real and --synthetic are folders of face images (searched recursively) or embeddings directories made by
    `digi2real embed`. 112 x 112 images are taken as aligned crops (DigiFace images, `digi2real align` output);
    other sizes are detected and aligned with MTCNN first. Unreadable images and images without a face are
    skipped and counted. Prints the realism gap before and after the shift.""")


def _shift_parser(sub: Any) -> None:
    p = sub.add_parser("shift", formatter_class=formatter, help="the CLIP-space realism shift Delta (real vs synthetic)",
                       description=SHIFT_DESCRIPTION, epilog=textwrap.dedent("""\
                           examples:
                             digi2real shift --real ffhq/ --synthetic digiface/ -o shift.safetensors
                             digi2real shift --real ffhq_aligned/ --synthetic runs/x/embeddings -o shift.safetensors --images 2000"""))
    p.add_argument("--real", type=Path, required=True, metavar="DIR", help="real faces (folder or embeddings dir)")
    p.add_argument("--synthetic", type=Path, required=True, metavar="DIR",
                   help="rendered faces, e.g. DigiFace-1M (folder or embeddings dir)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="shift.safetensors to write")
    p.add_argument("--images", type=int, help="images drawn from each side (default 1000)")
    p.add_argument("--seed", type=int, help="seed of the random choice of images (default 0)")
    _model_flags(p)
    add_common(p)
    p.set_defaults(func=_cmd_shift)


def _cmd_shift(args: argparse.Namespace) -> int:
    from digi2real.generation.shift import check_shift_paths, format_gap, make_shift

    cfg = load_config(args, {**_model_overrides(args), **given(shift__images=args.images, shift__seed=args.seed)})
    check_shift_paths(args.real, args.synthetic, args.output)  # before the models load
    model, encoder, detector = _load_models(cfg)
    shift = make_shift(args.real, args.synthetic, args.output, model, encoder, cfg.shift, cfg.align,
                       detector=detector, progress=not args.quiet)
    print(f"realism shift Delta ({' x '.join(map(str, shift.delta.shape))}) from {shift.meta.get('n_real')} real and "
          f"{shift.meta.get('n_synthetic')} synthetic faces -> {args.output}")
    for line in format_gap(shift.meta):
        print(f"  {line}")
    return 0


# --------------------------------------------------------------------------------------------------------- generate
GENERATE_DESCRIPTION = textwrap.dedent("""\
    Render every row of a plan with Arc2Face (paper section 3): the row's SLERP identity embedding replaces the
    `id` token of "photo of a id person", the realism shift lambda * Delta is added to that conditional branch,
    DPM-Solver++ denoises (25 steps, guidance 3, 512 x 512 by default) from noise drawn from the image's own
    seed; MTCNN aligns the result to a 112 x 112 ArcFace crop, which is embedded again to record its cosine to
    the conditioning embedding and to the identity's prototype (the identity gate, off by default, rejects and
    retries with new seeds below --min-similarity).

    Writes DATASET/images/<identity>/<k>.png, DATASET/manifest/shard-*.jsonl (one row per attempt, with the
    full provenance), DATASET/generation.json and DATASET/card.md.

    Resumable and shardable: kill it at any moment and run the same command again; nothing is lost or duplicated.
    The plan's rows are cut into work units of --batch-size consecutive rows; shards (--shard I/N, or torchrun's
    RANK/WORLD_SIZE, or Slurm's SLURM_PROCID/SLURM_NTASKS) take every N-th unit, each with its own manifest, so
    every shard gets the same number of images within one batch, and any shard count gives the same images.
    While the GPU denoises a batch, --workers threads detect, align, check and write the batches before it.
    --dry-run prints the work, each shard's images, disk and time (timed on this device) without generating.""")


def _generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", formatter_class=formatter, help="Arc2Face images of every plan row -> dataset",
                       description=GENERATE_DESCRIPTION, epilog=textwrap.dedent("""\
                           examples:
                             digi2real generate runs/x/plan.parquet -o runs/x/dataset --shift shift.safetensors
                             digi2real generate plan.parquet -o dataset --dry-run
                             torchrun --nproc-per-node 8 -m digi2real generate plan.parquet -o dataset --shift shift.safetensors
                             digi2real generate plan.parquet -o dataset --shard 3/16 --batch-size 32
                             digi2real generate plan.parquet -o dataset --min-similarity 0.4 --max-retries 3"""))
    p.add_argument("plan", type=Path, metavar="PLAN", help="plan.parquet written by `digi2real plan`")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DATASET", help="dataset folder (resumed if it exists)")
    p.add_argument("--shift", type=Path, metavar="FILE", help="realism shift from `digi2real shift` (default: none)")
    p.add_argument("--shift-weight", type=float, metavar="LAMBDA", help="weight of the shift (default 1.0)")
    p.add_argument("--embeddings", type=Path, metavar="DIR",
                   help="the plan's embeddings directory (default: the path recorded in the plan)")
    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=int, help="denoising steps (default 25)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 3.0)")
    s.add_argument("--size", type=int, help="generated image side in pixels (default 512)")
    s.add_argument("--batch-size", type=_batch_flag, metavar="N|auto",
                   help="images per work unit (default auto: from the GPU's free memory, 8 on the CPU; a resumed "
                        "dataset keeps its own; halved on out-of-memory). Changes pixels")
    s.add_argument("--keep-raw", action="store_true", default=None, help="also keep the full images under raw/")
    s.add_argument("--format", choices=["png", "jpg"], help="aligned crop format (default png)")
    s.add_argument("--workers", type=int, metavar="N",
                   help="threads that finish (align, check, write) batches while the next one renders; 0: in line "
                        "(default 2). Never changes pixels")
    s.add_argument("--queue", type=int, metavar="N", help="rendered batches waiting for those threads at most "
                   "(default 2)")
    g = p.add_argument_group("identity gate")
    g.add_argument("--min-similarity", type=float, metavar="COS",
                   help="reject crops whose ArcFace cosine to their conditioning is below COS (default: off)")
    g.add_argument("--gate-against", choices=["conditioning", "prototype"], help="reference of the gate")
    g.add_argument("--max-retries", type=int, help="new seeds tried for a rejected image (default 2)")
    p.add_argument("--shard", metavar="I/N", help="this process's share (default: from torchrun/Slurm, else all)")
    p.add_argument("--dry-run", action="store_true", help="print images, UNet evaluations, disk and time; make nothing")
    _model_flags(p)
    add_common(p)
    p.set_defaults(func=_cmd_generate)


def _batch_flag(text: str) -> int | str:
    """``--batch-size``: a positive number or ``auto`` (checked by the config)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of images or auto") from None


def _read_shift(path: Path | None, model: Any = None) -> Any:
    """The realism shift at ``path`` (None: none), checked against the model's width when ``model`` is given."""
    if path is None:
        return None
    from digi2real.generation.shift import read_shift

    return read_shift(path, hidden=None if model is None else model.hidden_size)


def _cmd_generate(args: argparse.Namespace) -> int:
    from digi2real.generation.runner import (SETTINGS_FILE, FaceChecker, check_output, generate_dataset, load_inputs,
                                             prepare_job, read_record)
    from digi2real.sharding import shard_from_env

    cfg = load_config(args, {**_model_overrides(args), **given(
        generate__steps=args.steps, generate__guidance=args.guidance, generate__size=args.size,
        generate__batch_size=args.batch_size, generate__keep_raw=args.keep_raw, generate__format=args.format,
        generate__workers=args.workers, generate__queue=args.queue,
        generate__shift_weight=args.shift_weight, generate__gate__min_similarity=args.min_similarity,
        generate__gate__against=args.gate_against, generate__gate__max_retries=args.max_retries)})
    shard = shard_from_env(args.shard)
    # Every input and the output folder are checked before the models load (minutes on a first download).
    inputs = load_inputs(args.plan, args.embeddings)
    check_output(args.output, [args.plan, inputs[1].root, args.shift])
    if (args.output / SETTINGS_FILE).exists():
        read_record(args.output, "resume")
    shift = _read_shift(args.shift)
    model, encoder, detector = _load_models(cfg, need_detector=not args.dry_run)
    checker = None if args.dry_run else FaceChecker(detector, encoder, cfg.align, cfg.generate.gate.min_similarity,
                                                    cfg.generate.gate.against)
    job, _ = prepare_job(args.plan, args.output, model=model, checker=checker, cfg=cfg.generate, align=cfg.align,
                         shift=shift, shift_path=args.shift, embeddings=args.embeddings,
                         encoder_hash=encoder.file_hash(), inputs=inputs)
    result = generate_dataset(job, args.output, shard=shard, progress=not args.quiet, dry_run=args.dry_run,
                              shift_path=args.shift, embeddings=args.embeddings,
                              extra={"encoder": cfg.encoder.model_dump(mode="json"),
                                     "arc2face_config": cfg.arc2face.model_dump(mode="json")})
    for line in (result if isinstance(result, list) else result.lines()):
        print(line)
    return 0


# ------------------------------------------------------------------------------------------------------- regenerate
def _regenerate_parser(sub: Any) -> None:
    p = sub.add_parser("regenerate", formatter_class=formatter, help="recompute one image of a dataset exactly",
                       description=textwrap.dedent("""\
                           Recompute one image of a generated dataset from its manifest row and the settings in
                           DATASET/generation.json, and compare it with the stored file (the same hardware gives
                           the same pixels). With -o, write the recomputed crop there instead of comparing."""),
                       epilog="examples:\n  digi2real regenerate runs/x/dataset id_00042/7\n"
                              "  digi2real regenerate runs/x/dataset id_00042/7 -o again.png")
    p.add_argument("dataset", type=Path, metavar="DATASET", help="a dataset folder written by `digi2real generate`")
    p.add_argument("key", metavar="KEY", help="the image's key, <identity>/<k> (the manifest's `key`)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the recomputed aligned crop here")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the recorded device")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_regenerate)


def _record_configs(path: Path, record: dict) -> tuple[Any, Any, Any, Any]:
    """The generate, align, Arc2Face and encoder settings recorded in ``generation.json``, validated."""
    from pydantic import ValidationError

    from digi2real.config import AlignConfig, Arc2FaceConfig, EncoderConfig, GenerateConfig
    from digi2real.errors import Digi2RealError
    from digi2real.generation.manifest import RECORD_FIX

    try:
        return (GenerateConfig(**record["settings"]["generate"]), AlignConfig(**record["align_config"]),
                Arc2FaceConfig(**record["arc2face_config"]), EncoderConfig(**record["encoder"]))
    except (ValidationError, TypeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:100]
        raise Digi2RealError(f"{path}: corrupt ({first}); {RECORD_FIX}") from None


def _recorded_input(path: Path, what: str, value: str | None) -> Path | None:
    """An input recorded in ``generation.json``, which must still be where it was for the image to be recomputed."""
    from digi2real.errors import Digi2RealError

    if not value:
        return None
    where = Path(value)
    if not where.exists():
        raise Digi2RealError(f"{path}: records the {what} {where}, which is not there any more; restore it there to "
                             "recompute images")
    return where


def _cmd_regenerate(args: argparse.Namespace) -> int:
    import numpy as np

    from digi2real.errors import Digi2RealError
    from digi2real.faces.arcface import ArcFaceEncoder
    from digi2real.faces.mtcnn import MTCNN
    from digi2real.fileio import check_apart, confine
    from digi2real.generation.arc2face import Arc2Face
    from digi2real.generation.runner import (IMAGES_DIR, SETTINGS_FILE, FaceChecker, check_units, load_inputs,
                                             prepare_job, read_record, regenerate)
    from digi2real.imageio import read_image, write_image

    path = args.dataset / SETTINGS_FILE
    if not path.is_file():
        raise Digi2RealError(f"{path}: not found; is {args.dataset} a dataset written by `digi2real generate`?")
    record = read_record(args.dataset, "regenerate")
    check_units(args.dataset, record["settings"], "recompute it with that version")
    gen, align, a2f, enc = _record_configs(path, record)
    plan_path = _recorded_input(path, "plan", record["plan"])
    embeddings = _recorded_input(path, "embeddings", record["embeddings"])
    shift_path = _recorded_input(path, "realism shift", record["shift"])
    if args.output is not None:  # the recomputed crop never lands in the dataset or on an input
        check_apart(args.output, [args.dataset, plan_path, embeddings, shift_path])
        if args.output.is_dir():
            raise Digi2RealError(f"-o {args.output}: is a folder; name the image file to write, e.g. "
                                 f"{args.output / 'again.png'}")
    inputs = load_inputs(plan_path, embeddings)
    keys = inputs[0].table.column("key").to_pylist()
    if args.key not in set(keys):
        raise Digi2RealError(f"{args.key!r} is not a key of the plan {plan_path}; keys look like {keys[0]!r} "
                             "(the manifest's `key`)")
    shift = _read_shift(shift_path)
    device = args.device or record["settings"]["device"]
    model = Arc2Face.from_pretrained(a2f.repo, a2f.base, device, record["settings"]["dtype"])
    encoder = ArcFaceEncoder.load(enc)
    checker = FaceChecker(MTCNN.from_package(align.detector), encoder, align, gen.gate.min_similarity,
                          gen.gate.against)
    job, _ = prepare_job(plan_path, args.dataset, model=model, checker=checker, cfg=gen, align=align,
                         shift=shift, shift_path=shift_path, embeddings=embeddings,
                         encoder_hash=encoder.file_hash(), inputs=inputs)
    if job.settings != record["settings"]:
        raise Digi2RealError(f"{args.dataset}: its inputs changed since generation (plan, embeddings, shift or "
                             "models); the image cannot be reproduced from them")
    crop, event = regenerate(job, args.key)
    if crop is None:
        print(f"{args.key}: rejected at attempt {event.attempt} ({event.verdict.status}: {event.verdict.reason})")
        return 0
    if args.output:
        write_image(args.output, crop)
        print(f"{args.key}: recomputed (attempt {event.attempt}, seed {event.seed}) -> {args.output}")
        return 0
    stored_path = confine(args.dataset / IMAGES_DIR, f"{args.key}.{gen.format}", f"key {args.key}")
    if not stored_path.is_file():
        print(f"{args.key}: recomputed, but {stored_path} is missing; pass -o FILE to write it")
        return 1
    stored = read_image(stored_path)
    same = stored.shape == crop.shape and np.array_equal(stored, crop)
    if same or gen.format == "png":
        diff = 0 if same else int(np.abs(stored.astype(int) - crop.astype(int)).max())
        print(f"{args.key}: {'identical to' if same else f'differs (max {diff} levels) from'} {stored_path}")
        return 0 if same else 1
    print(f"{args.key}: recomputed; {stored_path} is JPEG, so compare with -o")
    return 0


def register(sub: Any) -> None:
    _shift_parser(sub)
    _generate_parser(sub)
    _regenerate_parser(sub)
