"""The built-in miniature: every stage so far, on procedural faces and a miniature random ArcFace, in seconds, plus
`align` (the real MTCNN) on two real photos shipped by installed packages.

It shows the machinery (artifacts, resumability, selection, planning) with no download. The embeddings of a random
network carry no real identity information, so the selected identities mean nothing; on DigiFace with the real
``arcface.onnx`` the same commands reproduce the paper's recipe.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from digi2real.config import EmbedConfig, EncoderConfig, PlanConfig, SelectConfig
from digi2real.errors import Digi2RealError
from digi2real.faces.arcface import ArcFaceEncoder
from digi2real.identity.embed import embed_source
from digi2real.identity.plan import make_plan, write_plan
from digi2real.identity.select import select_identities, write_selection
from digi2real.identity.store import read_store
from digi2real.miniature import build_mini_arcface
from digi2real.sources.digiface import DigiFaceFolderSource
from digi2real.sources.procedural import write_procedural_tree


def run_demo(out: Path, identities: int = 60, keep: int = 40, progress: bool = True) -> dict:
    """Render -> embed -> select -> plan under ``out``; returns the paths of what it wrote."""
    out = Path(out)
    started = time.perf_counter()
    source_dir = out / "source"
    if not (source_dir / str(identities - 1) / "4.png").is_file():
        print(f"[demo] rendering {identities} procedural identities x 5 images in DigiFace layout -> {source_dir}")
        write_procedural_tree(source_dir, identities, 5, seed=0)
    model = out / "models" / "arcface-mini.onnx"
    if not model.is_file():
        print(f"[demo] building a miniature random ArcFace (ONNX) -> {model}")
        build_mini_arcface(model, seed=0)

    encoder = ArcFaceEncoder.load(EncoderConfig(model=str(model), batch_size=64))
    with DigiFaceFolderSource(source_dir) as source:
        summary = embed_source(source, encoder, out / "embeddings", EmbedConfig(images_per_identity=5),
                               progress=progress)
    print(f"[demo] embed: {summary.embedded} embeddings of {summary.identities} identities -> {out / 'embeddings'}")

    store = read_store(out / "embeddings")
    selection = select_identities(store, SelectConfig(n=keep))
    write_selection(out / "ids.csv", selection)
    print(f"[demo] select: kept {len(selection.identities)} least similar identities -> {out / 'ids.csv'}")

    plan = make_plan(store, selection.identities, PlanConfig(images_per_identity=20, images_per_latent=5, alpha=2.0))
    write_plan(out / "plan.parquet", plan)
    print(f"[demo] plan: {len(plan)} images ({keep} identities x 20, 4 SLERP latents each) -> {out / 'plan.parquet'}")
    aligned = _align_real_photos(out, progress)
    print(f"[demo] done in {time.perf_counter() - started:.1f} s")
    return {"source": source_dir, "model": model, "embeddings": out / "embeddings", "ids": out / "ids.csv",
            "plan": out / "plan.parquet", "aligned": aligned}


def _sample_photos() -> list[Path]:
    """Real face photos shipped inside installed packages (scikit-image's astronaut, matplotlib's Grace Hopper)."""
    found = []
    try:
        import skimage

        found.append(Path(skimage.__file__).parent / "data" / "astronaut.png")
    except ImportError:
        pass
    try:
        import matplotlib

        found.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    except ImportError:
        pass
    return [p for p in found if p.is_file()]


def align_sample_photos(dest: Path, progress: bool = False) -> int:
    """Align the real photos shipped by installed packages into ``dest`` (112 x 112 crops); returns how many."""
    import tempfile

    from digi2real.faces.align_stage import align_folder

    photos = _sample_photos()
    if not photos:
        raise Digi2RealError("no sample photos found: the demo's real faces come from scikit-image and matplotlib; "
                             "install them (pip install -e '.[test]')")
    with tempfile.TemporaryDirectory() as tmp:
        for photo in photos:
            shutil.copyfile(photo, Path(tmp) / photo.name)
        summary = align_folder(Path(tmp), dest, progress=progress)
    return summary.ok


def _align_real_photos(out: Path, progress: bool) -> Path | None:
    """`align` on real photos: MTCNN with the packaged weights, 5-point alignment to the ArcFace template."""
    from digi2real.faces.align_stage import align_folder

    photos = _sample_photos()
    if not photos:
        print("[demo] align: skipped (scikit-image and matplotlib, which ship the sample photos, are not installed)")
        return None
    src = out / "photos"
    src.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        if not (src / photo.name).is_file():
            shutil.copyfile(photo, src / photo.name)
    summary = align_folder(src, out / "aligned", progress=progress)
    print(f"[demo] align: {summary.ok} of {summary.total} real photos aligned to 112 x 112 -> {out / 'aligned'}")
    return out / "aligned"
