"""The ArcFace identity encoder, run through onnxruntime (FACTS 3; paper section 3, "Sampling Identities").

Arc2Face was trained on embeddings from one specific ArcFace (its hub repo's ``arcface.onnx``); embedding with another
model gives wrong identities, so that file is the default. Input: aligned 112 x 112 RGB crops, NCHW float32,
``(x - 127.5) / 127.5`` unless the graph normalises itself; output: one vector per image, L2-normalised here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digi2real.config import EncoderConfig
from digi2real.errors import ModelError
from digi2real.fileio import sha256_file

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


@dataclass
class ArcFaceEncoder:
    """A loaded ArcFace ONNX model: ``encoder(batch)`` maps aligned crops (B x 112 x 112 x 3, uint8) to unit vectors."""

    session: object
    input_name: str
    mean: float
    std: float
    batch_size: int
    model_path: Path
    embedding_dim: int
    fixed_batch: bool = False
    _sha256: str | None = None

    @classmethod
    def load(cls, cfg: EncoderConfig) -> "ArcFaceEncoder":
        """Open the model, check its input (N x 3 x 112 x 112) and output (N x embedding_dim), pick the provider."""
        import onnxruntime as ort

        path = resolve_model_file(cfg.model)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=_providers(cfg.provider))
        except Exception as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ModelError(f"{path}: not a loadable ONNX model ({first}); re-download the encoder file") from None

        inputs, outputs = session.get_inputs(), session.get_outputs()
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
            probe = session.run(None, {inputs[0].name: np.zeros((1, 3, INPUT_SIZE, INPUT_SIZE), np.float32)})[0]
            dim = int(probe.reshape(1, -1).shape[1])
        if len(out_shape) != 2 or dim != cfg.embedding_dim:
            raise ModelError(
                f"{path}: output shape {out_shape} is not N x {cfg.embedding_dim}; set encoder.embedding_dim if this "
                "model really has another embedding size"
            )

        inside = cfg.normalize == "inside" or (cfg.normalize == "auto" and _graph_normalises_itself(path))
        mean, std = (0.0, 1.0) if inside else (127.5, 127.5)
        # A graph exported with a fixed batch dimension only accepts that many images per call.
        batch = fixed[0] if fixed[0] is not None else cfg.batch_size
        return cls(session, inputs[0].name, mean, std, batch, path, dim, fixed_batch=fixed[0] is not None)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]  # type: ignore[attr-defined]

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
        out = self.session.run(None, {self.input_name: x})[0]  # type: ignore[attr-defined]
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
