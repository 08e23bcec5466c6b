"""Every sub-command, given careless input (a missing path, random bytes where a file of ours belongs, an output
that names an existing file, a usage error): one line, exit status 2, nothing changed (``hostile.refused``).

The cases here are the same for every command, so a new sub-command inherits them by being listed in ``COMMANDS``;
the stage-specific hostile inputs live in each stage's own tests (test_hostile_identity.py and the others).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from digi2real.cli import build_parser

from hostile import refused

MISSING = "{tmp}/does-not-exist"


def _garbage(tmp: Path, name: str) -> Path:
    path = tmp / "inputs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(3000))
    return path


#: argv templates per sub-command: {missing} is a path that does not exist, {garbage:NAME} a file of random bytes
#: called NAME, {file} an existing text file (as an output), {out} a fresh output path, {dir} an existing folder.
COMMANDS: dict[str, list[str]] = {
    "embed": ["embed", "{missing}", "-o", "{out}", "--encoder", "{garbage:arcface.onnx}", "-q"],
    "select": ["select", "{missing}", "-o", "{out}/ids.csv"],
    "plan": ["plan", "{missing}", "--ids", "{garbage:ids.csv}", "-o", "{out}/plan.parquet"],
    "shift": ["shift", "--real", "{missing}", "--synthetic", "{missing}", "-o", "{out}/shift.safetensors",
              "--arc2face", "{missing}", "--base", "{missing}", "--encoder", "{garbage:arcface.onnx}", "-q"],
    "generate": ["generate", "{garbage:plan.parquet}", "-o", "{out}", "--embeddings", "{missing}", "-q"],
    "regenerate": ["regenerate", "{missing}", "some/key", "-q"],
    "audit": ["audit", "{missing}", "--against", "{missing}", "-o", "{out}", "-q"],
    "align": ["align", "{missing}", "-o", "{out}", "-q"],
    "pack": ["pack", "{missing}", "-o", "{out}", "-q"],
    "verify": ["verify", "{missing}"],
    "train": ["train", "--data", "{missing}", "-o", "{out}", "-q"],
    "export": ["export", "{missing}", "--onnx", "-o", "{out}/m.onnx"],
    "eval": ["eval", "{garbage:model.onnx}", "--data-root", "{missing}", "-o", "{out}", "-q"],
    "compare": ["compare", "{missing}", "-o", "{out}"],
    "report": ["report", "{missing}", "-o", "{out}/r.html"],
    "run": ["run", "{missing}", "--dry-run"],
    "download": ["download", "digiface", "-o", "{file}", "--parts", "5", "-q"],
    "demo": ["demo", "-o", "{file}", "-q"],
    "config": ["config", "show", "{missing}", "-o", "{out}/mine.yaml"],
}

#: Commands whose main file input can be replaced by random bytes: (argv template, the input's name).
GARBAGE_INPUTS: dict[str, list[str]] = {
    "select": ["select", "{dir}", "-o", "{out}/ids.csv"],
    "plan": ["plan", "{dir}", "--ids", "{garbage:ids.csv}", "-o", "{out}/plan.parquet"],
    "generate": ["generate", "{garbage:plan.parquet}", "-o", "{out}", "-q"],
    "regenerate": ["regenerate", "{dir}", "0/0", "-q"],
    "audit": ["audit", "{dir}", "--against", "{garbage:lfw.bin}", "-o", "{out}", "-q"],
    "verify": ["verify", "{dir}"],
    "export": ["export", "{dir}", "--onnx", "-o", "{out}/m.onnx"],
    "run": ["run", "{garbage:config.yaml}", "--dry-run"],
    "train": ["train", "{garbage:config.yaml}", "-o", "{out}", "-q"],
    "report": ["report", "{dir}", "-o", "{out}/r.html"],
    "compare": ["compare", "{dir}", "-o", "{out}"],
}


def _fill(template: list[str], tmp: Path) -> list[str]:
    out = []
    for arg in template:
        if arg.startswith("{garbage:"):
            out.append(str(_garbage(tmp, arg[len("{garbage:"):-1])))
            continue
        arg = arg.replace("{missing}", str(tmp / "does-not-exist")).replace("{out}", str(tmp / "out"))
        arg = arg.replace("{dir}", str(tmp / "inputs"))
        if "{file}" in arg:
            (tmp / "afile").write_text("an unrelated file\n")
            arg = arg.replace("{file}", str(tmp / "afile"))
        out.append(arg)
    return out


def test_every_sub_command_is_listed():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_missing_inputs_give_one_line(tmp_path, capsys, command):
    argv = _fill(COMMANDS[command], tmp_path)
    refused(capsys, argv, tmp_path)
    assert not (tmp_path / "out").exists() or command in ("eval",) and not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("command", sorted(GARBAGE_INPUTS))
def test_random_bytes_where_our_files_belong_give_one_line(tmp_path, capsys, command):
    (tmp_path / "inputs").mkdir()
    for name in ("meta.json", "embeddings.safetensors", "index.parquet", "generation.json", "model.pt",
                 "checkpoint.pt", "train.rec", "train.idx", "property", "results.json", "config.yaml",
                 "pipeline.json"):
        _garbage(tmp_path, name)
    (tmp_path / "inputs" / "manifest").mkdir()
    _garbage(tmp_path, "manifest/shard-00000-of-00001.jsonl")
    argv = _fill(GARBAGE_INPUTS[command], tmp_path)
    refused(capsys, argv, tmp_path / "inputs")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_usage_errors_are_one_line(tmp_path, capsys, command):
    line = refused(capsys, [command, "--no-such-flag"], tmp_path)
    assert f"digi2real {command}" in line and "--help" in line
