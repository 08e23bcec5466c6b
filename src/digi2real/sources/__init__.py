"""Where identities come from: DigiFace-1M (folders or zips), any folder-per-identity set, or the built-in renderer."""

from __future__ import annotations

from digi2real.config import SourceConfig
from digi2real.errors import Digi2RealError
from digi2real.sources.base import ImageSource, SourceItem, natural_key

__all__ = ["ImageSource", "SourceItem", "natural_key", "open_source", "parse_source_spec"]


def parse_source_spec(spec: str) -> SourceConfig:
    """Turn a CLI SOURCE argument into settings.

    ``procedural`` or ``procedural:IDSxIMGS[:SEED]`` (e.g. ``procedural:200x5:0``) selects the built-in renderer;
    anything else is a path (DigiFace folders, a directory of DigiFace zips, one zip, or a folder-per-identity tree).
    """
    if spec == "procedural" or spec.startswith("procedural:"):
        fields: dict = {"kind": "procedural"}
        rest = spec.split(":")[1:]
        try:
            if rest and rest[0]:
                ids, _, imgs = rest[0].partition("x")
                fields["identities"] = int(ids)
                if imgs:
                    fields["images_per_identity"] = int(imgs)
            if len(rest) > 1 and rest[1]:
                fields["seed"] = int(rest[1])
        except ValueError:
            raise Digi2RealError(
                f"source {spec!r}: expected procedural:IDENTITIESxIMAGES[:SEED], e.g. procedural:200x5:0"
            ) from None
        from digi2real.config import validate_config

        return validate_config(SourceConfig, fields, origin=f"source {spec!r}")
    return SourceConfig(kind="auto", path=spec)


def open_source(cfg: SourceConfig) -> ImageSource:
    """Open the source that ``cfg`` describes; ``kind: auto`` inspects the path."""
    if cfg.kind == "procedural":
        from digi2real.sources.procedural import ProceduralSource

        return ProceduralSource(cfg.identities, cfg.images_per_identity, seed=cfg.seed, style=cfg.style,
                                first_identity=cfg.first_identity)

    from digi2real.sources import digiface, folder

    assert cfg.path is not None
    path = cfg.path
    if not path.exists():
        raise Digi2RealError(f"{path}: source not found; pass a DigiFace folder, a folder of its zips, or an image tree")
    if cfg.kind == "folder":
        return folder.FolderSource(path)
    layout = digiface.detect_layout(path)
    if cfg.kind == "digiface" and layout == "folder-tree":
        layout = "digiface-folder"
    if layout == "digiface-zip":
        return digiface.DigiFaceZipSource(path)
    if layout == "digiface-folder":
        return digiface.DigiFaceFolderSource(path)
    return folder.FolderSource(path)
