"""Face models under evaluation: IResNet state dicts (insightface layout), ONNX graphs, flip sum, unsafe pickles."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from digi2real.config import EvalConfig
from digi2real.errors import ConfigError, ModelError
from digi2real.evaluation.models import infer_iresnet, load_face_model
from digi2real.miniature import MiniArcFace, export_face_encoder
from digi2real.training.iresnet import IResNet


def _tiny_iresnet(seed: int = 0) -> IResNet:
    torch.manual_seed(seed)
    net = IResNet((1, 2, 1, 1), widths=(8, 16, 32, 64), embedding_dim=32)
    # non-trivial BN statistics so that a wrong eval/train mode or preprocessing shows in the outputs
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _images(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def _reference(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        return net((t / 255.0 - 0.5) / 0.5).numpy()


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory) -> tuple[Path, IResNet]:
    """insightface-style backbone.pth: DataParallel "module." prefix, wrapped under "state_dict"."""
    net = _tiny_iresnet()
    path = tmp_path_factory.mktemp("pth") / "backbone.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return path, net


def test_state_dict_depth_and_widths_inferred(tiny_pth) -> None:
    path, net = tiny_pth
    model = load_face_model(path, EvalConfig(flip=False, batch_size=2, device="cpu"))
    assert model.kind == "iresnet"
    assert model.info["layers"] == [1, 2, 1, 1]
    assert model.info["widths"] == [8, 16, 32, 64]
    assert model.embedding_dim == 32
    x = _images(5)
    np.testing.assert_allclose(model.embed(x), _reference(net, x), rtol=1e-4, atol=1e-5)


def test_real_depth_names_from_keys() -> None:
    state = {k: v for k, v in IResNet((3, 4, 14, 3), widths=(8, 16, 32, 64), embedding_dim=16).state_dict().items()}
    arch = infer_iresnet(state)
    assert arch["layers"] == (3, 4, 14, 3) and arch["widths"] == (8, 16, 32, 64) and arch["stem_stride"] == 1


def test_model_dir_and_flip_sum(tiny_pth, tmp_path) -> None:
    _, net = tiny_pth
    # our training output: a directory with model.pt holding a plain (unprefixed) backbone state dict
    torch.save(net.state_dict(), tmp_path / "model.pt")
    flipped = load_face_model(tmp_path, EvalConfig(flip=True, batch_size=3, device="cpu"))
    x = _images(4, seed=1)
    expected = _reference(net, x) + _reference(net, x[:, :, ::-1])
    got = flipped.embed(x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # unnormalised: the sum is returned as is (the protocols normalise)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)
    assert flipped.name == tmp_path.name


def test_bf16_on_cpu_runs_and_fp16_refused(tiny_pth) -> None:
    path, net = tiny_pth
    x = _images(2)
    bf16 = load_face_model(path, EvalConfig(flip=False, precision="bf16", device="cpu")).embed(x)
    assert bf16.dtype == np.float32
    ref = _reference(net, x)
    assert np.abs(bf16 - ref).max() < 0.1 * np.abs(ref).max()
    with pytest.raises(ConfigError, match="fp16"):
        load_face_model(path, EvalConfig(precision="fp16", device="cpu"))


class _Evil:
    """Pickles into a call of ``open(marker, "w")``: loading it with a plain unpickler creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch", "raw"])
def test_malicious_pickle_refused_without_running(tmp_path, writer) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "backbone.pth"
    payload = {"conv1.weight": torch.zeros(1), "evil": _Evil(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ModelError, match="refused"):
        load_face_model(path, EvalConfig(device="cpu"))
    assert not marker.exists()
    # the test's own payload is real: a plain unpickler does run it
    pickle.loads(pickle.dumps(_Evil(marker))).close()
    assert marker.exists()


def test_clear_errors(tmp_path) -> None:
    cfg = EvalConfig(device="cpu")
    with pytest.raises(ModelError, match="not found"):
        load_face_model(tmp_path / "missing.pth", cfg)
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF")
    with pytest.raises(ModelError, match="unknown model format"):
        load_face_model(tmp_path / "weights.h5", cfg)
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="not an insightface IResNet"):
        load_face_model(tmp_path / "other.pth", cfg)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no model.pt"):
        load_face_model(empty, cfg)


def test_onnx_model_matches_torch(tmp_path) -> None:
    torch.manual_seed(0)
    net = MiniArcFace(width=4, dim=24).eval()
    x = _images(3, seed=2)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        expected = net((t - 127.5) / 127.5).numpy()
    outside = load_face_model(export_face_encoder(net, tmp_path / "out.onnx"), EvalConfig(flip=False, device="cpu"))
    inside = load_face_model(export_face_encoder(net, tmp_path / "in.onnx", normalize_inside=True),
                             EvalConfig(flip=False, device="cpu"))
    assert outside.kind == "onnx" and outside.embedding_dim == 24
    assert inside.info["normalisation"] == "inside graph"
    np.testing.assert_allclose(outside.embed(x), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(inside.embed(x), expected, rtol=1e-4, atol=1e-4)


def test_onnx_other_input_size_resizes(tmp_path) -> None:
    # A network taking 56 x 56 crops: 112 crops are resized (bilinear, antialiased) before the graph.
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 28 * 28, 8)).eval()
    path = export_face_encoder(net, tmp_path / "small.onnx", input_size=56)
    model = load_face_model(path, EvalConfig(flip=False, device="cpu"))
    assert model.info["input_size"] == 56
    x = _images(2, seed=3)
    t = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float(), size=(56, 56),
                                        mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        expected = net((t - 127.5) / 127.5).numpy()
    np.testing.assert_allclose(model.embed(x), expected, rtol=1e-4, atol=1e-4)


def test_onnx_cuda_without_provider_is_clear(tmp_path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime here has CUDA")
    path = export_face_encoder(MiniArcFace(width=4, dim=8), tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="eval.device is 'cuda'"):
        load_face_model(path, EvalConfig(device="cuda"))
