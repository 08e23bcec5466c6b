"""The onnxruntime ArcFace encoder on tiny exported models (FACTS 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from digi2real.config import EncoderConfig
from digi2real.errors import ModelError
from digi2real.faces.arcface import ArcFaceEncoder, resolve_model_file
from digi2real.miniature import MiniArcFace, export_face_encoder


def _faces(n=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)


def test_embeddings_match_the_torch_network_on_preprocessed_input(tmp_path):
    torch.manual_seed(0)
    net = MiniArcFace(width=8, dim=512).eval()
    path = export_face_encoder(net, tmp_path / "m.onnx")
    enc = ArcFaceEncoder.load(EncoderConfig(model=str(path), batch_size=4, provider="cpu"))
    faces = _faces(10)
    out = enc(faces)  # 10 images in batches of 4: the last batch is partial
    assert out.shape == (10, 512) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    x = torch.from_numpy(faces).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)  # FACTS 3 preprocessing, RGB
    with torch.no_grad():
        ref = torch.nn.functional.normalize(net(x), dim=1).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4)
    assert enc.provider == "CPUExecutionProvider"


def test_graph_with_builtin_normalisation_is_detected(mini_arcface, mini_arcface_inside):
    outside = ArcFaceEncoder.load(EncoderConfig(model=str(mini_arcface)))
    inside = ArcFaceEncoder.load(EncoderConfig(model=str(mini_arcface_inside)))
    assert (outside.mean, outside.std) == (127.5, 127.5)
    assert (inside.mean, inside.std) == (0.0, 1.0)
    faces = _faces(6, seed=1)
    np.testing.assert_allclose(outside(faces), inside(faces), atol=1e-5)
    # forcing the wrong mode gives different embeddings: the detection matters
    forced = ArcFaceEncoder.load(EncoderConfig(model=str(mini_arcface_inside), normalize="outside"))
    assert np.abs(forced(faces) - inside(faces)).max() > 1e-2


def test_wrong_models_are_refused_with_clear_errors(tmp_path):
    pooled = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 512))
    small = export_face_encoder(pooled.eval(), tmp_path / "in64.onnx", input_size=64)
    with pytest.raises(ModelError, match=r"in64.onnx: input shape .* not N x 3 x 112 x 112"):
        ArcFaceEncoder.load(EncoderConfig(model=str(small)))

    class Tiny(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 42)  # 126-d output

    wrong_dim = export_face_encoder(Tiny(), tmp_path / "dim126.onnx")
    with pytest.raises(ModelError, match=r"dim126.onnx: output shape .* not N x 512"):
        ArcFaceEncoder.load(EncoderConfig(model=str(wrong_dim)))
    assert ArcFaceEncoder.load(EncoderConfig(model=str(wrong_dim), embedding_dim=126)).embedding_dim == 126

    with pytest.raises(ModelError, match="encoder model file not found"):
        ArcFaceEncoder.load(EncoderConfig(model=str(tmp_path / "missing.onnx")))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelError, match="junk.onnx: not a loadable ONNX model"):
        ArcFaceEncoder.load(EncoderConfig(model=str(junk)))


def test_hub_model_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match=r"cannot get arcface.onnx from the hub repo FoivosPar/Arc2Face.*--encoder"):
        resolve_model_file("FoivosPar/Arc2Face:arcface.onnx")


def test_cuda_provider_request_without_cuda_is_explained(mini_arcface):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match="no CUDA provider"):
        ArcFaceEncoder.load(EncoderConfig(model=str(mini_arcface), provider="cuda"))
