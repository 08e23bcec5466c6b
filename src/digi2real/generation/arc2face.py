"""Arc2Face: Stable Diffusion 1.5 conditioned on ArcFace identity embeddings (FACTS 2; paper section 3).

The identity vector replaces the token embedding of the word ``id`` in the prompt ``photo of a id person``; the CLIP
text encoder that Arc2Face fine-tuned then turns the prompt into the UNet's cross-attention conditioning
(``B x 77 x hidden``). Sampling is DPM-Solver++ with classifier-free guidance, whose unconditional branch is the same
encoder run on the empty prompt.

Models load from the hub (``FoivosPar/Arc2Face`` for the UNet and encoder, the SD1.5 repo for VAE, tokenizer and
scheduler), through its cache, or from local directories in the same layout.

Fast sampling on CUDA (:meth:`Arc2Face.optimize`, :meth:`Arc2Face.auto_batch_size`): float16 by default (bfloat16
selectable), UNet and VAE decode in that one precision, channels_last, and the UNet compiled for the job's batch size;
the algorithm, the noise and the guidance arithmetic are the same on every path. On the CPU nothing is applied, so CPU
pixels never change.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from digi2real.config import DEFAULT_ARC2FACE, DEFAULT_SD15
from digi2real.errors import ConfigError, ModelError
from digi2real.fileio import sha256_file
from digi2real.generation.dtypes import canonical_dtype

PROMPT = "photo of a id person"
ID_WORD = "id"
EMPTY_PROMPT = ""

# (subfolder, acceptable file names): the first that exists is used.
ARC2FACE_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "arc2face": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "encoder": (("config.json",), ("model.safetensors", "pytorch_model.bin")),
}
BASE_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "vae": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "tokenizer": (("vocab.json", "tokenizer.json"), ("merges.txt", "tokenizer.json"), ("tokenizer_config.json",)),
    "scheduler": (("scheduler_config.json",),),
}
ARC2FACE_PATTERNS = ["arc2face/config.json", "arc2face/diffusion_pytorch_model.safetensors",
                     "encoder/config.json", "encoder/pytorch_model.bin"]
BASE_PATTERNS = ["vae/config.json", "vae/diffusion_pytorch_model.safetensors", "tokenizer/*",
                 "scheduler/scheduler_config.json"]
_REVISION = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")


# --------------------------------------------------------------------------------------------------------- loading


def missing_files(root: Path, layout: dict[str, tuple[tuple[str, ...], ...]]) -> list[str]:
    """The files of the hub ``layout`` (``{subfolder: ((one of these names), ...)}``) that ``root`` lacks."""
    out = []
    for sub, groups in layout.items():
        for names in groups:
            if not any((root / sub / n).is_file() for n in names):
                out.append(f"{sub}/{names[0]}")
    return out


def is_local_spec(spec: str) -> bool:
    """A model spec names a local directory when it is one, or is absolute, relative (``.``/``~``) or anything but an
    ``org/name`` hub id."""
    local = Path(spec).expanduser()
    return local.is_dir() or local.is_absolute() or spec.startswith((".", "~")) or spec.count("/") != 1


def resolve_model_dir(spec: str, layout: dict[str, tuple[tuple[str, ...], ...]], patterns: list[str],
                      flag: str, hub_repo: str) -> Path:
    """A local directory in the hub layout as is; otherwise the hub repo ``spec`` from the cache, else downloaded.

    Every failure ends in one :class:`ModelError` naming the missing files and the command that fetches them.
    """
    local = Path(spec).expanduser()
    files = " ".join(f"'{p}'" for p in patterns)
    if is_local_spec(spec):
        if not local.is_dir():
            raise ModelError(f"{spec}: model directory not found; pass a directory in the hub layout "
                             f"({', '.join(layout)}/) with {flag}")
        missing = missing_files(local, layout)
        if missing:
            raise ModelError(f"{local}: missing {', '.join(missing)}; fetch them in the hub layout with "
                             f"`hf download {hub_repo} {files} --local-dir {local}`")
        return local

    from huggingface_hub import snapshot_download

    from digi2real.faces.arcface import hub_unreachable

    reason = "not in the local hub cache"
    with contextlib.suppress(Exception):
        cached = Path(snapshot_download(spec, allow_patterns=patterns, local_files_only=True))
        if not missing_files(cached, layout):
            return cached
        reason = f"the cached copy lacks {', '.join(missing_files(cached, layout))}"
    offline = hub_unreachable()
    if offline is None:
        try:
            root = Path(snapshot_download(spec, allow_patterns=patterns))
            missing = missing_files(root, layout)
            if not missing:
                return root
            reason = f"the repo has no {', '.join(missing)}"
        except Exception as exc:  # auth, missing repo, network: the user's fix is the same
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
    else:
        reason = f"{reason}, and the hub cannot be reached ({offline})"
    raise ModelError(f"cannot get the hub repo {spec} ({reason}); download it with "
                     f"`hf download {spec} {files} --local-dir DIR` and pass {flag} DIR")


def resolve_device(choice: str | torch.device) -> torch.device:
    """``auto`` (CUDA when visible), ``cpu``, ``cuda`` or ``cuda:N``, as a string or a ``torch.device``."""
    text = str(choice).strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"arc2face.device {text[:40]!r}: not a device; use auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("arc2face.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return device


def resolve_dtype(choice: str | torch.dtype, device: torch.device) -> torch.dtype:
    """float16 on CUDA and float32 on CPU by default; float16 on CPU is refused (slow, and not every kernel has it).

    ``choice``: a ``torch.dtype`` or any name diffusers accepts (:data:`digi2real.generation.dtypes.DTYPE_ALIASES`)."""
    name = canonical_dtype(choice)
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name == "float16" and device.type != "cuda":
        raise ConfigError("arc2face.dtype float16 needs CUDA; on CPU use float32 or bfloat16")
    return getattr(torch, name)


def _quiet_loaders() -> contextlib.AbstractContextManager:
    """Silence transformers' and diffusers' per-file progress bars and info lines while loading."""
    stack = contextlib.ExitStack()
    for name in ("transformers", "diffusers"):
        logger = logging.getLogger(name)
        level = logger.level
        logger.setLevel(logging.ERROR)
        stack.callback(logger.setLevel, level)
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            stack.callback(hf_logging.enable_progress_bar)
    return stack


def load_id_encoder(path: Path):
    """The Arc2Face ID encoder as a plain ``CLIPTextModel`` (float32).

    Its checkpoint keys start with ``text_model.``; transformers 5 maps them onto the plain class but would leave a
    subclass randomly initialised, printing only a report. So the report is checked: anything missing is an error.
    """
    from transformers import CLIPTextModel

    try:
        model, info = CLIPTextModel.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"{path}: not a loadable CLIP text encoder ({str(exc).splitlines()[0][:160]}); "
                         "re-download Arc2Face's encoder/") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        bad = (missing + [str(m) for m in mismatched])[:3]
        raise ModelError(f"{path}: encoder weights do not match the CLIPTextModel architecture (e.g. {bad}); "
                         "re-download Arc2Face's encoder/")
    return model.eval()


# --------------------------------------------------------------------------------------------------- conditioning


def id_token_position(tokenizer: Any, prompt: str = PROMPT, word: str = ID_WORD) -> tuple[list[int], int]:
    """The padded token ids of the Arc2Face prompt and the position of the word ``id`` in them (FACTS 2: 4 for SD1.5),
    found from the tokenizer rather than assumed."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(word_ids) != 1:
        raise ModelError(f"the tokenizer splits {word!r} into {len(word_ids)} tokens; Arc2Face needs the SD1.5 CLIP "
                         "tokenizer, where it is one token")
    positions = [i for i, t in enumerate(ids) if t == word_ids[0]]
    if len(positions) != 1:
        raise ModelError(f"the prompt {prompt!r} holds the token {word!r} {len(positions)} times; expected once")
    return list(ids), positions[0]


def pad_identity(id_embeddings: torch.Tensor, hidden: int) -> torch.Tensor:
    """FACTS 2: the L2-normalised ArcFace vector, zero-padded to the encoder's hidden size, with no other scaling."""
    if id_embeddings.ndim != 2:
        raise ValueError(f"identity embeddings must be B x D, got shape {tuple(id_embeddings.shape)}")
    d = id_embeddings.shape[1]
    if d > hidden:
        raise ValueError(f"identity embeddings have {d} dimensions, more than the encoder's hidden size {hidden}")
    return F.pad(F.normalize(id_embeddings.float(), dim=1), (0, hidden - d))


@contextlib.contextmanager
def replaced_token_row(embedding: torch.nn.Module, position: int, rows: torch.Tensor) -> Iterator[None]:
    """While active, the token-embedding lookup returns ``rows[b]`` at ``position`` of batch row ``b`` (the raw
    lookup, before position embeddings are added): the public input-embeddings path, valid on any transformers."""

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if output.shape[0] != rows.shape[0]:
            raise ValueError(f"batch of {output.shape[0]} prompts but {rows.shape[0]} identity embeddings")
        output = output.clone()
        output[:, position] = rows.to(output.dtype)
        return output

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def apply_shift(cond: torch.Tensor, delta: torch.Tensor | None, weight: float) -> torch.Tensor:
    """Paper section 3 (realism shift): the conditional branch becomes ``C(e) + lambda * Delta``; lambda = 0 (or no
    Delta) returns the conditioning untouched, bit for bit."""
    if delta is None or weight == 0.0:
        return cond
    if tuple(delta.shape) != tuple(cond.shape[1:]):
        raise ValueError(f"shift has shape {tuple(delta.shape)}, the conditioning {tuple(cond.shape[1:])}; the shift "
                         "was made with another encoder")
    return cond + weight * delta.to(cond.device, cond.dtype)


# ------------------------------------------------------------------------------------------- fast sampling on CUDA

#: Batch size on the CPU (``generate.batch_size: auto``): the default before issue 12, so CPU pixels are unchanged.
CPU_BATCH = 8
#: ``auto_batch_size`` uses at most this share of the free GPU memory and this many images. The rest is headroom for
#: what the per-image model below leaves out (cuDNN workspaces, the caching allocator's rounding, the detector and the
#: identity check running beside the UNet); out-of-memory halving in the runner stays the safety net.
MEMORY_FRACTION = 0.6
MAX_AUTO_BATCH = 64
#: Activation memory per pixel of the generated image, in elements of the model's dtype (multiply by its size in
#: bytes and by size x size). Estimated, not measured on a GPU: the peak of live tensors, traced on the meta device
#: through the real-size SD1.5 UNet (cross-attention 768) and VAE (diffusers' SD1.5 configs, random weights) at
#: 256 and 512 px in float16 and float32, with attention counted as O(tokens) as PyTorch's flash and memory-efficient
#: kernels run it: UNet 65.1 MiB per row at 512 px in float16 (130.2 elements per pixel), VAE decode 384 MiB per image
#: (768), both linear in the batch and in the pixel count. Weights are not in it: they are loaded before the free
#: memory is read.
UNET_ELEMENTS_PER_PIXEL = 131
VAE_ELEMENTS_PER_PIXEL = 768
#: The compiled UNet must agree with eager within this share of the largest eager output on the warm-up step; float16
#: kernels differ in the last bits (about 1e-3), a miscompilation by far more.
COMPILE_TOLERANCE = 5e-2

Switch = bool | Literal["auto"]


def per_image_bytes(size: int, guidance: float, dtype: torch.dtype) -> int:
    """Peak activation memory of one image at ``size`` px: its UNet rows (two with guidance: the unconditional branch
    rides in the same call) or its VAE decode, whichever is larger; the two phases never overlap."""
    rows = 1 if guidance == 1.0 else 2
    elements = max(rows * UNET_ELEMENTS_PER_PIXEL, VAE_ELEMENTS_PER_PIXEL)
    return size * size * elements * dtype.itemsize


def batch_for_memory(free_bytes: int, size: int, guidance: float, dtype: torch.dtype) -> int:
    """The largest power of two, at most :data:`MAX_AUTO_BATCH` and at least 1, whose images fit in
    :data:`MEMORY_FRACTION` of ``free_bytes`` by :func:`per_image_bytes`."""
    fits = int(MEMORY_FRACTION * free_bytes) // per_image_bytes(size, guidance, dtype)
    if fits < 1:
        return 1
    return min(MAX_AUTO_BATCH, 2 ** int(math.log2(fits)))


def _accelerated(device: torch.device) -> bool:
    """Whether the fast-sampling settings apply: on CUDA only (tests stand in for CUDA by replacing this)."""
    return device.type == "cuda"


def _switch(value: Any, setting: str) -> Switch:
    if value is True or value is False or value == "auto":
        return value
    raise ConfigError(f"{setting} {value!r}: not a choice; use true, false or auto")


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _one_line(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"[:200]


def _compile_options() -> dict | None:
    """Inductor's deterministic mode where this torch has it (2.10+): no on-device benchmarking that would pick
    kernels with another summation order from run to run, so a resumed run compiles to the same pixels."""
    import torch._inductor.config as inductor

    return {"deterministic": True} if hasattr(inductor, "deterministic") else None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------- the model


@dataclass
class Arc2Face:
    """A loaded Arc2Face: ``encode`` maps identity embeddings to conditioning, ``generate`` samples images."""

    unet: Any
    text_encoder: Any
    vae: Any
    tokenizer: Any
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    info: dict = field(default_factory=dict)
    _prompt_ids: torch.Tensor | None = field(default=None, repr=False)
    _id_position: int = -1
    _uncond: torch.Tensor | None = field(default=None, repr=False)
    #: The compiled UNet (None: eager), the batch and UNet rows it serves, and whether channels_last is applied.
    _compiled: Any = field(default=None, repr=False)
    _compiled_batch: int = 0
    _compiled_rows: int = 0
    _channels_last: bool = False
    _warming: bool = False  # while optimize() warms the compiled UNet up, its failures reach optimize()
    #: What :meth:`optimize` applied (JSON-able; updated in place if the compiled UNet fails during a run).
    optimization: dict = field(default_factory=dict)

    @classmethod
    def from_pretrained(cls, repo: str | Path = DEFAULT_ARC2FACE, base: str | Path = DEFAULT_SD15,
                        device: str = "auto", dtype: str | torch.dtype = "auto") -> "Arc2Face":
        """Load from hub ids (cached after the first download) or local directories in the hub layout.

        ``dtype`` (UNet and VAE): a ``torch.dtype`` or its name, as diffusers takes it (``torch.float16``, "fp16",
        "bfloat16", "auto"...)."""
        from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
        from transformers import CLIPTokenizer

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        root = resolve_model_dir(str(repo), ARC2FACE_FILES, ARC2FACE_PATTERNS, "--arc2face",
                                 DEFAULT_ARC2FACE)
        base_root = resolve_model_dir(str(base), BASE_FILES, BASE_PATTERNS, "--base", DEFAULT_SD15)
        with _quiet_loaders():
            try:
                unet = UNet2DConditionModel.from_pretrained(root / "arc2face", dtype=dt)
                vae = AutoencoderKL.from_pretrained(base_root / "vae", dtype=dt)
                tokenizer = CLIPTokenizer.from_pretrained(base_root / "tokenizer")
                scheduler_config = dict(DPMSolverMultistepScheduler.load_config(base_root / "scheduler"))
            except (OSError, ValueError, RuntimeError) as exc:
                raise ModelError(f"{root} / {base_root}: cannot load the generator "
                                 f"({str(exc).splitlines()[0][:200]}); re-download the model files") from None
            encoder = load_id_encoder(root / "encoder")
        if encoder.config.hidden_size != unet.config.cross_attention_dim:
            raise ModelError(f"{root}: encoder hidden size {encoder.config.hidden_size} does not match the UNet's "
                             f"cross-attention size {unet.config.cross_attention_dim}")
        info = {"repo": str(repo), "base": str(base), "repo_dir": str(root), "base_dir": str(base_root),
                "revision": _revision(root), "base_revision": _revision(base_root),
                "encoder_file": str(_first(root / "encoder", ARC2FACE_FILES["encoder"][1]))}
        model = cls(unet.to(dev).eval(), encoder.to(dev), vae.to(dev).eval(), tokenizer, scheduler_config, dev, dt, info)
        ids, pos = id_token_position(tokenizer)
        model._prompt_ids, model._id_position = torch.tensor([ids], device=dev), pos
        return model

    # -- conditioning ---------------------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def id_position(self) -> int:
        return self._id_position

    def encoder_sha256(self) -> str:
        """SHA-256 of the ID encoder's weights: the only model a realism shift depends on."""
        if "encoder_sha256" not in self.info:
            self.info["encoder_sha256"] = sha256_file(self.info["encoder_file"])
        return self.info["encoder_sha256"]

    @torch.no_grad()
    def encode(self, id_embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Identity embeddings (B x 512) -> prompt embeddings (B x 77 x hidden, float32): FACTS 2, for every row."""
        e = torch.as_tensor(np.asarray(id_embeddings, np.float32) if isinstance(id_embeddings, np.ndarray)
                            else id_embeddings).to(self.device, torch.float32)
        rows = pad_identity(e, self.hidden_size)
        ids = self._prompt_ids.expand(len(rows), -1)
        with replaced_token_row(self.text_encoder.get_input_embeddings(), self._id_position, rows):
            return self.text_encoder(input_ids=ids).last_hidden_state.float()

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """A plain text prompt through the ID encoder (1 x 77 x hidden, float32)."""
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(input_ids=ids).last_hidden_state.float()

    def unconditional(self) -> torch.Tensor:
        """The unconditional branch: the encoder's output for the empty prompt, computed once per model."""
        if self._uncond is None:
            self._uncond = self.encode_prompt(EMPTY_PROMPT)
        return self._uncond

    # -- sampling -------------------------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def initial_noise(self, seeds: Sequence[int], size: int) -> torch.Tensor:
        """Each image's latent noise from its own seed on a CPU generator: the same on every device and batching."""
        side = size // self.vae_scale_factor
        shape = (int(self.unet.config.in_channels), side, side)
        out = torch.empty((len(seeds), *shape), dtype=torch.float32)
        for i, seed in enumerate(seeds):
            out[i] = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)))
        return out

    def make_scheduler(self, steps: int) -> Any:
        """A fresh DPM-Solver++ multistep scheduler (its history is per call) from the base scheduler config."""
        from diffusers import DPMSolverMultistepScheduler

        scheduler = DPMSolverMultistepScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def unet_eps(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
        """One guided noise prediction: ``eps_u + g (eps_c - eps_u)``, both branches in one UNet call."""
        if guidance == 1.0:
            return self._unet(latents.to(self.dtype), t, cond.to(self.dtype)).float()
        uncond = self.unconditional().expand(len(cond), -1, -1)
        emb = torch.cat([uncond, cond]).to(self.dtype)
        eps = self._unet(torch.cat([latents, latents]).to(self.dtype), t, emb).float()
        eps_u, eps_c = eps.chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    def _unet(self, sample: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction: compiled when the rows are the ones it was compiled for, eager otherwise.

        Only one shape is compiled (``dynamic=False``): the last unit, retries and out-of-memory halves run eager
        instead of recompiling, so an image's pixels depend on its batch size alone, never on the order in which
        shapes were first seen (a resumed or re-sharded run makes the same images)."""
        compiled = self._compiled
        if compiled is not None and sample.shape[0] == self._compiled_rows:
            try:
                return compiled(sample, t, encoder_hidden_states=emb).sample
            except Exception as exc:  # a compiled graph that fails must not end the run: eager from here on
                if self._warming or _is_out_of_memory(exc):
                    raise
                reason = f"the compiled UNet failed during the run at batch {self._compiled_batch}: {_one_line(exc)}"
                self._drop_compiled(reason)
                warnings.warn(f"generate.compile: {reason}; images from here on are rendered eager", stacklevel=2)
        return self.unet(sample, t, encoder_hidden_states=emb).sample

    @torch.no_grad()
    def denoise(self, cond: torch.Tensor, noise: torch.Tensor, steps: int = 25, guidance: float = 3.0) -> torch.Tensor:
        """DPM-Solver++ from the initial noise to clean latents, guided by ``cond`` (FACTS 2: 25 steps, g = 3)."""
        scheduler = self.make_scheduler(steps)
        latents = noise.to(self.device, torch.float32) * scheduler.init_noise_sigma
        cond = cond.to(self.device, torch.float32)
        for t in scheduler.timesteps:
            eps = self.unet_eps(scheduler.scale_model_input(latents, t), t, cond, guidance)
            latents = scheduler.step(eps, t, latents).prev_sample
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Latents -> (B x H x W x 3 uint8 images, B booleans: the image is finite). A non-finite image is zeros."""
        x = self.vae.decode(latents.to(self.dtype) / self.vae.config.scaling_factor).sample.float()
        finite = torch.isfinite(x).flatten(1).all(dim=1)
        x = torch.nan_to_num(x, nan=-1.0, posinf=1.0, neginf=-1.0)
        x = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        x[~finite] = 0
        return x.permute(0, 2, 3, 1).cpu().numpy(), finite.cpu().numpy()

    @torch.no_grad()
    def generate(self, id_embeddings: torch.Tensor | np.ndarray, seeds: Sequence[int], *,
                 shift: torch.Tensor | None = None, shift_weight: float = 1.0, steps: int = 25, guidance: float = 3.0,
                 size: int = 512) -> np.ndarray:
        """Images (B x size x size x 3 uint8) of the identities, one seed each: encode, shift, denoise, decode."""
        if len(seeds) != len(id_embeddings):
            raise ValueError(f"{len(id_embeddings)} identity embeddings but {len(seeds)} seeds")
        cond = apply_shift(self.encode(id_embeddings), shift, shift_weight)
        latents = self.denoise(cond, self.initial_noise(seeds, size), steps, guidance)
        return self.decode(latents)[0]

    # -- fast sampling on CUDA ------------------------------------------------------------------------------------

    def auto_batch_size(self, size: int, guidance: float) -> int:
        """``generate.batch_size: auto``: :data:`CPU_BATCH` on the CPU; on CUDA the largest power of two (at most
        :data:`MAX_AUTO_BATCH`) whose images fit in :data:`MEMORY_FRACTION` of the free memory by
        :func:`per_image_bytes` (the figures and where they come from are at :data:`UNET_ELEMENTS_PER_PIXEL`)."""
        if not _accelerated(self.device):
            return CPU_BATCH
        torch.cuda.empty_cache()  # blocks this process cached but does not use are free for the batch
        free, _total = torch.cuda.mem_get_info(self.device)
        return batch_for_memory(int(free), size, guidance, self.dtype)

    @property
    def where(self) -> str:
        """Where and how the generator runs, for the run log and the card: e.g. ``cuda:0 (NVIDIA H200), float16,
        compiled (batch 32), channels_last`` or ``cpu, float32``."""
        parts = [_device_name(self.device), str(self.dtype).removeprefix("torch.")]
        if self._compiled is not None:
            parts.append(f"compiled (batch {self._compiled_batch})")
        if self._channels_last:
            parts.append("channels_last")
        return ", ".join(parts)

    def optimize(self, *, compile: Switch = "auto", channels_last: Switch = "auto", batch: int = CPU_BATCH,  # noqa: A002
                 size: int = 512, steps: int = 25, guidance: float = 3.0) -> dict:
        """Prepare fast sampling for a job of ``batch`` images at ``size`` px; returns what was applied (JSON-able).

        On CUDA: channels_last for the UNet and VAE (``auto``: on; cuDNN's tensor-core convolutions are NHWC), the UNet
        compiled with torch.compile (inductor, default mode, its deterministic option, one static shape: ``batch``
        images' UNet rows; ``auto``: on), then a warm-up of two denoising steps and one decode at that batch, timed
        as ``warmup_s`` and never counted as throughput. The compiled UNet must match eager on the warm-up step
        (:data:`COMPILE_TOLERANCE`). If compiling, the warm-up or that check fails, the UNet runs eager and the reason
        is recorded; ``compile: true`` also warns (one line), ``auto`` does not. No choice depends on a timing, so
        every run and shard of a configuration renders the same pixels. CUDA graphs are not used: at these batch
        sizes a step is a few hundred milliseconds of kernels, and their static buffers would pin the batch size.
        The VAE decode is not compiled: about 3% of an image's time (19 ms against 25 UNet steps of 26 ms, fp32, on
        the H200 of ``shared/gpu/README.md``).

        On the CPU nothing is applied (``compile: "off (cpu)"``), so CPU pixels never change.
        """
        compile_choice = _switch(compile, "generate.compile")
        layout_choice = _switch(channels_last, "generate.channels_last")
        if batch < 1 or size < 8 or steps < 1:
            raise ValueError(f"optimize: batch {batch}, size {size} and steps {steps} must be positive")
        self._drop_compiled(None)
        if not _accelerated(self.device):
            return self._record("off (cpu)" if compile_choice else "off (not requested)", "none (cpu)", 0.0)
        self._set_channels_last(layout_choice is not False)
        rows = batch if guidance == 1.0 else 2 * batch
        start = time.perf_counter()
        if compile_choice is False:
            state = "off (not requested)"
        elif (failure := self._compile_and_warm_up(batch, rows, size, steps, guidance)) is None:
            state = f"on (inductor, batch {batch}: {rows} UNet rows; other batch sizes run eager)"
        else:
            state = f"off (fallback: {failure})"
            if compile_choice is True:
                warnings.warn(f"generate.compile: {failure}; the UNet runs eager", stacklevel=2)
        warm = "done" if self._compiled is not None else self._warm_up_eager(batch, size, steps, guidance)
        return self._record(state, warm, time.perf_counter() - start)

    def _record(self, compile_state: str, warmup: str, seconds: float) -> dict:
        self.optimization = {"device": _device_name(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                             "compile": compile_state, "compiled_batch": self._compiled_batch or None,
                             "channels_last": self._channels_last, "warmup": warmup,
                             "warmup_s": round(seconds, 3), "where": self.where}
        return self.optimization

    def _set_channels_last(self, on: bool) -> None:
        if on != self._channels_last:
            layout = torch.channels_last if on else torch.contiguous_format
            self.unet.to(memory_format=layout)
            self.vae.to(memory_format=layout)
            self._channels_last = on

    def _drop_compiled(self, reason: str | None) -> None:
        """Back to the eager UNet; a reason (a failure during the run) goes into :attr:`optimization`."""
        self._compiled, self._compiled_batch, self._compiled_rows = None, 0, 0
        if reason is not None and self.optimization:
            self.optimization.update(compile=f"off (fallback: {reason})", compiled_batch=None, where=self.where)

    def _compile_and_warm_up(self, batch: int, rows: int, size: int, steps: int, guidance: float) -> str | None:
        """Compile the UNet for ``rows`` and warm it up: None, or why not (eager restored)."""
        try:
            self._compiled = torch.compile(self.unet, dynamic=False, options=_compile_options())
        except Exception as exc:  # no triton, no compiler, an unsupported torch: eager, never a crash
            self._drop_compiled(None)
            return f"torch.compile failed: {_one_line(exc)}"
        self._compiled_batch, self._compiled_rows = batch, rows
        self._warming = True
        try:
            self._warm_up(batch, size, steps, guidance)
            disagreement = self._compiled_disagreement(batch, size, steps, guidance)
        except Exception as exc:  # compilation happens at the first call: its errors surface here
            self._drop_compiled(None)
            _release(self.device)
            return f"the compiled UNet failed its warm-up: {_one_line(exc)}"
        finally:
            self._warming = False
        if disagreement is not None:
            self._drop_compiled(None)
        return disagreement

    def _warm_up_eager(self, batch: int, size: int, steps: int, guidance: float) -> str:
        """Warm the eager path (cuDNN's kernel choice, lazy initialisation); out of memory is recorded, not raised:
        the runner's halving handles it."""
        try:
            self._warm_up(batch, size, steps, guidance)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            _release(self.device)
            return f"out of memory at batch {batch} (the runner halves it)"
        return "done"

    def _warm_inputs(self, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.encode(np.eye(batch, 512, dtype=np.float32))
        return cond, self.initial_noise(list(range(batch)), size)

    def _warm_up(self, batch: int, size: int, steps: int, guidance: float) -> None:
        """Two denoising steps and one decode at the job's shapes (the scheduler's step count does not change them)."""
        cond, noise = self._warm_inputs(batch, size)
        self.decode(self.denoise(cond, noise, min(steps, 2), guidance))
        _synchronize(self.device)

    @torch.no_grad()
    def _compiled_disagreement(self, batch: int, size: int, steps: int, guidance: float) -> str | None:
        """None when the compiled UNet's guided prediction on the first step matches eager; otherwise why not."""
        cond, noise = self._warm_inputs(batch, size)
        scheduler = self.make_scheduler(steps)
        t = scheduler.timesteps[0]
        latents = scheduler.scale_model_input(noise.to(self.device) * scheduler.init_noise_sigma, t)
        fast = self.unet_eps(latents, t, cond, guidance)
        compiled, self._compiled = self._compiled, None
        try:
            slow = self.unet_eps(latents, t, cond, guidance)
        finally:
            self._compiled = compiled
        valid = torch.isfinite(slow)
        if not bool(valid.any()):  # eager itself is not finite here: nothing to compare against
            return None
        if not bool(torch.isfinite(fast[valid]).all()):
            return "the compiled UNet returned NaN or infinity where eager did not"
        error = float((fast - slow)[valid].abs().max() / slow[valid].abs().max().clamp_min(1e-6))
        if error > COMPILE_TOLERANCE:
            return f"the compiled UNet differs from eager by {error:.3g} of its largest output"
        return None


def _first(folder: Path, names: tuple[str, ...]) -> Path:
    return next((folder / n for n in names if (folder / n).is_file()), folder / names[0])


def _revision(path: Path) -> str | None:
    """The hub commit a cached snapshot came from (None for a plain local directory)."""
    match = _REVISION.search(path.resolve().as_posix() + "/")
    return match.group(1) if match else None


def _device_name(device: torch.device) -> str:
    """``cpu`` or ``cuda:N (GPU name)``."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = ""
    with contextlib.suppress(Exception):
        name = f" ({torch.cuda.get_device_name(index)})"
    return f"cuda:{index}{name}"


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
