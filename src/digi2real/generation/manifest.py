"""The files of a generated dataset, read and written through one module: the layout (``images/``, ``raw/``,
``manifest/``, ``generation.json``, ``card.md``), the record of how it was made (created once, by the first shard to
start), each shard's run record (``manifest/shard-*.run.json``: where its models ran, rewritten by every run of that
shard) and the manifest rows (one per attempt at an image, appended by each shard under a lock). The runner writes
them; the card, `regenerate`, `pack`, the report and `run` read them here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any

from digi2real.errors import Digi2RealError
from digi2real.fileio import read_json, temporary_prefix, write_json
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # read once, at import: os.umask is process-wide, racy with threads running


def create_record(out_dir: Path, record: dict) -> bool:
    """Write ``generation.json`` unless it exists (False then): shards launched together race to start a dataset,
    and exactly one record wins, whole, whatever the file system (a hard link never replaces a file; where links are
    not supported, a rename of a complete temporary)."""
    path = out_dir / SETTINGS_FILE
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, sort_keys=True, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)  # as a plain open() would make it (mkstemp's 0600 would hide it from others)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------------------ run records

RUN_FIX = "delete it: the next run of that shard writes it again"
#: What a shard's run record holds: its shard, where each model ran and how the engine was set up.
RUN_KEYS: dict[str, type | tuple[type, ...]] = {"shard": str, "models": dict}


def run_record_path(out_dir: Path, shard: Shard) -> Path:
    return out_dir / MANIFEST_DIR / manifest_name(shard).replace(".jsonl", ".run.json")


def write_run_record(out_dir: Path, shard: Shard, info: dict) -> None:
    """This shard's run record (where its models ran, its engine), replaced by each of its runs."""
    write_json(run_record_path(out_dir, shard), {"shard": str(shard), **info})


def read_run_records(out_dir: Path) -> list[dict]:
    """Every shard's run record, in shard order; one that is not ours is refused with one line."""
    return [read_json(p, fix=RUN_FIX, keys=RUN_KEYS) for p in sorted((out_dir / MANIFEST_DIR).glob("*.run.json"))]


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


def _whole_lines(path: Path, chunk: int = 1 << 16) -> int:
    """The length of ``path`` up to its last newline: what is left when a kill's unterminated last line is cut off.
    Read from the end, in bytes (a manifest holds a row per attempt: 400 MB at 400K images; a damaged file is refused
    by :func:`read_rows`, with its line, not here)."""
    with open(path, "rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            start = max(0, position - chunk)
            handle.seek(start)
            data = handle.read(position - start)
            if position == end and data.endswith(b"\n"):
                return end
            newline = data.rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            position = start
        return 0


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
        whole = _whole_lines(path)
        if whole < os.fstat(self.handle.fileno()).st_size:
            os.ftruncate(self.handle.fileno(), whole)
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
