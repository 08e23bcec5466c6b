"""What the method does, checked on the shipped trained miniatures (issue 13, item 4): a generated face keeps its
conditioning identity, SLERP's t moves it from the prototype toward the sample (paper eqs. 3-5), and the realism shift
moves the generated faces toward the real-style set (paper section 3). Small: a few dozen 64 x 64 images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from digi2real.config import EncoderConfig
from digi2real.faces.arcface import ArcFaceEncoder
from digi2real.generation.arc2face import Arc2Face
from digi2real.generation.shift import compute_shift
from digi2real.identity.sphere import slerp
from digi2real.miniature import shipped_models
from digi2real.sources.domains import REAL_TEST, REAL_TRAIN, RENDERED_SOURCE
from digi2real.sources.procedural import render_item

STEPS = 15  # DPM-Solver++ converges well before Arc2Face's 25 at this size; the tests' time is the UNet calls


@pytest.fixture(scope="module")
def models() -> tuple[Arc2Face, ArcFaceEncoder]:
    torch.set_num_threads(1)
    repo, base = shipped_models()
    return (Arc2Face.from_pretrained(repo, base, device="cpu"),
            ArcFaceEncoder.load(EncoderConfig(model=str(repo / "arcface.onnx"), provider="cpu")))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embed(encoder: ArcFaceEncoder, images: np.ndarray) -> np.ndarray:
    """The miniature ArcFace's unit embeddings of faces in the renderer's framing (ArcFace's, at any size)."""
    crops = np.stack([np.asarray(Image.fromarray(im).resize((112, 112), Image.BICUBIC)) for im in images])
    return unit(encoder(crops))


def faces(first: int, n: int, style: str, k: int = 0) -> np.ndarray:
    return np.stack([render_item(0, first + i, k, size=112, style=style) for i in range(n)])


def generate(model: Arc2Face, cond: np.ndarray, seed: int = 0, **kw) -> np.ndarray:
    return model.generate(cond.astype(np.float32), list(range(seed, seed + len(cond))), steps=STEPS, size=64, **kw)


def test_generated_faces_keep_their_conditioning_identity(models):
    """Held-out real-style people: each generated face is nearer its own identity than the others, by a margin."""
    model, encoder = models
    n, per = 8, 2
    cond = embed(encoder, faces(REAL_TEST.first, n, "real"))
    out = embed(encoder, generate(model, np.repeat(cond, per, axis=0)))
    sims = out @ cond.T
    owner = np.repeat(np.arange(n), per)
    own = sims[np.arange(len(sims)), owner]
    other = sims[owner[:, None] != np.arange(n)[None, :]]
    assert np.median(own) - np.median(other) > 0.25, (np.median(own), np.median(other))
    assert (sims.argmax(1) == owner).mean() >= 0.75  # identified among the 8 by nearest conditioning


def test_slerp_t_near_0_stays_near_the_prototype(models):
    """Eqs. 3-5: the embedding slerp(mu, e, t) makes the angle t * theta with mu; its generated face follows, nearer the
    prototype's identity at t = 0.1 than at t = 0.9 (e here another person's embedding, to make the path long)."""
    model, encoder = models
    n = 6
    mu = embed(encoder, faces(REAL_TEST.first + 100, n, "real"))
    e = embed(encoder, faces(REAL_TEST.first + 200, n, "real"))
    near = embed(encoder, generate(model, slerp(mu, e, 0.1)))
    far = embed(encoder, generate(model, slerp(mu, e, 0.9)))
    to_mu_near, to_mu_far = (near * mu).sum(1), (far * mu).sum(1)
    assert to_mu_near.mean() > to_mu_far.mean() + 0.2, (to_mu_near, to_mu_far)
    assert (to_mu_near > to_mu_far).mean() >= 5 / 6


def test_the_realism_shift_moves_generated_faces_toward_the_real_set(models):
    """Section 3: Delta = mean C(real) - mean C(rendered). Faces generated from rendered people's embeddings with
    lambda = 0.5 land nearer a set of real-style faces in ArcFace space than with lambda = 0 (the distance of the
    means and the Frechet distance both shrink), and keep most of their identity. In the miniature lambda = 1
    overshoots (both distances grow again, BENCHMARKS.md "Miniature study"), so the demo uses 0.5."""
    from digi2real.generation.shift import feature_frechet

    model, encoder = models
    n = 64
    real = embed(encoder, faces(REAL_TRAIN.first + 95_000, n, "real"))
    rendered = embed(encoder, faces(RENDERED_SOURCE.first + 5_000, n, "rendered"))
    shift = compute_shift(model, real, rendered)
    cond = embed(encoder, faces(RENDERED_SOURCE.first, n, "rendered"))
    plain = embed(encoder, generate(model, cond, shift=shift.delta, shift_weight=0.0))
    shifted = embed(encoder, generate(model, cond, shift=shift.delta, shift_weight=0.5))
    reference = embed(encoder, faces(REAL_TRAIN.first + 96_000, n, "real"))  # other real-style people
    centre = reference.mean(0)
    assert np.linalg.norm(shifted.mean(0) - centre) < 0.98 * np.linalg.norm(plain.mean(0) - centre)
    assert feature_frechet(shifted, reference) < 0.97 * feature_frechet(plain, reference)
    assert (shifted * cond).sum(1).mean() > 0.85 * (plain * cond).sum(1).mean()
