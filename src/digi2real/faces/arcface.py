"""The ArcFace identity encoder, an ONNX graph (FACTS 3; paper section 3, "Sampling Identities").

Arc2Face was trained on embeddings from one specific ArcFace (its hub repo's ``arcface.onnx``); embedding with another
model gives wrong identities, so that file is the default. Input: aligned 112 x 112 RGB crops, NCHW float32,
``(x - 127.5) / 127.5`` unless the graph normalises itself; output: one vector per image, L2-normalised here.

Where it runs (issue 12, item 3: the identity check of every generated image must not wait on the CPU of a GPU run):
onnxruntime's CUDA provider when it is installed, else the same graph converted to torch on the GPU
(:mod:`digi2real.faces.onnx_torch`: the H200 image has onnxruntime with its CPU provider only), else onnxruntime on
the CPU. A GPU route is used only after it embeds probe faces within :data:`TOLERANCE` of onnxruntime on the CPU;
falling back to the CPU on a machine with a GPU warns once, and :attr:`ArcFaceEncoder.where` always says where.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from digi2real.config import EncoderConfig
from digi2real.errors import ModelError
from digi2real.fileio import sha256_file

if TYPE_CHECKING:
    import torch

    from digi2real.faces.onnx_torch import OnnxGraph

INPUT_SIZE = 112
_HUB_SPEC = re.compile(r"^([\w.-]+/[\w.-]+):([^:]+)$")


def resolve_model_file(spec: str) -> Path:
    """A local path as is, or ``org/repo:file`` fetched from the Hugging Face hub (cached after the first time)."""
    local = Path(spec).expanduser()
    if local.exists():
        return local
    hub = _HUB_SPEC.match(spec)
    if hub:
        return hub_file(hub.group(1), hub.group(2), flag="--encoder PATH")
    raise ModelError(f"{spec}: encoder model file not found; pass the path of an ArcFace .onnx file with --encoder")


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached, found in milliseconds (DNS), instead of after the client's long retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy only the client itself can tell
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host}: {exc.strerror or exc}"
    return None


def hub_file(repo: str, filename: str, flag: str) -> Path:
    """A file of a hub repo from the local cache, else downloaded into it; a clear error when neither works."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, local_files_only=True))
    except Exception:  # not cached yet
        pass
    reason = hub_unreachable()
    if reason is None:
        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename))
        except Exception as exc:  # missing repo or file, auth, network: all end the same way for the user
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
    raise ModelError(
        f"cannot get {filename} from the hub repo {repo} ({reason}); download it from "
        f"https://huggingface.co/{repo} and pass its local path with {flag}"
    )


def _graph_normalises_itself(model_path: Path) -> bool:
    """insightface's rule: a graph whose first nodes are Sub/Mul applies (x - 127.5) / 127.5 itself."""
    try:
        import onnx
    except ImportError:  # onnx is optional at run time: without it, assume the common case
        return False
    graph = onnx.load(str(model_path), load_external_data=False).graph
    first_ops = [node.op_type for node in graph.node[:8]]
    return "Sub" in first_ops or "Mul" in first_ops


def _providers(choice: str) -> list[str]:
    """onnxruntime providers for a device choice (also used by eval's ONNX models)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if choice == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ModelError(
                "encoder.provider is 'cuda' but onnxruntime has no CUDA provider; pip install onnxruntime-gpu, "
                "or use --provider cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if choice == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# ------------------------------------------------------------------------------------------------ where it runs
#: Largest difference allowed between a GPU route's L2-normalised embeddings and onnxruntime's on the CPU (issue 12).
TOLERANCE = 1e-4
_PROBE_FACES = 2  # faces embedded both ways at load: enough to catch a wrong route, cheap on the CPU
_warned: set[str] = set()
_warn_lock = threading.Lock()


def _warn_once(message: str) -> None:
    """One stderr line per distinct message and process (many encoders may be loaded in one run)."""
    with _warn_lock:
        if message in _warned:
            return
        _warned.add(message)
    print(f"digi2real: warning: {message}", file=sys.stderr, flush=True)


def _cuda_device(device: "str | torch.device | None") -> str | None:
    """The CUDA device the run uses ("cuda:0"), or None when torch sees no CUDA device."""
    import torch

    if device is not None and not str(device).startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return None
    if device is not None and ":" in str(device):
        return str(device)
    return f"cuda:{torch.cuda.current_device()}"


def _torch_device(name: str) -> "torch.device":
    """The torch device for a device name (a seam: CPU tests map a faked cuda:0 onto the CPU)."""
    import torch

    return torch.device(name)


@dataclass(frozen=True)
class Route:
    """One way to run the graph: ``engine`` "onnxruntime" or "torch" on ``device`` ("cpu", "cuda:0")."""

    engine: str
    device: str


def candidate_routes(provider: str, ort_cuda: bool, gpu: str | None) -> list[Route]:
    """The routes to try, best first (issue 12 item 3): onnxruntime's CUDA provider, else the graph converted to
    torch on the GPU, and, unless the user asked for CUDA, onnxruntime on the CPU last (today's route without a GPU)."""
    if provider == "cpu":
        return [Route("onnxruntime", "cpu")]
    routes = []
    if ort_cuda:
        routes.append(Route("onnxruntime", gpu or "cuda:0"))
    if gpu is not None:
        routes.append(Route("torch", gpu))
    if provider == "cuda":
        if not routes:
            raise ModelError(
                "encoder.provider is 'cuda' but onnxruntime has no CUDA provider and torch sees no CUDA device; "
                "pip install onnxruntime-gpu or a CUDA build of torch, or use --provider cpu"
            )
        return routes
    return routes + [Route("onnxruntime", "cpu")]


class _OnnxRuntime:
    """The graph in an onnxruntime session (thread-safe: onnxruntime allows concurrent ``run`` calls)."""

    def __init__(self, session: object, where: str) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name  # type: ignore[attr-defined]
        self.where = where

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]  # type: ignore[attr-defined]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]  # type: ignore[attr-defined]


class _Torch:
    """The graph converted to torch (faces/onnx_torch.py): float32 under inference_mode, float32-exact on CUDA
    whatever the TF32 settings; on CUDA its own stream, so the identity check overlaps the generator's work."""

    provider = "torch"

    def __init__(self, graph: "OnnxGraph", device: "torch.device", where: str) -> None:
        import torch

        self.graph = graph.to(device).eval()
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.where = where

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import contextlib

        import torch

        on_stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with torch.inference_mode(), on_stream:
            out = self.graph(torch.from_numpy(x).to(self.device))
            return out.float().cpu().numpy()  # waits for this stream only


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:240]


def _session(path: Path, providers: list) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        with warnings.catch_warnings():  # a provider that cannot load is detected below, not warned about
            warnings.simplefilter("ignore")
            return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        reason = _first_line(exc)
        raise ModelError(f"{path}: not a loadable ONNX model ({reason}); re-download the encoder file") from None


def _ort_cuda(path: Path, device: str) -> _OnnxRuntime:
    """onnxruntime's CUDA provider on ``device``, with TF32 off: TF32 operands move an IResNet100's embeddings by
    1.5e-4 to 3e-4, over the tolerance (see :func:`digi2real.faces.onnx_torch._exact_product`)."""
    index = int(device.split(":")[1]) if ":" in device else 0
    session = None
    for options in ({"device_id": index, "use_tf32": 0}, {"device_id": index}):  # older onnxruntime lacks use_tf32
        try:
            session = _session(path, [("CUDAExecutionProvider", options), "CPUExecutionProvider"])
            break
        except ModelError:
            continue
    if session is None or session.get_providers()[0] != "CUDAExecutionProvider":  # type: ignore[attr-defined]
        raise ModelError("onnxruntime's CUDA provider did not load (CUDA or cuDNN libraries missing or mismatched)")
    return _OnnxRuntime(session, "onnxruntime CUDAExecutionProvider")


def _torch_route(path: Path, device: str) -> _Torch:
    from digi2real.faces.onnx_torch import OnnxGraph

    target = _torch_device(device)
    graph = OnnxGraph.read(path, exact_fp32=target.type == "cuda")
    return _Torch(graph, target, f"torch {device}")


def _agreement(route: Callable[[np.ndarray], np.ndarray], reference: _OnnxRuntime, probe: np.ndarray) -> float | None:
    """Max |difference| of the L2-normalised embeddings of ``probe`` by ``route`` and by onnxruntime on the CPU; None
    when the model itself gives non-finite embeddings (e.g. a random benchmark network), so nothing can be compared."""
    ref = reference(probe).reshape(len(probe), -1)
    if not np.isfinite(ref).all():
        return None
    got = np.asarray(route(probe), dtype=np.float32).reshape(len(probe), -1)
    diff = float(np.abs(l2_normalize(got) - l2_normalize(ref)).max()) if np.isfinite(got).all() else float("inf")
    return diff


def _agreement_note(diff: float | None) -> str:
    if diff is None:
        return "not compared with the CPU: the model gives non-finite embeddings"
    return f"embeddings within {diff:.1e} of onnxruntime's CPU provider"


def _check_signature(session: object, path: Path, cfg: EncoderConfig) -> tuple[int | None, int]:
    """The graph's fixed batch size (None when dynamic) and embedding size, after checking its input
    (N x 3 x 112 x 112) and output (N x embedding_dim)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()  # type: ignore[attr-defined]
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected one input (the face batch), found {len(inputs)}; is this an ArcFace model?")
    shape = list(inputs[0].shape)
    fixed = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if len(shape) != 4 or fixed[1:] != [3, INPUT_SIZE, INPUT_SIZE]:
        raise ModelError(
            f"{path}: input shape {shape} is not N x 3 x {INPUT_SIZE} x {INPUT_SIZE}; this is not an ArcFace "
            "recognition model for aligned 112 x 112 crops"
        )
    out_shape = list(outputs[0].shape)
    dim = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else None
    if dim is None:
        zeros = np.zeros((fixed[0] or 1, 3, INPUT_SIZE, INPUT_SIZE), np.float32)
        probe = session.run(None, {inputs[0].name: zeros})[0]  # type: ignore[attr-defined]
        dim = int(probe.reshape(len(probe), -1).shape[1])
    if len(out_shape) != 2 or dim != cfg.embedding_dim:
        raise ModelError(
            f"{path}: output shape {out_shape} is not N x {cfg.embedding_dim}; set encoder.embedding_dim if this "
            "model really has another embedding size"
        )
    return fixed[0], dim


def _place(path: Path, provider: str, cpu: _OnnxRuntime, probe: np.ndarray, device: "str | torch.device | None",
           route: str | None) -> "_OnnxRuntime | _Torch":
    """Where the encoder runs: the first route of :func:`candidate_routes` that loads and agrees with onnxruntime on
    the CPU within :data:`TOLERANCE` on ``probe``. Never silently on the CPU of a GPU machine: that case warns once
    with the reason and says it in ``where``."""
    import onnxruntime as ort

    gpu = _cuda_device(device)
    if route == "torch":  # forced (tests, benchmarks): no fallback, its own error
        return _forced_torch(path, gpu or (str(device) if device else "cpu"), cpu, probe)
    routes = candidate_routes(provider, "CUDAExecutionProvider" in ort.get_available_providers(), gpu)
    failures: list[str] = []
    for r in routes:
        if r.engine == "onnxruntime" and r.device == "cpu":
            if gpu is not None:
                reason = "encoder.provider is 'cpu'" if provider == "cpu" else "; ".join(failures)
                _warn_once(f"the ArcFace identity check runs on the CPU although {gpu} exists ({reason})")
                cpu.where += f" ({gpu} unused: {reason})"
            return cpu
        try:
            if r.engine == "onnxruntime":
                backend: _OnnxRuntime | _Torch = _ort_cuda(path, r.device)
                notes = [r.device]
            else:
                backend = _torch_route(path, r.device)
                why = failures[-1] if failures else "onnxruntime has no CUDA provider here"
                notes = [f"ONNX graph converted: {why}"]
            diff = _agreement(backend, cpu, probe)
        except Exception as exc:  # CUDA libraries, memory, an operator the converter refuses: try the next route
            failures.append(f"{r.engine} on {r.device}: {_first_line(exc)}")
            continue
        if diff is not None and not diff <= TOLERANCE:
            failures.append(f"{r.engine} on {r.device}: its embeddings differ from onnxruntime's on the CPU by "
                            f"{diff:.1e} (over {TOLERANCE:g})")
            continue
        notes.append(_agreement_note(diff))
        backend.where = f"{backend.where} ({'; '.join(notes)})"
        return backend
    raise ModelError(f"{path}: encoder.provider is 'cuda' but no GPU route works ({'; '.join(failures)}); pip "
                     "install onnxruntime-gpu, or use --provider cpu")


def _forced_torch(path: Path, device: str, cpu: _OnnxRuntime, probe: np.ndarray) -> _Torch:
    """The converted graph on ``device``, checked against onnxruntime on the CPU like any GPU route."""
    backend = _torch_route(path, device)
    diff = _agreement(backend, cpu, probe)
    if diff is not None and not diff <= TOLERANCE:
        raise ModelError(f"{path}: the torch route's embeddings differ from onnxruntime's on the CPU by {diff:.1e} "
                         f"(over {TOLERANCE:g}); use encoder.provider: cpu")
    backend.where = f"{backend.where} (ONNX graph converted; {_agreement_note(diff)})"
    return backend


def _probe_faces(n: int, mean: float, std: float) -> np.ndarray:
    """``n`` fixed random faces, preprocessed: the inputs each GPU route is checked on against the CPU."""
    faces = np.random.default_rng(0).integers(0, 256, size=(n, 3, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)
    return np.ascontiguousarray((faces - mean) / std, dtype=np.float32)


@dataclass
class ArcFaceEncoder:
    """A loaded ArcFace ONNX model: ``encoder(batch)`` maps aligned crops (B x 112 x 112 x 3, uint8) to unit vectors.

    It runs on the GPU whenever the machine has one (onnxruntime's CUDA provider, else the graph converted to torch,
    :mod:`digi2real.faces.onnx_torch`), checked at load against onnxruntime on the CPU; ``where`` says where.
    Thread-safe: both routes may be called from several threads at once.
    """

    backend: "_OnnxRuntime | _Torch"
    mean: float
    std: float
    batch_size: int
    model_path: Path
    embedding_dim: int
    fixed_batch: bool = False
    _sha256: str | None = None

    @classmethod
    def load(cls, cfg: EncoderConfig, *, device: "str | torch.device | None" = None,
             route: str | None = None) -> "ArcFaceEncoder":
        """Open the model, check its input (N x 3 x 112 x 112) and output (N x embedding_dim), choose where it runs
        (``cfg.provider``: auto, cpu, cuda). ``device`` names the GPU to use ("cuda:1"; default: torch's current one);
        ``route="torch"`` forces the converted graph on ``device`` (e.g. "cpu", for tests), without fallback."""
        path = resolve_model_file(cfg.model)
        cpu = _OnnxRuntime(_session(path, ["CPUExecutionProvider"]), "onnxruntime CPUExecutionProvider")
        fixed, dim = _check_signature(cpu.session, path, cfg)
        inside = cfg.normalize == "inside" or (cfg.normalize == "auto" and _graph_normalises_itself(path))
        mean, std = (0.0, 1.0) if inside else (127.5, 127.5)
        backend = _place(path, cfg.provider, cpu, _probe_faces(fixed or _PROBE_FACES, mean, std), device, route)
        # A graph exported with a fixed batch dimension only accepts that many images per call.
        batch = fixed if fixed is not None else cfg.batch_size
        return cls(backend, mean, std, batch, path, dim, fixed_batch=fixed is not None)

    @property
    def where(self) -> str:
        """Where the encoder runs, for run logs and dataset cards, e.g. "onnxruntime CPUExecutionProvider",
        "onnxruntime CUDAExecutionProvider (cuda:0; ...)", "torch cuda:0 (ONNX graph converted: ...)"."""
        return self.backend.where

    @property
    def provider(self) -> str:
        """The onnxruntime provider running the graph, or "torch" for the converted graph."""
        return self.backend.provider

    def file_hash(self) -> str:
        """SHA-256 of the model file, recorded in artifacts (computed once: the real file is 261 MB)."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.model_path)
        return self._sha256

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """B x 112 x 112 x 3 uint8 RGB -> B x 3 x 112 x 112 float32 as the model expects (FACTS 3)."""
        if images.ndim != 4 or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"expected B x {INPUT_SIZE} x {INPUT_SIZE} x 3 images, got {images.shape}")
        x = images.astype(np.float32).transpose(0, 3, 1, 2)
        if self.mean != 0.0 or self.std != 1.0:
            x -= self.mean
            x *= 1.0 / self.std
        return np.ascontiguousarray(x)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Forward pre-processed tensors; returns raw (unnormalised) vectors."""
        n = len(x)
        if self.fixed_batch and n < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
        out = self.backend(x)
        return out.reshape(len(x), -1)[:n]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Embed aligned crops in batches of ``batch_size``; returns L2-normalised float32 vectors (B x D)."""
        out = np.empty((len(images), self.embedding_dim), np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            out[start : start + len(chunk)] = self.run(self.preprocess(chunk))
        return l2_normalize(out)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32, copy=False)
