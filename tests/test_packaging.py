"""A plain install works (issue 13, item 5): the built wheel carries the configs, the shipped miniature models and the
MTCNN weights, and `digi2real` installed from it runs the demo by name from an empty folder and writes out the paper's
recipe to start one's own.

The wheel is built from a copy of the sources and installed into a fresh virtual environment that sees the project's
dependencies (a site folder of links to the current environment's, the project itself left out) but not the project:
``digi2real`` comes only from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "digi2real"


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _build_wheel(tmp: Path) -> Path:
    """`pip wheel` of a copy of the sources (the build writes build/ and *.egg-info beside them, never in the clone)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    done = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                 "-w", tmp / "dist", src], tmp, _env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("digi2real-*.whl")
    return wheel


def _dependencies_view(target: Path) -> Path:
    """A folder of links to every installed distribution of this environment except digi2real itself (its editable
    install would put the checkout on the path), so the fresh environment finds torch and the rest, not the project."""
    target.mkdir()
    sites = {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
    for site in sites:
        for entry in site.iterdir():
            if entry.name.lower().startswith(("digi2real", "__editable__")):
                continue
            if not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    return target


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1", **extra)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel, and a fresh virtual environment with the wheel (only) installed: its paths and build times."""
    tmp = tmp_path_factory.mktemp("packaging")
    start = time.perf_counter()
    wheel = _build_wheel(tmp)
    built = time.perf_counter() - start
    venv = tmp / "venv"
    # No pip inside the new environment: this environment's pip installs into it (--python), which is faster.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    (site,) = (venv / "lib").glob("python*/site-packages")
    view = _dependencies_view(tmp / "dependencies")
    # addsitedir, not a bare path: the dependencies' own .pth files must run as in their home environment.
    (site / "zz-dependencies.pth").write_text(f"import site; site.addsitedir({str(view)!r})\n")
    done = _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps",
                 "--no-index", "-q", wheel], tmp, _env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"wheel built in {built:.1f} s, installed in {time.perf_counter() - start - built:.1f} s")
    return {"wheel": wheel, "venv": venv, "site": site, "tmp": tmp}


def test_the_wheel_carries_configs_models_and_weights(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    shipped = [p for folder in ("configs", "assets", "faces/weights") for p in (PACKAGE / folder).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    assert {"digi2real/configs/demo.yaml", "digi2real/configs/digi2real-20k.yaml",
            "digi2real/configs/ablations/t2-alpha-1.yaml", "digi2real/assets/README.md"} <= names
    missing = {p.relative_to(PACKAGE.parent).as_posix() for p in shipped} - names
    assert not missing, f"in src/ but not in the wheel (pyproject.toml package-data): {sorted(missing)}"


def test_installed_digi2real_runs_the_demo_by_name_from_an_empty_folder(installed):
    venv, site = installed["venv"], installed["site"]
    work = installed["tmp"] / "empty"
    work.mkdir()
    env = _env(HF_HUB_OFFLINE="1", HF_HOME=str(installed["tmp"] / "hf"))
    probe = ("import digi2real; from digi2real.config import load_experiment, resolve_config as r; "
             "print(digi2real.__file__, r('ablations/t2-alpha-1'), load_experiment('ablations/t2-alpha-1').plan.alpha)")
    where = _run([venv / "bin" / "python", "-c", probe], work, env)
    package, overlay, alpha = where.stdout.split()
    # digi2real is the wheel's, not the clone's; a shipped overlay extends the shipped recipe by name.
    assert Path(package).is_relative_to(site) and Path(overlay).is_relative_to(site), where.stdout + where.stderr
    assert alpha == "1.0"

    start = time.perf_counter()
    # The demo by name, made smaller so the suite stays quick (`make demo` runs it whole).
    small = ["--set", "source.identities=14", "--set", "select.n=6", "--set", "plan.images_per_identity=4",
             "--set", "plan.images_per_latent=2", "--set", "generate.steps=4", "--set", "train.epochs=1", "--set", "train.batch_size=12",
             "--set", "report.training_identities=100"]
    demo = _run([venv / "bin" / "digi2real", "run", "demo", "-q", *small], work, env, timeout=600)
    print(f"`digi2real run demo` from the wheel: {time.perf_counter() - start:.1f} s")
    assert demo.returncode == 0, demo.stderr[-3000:]
    stages = "embed, select, plan, shift, generate, audit, pack, train, eval, report"
    assert demo.stdout.splitlines()[-1] == "stages: " + ", ".join(f"{s} ran" for s in stages.split(", "))
    # The shipped config's output_dir is relative to the working folder, not to the installed package.
    assert (work / "demo-out" / "run" / "report.html").is_file()
    assert not list((site / "digi2real").rglob("demo-out"))


def test_installed_config_show_writes_a_recipe_that_runs_from_anywhere(installed):
    venv = installed["venv"]
    work = installed["tmp"] / "mine"
    work.mkdir()
    env = _env(HF_HUB_OFFLINE="1", HF_HOME=str(installed["tmp"] / "hf"))
    digi2real = venv / "bin" / "digi2real"
    shown = _run([digi2real, "config", "show", "digi2real-20k", "-o", "mine.yaml"], work, env)
    assert shown.returncode == 0, shown.stderr
    assert (work / "mine.yaml").read_bytes() == (PACKAGE / "configs" / "digi2real-20k.yaml").read_bytes()
    dry = _run([digi2real, "run", "mine.yaml", "--dry-run"], work, env)
    # Exit 2 with the preflight's list of what is missing (no data here), not a crash or a missing config.
    assert dry.returncode == 2 and "Traceback" not in dry.stderr, dry.stderr[-3000:]
    assert dry.stderr.startswith("digi2real: error: mine.yaml: "), dry.stderr[:500]
    assert "  - source: data/digiface: not found" in dry.stderr
    assert not (work / "runs").exists()  # a dry run writes nothing
