"""The contract every source of identities fulfils.

A source is a set of identities, each with an ordered list of images. Listing is deterministic (identities and files
in natural order: ``2`` before ``10``), so "the first k images of each identity" and every row index downstream mean
the same thing on every machine.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SourceItem:
    """One image of a source: its identity and its path relative to the source root (``<identity>/<file>``)."""

    identity: str
    path: str


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded integers numerically: ``2.png`` < ``10.png``, ``id9`` < ``id10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


class ImageSource(ABC):
    """A collection of identities with ordered images. Subclasses implement listing and loading."""

    #: Short kind name recorded in artifacts ("digiface-folder", "digiface-zip", "folder", "procedural").
    kind: str = "source"

    @abstractmethod
    def describe(self) -> dict:
        """JSON-serialisable description (kind, location, settings) recorded in artifact metadata."""

    @abstractmethod
    def list_items(self, per_identity: int | None = None) -> list[SourceItem]:
        """All images in deterministic order, or the first ``per_identity`` of each identity."""

    @abstractmethod
    def load(self, item: SourceItem) -> np.ndarray:
        """The image as RGB uint8 H x W x 3; raises BadImageError for an unusable file."""

    def content_fingerprint(self, items: list[SourceItem]) -> str:
        """A hash of what ``items`` hold now, so work resumed from them notices images replaced under the same names
        (DESIGN "Safety": resumable work verifies what it resumes from). Sources whose pixels follow from
        :meth:`describe` alone (the renderer) keep this default; file-backed sources hash sizes and times or CRCs."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files (zip handles)."""

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def identities(self) -> list[str]:
        seen: dict[str, None] = {}
        for item in self.list_items(per_identity=1):
            seen.setdefault(item.identity, None)
        return list(seen)


def take_first(items_by_identity: dict[str, list[str]], per_identity: int | None) -> list[SourceItem]:
    """Flatten ``{identity: [paths...]}`` (already ordered) into items, keeping the first ``per_identity`` of each."""
    out: list[SourceItem] = []
    for identity, paths in items_by_identity.items():
        chosen = paths if per_identity is None else paths[:per_identity]
        out.extend(SourceItem(identity, p) for p in chosen)
    return out
