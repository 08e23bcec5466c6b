"""The ArcFace encoder on tiny exported models (FACTS 3), and where it runs (issue 12 item 3)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from digi2real.config import EncoderConfig
from digi2real.errors import ModelError
from digi2real.faces import arcface, onnx_torch
from digi2real.faces.arcface import ArcFaceEncoder, Route, candidate_routes, l2_normalize, resolve_model_file
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


def test_cuda_provider_request_without_any_cuda_is_explained(mini_arcface, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ModelError) as info:
        ArcFaceEncoder.load(EncoderConfig(model=str(mini_arcface), provider="cuda"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("encoder.provider is 'cuda' but onnxruntime has no CUDA provider and torch sees no CUDA "
                              "device") and message.endswith("or use --provider cpu")


# ------------------------------------------------------------------------------------------------ where it runs
def test_candidate_routes_follow_the_documented_order():
    ort_cuda, torch_gpu, cpu = Route("onnxruntime", "cuda:0"), Route("torch", "cuda:0"), Route("onnxruntime", "cpu")
    assert candidate_routes("auto", True, "cuda:0") == [ort_cuda, torch_gpu, cpu]
    assert candidate_routes("auto", False, "cuda:0") == [torch_gpu, cpu]
    assert candidate_routes("auto", False, None) == [cpu]  # no GPU: today's route
    assert candidate_routes("auto", True, None) == [ort_cuda, cpu]  # onnxruntime-gpu with a CPU build of torch
    assert candidate_routes("cuda", False, "cuda:1") == [Route("torch", "cuda:1")]  # never the CPU
    assert candidate_routes("cpu", True, "cuda:0") == [cpu]


@pytest.fixture()
def fake_gpu(monkeypatch):
    """A machine where torch sees cuda:0 and onnxruntime has only its CPU provider (the H200 image). The converted
    graph's "cuda:0" is mapped onto the CPU, so the choice, the load-time check and ``where`` run for real."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(arcface, "_torch_device", lambda name: torch.device("cpu"))
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(arcface, "_warned", set())


def _reference(path, faces):
    """Embeddings by a bare onnxruntime CPU session: today's numbers."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray((faces.astype(np.float32).transpose(0, 3, 1, 2) - 127.5) * np.float32(1 / 127.5))
    return l2_normalize(session.run(None, {session.get_inputs()[0].name: x})[0])


@pytest.mark.parametrize("provider", ["auto", "cuda"])
def test_a_gpu_machine_without_onnxruntime_cuda_runs_the_converted_graph_on_the_gpu(mini_arcface, fake_gpu, capsys,
                                                                                    provider):
    enc = ArcFaceEncoder.load(EncoderConfig(model=str(mini_arcface), provider=provider))
    assert enc.provider == "torch"
    assert enc.where.startswith("torch cuda:0 (ONNX graph converted: onnxruntime has no CUDA provider here; "
                                "embeddings within ")
    faces = _faces(5)
    assert np.abs(enc(faces) - _reference(mini_arcface, faces)).max() <= 1e-4
    assert capsys.readouterr().err == ""  # on the GPU: nothing to warn about


def test_an_onnxruntime_cuda_provider_that_does_not_load_gives_way_to_the_torch_route(mini_arcface, fake_gpu,
                                                                                     monkeypatch, capsys):
    # onnxruntime-gpu lists its CUDA provider even where CUDA's libraries are missing, then runs on the CPU instead
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    enc = ArcFaceEncoder.load(EncoderConfig(model=str(mini_arcface)))
    assert enc.where.startswith("torch cuda:0 (ONNX graph converted: onnxruntime on cuda:0: onnxruntime's CUDA "
                                "provider did not load")
    assert capsys.readouterr().err == ""


def test_onnxruntime_cuda_comes_first_where_it_loads(mini_arcface, fake_gpu, monkeypatch, capsys):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    loaded = []

    def cuda_session(path, device):  # stands in for onnxruntime-gpu: a working session that reports CUDA
        loaded.append(device)
        session = arcface._session(path, ["CPUExecutionProvider"])
        return arcface._OnnxRuntime(session, "onnxruntime CUDAExecutionProvider")

    monkeypatch.setattr(arcface, "_ort_cuda", cuda_session)
    enc = ArcFaceEncoder.load(EncoderConfig(model=str(mini_arcface)), device="cuda:1")
    assert loaded == ["cuda:1"]  # the device asked for, not torch's current one
    assert enc.where.startswith("onnxruntime CUDAExecutionProvider (cuda:1; embeddings within ")
    assert capsys.readouterr().err == ""


def test_the_cpu_on_a_gpu_machine_warns_once_and_says_why(mini_arcface, fake_gpu, capsys):
    cfg = EncoderConfig(model=str(mini_arcface), provider="cpu")
    enc = ArcFaceEncoder.load(cfg)
    assert enc.provider == "CPUExecutionProvider"
    assert enc.where == "onnxruntime CPUExecutionProvider (cuda:0 unused: encoder.provider is 'cpu')"
    err = capsys.readouterr().err
    assert err == ("digi2real: warning: the ArcFace identity check runs on the CPU although cuda:0 exists "
                   "(encoder.provider is 'cpu')\n")
    ArcFaceEncoder.load(cfg)
    assert capsys.readouterr().err == ""  # once per process


def _softmax_head(path):
    """The right signature (N x 3 x 112 x 112 -> N x 512) with an operator the torch route does not run."""
    w = np.random.default_rng(0).normal(0, 1, (3, 512)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["m"]), helper.make_node("Softmax", ["m"], ["embedding"], axis=1)]
    graph = helper.make_graph(nodes, "softmax", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                               ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 512])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def test_a_graph_the_gpu_routes_cannot_run_falls_back_to_the_cpu_with_the_reason(tmp_path, fake_gpu, capsys):
    path = _softmax_head(tmp_path / "softmax.onnx")
    enc = ArcFaceEncoder.load(EncoderConfig(model=str(path)))
    assert enc.provider == "CPUExecutionProvider"
    assert enc.where.startswith("onnxruntime CPUExecutionProvider (cuda:0 unused: torch on cuda:0: ")
    assert "operator Softmax" in enc.where
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs on the CPU although cuda:0 exists" in err and "Softmax" in err
    assert enc(_faces(2)).shape == (2, 512)
    refused = r"encoder\.provider is 'cuda' but no GPU route works .*operator Softmax"
    with pytest.raises(ModelError, match=refused) as info:
        ArcFaceEncoder.load(EncoderConfig(model=str(path), provider="cuda"))
    assert "\n" not in str(info.value)


def test_a_gpu_route_that_disagrees_with_the_cpu_is_not_used(mini_arcface, fake_gpu, monkeypatch, capsys):
    ops = dict(onnx_torch.OPS, PRelu=lambda args, attrs: [torch.relu(args[0])])  # a wrong conversion
    monkeypatch.setattr(onnx_torch, "OPS", ops)
    enc = ArcFaceEncoder.load(EncoderConfig(model=str(mini_arcface)))
    assert enc.provider == "CPUExecutionProvider"
    assert "embeddings differ from onnxruntime's on the CPU by" in enc.where
    assert "embeddings differ" in capsys.readouterr().err
    with pytest.raises(ModelError, match=r"no GPU route works \(torch on cuda:0: its embeddings differ"):
        ArcFaceEncoder.load(EncoderConfig(model=str(mini_arcface), provider="cuda"))


def test_auto_without_a_gpu_is_todays_cpu_route_with_todays_numbers(mini_arcface, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    enc = ArcFaceEncoder.load(EncoderConfig(model=str(mini_arcface), batch_size=8))
    assert enc.where == "onnxruntime CPUExecutionProvider" and enc.provider == "CPUExecutionProvider"
    faces = _faces(8, seed=4)
    np.testing.assert_array_equal(enc(faces), _reference(mini_arcface, faces))
    assert capsys.readouterr().err == ""
