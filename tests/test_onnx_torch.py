"""The ONNX graph run by torch (faces/onnx_torch.py): the same numbers as onnxruntime on the CPU, on our miniature
ArcFace files, a real-size IResNet100 export, hand-built mxnet-style graphs and every operator it claims to run."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from digi2real.config import EncoderConfig
from digi2real.errors import ModelError
from digi2real.faces import onnx_torch
from digi2real.faces.arcface import ArcFaceEncoder, l2_normalize
from digi2real.faces.onnx_torch import OPS, OnnxGraph, tf32_round
from digi2real.miniature import build_scaled_iresnet

TOLERANCE = 1e-4  # issue 12: max |difference| of L2-normalised embeddings against onnxruntime on the CPU


def _faces(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)


def _onnxruntime(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs)})[0]


def _torch(path, *inputs, **kw):
    with torch.inference_mode():
        return OnnxGraph.read(path, **kw)(*[torch.from_numpy(x) for x in inputs]).numpy()


def _save(tmp_path, name, nodes, inputs, outputs, initializers=(), opset=13):
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7  # old enough for every onnxruntime the project allows
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _value(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


# ------------------------------------------------------------------------------------------------ our ArcFace files
@pytest.mark.parametrize("fixture", ["mini_arcface", "mini_arcface_inside"])
def test_torch_route_embeds_like_onnxruntime_on_the_miniatures(fixture, request):
    path = request.getfixturevalue(fixture)
    ours = ArcFaceEncoder.load(EncoderConfig(model=str(path), batch_size=4), route="torch", device="cpu")
    reference = ArcFaceEncoder.load(EncoderConfig(model=str(path), batch_size=4, provider="cpu"))
    assert ours.provider == "torch" and reference.provider == "CPUExecutionProvider"
    assert ours.where.startswith("torch cpu (ONNX graph converted; embeddings within ")
    assert (ours.mean, ours.std) == (reference.mean, reference.std)  # the normalisation rule is the route's too
    faces = _faces(10)  # 10 in batches of 4: the last batch is partial
    got, want = ours(faces), reference(faces)
    assert got.shape == (10, 512) and got.dtype == np.float32
    assert np.abs(got - want).max() <= TOLERANCE




def test_torch_route_embeds_like_onnxruntime_on_a_real_size_iresnet100(tmp_path):
    """The real size: an IResNet100 (261 MB of ONNX, 24 GFLOP an image) as benchmarks/bench_embed.py builds."""
    path = build_scaled_iresnet("r100", tmp_path / "r100.onnx")
    ours = ArcFaceEncoder.load(EncoderConfig(model=str(path), batch_size=2), route="torch", device="cpu")
    faces = _faces(2, seed=3)
    x = ours.preprocess(faces)
    want = l2_normalize(_onnxruntime(path, x))
    assert np.isfinite(want).all()
    assert np.abs(ours(faces) - want).max() <= TOLERANCE


def _tf32_truncating(product):
    """``product`` as TF32 hardware computes it, harshest case: both operands truncated to 10 mantissa bits."""
    def truncate(t):
        return (t.contiguous().view(torch.int32) & -0x2000).view(torch.float32)

    return lambda x, w, *args, **kwargs: product(truncate(x), truncate(w), *args, **kwargs)


def test_exact_products_keep_float32_accuracy_where_the_hardware_rounds_to_tf32(tmp_path, monkeypatch):
    """On CUDA the graph runs its convolutions and matrix products as three TF32-exact products: a GPU that rounds
    float32 operands to TF32 (cuDNN's default) then still matches the CPU. Shown here by making the CPU round too, on
    a narrow IResNet18: 3.1e-4 off with TF32 alone, 1.3e-7 with the split (a full IResNet100: 3.2e-4 truncating,
    1.5e-4 rounding to nearest, 2.6e-7 with the split)."""
    path = build_scaled_iresnet("r18", tmp_path / "r18.onnx", widths=(16, 32, 64, 128))
    x = np.ascontiguousarray((_faces(1, seed=5).transpose(0, 3, 1, 2).astype(np.float32) - 127.5) / 127.5)
    want = l2_normalize(_onnxruntime(path, x))
    graph = OnnxGraph.read(path)
    monkeypatch.setattr(torch.nn.functional, "conv2d", _tf32_truncating(torch.nn.functional.conv2d))
    monkeypatch.setattr(torch, "mm", _tf32_truncating(torch.mm))
    with torch.inference_mode():
        plain = l2_normalize(graph(torch.from_numpy(x)).numpy())
        graph.exact_fp32 = True
        exact = l2_normalize(graph(torch.from_numpy(x)).numpy())
    assert np.abs(plain - want).max() > TOLERANCE  # TF32 alone is over the tolerance on this network
    assert np.abs(exact - want).max() <= TOLERANCE / 10


def test_tf32_round_keeps_10_mantissa_bits_rounding_to_nearest():
    x = torch.tensor([1.0, 1.0 + 2**-10, 1.0 + 2**-11, 1.0 + 3 * 2**-11, -(1.0 + 2**-12), 3.0e38, 0.0])
    assert tf32_round(x).tolist() == [1.0, 1.0 + 2**-10, 1.0, 1.0 + 2**-9, -1.0, tf32_round(x)[5].item(), 0.0]
    rest = x - tf32_round(x)
    assert (rest.abs() <= x.abs() * 2**-11).all()


def test_the_converted_graph_can_be_called_from_several_threads(mini_arcface):
    enc = ArcFaceEncoder.load(EncoderConfig(model=str(mini_arcface), batch_size=3), route="torch", device="cpu")
    batches = [_faces(5, seed=s) for s in range(6)]
    serial = [enc(b) for b in batches]
    results: dict[int, np.ndarray] = {}

    def work(i):
        results[i] = enc(batches[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(serial):
        np.testing.assert_array_equal(results[i], want)


# ------------------------------------------------------------------------------------------------ export styles
@pytest.mark.parametrize("opset", [8, 11, 13])
def test_an_mxnet_style_insightface_graph_runs_like_onnxruntime(tmp_path, opset):
    """What insightface's mxnet exports look like: normalisation as Sub/Mul by initializers, BN before and after
    convolutions, PRelu with C x 1 x 1 slopes, a residual Add, Dropout, Reshape by a [0, -1] initializer, Gemm with
    transB, a 1-D BatchNorm last (and on opset 8 the BN attribute ``spatial``)."""
    rng = np.random.default_rng(0)

    def rand(*shape):
        return rng.normal(0, 0.3, shape).astype(np.float32)

    def bn_params(prefix, n):
        return [(f"{prefix}_s", 1 + rand(n)), (f"{prefix}_b", rand(n)), (f"{prefix}_m", rand(n)),
                (f"{prefix}_v", 1 + np.abs(rand(n)))]

    def bn_node(prefix, x, y):
        spatial = {"spatial": 1} if opset < 9 else {}  # an attribute of opsets 7-8 only
        return helper.make_node("BatchNormalization", [x] + [f"{prefix}_{k}" for k in "sbmv"], [y], epsilon=2e-5,
                                **spatial)

    c = 4
    inits = [("mean", np.array(127.5, np.float32)), ("scale", np.array(1 / 128, np.float32)),
             ("w0", rand(c, 3, 3, 3)), ("w1", rand(c, c, 3, 3)), ("slope", rand(c, 1, 1)),
             ("shape", np.array([0, -1], np.int64)), ("fc_w", rand(8, c * 28 * 28)), ("fc_b", rand(8))]
    inits += bn_params("bn0", c) + bn_params("bn1", c) + bn_params("bn2", 8)
    nodes = [
        helper.make_node("Sub", ["data", "mean"], ["a"]),
        helper.make_node("Mul", ["a", "scale"], ["b"]),
        helper.make_node("Conv", ["b", "w0"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        bn_node("bn0", "c", "d"),
        helper.make_node("PRelu", ["d", "slope"], ["e"]),
        helper.make_node("Conv", ["e", "w1"], ["g"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        bn_node("bn1", "g", "h"),
        helper.make_node("Add", ["h", "e"], ["i"]),
        helper.make_node("Relu", ["i"], ["j"]),
        helper.make_node("Conv", ["j", "w1"], ["j2"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("Dropout", ["j2"], ["k"]),
        helper.make_node("Reshape", ["k", "shape"], ["l"]),
        helper.make_node("Gemm", ["l", "fc_w", "fc_b"], ["m"], transB=1, alpha=0.5, beta=2.0),
        bn_node("bn2", "m", "n"),
        helper.make_node("Identity", ["n"], ["fc1"]),
    ]
    path = _save(tmp_path, f"mx{opset}", nodes, [_value("data", ["N", 3, 112, 112])], [_value("fc1", ["N", 8])],
                 inits, opset)
    x = rng.uniform(0, 255, (3, 3, 112, 112)).astype(np.float32)
    np.testing.assert_allclose(_torch(path, x), _onnxruntime(path, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [12, 13])
def test_shape_helpers_and_the_other_operators_run_like_onnxruntime(tmp_path, opset):
    """The operators the mxnet-style graph leaves out, all feeding the output: the Shape/Gather/Unsqueeze/Concat
    chain that sizes a Reshape (a torch.onnx ``view``), Transpose, MatMul, Flatten(axis), GlobalAveragePool, Squeeze
    with and without axes, integer Div, Cast, Gather of features, every Constant form, LeakyRelu and a grouped,
    strided Conv with SAME padding and a dilated one. Axes are attributes in opset 12, inputs from 13 on."""
    rng = np.random.default_rng(1)
    inits = [("w", rng.normal(0, 0.3, (6, 2, 3, 3)).astype(np.float32)),
             ("w2", rng.normal(0, 0.3, (6, 6, 3, 3)).astype(np.float32)),
             ("mm", rng.normal(0, 0.3, (126, 5)).astype(np.float32)),
             ("pick", np.array([0, 2, -1], np.int64))]
    nodes = []

    def node(op, ins, outs, axes=None, **attrs):
        if axes is not None and opset < 13:
            attrs["axes"] = axes
        elif axes is not None:
            inits.append((f"{outs[0]}_axes", np.array(axes, np.int64)))
            ins = ins + [f"{outs[0]}_axes"]
        nodes.append(helper.make_node(op, ins, outs, **attrs))

    node("Conv", ["x", "w"], ["c"], group=2, strides=[2, 2], auto_pad="SAME_UPPER")  # N 6 7 6
    node("Conv", ["c", "w2"], ["c0"], dilations=[2, 1], pads=[2, 1, 2, 1])  # onnxruntime: no dilation with SAME
    node("LeakyRelu", ["c0"], ["c1"], alpha=0.2)
    node("Shape", ["c1"], ["shp"])
    node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64)))
    node("Gather", ["shp", "zero"], ["n"])  # the scalar N
    node("Unsqueeze", ["n"], ["n1"], axes=[0])
    node("Constant", [], ["rest"], value_ints=[-1, 2])
    node("Concat", ["n1", "rest"], ["target"], axis=0)  # [N, -1, 2]
    node("Reshape", ["c1", "target"], ["r"])  # N 126 2
    node("Transpose", ["r"], ["t"], perm=[0, 2, 1])  # N 2 126
    node("MatMul", ["t", "mm"], ["m"])  # N 2 5
    node("Flatten", ["m"], ["fl"], axis=1)  # N 10
    node("GlobalAveragePool", ["c1"], ["gap"])  # N 6 1 1
    node("Squeeze", ["gap"], ["s1"], axes=[-1])  # N 6 1
    node("Squeeze", ["s1"], ["s"])  # N 6: every size-1 axis (N is 3)
    node("Constant", [], ["two"], value_int=2)
    node("Div", ["n", "two"], ["half"])  # integer division: 3 // 2 = 1... times 1.5 below shows it is not 1.5
    node("Cast", ["half"], ["half_f"], to=TensorProto.FLOAT)
    node("Constant", [], ["three_halves"], value_float=1.5)
    node("Mul", ["half_f", "three_halves"], ["k"])
    node("Mul", ["s", "k"], ["s2"])
    node("Gather", ["s2", "pick"], ["g"], axis=1)  # N 3, a negative index among them
    node("Concat", ["fl", "g"], ["cat"], axis=1)  # N 13
    node("Constant", [], ["offsets"], value_floats=[0.25] * 13)
    node("Sub", ["cat", "offsets"], ["out"])
    path = _save(tmp_path, f"ops{opset}", nodes, [_value("x", ["N", 4, 13, 11])], [_value("out", ["N", 13])],
                 inits, opset)
    x = rng.normal(0, 1, (3, 4, 13, 11)).astype(np.float32)
    got, want = _torch(path, x), _onnxruntime(path, x)
    assert got.shape == want.shape == (3, 13)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    mxnet_style = {"Add", "BatchNormalization", "Conv", "Dropout", "Gemm", "Identity", "PRelu", "Relu", "Reshape"}
    assert {n.op_type for n in nodes} - {"Constant"} | mxnet_style == set(OPS)  # together the two tests run them all


def test_a_torch_view_export_with_its_shape_chain_runs_like_onnxruntime(tmp_path):
    """``x.view(x.size(0), -1)`` as torch.onnx (opset 11) writes it: Shape, Gather, Unsqueeze, Concat, Reshape."""
    class Viewed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.Linear(4 * 28 * 28, 512)

        def forward(self, x):
            y = self.conv(x)
            return self.fc(y.view(y.size(0), -1))

    torch.manual_seed(0)
    path = tmp_path / "viewed.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore")
        torch.onnx.export(Viewed().eval(), (torch.zeros(1, 3, 112, 112),), str(path), input_names=["input"],
                          output_names=["embedding"], dynamic_axes={"input": {0: "b"}, "embedding": {0: "b"}},
                          opset_version=11, dynamo=False)
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    x = np.random.default_rng(2).normal(0, 1, (3, 3, 112, 112)).astype(np.float32)
    np.testing.assert_allclose(_torch(path, x), _onnxruntime(path, x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ refused graphs
def _softmax_head(tmp_path, domain=""):
    """A graph with the right signature (N x 3 x 112 x 112 -> N x 512) and one operator the torch route lacks."""
    w = np.random.default_rng(0).normal(0, 1, (3, 512)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["m"]),
             helper.make_node("Softmax", ["m"], ["embedding"], axis=1, domain=domain)]
    graph = helper.make_graph(nodes, "softmax", [_value("input", ["N", 3, 112, 112])],
                              [_value("embedding", ["N", 512])], [numpy_helper.from_array(w, "w")])
    imports = [helper.make_opsetid("", 13)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 7
    path = tmp_path / f"softmax{domain}.onnx"
    onnx.save(model, str(path))
    return path


def test_an_unsupported_operator_is_refused_with_one_line_naming_it(tmp_path):
    path = _softmax_head(tmp_path)
    with pytest.raises(ModelError) as info:
        OnnxGraph.read(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: the ONNX graph uses the operator Softmax (node #3)")
    assert "encoder.provider: cpu" in message
    # the same line from the encoder, when the torch route is asked for
    with pytest.raises(ModelError, match=r"operator Softmax") as info:
        ArcFaceEncoder.load(EncoderConfig(model=str(path)), route="torch", device="cpu")
    assert "\n" not in str(info.value)
    # onnxruntime itself runs it: the CPU route is unaffected
    assert ArcFaceEncoder.load(EncoderConfig(model=str(path), provider="cpu"))(_faces(2)).shape == (2, 512)


def test_an_operator_outside_the_standard_set_is_refused(tmp_path):
    path = _softmax_head(tmp_path, domain="com.example")
    with pytest.raises(ModelError, match=r"operator com\.example\.Softmax \(node #3\), outside the standard set"):
        OnnxGraph.read(path)


def test_training_mode_batch_norm_is_refused(tmp_path):
    c = np.ones(3, np.float32)
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], training_mode=1)]
    path = _save(tmp_path, "bn_train", nodes, [_value("x", ["N", 3, 4, 4])], [_value("y", ["N", 3, 4, 4])],
                 [("s", c), ("b", c), ("m", c), ("v", c)], opset=15)
    with pytest.raises(ModelError, match=r"BatchNormalization node #0 is in training or per-activation mode"):
        OnnxGraph.read(path)


def test_intermediate_values_are_released_as_soon_as_no_step_reads_them(mini_arcface):
    graph = OnnxGraph.read(mini_arcface)
    freed = [name for step in graph.steps for name in step.free]
    produced = [name for step in graph.steps for name in step.outputs]
    assert sorted(freed) == sorted(set(produced) - set(graph.output_names))  # each once, the output never
    assert onnx_torch.OnnxGraph.read(mini_arcface).exact_fp32 is False
