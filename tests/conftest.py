"""Shared fixtures: miniature ONNX face encoders built once per session, in the layout a user's download has."""

from __future__ import annotations

from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image

from digi2real.config import DetectorConfig
from digi2real.miniature import build_mini_arc2face, build_mini_arcface
from digi2real.sources.procedural import render_item


@pytest.fixture(scope="session")
def mini_arcface(tmp_path_factory) -> Path:
    """A random MiniArcFace exported to ONNX that expects (x - 127.5) / 127.5 inputs, like most ArcFace files."""
    return build_mini_arcface(tmp_path_factory.mktemp("models") / "arcface.onnx", seed=0)


@pytest.fixture(scope="session")
def mini_arcface_inside(tmp_path_factory) -> Path:
    """The same network with the normalisation inside the graph (first nodes Sub, Mul), as some exports have."""
    return build_mini_arcface(tmp_path_factory.mktemp("models") / "arcface_inside.onnx", seed=0, normalize_inside=True)


@pytest.fixture(scope="session")
def mini_arc2face(tmp_path_factory) -> tuple[Path, Path]:
    """Random miniature Arc2Face (repo dir: arc2face/, encoder/, arcface.onnx) and SD1.5 base (vae/, tokenizer/,
    scheduler/) in the hub layout; 64 x 64 images. Returns (repo_dir, base_dir)."""
    return build_mini_arc2face(tmp_path_factory.mktemp("arc2face"), seed=0, size=64)


@pytest.fixture(scope="session")
def mini_generator(mini_arc2face):
    """The miniature loaded once through :meth:`Arc2Face.from_pretrained` on the CPU in float32."""
    from digi2real.generation.arc2face import Arc2Face

    repo, base = mini_arc2face
    return Arc2Face.from_pretrained(repo, base, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def detector():
    """The real MTCNN with the packaged weights, on the CPU."""
    from digi2real.faces.mtcnn import MTCNN

    return MTCNN.from_package(DetectorConfig(), device="cpu")


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """scikit-image's astronaut.png (512 x 512, one face): a real photo shipped by an installed package."""
    return np.array(skimage.data.astronaut())


@pytest.fixture(scope="session")
def grace() -> np.ndarray:
    """matplotlib's grace_hopper.jpg (one face)."""
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        return np.array(img.convert("RGB"))


class ArraySet:
    """A TrainingSet over images rendered once into memory (keeps rendering out of the timed loop; picklable)."""

    def __init__(self, identities: int, per: int, seed: int = 0) -> None:
        self.images = np.stack([render_item(seed, i, k) for i in range(identities) for k in range(per)])
        self.labels = np.repeat(np.arange(identities, dtype=np.int64), per)
        self.num_classes = identities

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def kill_when_rows(cmd: list[str], manifest: Path, rows: int, timeout: float = 300.0) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``manifest`` holds ``rows`` lines: a crash in the middle of the work."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_text().count("\n") >= rows:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()[-800:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for a training test (modules opt in with ``pytestmark``): on the shared 2-core
    machine oversubscribed threads ran the learning test 87-286 s with two threads, depending on what else ran, and
    77 s with one."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_train_cfg(**kw):
    """The training tests' miniature recipe: IResNet widths 8-16, AdaFace, CPU, fp32, no loader workers; ``kw``
    overrides any field."""
    from digi2real.config import DataConfig, TrainConfig

    base = dict(widths=(8, 8, 16, 16), depths=(1, 1, 1, 1), stem_stride=2, embedding_dim=32, head="adaface",
                batch_size=32, epochs=2, lr=0.05, warmup_epochs=0.5, device="cpu", log_every=2, dropout=0.1,
                augment="flip+photometric+lowres", data=DataConfig(workers=0))
    base.update(kw)
    return TrainConfig(**base)

