"""The `digi2real` command line: one sub-command per pipeline stage.

Thin on purpose: parse flags, load the config (YAML + flag overrides), call the stage's function, print a summary.
Errors caused by input are printed as one line and exit with status 2; an interrupted stage exits 130 and resumes
when the same command is run again.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path

from digi2real import __version__
from digi2real.errors import Digi2RealError
from digi2real.cli_common import Parser, add_common, formatter, given, load_config, one_line
from digi2real.fileio import check_apart

PIPELINE = """\
stages (each reads the previous one's output; see README.md):
  run       all of them in order, skipping what is done        CONFIG -> output_dir/ (dataset, model, report)
  embed     ArcFace embeddings of the source images          SOURCE  -> embeddings/
  select    prototypes + keep the least similar identities   embeddings/ -> ids.csv
  plan      SLERP latents and per-image seeds                 embeddings/ + ids.csv -> plan.parquet
  shift     the realism shift Delta (real vs synthetic faces)  real/ + synthetic/ -> shift.safetensors
  generate  Arc2Face images of every plan row, aligned        plan.parquet (+ shift) -> dataset/
  regenerate  recompute one image of a dataset exactly
  audit     leakage, duplicates, consistency, realism gap      dataset/ (+ benchmarks, real faces) -> audit/
  align     MTCNN detection + 5-point alignment of photos     photos/ -> aligned/
  pack      an image set -> insightface RecordIO              dataset/ -> train.rec, train.idx, property
  verify    check a packed set against its source
  train     IResNet + AdaFace/ArcFace/CosFace, resumable     dataset/ or packed/ -> RUN/model.pt
  export    a trained backbone as ONNX                       RUN/ -> model.onnx
  eval      LFW-family, IJB-B/C and RFW benchmarks of a model MODEL -> results.json/.md/.csv + ROC plots
  compare   one table from several eval result folders
  report    one self-contained HTML page of a run             RUN/ -> RUN/report.html
  download  fetch DigiFace-1M zips (resumable)
  demo      the identity stages on procedural faces (the whole method: make demo)
  config    the shipped experiment configs: list them, print one or write it out to start your own
"""


# ----------------------------------------------------------------------------------------------------------- embed
def _embed_parser(sub) -> None:
    p = sub.add_parser(
        "embed", formatter_class=formatter, help="ArcFace embeddings of source images",
        description=textwrap.dedent("""\
            Embed the first k aligned 112x112 images of every identity with ArcFace (paper section 3: k = 5) and
            write the embeddings artifact: embeddings.safetensors (unit rows), index.parquet (identity, path),
            meta.json, failures.jsonl. Resumable: re-run the same command after a crash and it continues.

            SOURCE is a DigiFace-1M folder (<id>/<k>.png), a folder of its zips (read without unzipping), one zip,
            any folder-per-identity image tree, or procedural[:IDSxIMGS[:SEED]] for the built-in face renderer."""),
        epilog=textwrap.dedent("""\
            examples:
              digi2real embed data/digiface -o runs/x/embeddings
              digi2real embed data/digiface_zips -o runs/x/embeddings -k 5 --encoder models/arcface.onnx
              digi2real embed procedural:200x5 -o /tmp/emb --encoder mini.onnx"""),
    )
    p.add_argument("source", nargs="?", help="images to embed (default: the config's source section)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="embeddings directory to write")
    p.add_argument("-k", "--per-identity", type=int, metavar="K", help="embed the first K images per identity (default 5)")
    p.add_argument("--all", action="store_true", help="embed every image of every identity")
    p.add_argument("--encoder", metavar="MODEL",
                   help="ArcFace .onnx path or org/repo:file on the hub (default FoivosPar/Arc2Face:arcface.onnx)")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"],
                   help="where the ArcFace encoder runs: auto (the GPU when there is one; default), cpu, cuda")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, help="decoding threads (default 2; 0 decodes inline)")
    p.add_argument("--chunk-size", type=int, help="images per resumable part (default 2048)")
    p.add_argument("--overwrite", action="store_true", help="replace an output made from other inputs or settings")
    add_common(p)
    p.set_defaults(func=_cmd_embed)


def _cmd_embed(args: argparse.Namespace) -> int:
    from digi2real.faces.arcface import ArcFaceEncoder
    from digi2real.identity.embed import embed_source
    from digi2real.sources import open_source, parse_source_spec

    flags = given(embed__images_per_identity=args.per_identity, encoder__model=args.encoder,
                   encoder__provider=args.provider, encoder__batch_size=args.batch_size,
                   embed__workers=args.workers, embed__chunk_size=args.chunk_size)
    if args.all:
        flags["embed.images_per_identity"] = None
    if args.source:
        flags["source"] = parse_source_spec(args.source).model_dump(mode="json")
    cfg = load_config(args, flags)
    check_apart(args.output, [cfg.source.path])
    with open_source(cfg.source) as source:
        encoder = ArcFaceEncoder.load(cfg.encoder)
        summary = embed_source(source, encoder, args.output, cfg.embed, progress=not args.quiet,
                               overwrite=args.overwrite)
    if summary.already_complete:
        print(f"{args.output}: already complete ({summary.embedded} embeddings of {summary.identities} identities)")
    else:
        print(f"embedded {summary.embedded} images of {summary.identities} identities in {summary.seconds:.1f} s "
              f"({summary.failed} failed, see {args.output / 'failures.jsonl'}; {summary.resumed_parts} parts resumed)"
              f" -> {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------------------- select
def _select_parser(sub) -> None:
    p = sub.add_parser(
        "select", formatter_class=formatter, help="keep the N least similar identities",
        description=textwrap.dedent("""\
            Compute each identity's prototype (normalised mean of its embeddings), its maximum cosine similarity to
            any other prototype, and keep the N least similar identities (paper section 4.1, Table 4). With
            --method greedy, walk identities from least to most similar and keep one only if its cosine to every
            identity kept so far is below --threshold. Writes ids.csv (rank, identity, max_similarity,
            nearest_identity, images) and ids.csv.json (settings and statistics)."""),
        epilog=textwrap.dedent("""\
            examples:
              digi2real select runs/x/embeddings -n 20000 -o runs/x/ids.csv
              digi2real select runs/x/embeddings --method greedy --threshold 0.6 -o runs/x/ids.csv"""),
    )
    p.add_argument("embeddings", type=Path, help="embeddings directory written by `digi2real embed`")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="CSV", help="identity list to write")
    p.add_argument("-n", type=int, help="number of identities to keep (default 20000)")
    p.add_argument("--all", action="store_true", help="keep every identity (ranked), or all that pass --threshold")
    p.add_argument("--method", choices=["least_similar", "greedy"], help="selection rule (default least_similar)")
    p.add_argument("--threshold", type=float, help="greedy: maximum cosine between two kept identities")
    p.add_argument("--min-images", type=int, help="identities with fewer embedded images are not eligible")
    p.add_argument("--block-size", type=int, help="similarity rows computed at once (memory: block x identities x 4 B)")
    add_common(p)
    p.set_defaults(func=_cmd_select)


def _cmd_select(args: argparse.Namespace) -> int:
    from digi2real.identity.select import select_identities, write_selection
    from digi2real.identity.store import read_store

    flags = given(select__n=args.n, select__method=args.method, select__threshold=args.threshold,
                   select__min_images=args.min_images, select__block_size=args.block_size)
    if args.all:
        flags["select.n"] = None
    cfg = load_config(args, flags)
    check_apart(args.output, [args.embeddings])
    store = read_store(args.embeddings)
    selection = select_identities(store, cfg.select)
    write_selection(args.output, selection)
    meta = selection.meta
    sims = meta["max_similarity_selected"]
    print(f"selected {meta['selected']} of {meta['eligible']} identities ({cfg.select.method}) in {meta['seconds']:.1f} s;"
          f" max similarity of the kept: median {sims.get('median', float('nan')):.3f}, max {sims.get('max', float('nan')):.3f}"
          f" -> {args.output}")
    if meta["note"]:
        print(f"note: {meta['note']}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------------------ plan
def _plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan", formatter_class=formatter, help="SLERP latents and seeds for every image to generate",
        description=textwrap.dedent("""\
            Make the generation plan (paper section 3): for each selected identity, --images images grouped in
            latents of --per-latent; each latent is the SLERP point from the identity's prototype toward one of its
            sample embeddings at t ~ Beta(alpha, alpha). Each image's seed derives from (seed, identity, image
            index) only, so the plan is identical however it is sharded. Writes a Parquet table, one row per image:
            key, identity, image_index, latent_index, sample_row, sample_path, t, seed."""),
        epilog=textwrap.dedent("""\
            examples:
              digi2real plan runs/x/embeddings --ids runs/x/ids.csv -o runs/x/plan.parquet
              digi2real plan runs/x/embeddings --ids runs/x/ids.csv --images 10 --alpha 1 -o plan-a1.parquet
              digi2real plan runs/x/embeddings --ids runs/x/ids.csv --shard 3/8 -o plan-3.parquet"""),
    )
    p.add_argument("embeddings", type=Path, help="embeddings directory written by `digi2real embed`")
    p.add_argument("--ids", type=Path, required=True, metavar="CSV", help="identity list written by `digi2real select`")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="PARQUET", help="plan file to write")
    p.add_argument("--images", type=int, help="images per identity (default 20)")
    p.add_argument("--per-latent", type=int, help="images generated from each latent (default 5)")
    p.add_argument("--alpha", type=float, help="Beta(alpha, alpha) for the SLERP fraction t (default 2)")
    p.add_argument("--seed", type=int, help="run seed (default 0)")
    p.add_argument("--shard", metavar="I/N", help="only this shard's identities (position modulo N)")
    add_common(p)
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    from digi2real.fileio import sha256_file
    from digi2real.identity.plan import make_plan, write_plan
    from digi2real.identity.select import read_selection
    from digi2real.identity.store import read_store
    from digi2real.sharding import Shard, parse_shard

    cfg = load_config(args, given(plan__images_per_identity=args.images, plan__images_per_latent=args.per_latent,
                             plan__alpha=args.alpha, plan__seed=args.seed))
    shard = parse_shard(args.shard) if args.shard else Shard()
    check_apart(args.output, [args.embeddings, args.ids])
    store = read_store(args.embeddings)
    ids = read_selection(args.ids)
    plan = make_plan(store, ids, cfg.plan, shard, inputs={"ids_file": str(args.ids), "ids_sha256": sha256_file(args.ids)})
    write_plan(args.output, plan)
    n_id = len(set(plan.table.column("identity").to_pylist()))
    print(f"planned {len(plan)} images for {n_id} identities (alpha {cfg.plan.alpha}, "
          f"{cfg.plan.images_per_identity} per identity, {cfg.plan.images_per_latent} per latent, shard {shard})"
          f" -> {args.output}")
    return 0


# ------------------------------------------------------------------------------------------------------------- run
def _run_parser(sub) -> None:
    p = sub.add_parser(
        "run", formatter_class=formatter, help="every stage in order: identities -> dataset -> model -> table",
        description=textwrap.dedent("""\
            Run embed, select, plan, shift, generate, pack, train, eval and report in order, as CONFIG says, in
            its output_dir. Each stage's settings and inputs are fingerprinted in output_dir/pipeline.json: a stage
            done with the same fingerprint is skipped, an interrupted one resumes, and a changed setting re-runs
            that stage and the ones after it (their old outputs are moved to output_dir/stale/, never mixed with
            new ones). Kill it at any moment and run the same command again.

            First, every input of the stages that will run is checked (the preflight): the source images, the
            real faces of the shift, the weights (hub cache or local directories), the benchmark files under
            eval.data_root, the GPUs a setting needs, the free disk. If anything is missing the run stops before
            creating anything, listing each missing input and how to get it. --dry-run prints the checks and
            each stage's forecast (images, UNet evaluations, hours, disk) and writes nothing.

            Under torchrun or srun (N processes), rank 0 runs the single-process stages while the others wait;
            every process generates its shard and joins training. A waiting process says what it waits for and
            gives up, with one line naming pipeline.json, when rank 0 does not start within --start-timeout or
            shows no sign of life (its heartbeat, every 30 s) for --wait-timeout."""),
        epilog=textwrap.dedent("""\
            exit status:
              0  done (or, with --dry-run: every input is there)
              2  inputs missing (listed, one per line, after the "digi2real: error:" line; with --dry-run the
                 whole report is printed first), a bad config or setting, or a stage's error
              3  a stage is not complete yet (run the same command again)
              130 interrupted (run the same command again to resume)

            CONFIG is a YAML file or the name of a shipped config (`digi2real config list`); an existing file
            always wins. Relative paths in a shipped config (output_dir, data) are relative to the working folder.

            examples:
              digi2real run demo                                    # the built-in miniature (make demo)
              digi2real run digi2real-20k                           # the paper's recipe (GPU, weights, DigiFace)
              digi2real run digi2real-20k --dry-run                 # check every input; forecast; write nothing
              digi2real run digi2real-20k --until generate
              digi2real run ablations/t2-alpha-1 --set generate.batch_size=32
              digi2real config show digi2real-20k -o mine.yaml && digi2real run mine.yaml   # your own copy"""),
    )
    p.add_argument("config", metavar="CONFIG",
                   help="experiment YAML file, or a shipped config's name (demo, digi2real-20k, ablations/t2-alpha-1)")
    p.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage (earlier ones must be done)")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.add_argument("--dry-run", action="store_true",
                   help="check every input, print each stage's forecast; write nothing (exit 2 if inputs are missing)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value by dotted key (repeatable)")
    p.add_argument("--start-timeout", type=float, metavar="SECONDS",
                   help="multi-process: how long the other processes wait for rank 0 to start (default 600; env "
                        "DIGI2REAL_START_TIMEOUT)")
    p.add_argument("--wait-timeout", type=float, metavar="SECONDS",
                   help="multi-process: give up after this long without a sign of life from the awaited process "
                        "(default 1800; env DIGI2REAL_WAIT_TIMEOUT); a long stage never times out by itself")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    import math

    from digi2real.config import load_experiment, parse_override, resolve_config
    from digi2real.liveness import START_ENV, START_TIMEOUT, WAIT_ENV, WAIT_TIMEOUT, timeout_from_env
    from digi2real.pipeline import run_pipeline
    from digi2real.preflight import PreflightError

    overrides = {}
    for item in args.set:
        keys, value = parse_override(item)
        overrides[".".join(keys)] = value
    config = resolve_config(args.config)
    timeouts = {}
    for flag, value, env, default in (("--start-timeout", args.start_timeout, START_ENV, START_TIMEOUT),
                                      ("--wait-timeout", args.wait_timeout, WAIT_ENV, WAIT_TIMEOUT)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise Digi2RealError(f"{flag} {value}: must be a positive number of seconds, e.g. {flag} {default:.0f}")
        timeouts[flag] = value if value is not None else timeout_from_env(env, default)
    cfg = load_experiment(config, overrides)
    try:
        outcome = run_pipeline(cfg, start=args.start, until=args.until, dry=args.dry_run, progress=not args.quiet,
                               origin=str(args.config), start_timeout=timeouts["--start-timeout"],
                               wait_timeout=timeouts["--wait-timeout"])
    except PreflightError as exc:
        # The whole list, one missing input a line under the one error header: a single line would hide most of it.
        sys.stdout.flush()
        print("digi2real: error: " + "\n".join(exc.lines()), file=sys.stderr)
        return 2
    if outcome:
        print("stages: " + ", ".join(f"{k} {v}" for k, v in outcome.items()))
    return 0 if all(v != "incomplete" for v in outcome.values()) else 3


# -------------------------------------------------------------------------------------------------------- download
def _download_parser(sub) -> None:
    p = sub.add_parser(
        "download", formatter_class=formatter, help="download DigiFace-1M zips (resumable)",
        description=textwrap.dedent("""\
            Download DigiFace-1M (Microsoft; Research Use of Data Agreement: non-commercial research only) into a
            directory. Interrupted downloads resume from where they stopped (HTTP Range); finished files are checked
            against their known sizes and skipped on a re-run. `digi2real embed DIR` reads the zips directly."""),
        epilog="examples:\n  digi2real download digiface -o data/digiface_zips             # all 8 zips\n"
               "  digi2real download digiface -o data/digiface_zips --parts 72   # the five 72-image zips\n"
               "  digi2real download digiface --list -o data/digiface_zips",
    )
    p.add_argument("dataset", choices=["digiface"], help="what to download")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="directory for the zip files")
    p.add_argument("--parts", nargs="+", default=["all"], metavar="PART",
                   help="default all (about 25 GB; the paper selects its identities from all 110K). " + _parts_help())
    p.add_argument("--list", action="store_true", help="list the part names, files and sizes, then exit")
    p.add_argument("--verify", action="store_true", help="also check every zip member's CRC (slow: reads 3 GB a zip)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before the download stops (re-run to resume)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_download)


def _parts_help() -> str:
    from digi2real.sources.digiface import PARTS_HELP

    return PARTS_HELP


def _cmd_download(args: argparse.Namespace) -> int:
    from digi2real.sources import digiface

    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise Digi2RealError(f"--timeout {args.timeout}: must be a positive number of seconds, e.g. --timeout 60")
    if args.list:
        for name, (filename, size) in digiface.DIGIFACE_PARTS.items():
            print(f"{name:16s} {filename:42s} {f'{size / 1e9:.2f} GB' if size else 'size unknown'}")
        return 0
    paths = digiface.download_digiface(args.output, args.parts, progress=not args.quiet, timeout=args.timeout,
                                       verify=args.verify)
    print(f"{len(paths)} file(s) ready in {args.output}")
    return 0


# ------------------------------------------------------------------------------------------------------------ demo
def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", formatter_class=formatter,
        help="the identity stages on procedural faces, in seconds (the whole method: digi2real run demo)",
        description="Render procedural identities, build a miniature random ArcFace (ONNX), then embed, select and "
                    "plan exactly as on DigiFace, and align two real photos (scikit-image's astronaut, matplotlib's "
                    "Grace Hopper) with the real MTCNN. Shows the machinery, not realistic faces. Seconds on a CPU. "
                    "For every stage through generation, training, evaluation and the report, run "
                    "`digi2real run demo` (what `make demo` does).",
    )
    p.add_argument("-o", "--output", type=Path, default=Path("demo-out"), metavar="DIR", help="where to write")
    p.add_argument("--identities", type=int, default=60, help="procedural identities to render")
    p.add_argument("--keep", type=int, default=40, help="identities to select")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from digi2real.demo import run_demo

    run_demo(args.output, identities=args.identities, keep=args.keep, progress=not args.quiet)
    return 0


# ---------------------------------------------------------------------------------------------------------- config
def _config_parser(sub) -> None:
    p = sub.add_parser(
        "config", formatter_class=formatter, help="the shipped experiment configs: list, show, write one out",
        description=textwrap.dedent("""\
            The experiment configs ship inside the package: the built-in miniature (demo), the paper's recipe
            (digi2real-20k), its ablations (ablations/...) and the small CPU check (smoke-cpu). Wherever a command
            takes a config (`run CONFIG`, `--config`, `extends:` in a YAML) a name works as well as a file; an
            existing file always wins. To start your own, write one out and edit it, or write a small YAML that
            says `extends: digi2real-20k` and only what changes."""),
        epilog=textwrap.dedent("""\
            examples:
              digi2real config list                              # every name, with what it is
              digi2real config show demo                         # print it
              digi2real config show digi2real-20k -o mine.yaml   # write it out, edit, then: digi2real run mine.yaml
              printf 'extends: digi2real-20k\\nplan: {alpha: 1.0}\\n' > a1.yaml && digi2real run a1.yaml --dry-run"""),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)
    actions.add_parser("list", help="the shipped configs' names and descriptions").set_defaults(func=_cmd_config_list)
    show = actions.add_parser(
        "show", formatter_class=formatter, help="print a shipped config, or write it to a file (-o)",
        description=textwrap.dedent("""\
            Print the shipped config NAME as it is (comments included), or write it to FILE (atomically; an existing
            FILE is kept unless --force). Its `extends:`, if any, names a shipped config, so the copy loads from any
            folder. NAME may also be written as in a clone (configs/demo.yaml) or with .yaml."""),
        epilog="examples:\n  digi2real config show ablations/t2-alpha-1\n"
               "  digi2real config show digi2real-20k -o mine.yaml && digi2real run mine.yaml --dry-run")
    show.add_argument("name", metavar="NAME", help="a shipped config's name (`digi2real config list`)")
    show.add_argument("-o", "--output", type=Path, metavar="FILE", help="write it here instead of printing it")
    show.add_argument("--force", action="store_true", help="replace FILE when it exists")
    show.set_defaults(func=_cmd_config_show)


def _cmd_config_list(args: argparse.Namespace) -> int:
    from digi2real.config import config_description, packaged_configs

    shipped = packaged_configs()
    width = max(map(len, shipped))
    for name, path in shipped.items():
        print(f"{name:{width}s}  {config_description(path)}")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from digi2real.config import packaged_config
    from digi2real.fileio import atomic_open

    text = packaged_config(args.name).read_bytes()
    if args.output is None:
        sys.stdout.write(text.decode("utf-8"))
        return 0
    if args.output.exists() and not args.force:
        raise Digi2RealError(f"{args.output}: already exists; choose another file, or add --force to replace it")
    with atomic_open(args.output, "wb") as handle:
        handle.write(text)
    print(f"wrote {args.name} to {args.output}; edit it, then: digi2real run {args.output}")
    return 0


def describe_os_error(exc: OSError) -> str:
    """``PATH: reason; what to check`` for an error from the operating system."""
    import errno

    path = exc.filename if exc.filename is not None else "a file"
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = {
        errno.EACCES: "check the permissions of the file and its folder, or choose another path",
        errno.EPERM: "check the permissions of the file and its folder, or choose another path",
        errno.EROFS: "the file system is read-only; choose an output folder you can write to",
        errno.ENOSPC: "the disk is full; free space or choose another output folder (finished work is kept)",
        errno.EDQUOT: "the disk quota is exceeded; free space or choose another output folder",
        errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
        errno.EISDIR: "a folder is where a file is expected; choose another path",
        errno.ENOENT: "check that the path exists",
        errno.EEXIST: "something is already there; choose another path",
        errno.ENAMETOOLONG: "use a shorter path",
    }.get(exc.errno, "check the path, its permissions and free space")
    return one_line(f"{path}: {reason}; {fix}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="digi2real", formatter_class=formatter,
        description="Realistic synthetic face-recognition data from rendered identities (the Digi2Real method).",
        epilog=PIPELINE + "\nRun `digi2real COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"digi2real {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _embed_parser(sub)
    _select_parser(sub)
    _plan_parser(sub)
    from digi2real.audit import commands as audit_commands
    from digi2real.dataset import commands as dataset_commands
    from digi2real.evaluation import commands as eval_commands
    from digi2real.faces import commands as face_commands
    from digi2real.generation import commands as generation_commands
    from digi2real.report import commands as report_commands
    from digi2real.training import commands as train_commands

    face_commands.register(sub)
    generation_commands.register(sub)
    audit_commands.register(sub)
    dataset_commands.register(sub)
    train_commands.register(sub)
    eval_commands.register(sub)
    report_commands.register(sub)
    _run_parser(sub)
    _download_parser(sub)
    _demo_parser(sub)
    _config_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2, already printed as one line)
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Digi2RealError as exc:
        print(f"digi2real: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A read-only or full output folder, -o naming a file, an unreadable input: the system's reason and the path.
        print(f"digi2real: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("digi2real: error: out of memory; lower the batch or block size settings, or use a smaller input",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("digi2real: interrupted; finished work is kept; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
