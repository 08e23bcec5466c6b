"""Run an ArcFace ONNX graph with torch, so that the identity check runs on the GPU where onnxruntime has only its CPU
provider (issue 12, item 3: the H200 image has onnxruntime 1.30 with the CPU provider alone, shared/gpu/README.md).

A small interpreter, not a general converter: the graph's nodes run in file order (ONNX requires it to be
topological), each through one entry of :data:`OPS`, on tensors of the device the module was moved to. The closed set
of operators covers the exports of insightface's ArcFace / IResNet models (FACTS 3, 6): mxnet-era exports (Sub/Mul
normalisation, BatchNormalization around Conv, PRelu, Flatten or Reshape, Gemm, a final BatchNormalization) and
torch.onnx exports (Conv with BN folded in, PRelu, Add, Flatten, Gemm, and the Shape/Gather/Unsqueeze/Concat/Reshape
chain that ``x.view(x.size(0), -1)`` becomes). Any other operator is refused when the graph is read, with one line
naming it. Semantics are the ONNX operator specification's (opsets 7-21): numpy broadcasting, Reshape's 0 and -1,
Gemm's alpha/beta/trans flags, PRelu's broadcast slope, Unsqueeze/Squeeze axes as attribute (< 13) or input (>= 13).

Shape arithmetic (``Shape`` and whatever consumes its output) stays on the CPU as int64 tensors, so reading a target
shape never waits for the GPU; floating-point constants are module buffers and follow ``.to(device)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from digi2real.errors import ModelError

Args = list[Tensor | None]
Attrs = dict[str, Any]
EXACT = "__exact_fp32__"  # the key under which a product step is told to use _exact_product
_PRODUCTS = ("Conv", "Gemm", "MatMul")


# ------------------------------------------------------------------------------------------------------ helpers
def _together(*xs: Tensor) -> list[Tensor]:
    """The tensors on one device: a CPU shape value meeting a GPU tensor moves to the GPU (never the other way)."""
    device = next((x.device for x in xs if x.device.type != "cpu"), None)
    return [x if device is None or x.device == device else x.to(device) for x in xs]


def _ints(t: Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]  # shape values live on the CPU: no sync


def _axes(a: Attrs, args: Args) -> list[int] | None:
    """Unsqueeze/Squeeze axes: the ``axes`` attribute before opset 13, the second input from 13 on; None if absent."""
    if "axes" in a:
        return list(a["axes"])
    return _ints(args[1]) if len(args) > 1 and args[1] is not None else None


def _same_padding(x: Tensor, w: Tensor, strides: list[int], dilations: list[int], upper: bool) -> list[int]:
    """ONNX auto_pad SAME_UPPER / SAME_LOWER as explicit [begin..., end...] pads for the input's actual size."""
    begins, ends = [], []
    for size, k, s, d in zip(x.shape[2:], w.shape[2:], strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins + ends


def tf32_round(t: Tensor) -> Tensor:
    """``t`` (float32) rounded to the nearest TF32 value: 10 mantissa bits instead of 23, ties to even."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x0FFF + ((bits >> 13) & 1)) & -0x2000).view(torch.float32)


def _exact_product(product: Callable[[Tensor, Tensor], Tensor], x: Tensor, w: Tensor) -> Tensor:
    """``product(x, w)`` (bilinear: a convolution or a matrix product) to float32 accuracy even where the hardware
    rounds float32 operands to TF32.

    cuDNN convolutions on Ampere and later GPUs round their float32 operands to TF32 by default
    (``torch.backends.cudnn.allow_tf32``); on a random IResNet100 that moves the L2-normalised embedding by 1.5e-4
    (operands rounded to nearest) to 3.2e-4 (truncated), measured on the CPU by rounding the operands there: over the
    1e-4 issue 12 allows. The split below stays within 3e-7. Turning the global flag off would
    also change, mid-run and from another thread, the convolutions of any other float32 model in the process. Instead
    each operand is split into a TF32 value and its remainder, x = xh + xl, and x w ~ (xl wh + xh wl) + xh wh, dropping
    xl wl (2^-22 relative): products of TF32-exact operands, summed in float32 (CUTLASS's "3xTF32").
    """
    xh, wh = tf32_round(x), tf32_round(w)
    xl, wl = x - xh, w - wh  # exact: xh is within half a TF32 step of x
    return (product(xl, wh) + product(xh, wl)) + product(xh, wh)


# ------------------------------------------------------------------------------------------------------ operators
def _conv(args: Args, a: Attrs) -> list[Tensor]:
    x, w, b = args[0], args[1], args[2] if len(args) > 2 else None
    assert x is not None and w is not None
    spatial = w.dim() - 2
    strides = a.get("strides", [1] * spatial)
    dilations = a.get("dilations", [1] * spatial)
    auto_pad = a.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_padding(x, w, strides, dilations, upper=auto_pad == "SAME_UPPER")
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    else:
        pads = a.get("pads", [0] * (2 * spatial))
    begin, end = pads[:spatial], pads[spatial:]
    if begin != end:  # torch pads both sides alike: pad the rest explicitly (F.pad lists the last axis first)
        x = F.pad(x, [p for i in reversed(range(spatial)) for p in (begin[i], end[i])])
        begin = [0] * spatial
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    options = {"stride": strides, "padding": begin, "dilation": dilations, "groups": a.get("group", 1)}
    if not a.get(EXACT):
        return [conv(x, w, b, **options)]
    y = _exact_product(lambda u, v: conv(u, v, None, **options), x, w)
    return [y if b is None else y + b.reshape(1, -1, *[1] * spatial)]


def _batch_norm(args: Args, a: Attrs) -> list[Tensor]:
    x, scale, bias, mean, var = args[:5]
    assert x is not None
    return [F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))]


def _prelu(args: Args, a: Attrs) -> list[Tensor]:
    x, slope = _together(args[0], args[1])  # type: ignore[arg-type]
    return [torch.where(x >= 0, x, x * slope)]  # the slope broadcasts as ONNX says (usually C x 1 x 1)


def _gemm(args: Args, a: Attrs) -> list[Tensor]:
    x, w = args[0], args[1]
    assert x is not None and w is not None
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    c = args[2] if len(args) > 2 else None
    y = _exact_product(torch.mm, x, w) if a.get(EXACT) else torch.mm(x, w)
    y = y * alpha if alpha != 1.0 else y
    if c is None:
        return [y]
    return [y + (c * beta if beta != 1.0 else c)]


def _flatten(args: Args, a: Attrs) -> list[Tensor]:
    x = args[0]
    assert x is not None
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    rows, cols = (int(np.prod(part, dtype=np.int64)) for part in (x.shape[:axis], x.shape[axis:]))
    return [x.reshape(rows, cols)]


def _reshape(args: Args, a: Attrs) -> list[Tensor]:
    x = args[0]
    assert x is not None
    shape = _ints(args[1])
    if not a.get("allowzero", 0):  # 0 copies the input's dimension at that position
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _transpose(args: Args, a: Attrs) -> list[Tensor]:
    x = args[0]
    assert x is not None
    return [x.permute(a.get("perm", list(reversed(range(x.dim())))))]


def _shape(args: Args, a: Attrs) -> list[Tensor]:
    x = args[0]
    assert x is not None
    dims = list(x.shape)[a.get("start", 0) : a.get("end", None)]
    return [torch.tensor(dims, dtype=torch.int64)]


def _gather(args: Args, a: Attrs) -> list[Tensor]:
    data, idx = args[0], args[1]
    assert data is not None and idx is not None
    axis = a.get("axis", 0)
    axis = axis + data.dim() if axis < 0 else axis
    idx = idx.to(data.device, torch.int64)
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    picked = data.index_select(axis, idx.reshape(-1))
    return [picked.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))]  # a scalar index drops the axis


def _unsqueeze(args: Args, a: Attrs) -> list[Tensor]:
    x = args[0]
    assert x is not None
    axes = _axes(a, args) or []
    rank = x.dim() + len(axes)  # negative axes count from the end of the output
    for axis in sorted(axis + rank if axis < 0 else axis for axis in axes):
        x = x.unsqueeze(axis)
    return [x]


def _squeeze(args: Args, a: Attrs) -> list[Tensor]:
    x = args[0]
    assert x is not None
    axes = _axes(a, args)
    if axes is None:  # every dimension of size 1
        return [x.squeeze()]
    for axis in sorted((axis + x.dim() if axis < 0 else axis for axis in axes), reverse=True):
        x = x.squeeze(axis)
    return [x]


def _concat(args: Args, a: Attrs) -> list[Tensor]:
    return [torch.cat(_together(*[t for t in args if t is not None]), dim=a["axis"])]


def _global_average_pool(args: Args, a: Attrs) -> list[Tensor]:
    x = args[0]
    assert x is not None
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


def _cast(args: Args, a: Attrs) -> list[Tensor]:
    import onnx

    x = args[0]
    assert x is not None
    dtype = torch.from_numpy(np.zeros(0, onnx.helper.tensor_dtype_to_np_dtype(a["to"]))).dtype
    return [x.to(dtype)]


def _divide(x: Tensor, y: Tensor) -> Tensor:
    # ONNX integer Div truncates (C semantics), as onnxruntime does; float Div is true division.
    return torch.div(x, y, rounding_mode="trunc") if not x.is_floating_point() else x / y


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Args, Attrs], list[Tensor]]:
    def run(args: Args, a: Attrs) -> list[Tensor]:
        x, y = _together(args[0], args[1])  # type: ignore[arg-type]
        return [fn(x, y)]

    return run


def _unary(fn: Callable[[Tensor], Tensor]) -> Callable[[Args, Attrs], list[Tensor]]:
    def run(args: Args, a: Attrs) -> list[Tensor]:
        assert args[0] is not None
        return [fn(args[0])]

    return run


def _leaky_relu(args: Args, a: Attrs) -> list[Tensor]:
    assert args[0] is not None
    return [F.leaky_relu(args[0], a.get("alpha", 0.01))]


def _matmul(args: Args, a: Attrs) -> list[Tensor]:
    x, w = _together(args[0], args[1])  # type: ignore[arg-type]
    return [_exact_product(torch.matmul, x, w) if a.get(EXACT) and x.is_floating_point() else torch.matmul(x, w)]


def _dropout(args: Args, a: Attrs) -> list[Tensor]:
    x = args[0]
    assert x is not None
    return [x, torch.ones_like(x, dtype=torch.bool)]  # inference: identity, and a mask that keeps everything


#: Every operator the torch route runs (one dictionary, one lookup, one error listing the names).
OPS: dict[str, Callable[[Args, Attrs], list[Tensor]]] = {
    "Add": _binary(torch.add),
    "BatchNormalization": _batch_norm,
    "Cast": _cast,
    "Concat": _concat,
    "Conv": _conv,
    "Div": _binary(_divide),
    "Dropout": _dropout,
    "Flatten": _flatten,
    "Gather": _gather,
    "Gemm": _gemm,
    "GlobalAveragePool": _global_average_pool,
    "Identity": _unary(lambda x: x),
    "LeakyRelu": _leaky_relu,
    "MatMul": _matmul,
    "Mul": _binary(torch.mul),
    "PRelu": _prelu,
    "Relu": _unary(F.relu),
    "Reshape": _reshape,
    "Shape": _shape,
    "Squeeze": _squeeze,
    "Sub": _binary(torch.sub),
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
}


# ------------------------------------------------------------------------------------------------------ the graph
@dataclass
class _Step:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: Attrs
    free: list[str] = field(default_factory=list)  # values no later step reads: dropped after this one


def _attributes(node: Any) -> Attrs:
    import onnx
    from onnx import numpy_helper

    out: Attrs = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        elif isinstance(value, list):
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        out[attr.name] = value
    return out


def _constant_value(node: Any, where: str) -> np.ndarray:
    """The value of a Constant node: a tensor, or one of the scalar/list forms of opsets 12+."""
    attrs = _attributes(node)
    if "value" in attrs:
        return np.asarray(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    raise ModelError(f"{where}: a Constant node ({node.name or node.output[0]}) holds {', '.join(attrs) or 'nothing'}, "
                     "which the torch route cannot run; use encoder.provider: cpu (onnxruntime)")


def _check_node(op: str, attrs: Attrs, name: str, where: str) -> None:
    """Refuse, when the graph is read, the forms of supported operators that mean something else at inference."""
    fixes = "install onnxruntime-gpu to run this graph on the GPU, or set encoder.provider: cpu"
    if op not in OPS:
        raise ModelError(f"{where}: the ONNX graph uses the operator {op} (node {name}), which the torch route does "
                         f"not run (it runs {', '.join(sorted(OPS))}); {fixes}")
    if op == "BatchNormalization" and (attrs.get("training_mode", 0) or attrs.get("spatial", 1) != 1):
        raise ModelError(f"{where}: BatchNormalization node {name} is in training or per-activation mode, which the "
                         f"torch route does not run; {fixes}")
    if op == "Concat" and "axis" not in attrs:
        raise ModelError(f"{where}: Concat node {name} has no axis; the graph is malformed, re-export it")
    if op == "Cast" and "to" not in attrs:
        raise ModelError(f"{where}: Cast node {name} has no target type; the graph is malformed, re-export it")


class OnnxGraph(nn.Module):
    """An ONNX graph (one float input, one output) as a torch module: ``OnnxGraph.read(path)(x)``.

    ``exact_fp32=True`` computes every Conv/Gemm/MatMul with :func:`_exact_product`, float32-accurate whatever the
    TF32 settings; meant for CUDA (the CPU has no TF32: there it only costs time).
    """

    def __init__(self, model: Any, where: str, exact_fp32: bool = False) -> None:
        from onnx import numpy_helper

        super().__init__()
        graph = model.graph
        constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in constants]
        self.output_names = [o.name for o in graph.output]
        self.steps: list[_Step] = []
        for i, node in enumerate(graph.node):
            name = node.name or f"#{i}"
            if node.domain not in ("", "ai.onnx"):
                raise ModelError(f"{where}: the ONNX graph uses the operator {node.domain}.{node.op_type} (node "
                                 f"{name}), outside the standard set the torch route runs; install onnxruntime-gpu "
                                 "to run this graph on the GPU, or set encoder.provider: cpu")
            if node.op_type == "Constant":
                constants[node.output[0]] = _constant_value(node, where)
                continue
            attrs = _attributes(node)
            _check_node(node.op_type, attrs, name, where)
            self.steps.append(_Step(node.op_type, list(node.input), list(node.output), attrs))
        self._buffers_of: dict[str, str] = {}
        self._fixed: dict[str, Tensor] = {}  # integer constants: shape values, kept on the CPU
        for j, (name, value) in enumerate(constants.items()):
            owned = value if value.flags.writeable and value.flags.c_contiguous else np.array(value)
            tensor = torch.from_numpy(owned)
            if tensor.is_floating_point():
                self.register_buffer(f"c{j}", tensor)
                self._buffers_of[name] = f"c{j}"
            else:
                self._fixed[name] = tensor
        self._plan_frees()
        self.exact_fp32 = exact_fp32

    @property
    def exact_fp32(self) -> bool:
        return self._exact

    @exact_fp32.setter
    def exact_fp32(self, on: bool) -> None:
        self._exact = bool(on)
        for step in self.steps:
            if step.op in _PRODUCTS:
                step.attrs[EXACT] = self._exact

    @classmethod
    def read(cls, path: str | Path, exact_fp32: bool = False) -> "OnnxGraph":
        import onnx

        return cls(onnx.load(str(path)), str(path), exact_fp32)

    def _plan_frees(self) -> None:
        """After each step, drop the intermediate values no later step reads (activations would otherwise pile up:
        gigabytes for an IResNet100 batch of 64)."""
        keep = set(self.output_names) | set(self._buffers_of) | set(self._fixed) | set(self.input_names)
        last: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for name in step.inputs:
                last[name] = i
            for name in step.outputs:
                last.setdefault(name, i)
        for name, i in last.items():
            if name and name not in keep:
                self.steps[i].free.append(name)

    def forward(self, *inputs: Tensor) -> Tensor:
        values: dict[str, Tensor] = dict(zip(self.input_names, inputs))
        values.update(self._fixed)
        values.update({name: getattr(self, buffer) for name, buffer in self._buffers_of.items()})
        for step in self.steps:
            outputs = OPS[step.op]([values[n] if n else None for n in step.inputs], step.attrs)
            for name, value in zip(step.outputs, outputs):
                if name:
                    values[name] = value
            for name in step.free:
                values.pop(name, None)
        return values[self.output_names[0]]
