"""Face-recognition models under evaluation: ONNX graphs and IResNet state dicts, behind one ``embed`` call.

Accepted (see :func:`load_face_model`):

* an ONNX face model (``.onnx``) taking N x 3 x S x S float32 RGB; crops are resized when S != 112 and the input
  normalisation is detected as insightface does (FACTS 3);
* a PyTorch state dict in insightface's IResNet layout (``backbone.pth``), possibly wrapped under ``state_dict`` or
  prefixed ``module.`` / ``backbone.``; depth and widths are inferred from the keys and shapes (FACTS 6);
* a directory holding ``model.pt`` (our training output: a backbone state dict), or ``backbone.pth``, or one ``.onnx``.

Pickled files are only ever read with ``torch.load(weights_only=True)``: a checkpoint from the internet must not be
able to run code on the evaluating machine.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.config import EvalConfig
from digi2real.errors import ConfigError, ModelError

INPUT_SIZE = 112
_FIX = "pass an ONNX face model, an insightface IResNet backbone.pth, or a training output folder with model.pt"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "backbone", "model")
_PREFIXES = ("module.", "backbone.", "model.")
_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")


@dataclass
class FaceModel:
    """A loaded face model: :meth:`embed` maps aligned RGB crops to raw (unnormalised) embeddings.

    ``forward`` takes N x 112 x 112 x 3 uint8 and returns N x D float32 for one orientation; ``embed`` adds batching
    and the flip sum of the verification protocols (FACTS 8, 9).
    """

    path: Path
    kind: str  # "onnx" or "iresnet"
    embedding_dim: int
    batch_size: int
    flip: bool
    device: str
    precision: str
    forward: Callable[[np.ndarray], np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """A short display name: the file stem, or the directory's name for ``DIR/model.pt``."""
        if self.path.name in ("model.pt", "backbone.pth") and self.path.parent.name:
            return self.path.parent.name
        return self.path.stem

    def describe(self) -> dict[str, Any]:
        """JSON-ready description recorded with results (what was evaluated, how)."""
        return {"path": str(self.path), "kind": self.kind, "embedding_dim": self.embedding_dim, "flip": self.flip,
                "device": self.device, "precision": self.precision, **self.info}

    def embed(self, images: np.ndarray) -> np.ndarray:
        """N x 112 x 112 x 3 uint8 RGB -> N x D float32: emb(x) + emb(flip(x)) when ``flip``, never normalised."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"expected N x {INPUT_SIZE} x {INPUT_SIZE} x 3 uint8 images, got {images.shape}")
        out = np.empty((len(images), self.embedding_dim), np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = np.ascontiguousarray(images[start : start + self.batch_size])
            emb = self.forward(chunk).astype(np.float32)
            if self.flip:
                # horizontal flip = reverse the width axis of NHWC
                emb = emb + self.forward(np.ascontiguousarray(chunk[:, :, ::-1])).astype(np.float32)
            out[start : start + len(chunk)] = emb
        return out


# ------------------------------------------------------------------------------------------------------ entry point
def load_face_model(path: str | Path, cfg: EvalConfig) -> FaceModel:
    """Open an ONNX model, an IResNet state dict (``.pth``/``.pt``), or a directory holding one of them.

    Raises :class:`ModelError` (one line) for a missing file, an unknown format or a state dict that is not an
    IResNet, and :class:`ConfigError` for a device/precision combination that cannot run (PyTorch models; an ONNX
    graph runs on onnxruntime's provider for cfg.device in its exported precision, recorded as "graph").
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"{path}: model not found; pass an .onnx file, an IResNet backbone.pth, or a training "
                         "output directory holding model.pt")
    if path.is_dir():
        path = _model_file_in(path)
    if not path.is_file():  # a FIFO or device would block the reader or never end
        raise ModelError(f"{path}: not a regular file; pass the model file itself (.onnx, .pth/.pt)")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        # onnxruntime picks its own provider (auto prefers CUDA when onnxruntime-gpu is installed); autocast
        # precision does not apply to a graph, which runs in the precision it was exported with.
        return _load_onnx(path, cfg)
    if suffix in (".pth", ".pt", ".ckpt", ".bin", ".tar"):
        return _load_iresnet(path, cfg, _resolve_device(cfg))
    raise ModelError(f"{path}: unknown model format {suffix or '(no suffix)'!r}; expected .onnx, or a PyTorch state "
                     "dict .pth/.pt")


def _model_file_in(directory: Path) -> Path:
    """The model file inside a directory: model.pt (our training output), then backbone.pth, then a sole .onnx."""
    for name in ("model.pt", "backbone.pth"):
        if (directory / name).is_file():
            return directory / name
    onnx_files = sorted(directory.glob("*.onnx"))
    if len(onnx_files) == 1:
        return onnx_files[0]
    raise ModelError(f"{directory}: no model.pt, backbone.pth or single .onnx file in this directory; pass the "
                     "model file itself, or the training output folder holding model.pt")


def _resolve_device(cfg: EvalConfig) -> str:
    """cfg.device with auto resolved, checked against the precision (fp16 autocast exists on CUDA only here)."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("eval.device is 'cuda' but torch sees no CUDA device; use --device cpu or auto")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"
    if cfg.precision == "fp16" and device == "cpu":
        raise ConfigError("eval.precision is 'fp16' but the model runs on the CPU, where fp16 autocast is not "
                          "supported; use --precision bf16 or fp32, or --device cuda")
    return device


# ------------------------------------------------------------------------------------------------------------- ONNX
def _load_onnx(path: Path, cfg: EvalConfig) -> FaceModel:
    """An ONNX face model with input N x 3 x S x S, on the onnxruntime provider cfg.device asks for."""
    import onnxruntime as ort

    # Reuse the encoder's rules (provider choice, insightface's normalisation detection) rather than restating them.
    from digi2real.faces.arcface import _graph_normalises_itself, _providers

    try:
        providers = _providers(cfg.device)
    except ModelError:  # its message names the encoder's setting; say which setting of eval to change
        raise ModelError("eval.device is 'cuda' but onnxruntime has no CUDA provider; pip install onnxruntime-gpu, "
                         "or use --device cpu") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: not a loadable ONNX model ({first}); {_FIX}") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected one input (the face batch), found {len(inputs)}; {_FIX}")
    shape = [d if isinstance(d, int) and d > 0 else None for d in inputs[0].shape]
    if len(shape) != 4 or shape[1] != 3 or shape[2] is None or shape[2] != shape[3]:
        raise ModelError(f"{path}: input shape {list(inputs[0].shape)} is not N x 3 x S x S; not a face "
                         f"recognition model for aligned square crops: {_FIX}")
    size = int(shape[2])
    fixed_batch = shape[0]
    inside = _graph_normalises_itself(path)
    mean, std = (0.0, 1.0) if inside else (127.5, 127.5)
    name = inputs[0].name

    def forward(images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32).transpose(0, 3, 1, 2)
        if size != INPUT_SIZE:
            x = _resize(x, size)
        x = np.ascontiguousarray((x - mean) / std, dtype=np.float32)
        n = len(x)
        out_parts = []
        # A graph exported with a fixed batch only takes exactly that many images: feed padded slices.
        step = fixed_batch or n
        for s in range(0, n, step):
            part = x[s : s + step]
            if fixed_batch and len(part) < fixed_batch:
                part = np.concatenate([part, np.zeros((fixed_batch - len(part), *part.shape[1:]), np.float32)])
            res = session.run(None, {name: part})[0]
            out_parts.append(res.reshape(len(part), -1)[: min(step, n - s)])
        return np.concatenate(out_parts).astype(np.float32)

    try:  # one face through the graph: a graph that cannot embed fails here with one line, not mid-benchmark
        probe = forward(np.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), np.uint8))
    except Exception as exc:  # onnxruntime raises its own exception types (wrong input type, bad node, ...)
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"{path}: running the graph on one face failed ({first}); {_FIX}") from None
    if probe.ndim != 2 or probe.shape[1] == 0:
        raise ModelError(f"{path}: the graph's output for one face has shape {probe.shape}, not 1 x D; {_FIX}")
    dim = int(probe.shape[1])
    batch = fixed_batch or cfg.batch_size
    device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    return FaceModel(path, "onnx", dim, batch, cfg.flip, device, "graph", forward,
                     info={"input_size": size, "normalisation": "inside graph" if inside else "(x-127.5)/127.5",
                           "provider": session.get_providers()[0]})


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of N x 3 x 112 x 112 float32 to the model's side (antialiased when shrinking)."""
    import torch
    import torch.nn.functional as F

    t = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=size < INPUT_SIZE)
    return t.numpy()


# ---------------------------------------------------------------------------------------------------------- IResNet
def read_state_dict(path: Path) -> dict[str, Any]:
    """A flat name -> tensor dict from a checkpoint, loaded with ``weights_only=True`` (no code can run).

    Unwraps ``{"state_dict": ...}``-style containers and strips ``module.`` / ``backbone.`` prefixes left by
    DataParallel and training wrappers.
    """
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler explains itself over many lines; keep the line that says what it met.
        text = str(exc)
        named = re.search(r"GLOBAL (\S+)", text)
        if named:
            raise ModelError(f"{path}: refused: the file holds more than tensors (it names {named.group(1)}); only "
                             "plain state dicts are loaded, because pickles can run code: save the weights alone "
                             "with torch.save(model.state_dict(), path)") from None
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", text)
        first = (detail.group(1) if detail else (text.splitlines() or [type(exc).__name__])[0]).strip()[:160]
        raise ModelError(f"{path}: not a readable PyTorch state dict ({first}); {_FIX}") from None
    except Exception as exc:  # truncated zip, not a torch file at all, ...
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(f"{path}: not a readable PyTorch state dict ({first}); {_FIX}") from None
    for _ in range(3):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if isinstance(obj, Mapping) and not _has_tensors(obj):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _has_tensors(obj):
        raise ModelError(f"{path}: not a state dict of tensors (found {type(obj).__name__}); expected an IResNet "
                         "backbone.pth or model.pt")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed:  # e.g. "module.backbone.conv1.weight"
        changed = False
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _has_tensors(obj: Mapping) -> bool:
    import torch

    return any(isinstance(v, torch.Tensor) for v in obj.values())


def infer_iresnet(state: Mapping[str, Any], path: Path | str = "model") -> dict[str, Any]:
    """IResNet constructor arguments from a state dict: blocks per ``layerN``, widths, embedding size, stem stride."""
    from digi2real.training.iresnet import feature_side

    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ModelError(f"{path}: not a state dict of named tensors; only insightface IResNet state dicts are read")
    needed = ("conv1.weight", "fc.weight", "layer1.0.conv1.weight", "features.weight")
    missing = [k for k in needed if k not in state]
    dims = {"conv1.weight": 4, "fc.weight": 2, "layer1.0.conv1.weight": 4, "features.weight": 1}
    bad = [k for k in needed if k in state and getattr(state[k], "ndim", -1) != dims[k]]
    if missing or bad:
        missing = missing + [f"{k} (not {dims[k]}-D)" for k in bad]
        sample = ", ".join(list(state)[:4])
        raise ModelError(f"{path}: keys are not an insightface IResNet (missing {', '.join(missing)}; "
                         f"first keys: {sample}); only insightface IResNet state dicts are read")
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = sorted(blocks)
    if stages != list(range(1, len(stages) + 1)):
        raise ModelError(f"{path}: IResNet stages {stages} are not numbered layer1..layerN")
    layers = tuple(len(blocks[i]) for i in stages)
    widths = tuple(int(state[f"layer{i}.0.conv1.weight"].shape[0]) for i in stages)
    stem = int(state["conv1.weight"].shape[0])
    if stem != widths[0]:
        raise ModelError(f"{path}: stem width {stem} differs from layer1's {widths[0]}; not an IResNet layout")
    fc_out, fc_in = (int(d) for d in state["fc.weight"].shape)
    side2 = fc_in // widths[-1]
    # fc sees widths[-1] x side x side, and the side tells the stem stride.
    stem_stride = next((s for s in (1, 2, 4) if feature_side(INPUT_SIZE, s, len(layers)) ** 2 == side2
                        and side2 * widths[-1] == fc_in), None)
    if stem_stride is None:
        raise ModelError(f"{path}: fc input {fc_in} does not match {widths[-1]} channels on a square map for "
                         f"{INPUT_SIZE} x {INPUT_SIZE} input")
    return {"layers": layers, "widths": widths, "embedding_dim": fc_out, "stem_stride": stem_stride}


def _arch_name(layers: tuple[int, ...]) -> str:
    from digi2real.training.iresnet import DEPTHS

    return next((name for name, d in DEPTHS.items() if tuple(d) == tuple(layers)), "custom")


def _load_iresnet(path: Path, cfg: EvalConfig, device: str) -> FaceModel:
    """Build our IResNet with the inferred shape and load the state dict strictly."""
    import torch

    from digi2real.training.iresnet import IResNet

    state = read_state_dict(path)
    arch = infer_iresnet(state, path)
    net = IResNet(arch["layers"], widths=arch["widths"], embedding_dim=arch["embedding_dim"],
                  stem_stride=arch["stem_stride"])
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:240]
        raise ModelError(f"{path}: state dict does not fit an IResNet {arch['layers']} ({detail}); {_FIX}") from None
    net.eval().to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    def forward(images: np.ndarray) -> np.ndarray:
        # FACTS 6: RGB, (x / 255 - 0.5) / 0.5, NCHW
        x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5).div_(0.5)
        with torch.inference_mode(), torch.autocast(device_type=device, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            out = net(x)
        return out.float().cpu().numpy()

    return FaceModel(path, "iresnet", arch["embedding_dim"], cfg.batch_size, cfg.flip, device, cfg.precision,
                     forward, info={"arch": _arch_name(arch["layers"]), "layers": list(arch["layers"]),
                                    "widths": list(arch["widths"]), "stem_stride": arch["stem_stride"]})
