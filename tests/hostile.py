"""What every hostile-input test checks: exit status 2, one line on stderr, and nothing the user had changed.

``refused(capsys, argv, *watched)`` runs the CLI in-process and returns its error line after asserting exit 2, exactly
one ``digi2real: error:`` line, no traceback, and that every file under ``watched`` (inputs and earlier outputs) is
byte-identical, with the same permissions, afterwards, and that no file appeared or vanished there.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from digi2real.cli import main


def snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mode of every file (and the mode of every folder) under ``roots``."""
    out: dict[str, tuple[str, int]] = {}
    for root in roots:
        root = Path(root)
        if root.is_file():
            out[str(root)] = (hashlib.sha256(root.read_bytes()).hexdigest(), root.stat().st_mode)
            continue
        for dirpath, dirs, files in os.walk(root):
            out[dirpath] = ("<dir>", os.stat(dirpath).st_mode)
            for name in files:
                path = Path(dirpath) / name
                out[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
    return out


def refused(capsys, argv: list[str], *watched: Path) -> str:
    """Run ``digi2real argv``; assert the refusal contract (module doc) and return the error line."""
    before = snapshot(*watched)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, f"exit {code}, stderr: {err[-2000:]}"
    errors = [ln for ln in lines if ln.startswith("digi2real: error: ")]
    assert len(errors) == 1, f"expected one error line, got: {err[-2000:]}"
    assert "Traceback" not in err
    assert snapshot(*watched) == before, "an input or an earlier output changed"
    return errors[0]
