"""The files of a generated dataset, read and written through one module: the layout (``images/``, ``raw/``,
``manifest/``, ``generation.json``, ``card.md``), the record of how it was made, and the manifest rows (one per attempt
at an image, appended by each shard under a lock). The runner writes them; the card, `regenerate`, `pack`, the report
and `run` read them here.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO, Any

from digi2real.errors import Digi2RealError
from digi2real.fileio import read_json
from digi2real.sharding import Shard

IMAGES_DIR = "images"
RAW_DIR = "raw"
MANIFEST_DIR = "manifest"
SETTINGS_FILE = "generation.json"
CARD_FILE = "card.md"


RECORD_FIX = ("it records how this dataset was made: restore it from a backup, or generate into a new output "
              "folder")
MANIFEST_FIX = ("the manifest is corrupt: restore it, or delete that line and run the same `digi2real generate` "
                "again to redo its image")


#: The parts of ``generation.json`` each reader needs, with their types: a resumed run compares ``settings``; the
#: card reads the settings and counts; `regenerate` rebuilds the job from the inputs and configs recorded.
RECORD_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "resume": {"settings": dict},
    "card": {"settings": dict, "planned_images": int},
    "regenerate": {"settings": dict, "plan": str, "embeddings": str, "shift": (str, type(None)),
                   "align_config": dict, "arc2face_config": dict, "encoder": dict},
}
SETTINGS_KEYS: dict[str, type | tuple[type, ...]] = {
    "generate": dict, "align": dict, "arc2face": dict, "device": str, "dtype": str, "plan_sha256": str,
    "embeddings_sha256": str, "arcface_sha256": str, "shift_sha256": (str, type(None)),
}


def read_record(out_dir: Path, purpose: str = "regenerate") -> dict:
    """``generation.json`` of a dataset, refused with one line naming it and the fix when it is unreadable or lacks
    what ``purpose`` (``resume``, ``card``, ``regenerate``) reads."""
    path = out_dir / SETTINGS_FILE
    record = read_json(path, fix=RECORD_FIX, keys=RECORD_KEYS[purpose])
    if purpose != "resume":
        settings = record["settings"]
        for key, kind in SETTINGS_KEYS.items():
            if not isinstance(settings.get(key), kind):
                raise Digi2RealError(f"{path}: corrupt ('settings.{key}' missing or of the wrong type); {RECORD_FIX}")
    return record


# ------------------------------------------------------------------------------------------------------ manifest


def manifest_name(shard: Shard) -> str:
    return f"shard-{shard.index:05d}-of-{shard.count:05d}.jsonl"


_NONE = type(None)
_NUMBER = (int, float)
#: Keys every manifest row has (resume reads them), and the types of the optional ones the card reads.
ROW_KEYS: dict[str, type | tuple[type, ...]] = {"key": str, "final": bool, "status": str, "attempt": int}
ROW_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "identity": str, "path": (str, _NONE), "raw_path": (str, _NONE), "reason": (str, _NONE),
    "id_similarity": (*_NUMBER, _NONE), "proto_similarity": (*_NUMBER, _NONE), "detection": (dict, _NONE),
}


def _row_problem(row: Any) -> str | None:
    """Why a parsed manifest line is not a row we wrote (None when it is one)."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for key, kind in ROW_KEYS.items():
        value = row.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{key!r} missing or of the wrong type"
    if row["attempt"] < 0:
        return "'attempt' is negative"
    for key, kind in ROW_OPTIONAL.items():
        if key in row and (not isinstance(row[key], kind) or isinstance(row[key], bool)):
            return f"{key!r} of the wrong type"
    return None


def read_rows(out_dir: Path) -> list[dict]:
    """Every manifest row of the dataset, all shards, in file then line order (a truncated last line, as a kill
    leaves, is skipped); a line that is not a row we wrote is refused with one line naming it."""
    rows = []
    for file in sorted((out_dir / MANIFEST_DIR).glob("*.jsonl")):
        try:
            lines = file.read_bytes().decode("utf-8").split("\n")
        except UnicodeDecodeError:
            raise Digi2RealError(f"{file}: not text (binary data); {MANIFEST_FIX}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: "[[[[..." nested beyond the parser
                if n == len(lines):
                    continue
                raise Digi2RealError(f"{file}:{n}: not a JSON row; {MANIFEST_FIX}") from None
            problem = _row_problem(row)
            if problem:
                raise Digi2RealError(f"{file}:{n}: not a manifest row ({problem}); {MANIFEST_FIX}")
            rows.append(row)
    return rows


class ManifestWriter:
    """This shard's manifest, opened for appending under an exclusive lock (a second process on the same shard is
    refused), its unterminated last line from a kill cut off first."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.handle: IO[str] = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise Digi2RealError(f"{path}: another process is generating this shard; give each process its own "
                                 "--shard, or wait for it to finish") from None
        self.handle.seek(0)
        data = self.handle.read()
        if data and not data.endswith("\n"):
            self.handle.truncate(len(data[: data.rfind("\n") + 1].encode("utf-8")))
        self.handle.seek(0, os.SEEK_END)

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.handle.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def final_keys(rows: list[dict]) -> set[str]:
    return {r["key"] for r in rows if r.get("final")}
