"""The built-in procedural face source: parametric cartoon faces drawn from scratch in numpy.

It stands in for DigiFace-1M in the demo and in tests, so that every stage can run without downloading a dataset.
Each identity is a set of shape and colour parameters (face outline, skin tone, eyes, brows, nose, lips, hair, beard,
glasses, moles); each image adds nuisances (head pose, alignment jitter, expression, lighting, background, clothes,
blur, sensor noise, an occasional occluder). The nuisances are deliberately strong: raw pixels must not verify
identity, while a learned model must, which is the property the training and evaluation stages rely on.

Images are aligned like ArcFace crops: at frontal pose without jitter the eye centres, nose tip and mouth corners sit
on the ArcFace 5-point template of a 112 x 112 crop (scaled for other sizes). Shapes are signed-distance functions
with a soft edge, which gives anti-aliasing and defocus blur for the price of one clip per layer.

Two styles draw the same people (issue 13), standing in for the paper's two worlds: ``rendered`` is the flat synthetic
look above (the DigiFace-1M stand-in), ``real`` draws the same identity and the same nuisances like a photograph (soft
shading in a coloured key and fill light, relief shadows, skin and hair texture anchored to the face, a cluttered
out-of-focus room behind, lens blur, sensor noise, JPEG-like blocks): the miniature's "real" image domain. Geometry
is shared, so :func:`face_landmarks` holds for both.

Determinism: identity ``i`` depends only on ``(seed, i)``, image ``k`` of it only on ``(seed, i, k)``; the same inputs
give bit-identical pixels on the same platform, in either style.
"""

from __future__ import annotations

import cmath
import dataclasses
import functools
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import numpy as np

from digi2real.errors import BadImageError, ConfigError
from digi2real.faces.template import ARCFACE_TEMPLATE
from digi2real.imageio import write_image
from digi2real.sources.base import ImageSource, SourceItem

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "RENDERER_VERSION",
    "STYLES",
    "FaceIdentity",
    "FaceNuisance",
    "ProceduralSource",
    "face_landmarks",
    "identity_rng",
    "image_rng",
    "render_face",
    "render_item",
    "sample_identity",
    "sample_nuisance",
    "template_landmarks",
    "check_style",
    "write_procedural_tree",
]

#: Recorded in artifacts; bump whenever the drawing or the parameter sampling changes, since images then change too.
#: The ``real`` style is new drawing, not a change: ``rendered`` images are byte-identical to before it existed.
RENDERER_VERSION = "procedural-faces-1"

#: The two ways of drawing a face: flat synthetic renders (the DigiFace-1M stand-in) and photograph-like images.
STYLES = ("rendered", "real")

#: ArcFace 5-point template for a 112 x 112 crop (the one in faces.template): faces are drawn onto it.
ARCFACE_TEMPLATE_112 = ARCFACE_TEMPLATE

# The template as Python floats, so that arithmetic with float32 arrays never promotes to float64.
_T = tuple((float(x), float(y)) for x, y in ARCFACE_TEMPLATE_112)
_EYE_MID = 0.5 * (_T[0][0] + _T[1][0])
_EYE_HALF = 0.5 * (_T[1][0] - _T[0][0])
_EYE_Y = 0.5 * (_T[0][1] + _T[1][1])
_EYE_SLOPE = (_T[1][1] - _T[0][1]) / (_T[1][0] - _T[0][0])
_MOUTH_MID = 0.5 * (_T[3][0] + _T[4][0])
_MOUTH_HALF = 0.5 * (_T[4][0] - _T[3][0])
_MOUTH_Y = 0.5 * (_T[3][1] + _T[4][1])
_MOUTH_SLOPE = (_T[4][1] - _T[3][1]) / (_T[4][0] - _T[3][0])

Colour = tuple[float, float, float]

# Head model, in canonical "template pixels" (the 112 x 112 frame at frontal pose, v pointing down). Yaw turns the
# head about a vertical cylinder through the face midline, pitch about a horizontal one; the turned face is then
# re-aligned onto the template like a real crop, and the nuisance's roll, scale and shift add the residual error of
# a 5-point aligner about the crop centre.
_MID_X = 56.0
_PITCH_CY = 62.0
_PITCH_R = 78.0
_CROP_C = 56.0
# Pixels off the head cylinder, or on its far side, get this canonical coordinate, far from every face shape.
_FAR = 1.0e4
# Distinct entropy tags keep identity and image streams apart even where (seed, i) and (seed, i, k) could collide.
_IDENTITY_TAG = 0x1D_F4CE
_IMAGE_TAG = 0x1A_6E5
# The real style's extra randomness: a photograph's settings come from the nuisance's own seed, an identity's skin and
# hair texture from a hash of its parameters, so neither stream above changes (rendered images stay byte-identical).
_PHOTO_TAG = 0x9407_0
_TEXTURE_TAG = 0x7E_C5


# ---------------------------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class FaceIdentity:
    """Everything that stays the same across the images of one person.

    Lengths are in template pixels of the frontal 112 x 112 frame (v downwards), colours are RGB in [0, 1]. The five
    landmarks themselves are fixed by alignment, so "eye spacing" shows as the face width around fixed eyes.
    """

    skin: Colour
    # Face outline: half-width at the widest line, heights of the forehead top, the widest line and the chin; jaw taper
    # narrows the lower face, chin_square flattens the chin, cheek bulges the face just below the widest line.
    face_half_width: float
    face_top: float
    face_mid: float
    chin: float
    jaw_taper: float
    chin_square: float
    cheek: float
    ears: bool
    ear_size: float
    # Eyes: half-width and upper-lid height of the opening, lower lid as a fraction of it, canthal tilt (radians,
    # outer corner up), iris radius relative to the opening, eyelid line thickness.
    eye_half_width: float
    eye_height: float
    eye_lower: float
    eye_tilt: float
    iris_ratio: float
    iris: Colour
    lid_thickness: float
    # Brows: height above the eye, length, thickness at the inner end, slope and arch, and a sideways shift.
    brow_gap: float
    brow_length: float
    brow_thickness: float
    brow_angle: float
    brow_arch: float
    brow_shift: float
    brow_colour: Colour
    # Nose: half-spacing of the nostrils, bridge length above the tip, nostril size, how far the tip stands out.
    nose_width: float
    nose_length: float
    nostril_size: float
    nose_depth: float
    # Lips: thickness at the middle, depth of the cupid's bow (0..1).
    upper_lip: float
    lower_lip: float
    lip_bow: float
    lips: Colour
    # Hair: top of the hair mass, extra width beyond the face, where it ends (v; past the chin for long hair),
    # hairline height at the middle and how far it drops at the temples, fringe depth and waviness, parting slope,
    # strand contrast and frequency.
    hair: Colour
    hair_top: float
    hair_volume: float
    hair_length: float
    hairline: float
    temple_drop: float
    fringe: float
    fringe_freq: float
    fringe_phase: float
    hair_part: float
    hair_strands: float
    strand_freq: float
    # Optional features: 0 means absent; otherwise beard and moustache density, glasses frame thickness.
    beard: float
    beard_line: float
    moustache: float
    glasses: float
    glasses_colour: Colour
    glasses_size: float
    glasses_aspect: float
    moles: tuple[tuple[float, float, float], ...]
    blush: float


@dataclass(frozen=True)
class FaceNuisance:
    """Everything that changes from one image of a person to the next (angles in radians, lengths in template px)."""

    # Head turn (left-right, up-down), then the residual alignment error: in-plane rotation, zoom, shift.
    yaw: float
    pitch: float
    roll: float
    scale: float
    shift_x: float
    shift_y: float
    # Expression: smile curvature (negative frowns), lip gap, eye openness (1 = identity's own), brow lift.
    smile: float
    mouth_open: float
    eye_open: float
    brow_raise: float
    # Directional light on the rounded head, then exposure, contrast and per-channel white balance.
    light_azimuth: float
    light_elevation: float
    light_strength: float
    brightness: float
    contrast: float
    cast: Colour
    # Background: 0 flat, 1 gradient, 2 stripes, 3 blotches, between two colours; clothes colour.
    background_kind: int
    background_a: Colour
    background_b: Colour
    background_angle: float
    background_freq: float
    background_phase: float
    clothes: Colour
    # Camera: edge softness (defocus, in pixels), sensor noise level and its seed.
    softness: float
    noise: float
    noise_seed: int
    # Something in front of the face: 0 none, 1 ellipse, 2 bar; centre, half-sizes, angle, colour (crop pixels).
    occluder_kind: int
    occluder_x: float
    occluder_y: float
    occluder_w: float
    occluder_h: float
    occluder_angle: float
    occluder_colour: Colour

    @classmethod
    def neutral(cls) -> "FaceNuisance":
        """Frontal pose, no jitter, neutral expression, even light, plain grey background, no blur, noise or occluder.

        At this nuisance the rendered landmarks coincide with the ArcFace template; tests use it as the reference.
        """
        return cls(
            yaw=0.0,
            pitch=0.0,
            roll=0.0,
            scale=1.0,
            shift_x=0.0,
            shift_y=0.0,
            smile=0.0,
            mouth_open=0.0,
            eye_open=1.0,
            brow_raise=0.0,
            light_azimuth=0.0,
            light_elevation=0.0,
            light_strength=0.0,
            brightness=0.0,
            contrast=1.0,
            cast=(1.0, 1.0, 1.0),
            background_kind=0,
            background_a=(0.5, 0.5, 0.5),
            background_b=(0.5, 0.5, 0.5),
            background_angle=0.0,
            background_freq=0.0,
            background_phase=0.0,
            clothes=(0.3, 0.3, 0.35),
            softness=1.0,
            noise=0.0,
            noise_seed=0,
            occluder_kind=0,
            occluder_x=56.0,
            occluder_y=56.0,
            occluder_w=0.0,
            occluder_h=0.0,
            occluder_angle=0.0,
            occluder_colour=(0.0, 0.0, 0.0),
        )


def _mix(a: Colour, b: Colour, t: float) -> Colour:
    """Linear blend of two colours."""
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t)


def _scaled(c: Colour, k: float) -> Colour:
    """A colour darkened (or lightened, capped at 1) by a factor."""
    return (min(c[0] * k, 1.0), min(c[1] * k, 1.0), min(c[2] * k, 1.0))


def _jitter(rng: np.random.Generator, c: Colour, amount: float) -> Colour:
    """A colour moved by up to ``amount`` per channel, kept in [0, 1]."""
    d = rng.uniform(-amount, amount, 3).tolist()
    return (min(max(c[0] + d[0], 0.0), 1.0), min(max(c[1] + d[1], 0.0), 1.0), min(max(c[2] + d[2], 0.0), 1.0))


def _pick(rng: np.random.Generator, cdf: tuple[float, ...]) -> int:
    """Index drawn with probabilities given by a cumulative table."""
    x = rng.random()
    return min(sum(1 for c in cdf if c <= x), len(cdf) - 1)


def _palette(points: list[Colour], t: float) -> Colour:
    """Piecewise-linear colour ramp through ``points`` at ``t`` in [0, 1]."""
    pos = t * (len(points) - 1)
    j = min(int(pos), len(points) - 2)
    return _mix(points[j], points[j + 1], pos - j)


# Light to dark skin; a continuum rather than classes so that neighbouring identities differ a little.
_SKIN = [
    (0.97, 0.84, 0.75),
    (0.91, 0.72, 0.58),
    (0.80, 0.58, 0.42),
    (0.64, 0.44, 0.30),
    (0.46, 0.31, 0.21),
    (0.30, 0.20, 0.14),
]
_HAIR = [
    ((0.07, 0.06, 0.06), 0.24),  # black
    ((0.22, 0.14, 0.09), 0.22),  # dark brown
    ((0.45, 0.30, 0.17), 0.15),  # brown
    ((0.56, 0.26, 0.12), 0.07),  # auburn
    ((0.86, 0.70, 0.44), 0.10),  # blond
    ((0.78, 0.40, 0.16), 0.05),  # ginger
    ((0.60, 0.60, 0.60), 0.07),  # grey
    ((0.90, 0.90, 0.88), 0.04),  # white
    ((0.30, 0.35, 0.80), 0.02),  # dyed blue
    ((0.75, 0.30, 0.60), 0.02),  # dyed magenta
    ((0.25, 0.60, 0.35), 0.02),  # dyed green
]
_HAIR_CDF = tuple(float(x) for x in np.cumsum([w for _, w in _HAIR]) / sum(w for _, w in _HAIR))
_IRIS = [
    (0.30, 0.18, 0.09),
    (0.16, 0.10, 0.06),
    (0.48, 0.36, 0.18),
    (0.30, 0.50, 0.30),
    (0.30, 0.50, 0.78),
    (0.50, 0.56, 0.62),
]


def sample_identity(rng: np.random.Generator) -> FaceIdentity:
    """Draw the parameters of one person from ``rng`` (use :func:`identity_rng` for the source's stream)."""
    u = rng.uniform
    skin = _jitter(rng, _palette(_SKIN, float(u(0, 1))), 0.035)
    hair = _jitter(rng, _HAIR[_pick(rng, _HAIR_CDF)][0], 0.05)

    face_half_width = float(u(32.5, 43.0))
    face_top = float(u(7.0, 18.0))
    face_mid = float(u(50.0, 62.0))
    chin = float(u(100.0, 111.0))

    long_hair = rng.random() < 0.35
    bald = rng.random() < 0.07
    hair_top = float(face_top - u(1.0, 12.0))
    hair_volume = float(u(0.0, 10.0))
    hairline = float(u(18.0, 34.0))
    fringe = float(u(3.0, 12.0)) if rng.random() < 0.35 else 0.0
    if bald:
        hair_top, hair_volume, hairline, fringe = face_top + 3.0, 0.0, -10.0, 0.0
    hair_length = float(u(100.0, 150.0)) if long_hair and not bald else float(u(52.0, 72.0))

    # Brows usually follow the hair but darker; blond and grey people often have darker brows than hair.
    brow_colour = _jitter(rng, _scaled(hair, float(u(0.55, 0.9))), 0.04)

    beard = float(u(0.35, 0.95)) if rng.random() < 0.22 else 0.0
    moustache = float(u(0.4, 0.95)) if (beard > 0 and rng.random() < 0.7) or rng.random() < 0.08 else 0.0
    glasses = float(u(0.8, 2.0)) if rng.random() < 0.18 else 0.0
    dark_frame = rng.random() < 0.6
    glasses_colour = _jitter(rng, (0.08, 0.08, 0.08) if dark_frame else (0.5, 0.5, 0.5), 0.06 if dark_frame else 0.4)
    n_moles = _pick(rng, (0.6, 0.85, 0.95, 1.0))
    moles = tuple(
        (float(u(_MID_X - 28, _MID_X + 28)), float(u(40.0, 98.0)), float(u(0.7, 1.5))) for _ in range(n_moles)
    )
    lips = _jitter(rng, _mix(_scaled(skin, 0.85), (0.72, 0.30, 0.33), float(u(0.25, 0.65))), 0.03)

    return FaceIdentity(
        skin=skin,
        face_half_width=face_half_width,
        face_top=face_top,
        face_mid=face_mid,
        chin=chin,
        jaw_taper=float(u(0.0, 0.55)),
        chin_square=float(u(0.0, 1.0)),
        cheek=float(u(-0.08, 0.16)),
        ears=bool(hair_length < 80.0 or rng.random() < 0.3),
        ear_size=float(u(0.75, 1.3)),
        eye_half_width=float(u(5.0, 7.6)),
        eye_height=float(u(2.5, 4.5)),
        eye_lower=float(u(0.45, 0.95)),
        eye_tilt=float(u(-0.2, 0.2)),
        iris_ratio=float(u(0.8, 1.05)),
        iris=_jitter(rng, _IRIS[int(rng.integers(len(_IRIS)))], 0.05),
        lid_thickness=float(u(0.45, 1.1)),
        brow_gap=float(u(7.0, 12.0)),
        brow_length=float(u(12.0, 20.0)),
        brow_thickness=float(u(1.4, 4.4)),
        brow_angle=float(u(-0.22, 0.22)),
        brow_arch=float(u(-0.5, 3.5)),
        brow_shift=float(u(-2.0, 2.5)),
        brow_colour=brow_colour,
        nose_width=float(u(2.8, 5.6)),
        nose_length=float(u(11.0, 21.0)),
        nostril_size=float(u(0.7, 1.4)),
        nose_depth=float(u(5.0, 11.0)),
        upper_lip=float(u(1.3, 3.6)),
        lower_lip=float(u(1.8, 5.0)),
        lip_bow=float(u(0.0, 0.6)),
        lips=lips,
        hair=hair,
        hair_top=hair_top,
        hair_volume=hair_volume,
        hair_length=hair_length,
        hairline=hairline,
        temple_drop=float(u(10.0, 26.0)),
        fringe=fringe,
        fringe_freq=float(u(0.15, 0.6)),
        fringe_phase=float(u(0.0, 2 * math.pi)),
        hair_part=float(u(-0.3, 0.3)),
        hair_strands=float(u(0.0, 0.22)),
        strand_freq=float(u(0.5, 1.6)),
        beard=beard,
        beard_line=float(u(-4.0, 8.0)),
        moustache=moustache,
        glasses=glasses,
        glasses_colour=glasses_colour,
        glasses_size=float(u(0.8, 1.25)),
        glasses_aspect=float(u(0.6, 0.95)),
        moles=moles,
        blush=float(u(0.0, 0.28)),
    )


def _random_colour(rng: np.random.Generator) -> Colour:
    """Any RGB colour, uniformly."""
    r, g, b = rng.random(3).tolist()
    return (r, g, b)


def sample_nuisance(rng: np.random.Generator) -> FaceNuisance:
    """Draw the per-image nuisances (pose, expression, light, background, camera) from ``rng``."""
    u = rng.uniform
    background_a = _random_colour(rng)
    background_b = _random_colour(rng)
    blink = rng.random() < 0.07
    occluder_kind = int(rng.integers(1, 3)) if rng.random() < 0.15 else 0
    return FaceNuisance(
        yaw=float(u(-0.5, 0.5)),
        pitch=float(u(-0.25, 0.25)),
        roll=min(max(float(rng.normal(0.0, 0.06)), -0.15), 0.15),
        scale=float(u(0.94, 1.06)),
        shift_x=float(u(-3.0, 3.0)),
        shift_y=float(u(-3.0, 3.0)),
        smile=float(u(-0.5, 1.0)),
        mouth_open=float(u(0.0, 7.0)) if rng.random() < 0.45 else 0.0,
        eye_open=0.12 if blink else float(u(0.4, 1.2)),
        brow_raise=float(u(-1.5, 3.0)),
        light_azimuth=float(u(0.0, 2 * math.pi)),
        light_elevation=float(u(0.2, 1.1)),
        light_strength=float(u(0.0, 0.75)),
        brightness=float(u(-0.2, 0.2)),
        contrast=float(u(0.6, 1.3)),
        cast=(float(u(0.82, 1.18)), float(u(0.88, 1.12)), float(u(0.82, 1.18))),
        background_kind=int(rng.integers(0, 4)),
        background_a=background_a,
        background_b=background_b,
        background_angle=float(u(0.0, 2 * math.pi)),
        background_freq=float(u(0.05, 0.5)),
        background_phase=float(u(0.0, 2 * math.pi)),
        clothes=_random_colour(rng),
        softness=float(u(0.8, 2.8)),
        noise=float(u(0.0, 0.06)),
        noise_seed=int(rng.integers(0, 2**63 - 1)),
        occluder_kind=occluder_kind,
        occluder_x=float(u(25.0, 87.0)),
        occluder_y=float(u(40.0, 105.0)),
        occluder_w=float(u(8.0, 22.0)),
        occluder_h=float(u(8.0, 30.0)),
        occluder_angle=float(u(0.0, math.pi)),
        occluder_colour=_random_colour(rng),
    )


def identity_rng(seed: int, identity: int) -> np.random.Generator:
    """The random stream of identity ``identity`` under ``seed``: depends on nothing else."""
    return np.random.default_rng(np.random.SeedSequence([_IDENTITY_TAG, int(seed), int(identity)]))


def image_rng(seed: int, identity: int, k: int) -> np.random.Generator:
    """The random stream of image ``k`` of identity ``identity`` under ``seed``: depends on nothing else."""
    return np.random.default_rng(np.random.SeedSequence([_IMAGE_TAG, int(seed), int(identity), int(k)]))


# ---------------------------------------------------------------------------------------------------------------------
# Geometry: canonical face coordinates <-> output pixels


@dataclass(frozen=True)
class _Pose:
    """Maps canonical face coordinates (template pixels at frontal pose) to the output crop and back.

    A point is first turned (yaw about a vertical cylinder, pitch about a horizontal one), then placed by the crop
    similarity ``z -> a z + b`` (complex numbers: x + iy).
    """

    yaw: float
    pitch: float
    radius: float  # of the yaw cylinder; wider heads turn about a wider cylinder
    a: complex
    b: complex

    def turn_u(self, u: float, depth: float = 0.0) -> float:
        """Horizontal position after yaw of a canonical ``u`` (``depth`` above the surface); depends on u alone."""
        r = self.radius + depth
        # Clamped at the limb: a point turned past it is hidden, and the limb bounds where it could show.
        turned = math.asin(min(max((u - _MID_X) / r, -1.0), 1.0)) + self.yaw
        return _MID_X + r * math.sin(min(max(turned, -0.5 * math.pi), 0.5 * math.pi))

    def turn_v(self, v: float, depth: float = 0.0) -> float:
        """Vertical position after pitch of a canonical ``v``; depends on v alone."""
        r = _PITCH_R + depth
        return _PITCH_CY + r * math.sin(math.asin(min(max((v - _PITCH_CY) / r, -1.0), 1.0)) + self.pitch)

    def place(self, u1: float, v1: float) -> tuple[float, float]:
        """The crop similarity applied to a turned point."""
        z = self.a * complex(u1, v1) + self.b
        return z.real, z.imag

    def forward(self, u: float, v: float, depth: float = 0.0) -> tuple[float, float]:
        """Canonical point (``depth`` above the head surface, e.g. the nose tip) to 112-frame output coordinates."""
        return self.place(self.turn_u(u, depth), self.turn_v(v, depth))

    def depth_offset(self, u: float, v: float, depth: float) -> tuple[float, float]:
        """Where on the head surface a point raised by ``depth`` appears, minus where it sits: shapes drawn in surface
        coordinates (the nose) are shifted by this so they move further than the face when the head turns."""
        u1, v1 = self.turn_u(u, depth), self.turn_v(v, depth)
        us = _MID_X + self.radius * math.sin(
            math.asin(min(max((u1 - _MID_X) / self.radius, -1.0), 1.0)) - self.yaw
        )
        vs = _PITCH_CY + _PITCH_R * math.sin(math.asin(min(max((v1 - _PITCH_CY) / _PITCH_R, -1.0), 1.0)) - self.pitch)
        return us - u, vs - v


def _pose_of(identity: FaceIdentity, nuisance: FaceNuisance) -> _Pose:
    """The head turn, re-aligned like a real crop: the similarity that best maps the turned five landmarks onto the
    template (least squares, as 5-point alignment does), followed by the nuisance's residual roll, scale and shift.

    Without the re-alignment a turned head would slide half its width sideways, which no aligned dataset shows.
    """
    turned = _Pose(nuisance.yaw, nuisance.pitch, 1.25 * identity.face_half_width + 6.0, 1.0 + 0j, 0j)
    src = [complex(turned.turn_u(x, d), turned.turn_v(y, d)) for (x, y), d in zip(_T, _landmark_depths(identity))]
    dst = [complex(x, y) for x, y in _T]
    src_mean, dst_mean = sum(src) / 5.0, sum(dst) / 5.0
    num = sum((q - dst_mean) * (p - src_mean).conjugate() for p, q in zip(src, dst))
    den = sum(abs(p - src_mean) ** 2 for p in src)
    align_a = num / den
    align_b = dst_mean - align_a * src_mean
    # The residual error of a real aligner: a small rotation and zoom about the crop centre, and a shift.
    jitter = cmath.rect(nuisance.scale, nuisance.roll)
    centre = complex(_CROP_C, _CROP_C)
    a = jitter * align_a
    b = jitter * (align_b - centre) + centre + complex(nuisance.shift_x, nuisance.shift_y)
    return _Pose(nuisance.yaw, nuisance.pitch, turned.radius, a, b)


def _landmark_depths(identity: FaceIdentity) -> tuple[float, ...]:
    """Height of each landmark above the head surface: only the nose tip stands out."""
    return (0.0, 0.0, identity.nose_depth, 0.0, 0.0)


def template_landmarks(size: int = 112) -> np.ndarray:
    """The ArcFace 5-point template scaled to a ``size`` x ``size`` crop (5 x 2, x then y)."""
    return ARCFACE_TEMPLATE_112 * (size / 112.0)


def face_landmarks(identity: FaceIdentity, nuisance: FaceNuisance, size: int = 112) -> np.ndarray:
    """Where the eye centres, nose tip and mouth corners of ``render_face(identity, nuisance, size)`` are (5 x 2).

    Rows follow the ArcFace order (left eye, right eye, nose tip, left mouth corner, right mouth corner), in pixel
    coordinates whose integer values are pixel centres. At :meth:`FaceNuisance.neutral` they equal the template.
    """
    pose = _pose_of(identity, nuisance)
    points = [pose.forward(u, v, d) for (u, v), d in zip(_T, _landmark_depths(identity))]
    return np.array(points, dtype=np.float64) * (size / 112.0)


# ---------------------------------------------------------------------------------------------------------------------
# Drawing primitives
#
# Scalars are Python floats on purpose: NumPy keeps float32 arrays float32 with them, and they skip the cost of
# building a NumPy scalar, which matters because most shapes are evaluated on windows of a few hundred pixels where
# per-call overhead dominates.

def _coverage(d: np.ndarray, inv_aa: float) -> np.ndarray:
    """Soft inside-coverage of a signed distance (negative inside): a linear ramp one edge width wide."""
    c = d * -inv_aa
    c += 0.5
    np.maximum(c, 0.0, out=c)
    np.minimum(c, 1.0, out=c)
    return c


def _paint(img: np.ndarray, alpha: np.ndarray, colour: Colour) -> None:
    """Composite a flat ``colour`` over ``img`` (a 3 x h x w view) with per-pixel ``alpha``, in place."""
    # Planar channels: broadcasting alpha over a leading axis is several times faster than over a trailing one.
    diff = np.array(colour, dtype=np.float32).reshape(3, 1, 1) - img
    diff *= alpha
    img += diff


def _wave(x: np.ndarray) -> np.ndarray:
    """Triangle wave in [-1, 1] with period 2 pi, shaped like ``sin`` but far cheaper to evaluate."""
    t = x * (1.0 / (2.0 * math.pi))
    t += 0.25
    t -= np.floor(t)
    t -= 0.5
    np.abs(t, out=t)
    t *= -4.0
    t += 1.0
    return t


def _ellipse_distance(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse (exact on the axes, good near the boundary)."""
    xa = x * (1.0 / a)
    yb = y * (1.0 / b)
    k0 = xa * xa
    k0 += yb * yb
    np.sqrt(k0, out=k0)
    xa *= 1.0 / a
    yb *= 1.0 / b
    k1 = xa * xa
    k1 += yb * yb
    np.sqrt(k1, out=k1)
    k1 += 1e-6
    d = k0 - 1.0
    d *= k0
    d /= k1
    return d


def _segment_distance(x: np.ndarray, y: np.ndarray, ax: float, ay: float, bx: float, by: float) -> np.ndarray:
    """Unsigned distance from each point to the segment a-b."""
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy + 1e-9
    px = x - ax
    py = y - ay
    t = px * (dx / length2)
    t += py * (dy / length2)
    np.clip(t, 0.0, 1.0, out=t)
    px -= t * dx
    py -= t * dy
    px *= px
    py *= py
    px += py
    return np.sqrt(px, out=px)


def _unrotate(s: np.ndarray, angle: float, radius: float, centre: float) -> np.ndarray:
    """``centre + radius * sin(arcsin(s) - angle)`` for ``s`` in [-1, 1], without the arcsin."""
    # sin(a - t) = sin(a) cos(t) - cos(a) sin(t), and cos(a) >= 0 on the visible side of the head.
    cos_part = s * s
    np.subtract(1.0, cos_part, out=cos_part)
    np.maximum(cos_part, 0.0, out=cos_part)
    np.sqrt(cos_part, out=cos_part)
    cos_part *= -radius * math.sin(angle)
    out = s * (radius * math.cos(angle))
    out += cos_part
    out += centre
    return out


class _Canvas:
    """One image being drawn: the planar pixel buffer, canonical coordinates of every pixel, and window lookup."""

    def __init__(self, identity: FaceIdentity, nuisance: FaceNuisance, size: int) -> None:
        """Map every output pixel back to canonical face coordinates for this pose."""
        self.size = size
        self.pose = pose = _pose_of(identity, nuisance)
        self.k = size / 112.0
        # Output pixels per canonical unit; the edge width in canonical units is at least one output pixel.
        self.scale = abs(pose.a)
        unit = self.k * self.scale
        self.inv_aa = float(unit / max(nuisance.softness * self.k, 1.0))

        q = np.arange(size, dtype=np.float64) / self.k  # pixel centres in the 112 frame
        inv = 1.0 / pose.a
        c, s = inv.real, inv.imag
        qx = q - pose.b.real
        qy = q - pose.b.imag
        self.q = q.astype(np.float32)
        # Inverse similarity, separable in x and y so each coordinate plane costs one broadcast add. The result is
        # the turned frame: body parts (neck, shoulders) live there, as they do not turn with the head.
        self.body_u = (c * qx).astype(np.float32)[None, :] + (-s * qy).astype(np.float32)[:, None]
        self.body_v = (s * qx).astype(np.float32)[None, :] + (c * qy).astype(np.float32)[:, None]

        r = pose.radius
        su = ((c * qx - _MID_X) / r).astype(np.float32)[None, :] + (-s * qy / r).astype(np.float32)[:, None]
        outside = np.abs(su) > 1.0
        np.clip(su, -1.0, 1.0, out=su)
        self.normal_x = su
        # Where the turned head shows its back, sin(a - yaw) folds back onto the face side; the hair mass keeps that
        # folded coordinate (the back of a head is hair) while faces, ears and glasses must not appear there twice.
        self.hair_u = _unrotate(su, pose.yaw, r, _MID_X)
        # |arcsin(su) - yaw| > pi / 2 reduces to this one comparison.
        back = (su * -math.copysign(1.0, pose.yaw)) > math.cos(pose.yaw)
        back |= outside
        self.hair_u[outside] = _FAR
        self.u = self.hair_u.copy()
        self.u[back] = _FAR
        sv = self.body_v - _PITCH_CY
        sv *= 1.0 / _PITCH_R
        np.clip(sv, -1.0, 1.0, out=sv)
        self.v = _unrotate(sv, pose.pitch, _PITCH_R, _PITCH_CY)
        self.img = np.empty((3, size, size), dtype=np.float32)

    def view(self, sl: tuple[slice, slice]) -> np.ndarray:
        """The 3 x h x w pixel view of a window."""
        return self.img[:, sl[0], sl[1]]

    def window(self, u0: float, v0: float, rx: float, ry: float, depth: float = 0.0) -> tuple[slice, slice] | None:
        """Output-pixel box holding the canonical rectangle ``u0 +- rx``, ``v0 +- ry``; None if it is off the image.

        Yaw acts on u alone and pitch on v alone, both monotone, so the turned rectangle is again an axis-aligned
        rectangle; the crop similarity then makes it a rotated one with an exact bounding box.
        """
        pose = self.pose
        ua, ub = pose.turn_u(u0 - rx, depth), pose.turn_u(u0 + rx, depth)
        va, vb = pose.turn_v(v0 - ry, depth), pose.turn_v(v0 + ry, depth)
        return self._box(*pose.place(0.5 * (ua + ub), 0.5 * (va + vb)), 0.5 * abs(ub - ua), 0.5 * abs(vb - va))

    def body_window(self, u0: float, v0: float, rx: float, ry: float) -> tuple[slice, slice] | None:
        """Output-pixel box of a rectangle in body coordinates (crop similarity only, no head rotation)."""
        return self._box(*self.pose.place(u0, v0), rx, ry)

    def _box(self, cx: float, cy: float, hx: float, hy: float) -> tuple[slice, slice] | None:
        """Pixel box around a rectangle centred at crop point (cx, cy) with half-sizes hx, hy before the similarity."""
        c, s = abs(self.pose.a.real), abs(self.pose.a.imag)
        k = self.k
        ex = (c * hx + s * hy) * k + 1.5 + k / self.inv_aa
        ey = (s * hx + c * hy) * k + 1.5 + k / self.inv_aa
        x0, x1 = max(int(cx * k - ex), 0), min(int(cx * k + ex) + 2, self.size)
        y0, y1 = max(int(cy * k - ey), 0), min(int(cy * k + ey) + 2, self.size)
        if x0 >= x1 or y0 >= y1:
            return None
        return (slice(y0, y1), slice(x0, x1))


# ---------------------------------------------------------------------------------------------------------------------
# Layers, back to front


def _draw_background(cv: _Canvas, n: FaceNuisance) -> None:
    """Fill the crop with a flat colour, a gradient, stripes or blotches (crop coordinates)."""
    img = cv.img
    img[...] = np.array(n.background_a, dtype=np.float32).reshape(3, 1, 1)
    if n.background_kind == 0:
        return
    ca, sa = math.cos(n.background_angle), math.sin(n.background_angle)
    qc = cv.q - 56.0
    if n.background_kind == 1:  # linear gradient across the crop
        t = (qc * (ca / 112.0))[None, :] + (qc * (sa / 112.0) + 0.5)[:, None]
        np.clip(t, 0.0, 1.0, out=t)
    elif n.background_kind == 2:  # stripes
        f = n.background_freq
        t = _wave((qc * (f * ca))[None, :] + (qc * (f * sa) + n.background_phase)[:, None])
        t *= 0.5
        t += 0.5
    else:  # blotches: product of two slow waves in different directions
        f = n.background_freq * 0.6
        wa = np.sin(qc * (f * ca) + n.background_phase)
        wb = np.sin(qc * (f * sa * 1.3) + n.background_phase * 0.7)
        t = wa[None, :] * wb[:, None]
        t *= 0.5
        t += 0.5
    _paint(img, t, n.background_b)


def _draw_body(cv: _Canvas, ident: FaceIdentity, n: FaceNuisance) -> np.ndarray:
    """Shoulders in clothes; they follow the crop's similarity jitter but not the head's yaw and pitch. Returns their
    coverage."""
    x = cv.body_u - _MID_X
    x *= x
    # Shoulder line: a parabola that starts below the chin and falls towards the crop corners.
    x *= 0.014
    x -= cv.body_v
    x += ident.chin + 12.0
    alpha = _coverage(x, cv.inv_aa)
    _paint(cv.img, alpha, n.clothes)
    return alpha


def _draw_neck(cv: _Canvas, ident: FaceIdentity) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """A neck column under the chin; it follows the chin sideways but does not turn with the head. Returns its window
    and coverage there (None when it is off the crop)."""
    half = ident.face_half_width * 0.34
    top = ident.chin - 26.0
    bottom = ident.chin + 14.0
    # Under where the chin lands after the turn (body coordinates are the turned frame).
    neck_x = cv.pose.turn_u(_MID_X)
    sl = cv.body_window(neck_x, 0.5 * (top + bottom), half + 1.0, 0.5 * (bottom - top) + 1.0)
    if sl is None:
        return None
    bu, bv = cv.body_u[sl[0], sl[1]], cv.body_v[sl[0], sl[1]]
    dx = np.abs(bu - neck_x)
    dx -= half
    d = np.maximum(dx, top - bv)
    # The collar: the neck ends a little below the chin, where the clothes start.
    d = np.maximum(d, bv - bottom, out=d)
    alpha = _coverage(d, cv.inv_aa)
    _paint(cv.view(sl), alpha, _scaled(ident.skin, 0.78))
    return sl, alpha


def _hair_outline(cv: _Canvas, ident: FaceIdentity) -> np.ndarray:
    """Signed distance of the hair mass (a dome over the head, extended downwards for long hair)."""
    half = ident.face_half_width + ident.hair_volume + 2.0
    centre = ident.face_mid - 4.0
    cap = max(centre - ident.hair_top, 10.0)
    x = cv.hair_u - _MID_X
    x *= cap / half
    x *= x
    lower = max(centre, ident.hair_length - cap)
    dy = cv.v - np.clip(cv.v, centre, lower)
    dy *= dy
    x += dy
    np.sqrt(x, out=x)
    x -= cap
    x *= min(1.0, half / cap)
    return x


def _hair_ripple(cv: _Canvas, ident: FaceIdentity) -> np.ndarray | None:
    """Strands: a ripple of brightness in the hair, identity-specific in frequency and strength."""
    if ident.hair_strands <= 0.02:
        return None
    bend = _wave(cv.v * 0.2)
    bend *= 2.0
    bend += cv.hair_u * ident.strand_freq
    ripple = _wave(bend)
    ripple *= ident.hair_strands
    return ripple


def _paint_hair(cv: _Canvas, alpha: np.ndarray, colour: Colour, ripple: np.ndarray | None) -> None:
    """Paint a hair layer, then darken and lighten it along the identity's strands."""
    _paint(cv.img, alpha, colour)
    if ripple is not None:
        shade = ripple * alpha
        shade += 1.0
        cv.img *= shade


def _draw_hair_back(cv: _Canvas, ident: FaceIdentity, outline: np.ndarray, ripple: np.ndarray | None) -> np.ndarray:
    """The hair mass behind the head: visible around the face and, for long hair, below it. Returns its coverage."""
    a = _coverage(outline, cv.inv_aa)
    a *= _coverage(cv.v - ident.hair_length, cv.inv_aa)
    _paint_hair(cv, a, _scaled(ident.hair, 0.8), ripple)
    return a


def _draw_ears(cv: _Canvas, ident: FaceIdentity) -> None:
    """Both ears at the sides of the face (only for identities whose hair leaves them visible)."""
    if not ident.ears:
        return
    ey = 64.0
    rx, ry = 4.0 * ident.ear_size, 8.5 * ident.ear_size
    off = ident.face_half_width - 1.0
    sl = cv.window(_MID_X, ey, off + rx + 1.0, ry + 1.0)
    if sl is None:
        return
    # Both ears at once: mirrored about the midline, positive towards the outside.
    x = np.abs(cv.u[sl] - _MID_X)
    x -= off
    y = cv.v[sl] - ey
    img = cv.view(sl)
    _paint(img, _coverage(_ellipse_distance(x, y, rx, ry), cv.inv_aa), _scaled(ident.skin, 0.92))
    x -= rx * 0.15
    inner = _coverage(_ellipse_distance(x, y, rx * 0.45, ry * 0.6), cv.inv_aa)
    inner *= 0.6
    _paint(img, inner, _scaled(ident.skin, 0.65))


def _face_distance(cv: _Canvas, ident: FaceIdentity) -> np.ndarray:
    """Signed distance of the face outline: a dome above the widest line, a tapering jaw below it."""
    w = ident.face_half_width
    mid = ident.face_mid
    yn = cv.v - mid
    yn *= np.where(yn < 0.0, np.float32(1.0 / (mid - ident.face_top)), np.float32(1.0 / (ident.chin - mid)))
    low = np.maximum(yn, 0.0)
    low2 = low * low
    # Jaw: the half-width shrinks with depth below the widest line; cheeks add a bulge just under it.
    width = low * ident.cheek
    width -= low2 * (ident.jaw_taper + ident.cheek)
    width += 1.0
    np.maximum(width, 0.05, out=width)
    width *= w
    x = cv.u - _MID_X
    x /= width
    x *= x
    # A flatter chin: mix y^2 with y^4 below the widest line.
    yy = yn * yn
    low2 -= 1.0
    low2 *= low
    low2 *= low
    low2 *= ident.chin_square * 0.7
    yy += low2
    x += yy
    np.sqrt(x, out=x)
    x -= 1.0
    x *= 0.45 * (w + 0.5 * (ident.chin - ident.face_top))
    return x


def _draw_face(cv: _Canvas, ident: FaceIdentity) -> np.ndarray:
    """Paint the face in the skin tone; returns its signed distance for layers clipped to the face."""
    d = _face_distance(cv, ident)
    _paint(cv.img, _coverage(d, cv.inv_aa), ident.skin)
    return d


def _draw_skin_marks(cv: _Canvas, ident: FaceIdentity) -> None:
    """Blush on the cheeks and the identity's moles."""
    if ident.blush > 0.04:
        off, by = ident.face_half_width * 0.55, 75.0
        sl = cv.window(_MID_X, by, off + 8.0, 5.0)
        if sl is not None:
            x = np.abs(cv.u[sl] - _MID_X)
            x -= off
            x *= 1.0 / 8.0
            y = cv.v[sl] - by
            y *= 1.0 / 5.0
            x *= x
            y *= y
            a = 1.0 - x
            a -= y
            np.maximum(a, 0.0, out=a)
            a *= ident.blush
            _paint(cv.view(sl), a, (0.85, 0.32, 0.34))
    for mu, mv, mr in ident.moles:
        sl = cv.window(mu, mv, mr + 1.0, mr + 1.0)
        if sl is None:
            continue
        x = cv.u[sl] - mu
        y = cv.v[sl] - mv
        x *= x
        y *= y
        x += y
        d = np.sqrt(x, out=x)
        d -= mr
        _paint(cv.view(sl), _coverage(d, cv.inv_aa), _scaled(ident.skin, 0.45))


def _draw_beard(cv: _Canvas, ident: FaceIdentity, face_d: np.ndarray) -> None:
    """Beard (lower face up to the sideburns) and moustache, semi-opaque by density."""
    if ident.beard <= 0.0 and ident.moustache <= 0.0:
        return
    colour = _scaled(ident.hair, 0.85)
    if ident.beard > 0.0:
        top = _MOUTH_Y - 4.0 + ident.beard_line
        sideburn = 58.0
        sl = cv.window(_MID_X, 0.5 * (sideburn + ident.chin), ident.face_half_width + 1.0,
                       0.5 * (ident.chin - sideburn) + 1.0)
        if sl is not None:
            xn = cv.u[sl] - _MID_X
            xn *= 1.0 / ident.face_half_width
            xn *= xn
            # The beard line rises towards the ears (sideburns).
            xn *= -(top - sideburn)
            xn += top
            xn -= cv.v[sl]
            a = _coverage(xn, cv.inv_aa * 0.5)
            a *= _coverage(face_d[sl], cv.inv_aa)
            a *= ident.beard
            _paint(cv.view(sl), a, colour)
    if ident.moustache > 0.0:
        my = _MOUTH_Y - 5.5
        sl = cv.window(_MID_X, my, 16.0, 5.0)
        if sl is not None:
            x = cv.u[sl] - _MID_X
            xn = x * (1.0 / 15.0)
            xn *= xn
            xn *= -4.0
            xn += cv.v[sl]
            xn -= my
            # A band that droops at its ends.
            d = np.abs(xn, out=xn)
            d -= 2.2
            np.abs(x, out=x)
            x -= 15.0
            np.maximum(d, x, out=d)
            a = _coverage(d, cv.inv_aa)
            a *= ident.moustache
            _paint(cv.view(sl), a, colour)


def _draw_nose(cv: _Canvas, ident: FaceIdentity, n: FaceNuisance) -> None:
    """Bridge shadow, underside line and nostrils around the nose tip, which stands out when the head turns."""
    tx, ty = _T[2]
    length = ident.nose_length
    w = ident.nose_width
    sl = cv.window(tx, ty - 0.5 * length + 2.0, w + 3.0, 0.5 * length + 3.0, ident.nose_depth * 0.5)
    if sl is None:
        return
    du, dv = cv.pose.depth_offset(tx, ty, ident.nose_depth)
    x = cv.u[sl] - (tx + du)
    y = cv.v[sl] - (ty + dv)
    img = cv.view(sl)
    # Side of the bridge away from the light is in shadow; with flat light a faint line on both sides.
    side = -1.0 if math.sin(n.light_azimuth) > 0 else 1.0
    shadow = 0.25 + 0.5 * n.light_strength
    dist = _segment_distance(x, y, side * 2.0, -length, side * (w + 0.3), -2.0)
    dist -= 0.6
    a = _coverage(dist, cv.inv_aa * 0.6)
    a *= shadow
    _paint(img, a, _scaled(ident.skin, 0.7))
    # The underside line joining the nostrils.
    under = x * x
    under *= 0.06
    under += y
    under -= 2.3
    np.abs(under, out=under)
    under -= 0.45
    ax = np.abs(x)
    np.maximum(under, ax - w, out=under)
    a = _coverage(under, cv.inv_aa)
    a *= 0.55
    _paint(img, a, _scaled(ident.skin, 0.6))
    # Both nostrils at once, mirrored about the nose axis.
    ax -= w * 0.72
    nd = _ellipse_distance(ax, y - 1.3, 1.5 * ident.nostril_size, 0.95 * ident.nostril_size)
    _paint(img, _coverage(nd, cv.inv_aa), _scaled(ident.skin, 0.35))


def _draw_mouth(cv: _Canvas, ident: FaceIdentity, n: FaceNuisance) -> None:
    """Lips between the two mouth-corner landmarks; smile bends them, an open mouth shows teeth."""
    half = _MOUTH_HALF
    sl = cv.window(_MOUTH_MID, _MOUTH_Y + 2.0, half + 1.5, ident.upper_lip + ident.lower_lip + 0.5 * n.mouth_open + 5.0)
    if sl is None:
        return
    img = cv.view(sl)
    xs = cv.u[sl] - _MOUTH_MID
    y = cv.v[sl] - _MOUTH_Y
    y -= xs * _MOUTH_SLOPE
    x = xs * (1.0 / half)
    x2 = x * x
    q = 1.0 - x2
    np.maximum(q, 0.0, out=q)
    rq = np.sqrt(q)
    # Corners stay on the landmarks; a smile lowers the middle, so the corners read as raised.
    centre = q * (3.2 * n.smile)
    gap = q * (0.5 * n.mouth_open)
    upper = rq * ident.upper_lip
    if ident.lip_bow > 0:
        bow = x2 * (-1.0 / 0.08)
        bow += 1.0
        np.maximum(bow, 0.0, out=bow)
        bow *= -ident.lip_bow
        bow += 1.0
        upper *= bow
    top = centre - gap
    top -= upper
    bottom = rq * ident.lower_lip
    bottom += centre
    bottom += gap
    edge_x = np.abs(xs)
    edge_x -= half
    top -= y
    bottom = np.subtract(y, bottom, out=bottom)
    d = np.maximum(top, bottom, out=top)
    np.maximum(d, edge_x, out=d)
    _paint(img, _coverage(d, cv.inv_aa), ident.lips)
    if n.mouth_open > 0.4:
        inner = np.maximum((centre - gap) - y, y - (centre + gap))
        np.maximum(inner, edge_x, out=inner)
        _paint(img, _coverage(inner, cv.inv_aa), (0.28, 0.07, 0.09))
        teeth = np.maximum(inner, y - (centre - 0.2 * gap))
        a = _coverage(teeth, cv.inv_aa)
        a *= 0.9
        _paint(img, a, (0.93, 0.91, 0.86))
    line = y - centre
    np.abs(line, out=line)
    line -= 0.4
    np.maximum(line, edge_x, out=line)
    a = _coverage(line, cv.inv_aa)
    a *= 0.7
    _paint(img, a, _scaled(ident.lips, 0.45))


def _eye_frame(cv: _Canvas, sl: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both eyes in one frame: x mirrored about the midline (``xo`` > 0 towards the outer corner, 0 at the eye centre),
    y measured from the line through the two eye landmarks. Returns (x from the midline, xo, y)."""
    x = cv.u[sl] - _EYE_MID
    y = cv.v[sl] - _EYE_Y
    y -= x * _EYE_SLOPE
    xo = np.abs(x)
    xo -= _EYE_HALF
    return x, xo, y


def _draw_eyes(cv: _Canvas, ident: FaceIdentity, n: FaceNuisance) -> None:
    """Both eyes, centred on the eye landmarks: sclera, iris, pupil, catch light and upper lid line."""
    ew, eh = ident.eye_half_width, ident.eye_height * n.eye_open
    iris_r = min(ident.iris_ratio * ident.eye_height, ew * 0.8)
    sl = cv.window(_EYE_MID, _EYE_Y, _EYE_HALF + ew + 1.5, ident.eye_height + 2.5)
    if sl is None:
        return
    img = cv.view(sl)
    _, xo, y = _eye_frame(cv, sl)
    ys = xo * ident.eye_tilt  # canthal tilt: outer corner up for positive tilt
    ys += y
    q = xo * (1.0 / ew)
    q *= q
    np.subtract(1.0, q, out=q)
    lid_top = q * -eh
    lid_bottom = q * (eh * ident.eye_lower)
    edge_x = np.abs(xo)
    edge_x -= ew
    d_eye = lid_top - ys
    np.maximum(d_eye, ys - lid_bottom, out=d_eye)
    np.maximum(d_eye, edge_x, out=d_eye)
    a_eye = _coverage(d_eye, cv.inv_aa)
    _paint(img, a_eye, (0.93, 0.91, 0.88))
    r2 = xo * xo
    r2 += y * y
    r = np.sqrt(r2)
    a = _coverage(r - iris_r, cv.inv_aa)
    a *= a_eye
    _paint(img, a, ident.iris)
    a = _coverage(r - iris_r * 0.45, cv.inv_aa)
    a *= a_eye
    _paint(img, a, (0.03, 0.03, 0.03))
    gx = xo - iris_r * 0.35
    gy = y + iris_r * 0.35
    gx *= gx
    gy *= gy
    gx += gy
    glint = np.sqrt(gx, out=gx)
    glint -= iris_r * 0.22
    a = _coverage(glint, cv.inv_aa)
    a *= a_eye
    a *= 0.8
    _paint(img, a, (1.0, 1.0, 1.0))
    lid = ys - lid_top
    np.abs(lid, out=lid)
    lid -= ident.lid_thickness
    edge_x -= ew * 0.08
    np.maximum(lid, edge_x, out=lid)
    _paint(img, _coverage(lid, cv.inv_aa), (0.1, 0.07, 0.06))


def _draw_brows(cv: _Canvas, ident: FaceIdentity, n: FaceNuisance) -> None:
    """Both eyebrows above the eyes, lifted by the expression."""
    half = 0.5 * ident.brow_length
    lift = ident.brow_gap + n.brow_raise
    rise = ident.brow_arch + 0.5 * ident.brow_thickness + abs(ident.brow_angle) * half + 1.0
    sl = cv.window(_EYE_MID, _EYE_Y - lift, _EYE_HALF + ident.brow_shift + half + 1.0, rise + 1.0)
    if sl is None:
        return
    _, xo, y = _eye_frame(cv, sl)
    xo -= ident.brow_shift
    y += lift
    xn = xo * (1.0 / half)
    centre = xn * xn
    centre -= 1.0
    centre *= ident.brow_arch
    centre -= xo * ident.brow_angle
    # Thick at the inner end, thinning towards the tail.
    thick = xn * (-0.175 * ident.brow_thickness)
    thick += 0.575 * ident.brow_thickness
    y -= centre
    np.abs(y, out=y)
    y -= thick
    np.abs(xo, out=xo)
    xo -= half
    np.maximum(y, xo, out=y)
    _paint(cv.view(sl), _coverage(y, cv.inv_aa), ident.brow_colour)


def _draw_hair_front(cv: _Canvas, ident: FaceIdentity, outline: np.ndarray, ripple: np.ndarray | None
                     ) -> np.ndarray:
    """Hair over the forehead down to the hairline (temples, parting, fringe), and the back of the head. Returns the
    distance below the hairline (template px, negative in the hair)."""
    x = cv.u - _MID_X
    xn = x * (1.0 / ident.face_half_width)
    xn *= xn
    xn *= xn
    # The hairline drops to the ears at the temples; a parting tilts it, a fringe brings a wavy edge down.
    line = xn
    line *= ident.temple_drop
    line += ident.hairline
    line += x * ident.hair_part
    if ident.fringe > 0:
        wave = x * ident.fringe_freq
        wave += ident.fringe_phase
        wave = _wave(wave)
        np.abs(wave, out=wave)
        wave *= -0.45 * ident.fringe
        wave += ident.fringe
        line += wave
    below = cv.v - line
    a = _coverage(below, cv.inv_aa)
    a *= _coverage(outline, cv.inv_aa)
    _paint_hair(cv, a, ident.hair, ripple)
    return below


def _draw_glasses(cv: _Canvas, ident: FaceIdentity) -> None:
    """Frames around both eyes with tinted lenses, a bridge and arms towards the ears."""
    if ident.glasses <= 0.0:
        return
    ga = (ident.eye_half_width + 4.5) * ident.glasses_size
    gb = ga * ident.glasses_aspect
    half_t = 0.5 * ident.glasses
    reach = ident.face_half_width + 1.0 - (_EYE_MID - _MID_X)
    sl = cv.window(_EYE_MID, _EYE_Y, reach + 1.0, gb + 3.0)
    if sl is None:
        return
    img = cv.view(sl)
    x, xo, y = _eye_frame(cv, sl)
    y -= 1.0
    ring = _ellipse_distance(xo, y, ga, gb)
    lens = _coverage(ring, cv.inv_aa)
    lens *= 0.12
    _paint(img, lens, (0.78, 0.86, 0.95))
    np.abs(ring, out=ring)
    ring -= half_t
    # Bridge between the lenses and arms out to the ears: horizontal bars, mirrored like the rims.
    bar = np.abs(y + 1.0)
    bar -= half_t
    ax = np.abs(x)
    inner = np.maximum(bar, ax - (_EYE_HALF - ga + 0.5))
    np.maximum(bar, (_EYE_HALF + ga - 0.5) - ax, out=bar)
    np.maximum(bar, ax - reach, out=bar)
    np.minimum(ring, inner, out=ring)
    np.minimum(ring, bar, out=ring)
    _paint(img, _coverage(ring, cv.inv_aa), ident.glasses_colour)


def _turned_frame(cv: _Canvas, window: tuple[int, int, int, int], cx: float, cy: float,
                  angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Crop coordinates of the pixels in ``window`` (x0, x1, y0, y1) in a frame centred on (cx, cy) and turned by
    ``angle``: where an object's own shape is measured."""
    x0, x1, y0, y1 = window
    qx = cv.q[x0:x1] - cx
    qy = cv.q[y0:y1] - cy
    ca, sa = math.cos(angle), math.sin(angle)
    return (qx * ca)[None, :] + (qy * sa)[:, None], (qx * -sa)[None, :] + (qy * ca)[:, None]


def _draw_occluder(cv: _Canvas, n: FaceNuisance) -> None:
    """Something between camera and face (a hand, a microphone, a sticker): drawn in crop coordinates."""
    if n.occluder_kind == 0:
        return
    k = cv.k
    r = max(n.occluder_w, n.occluder_h) * k + 3.0
    cx, cy = n.occluder_x * k, n.occluder_y * k
    x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, cv.size)
    y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, cv.size)
    if x0 >= x1 or y0 >= y1:
        return
    x, y = _turned_frame(cv, (x0, x1, y0, y1), n.occluder_x, n.occluder_y, n.occluder_angle)
    if n.occluder_kind == 1:
        d = _ellipse_distance(x, y, n.occluder_w, n.occluder_h)
    else:
        d = np.maximum(np.abs(x) - n.occluder_w, np.abs(y) - 0.35 * n.occluder_h)
    _paint(cv.img[:, y0:y1, x0:x1], _coverage(d, cv.inv_aa / cv.scale), n.occluder_colour)


def _light_direction(n: FaceNuisance) -> tuple[float, float, float]:
    """The key light's unit direction (x right, y down, z toward the camera) from its azimuth and elevation."""
    ce = math.cos(n.light_elevation)
    return math.sin(n.light_azimuth) * ce, -math.cos(n.light_azimuth) * ce, math.sin(n.light_elevation)


def _head_normals(cv: _Canvas) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The head's surface normals per pixel, as a sphere-like shape: x from the canvas, y from the height above the
    pitch centre, z completing a unit vector (fresh arrays but x, which is the canvas's)."""
    nx = cv.normal_x
    ny = cv.body_v - _PITCH_CY
    ny *= 1.0 / 70.0
    np.clip(ny, -1.0, 1.0, out=ny)
    nz = nx * nx
    nz += ny * ny
    np.subtract(1.0, nz, out=nz)
    np.maximum(nz, 0.0, out=nz)
    np.sqrt(nz, out=nz)
    return nx, ny, nz


def _light_and_camera(cv: _Canvas, n: FaceNuisance) -> None:
    """Directional shading on a rounded head, exposure and white balance, then sensor noise; ends in 0..255 units."""
    img = cv.img
    if n.light_strength > 0.0:
        lx, ly, lz = _light_direction(n)
        nx, ny, nz = _head_normals(cv)
        shade = nx * lx
        ny *= ly
        shade += ny
        nz *= lz
        shade += nz
        np.maximum(shade, 0.0, out=shade)
        # A surface facing the light keeps its colour; one facing away falls to 1 - strength.
        shade *= n.light_strength
        shade += 1.0 - n.light_strength
        img *= shade
    # Exposure, contrast and white balance folded into one gain and offset per channel, already in 0..255 units;
    # the +0.5 makes the final truncating cast round.
    cast = np.array(n.cast, dtype=np.float32).reshape(3, 1, 1)
    img *= cast * (255.0 * n.contrast)
    offset = cast * (255.0 * (0.5 + n.brightness - 0.5 * n.contrast)) + 0.5
    if n.noise > 0.0:
        # Uniform rather than Gaussian noise: drawing integers is several times cheaper, and it looks the same.
        raw = np.random.default_rng(n.noise_seed).integers(0, 1 << 16, img.shape, dtype=np.uint16)
        noise = raw.astype(np.float32)
        amplitude = 255.0 * n.noise * math.sqrt(12.0)
        noise *= amplitude / 65536.0
        noise += offset - 0.5 * amplitude
        img += noise
    else:
        img += offset


# ---------------------------------------------------------------------------------------------------------------------
# The real style: the same face, photographed
#
# The layers above are drawn unchanged (same geometry, same landmarks); around them a photograph adds a scene behind
# the person, texture anchored to the face, relief shadows, a coloured key and fill light, and a camera's blur, noise
# and compression. Every extra random choice comes from the nuisance's seed (per image) or from a hash of the
# identity's parameters (per person), so the rendered style's streams are untouched.


@dataclass(frozen=True, eq=False)
class _Texture:
    """One person's skin and hair texture: value-noise grids in [-1, 1] sampled in canonical face coordinates, so the
    same blotches and strands sit at the same place on the face in every photograph."""

    mottle: np.ndarray  # 32 x 32, cells of 4 template px: blotchy skin colour
    grain: np.ndarray  # 96 x 96, cells of 1.25 template px: pores and fine grain
    strands: np.ndarray  # 24 rows of 8 template px down the head x 256 columns across it: hair strands
    roughness: float  # skin texture amplitude
    redness: float  # how far blotches shift towards red
    strand_contrast: float
    wave: float  # sideways sway of the strands (template px) and its frequency
    wave_freq: float
    hair_shadow: float  # how much darker hair photographs than its colour


@functools.lru_cache(maxsize=256)
def _texture_of(identity: FaceIdentity) -> _Texture:
    """The texture of ``identity``: drawn from a hash of its parameters, hence the same wherever they are the same."""
    digest = hashlib.blake2b(repr(identity).encode(), digest_size=16).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    rng = np.random.default_rng(np.random.SeedSequence([_TEXTURE_TAG, *words]))
    u = rng.uniform
    return _Texture(
        mottle=rng.uniform(-1.0, 1.0, (32, 32)).astype(np.float32),
        grain=rng.uniform(-1.0, 1.0, (96, 96)).astype(np.float32),
        strands=rng.uniform(-1.0, 1.0, (24, 256)).astype(np.float32),
        roughness=float(u(0.03, 0.08)),
        redness=float(u(0.0, 0.06)),
        # The identity's own strand strength (rendered style) carries over: wispy hair stays wispy.
        strand_contrast=float(0.16 + identity.hair_strands + u(0.0, 0.08)),
        wave=float(u(0.0, 3.0)),
        wave_freq=float(u(0.05, 0.2)),
        hair_shadow=float(u(0.15, 0.35)),
    )


@dataclass(frozen=True)
class _Thing:
    """A defocused object in the room behind the person (crop coordinates, template px)."""

    kind: int  # 0 box (furniture, door, frame), 1 round (lamp, plant), 2 striped box (shelf, blinds, window bars)
    x: float
    y: float
    w: float
    h: float
    angle: float
    edge: float  # defocus: width of the soft edge
    colour: Colour
    stripes: float  # stripe frequency (kind 2)


@dataclass(frozen=True)
class _Photo:
    """What photographing adds to one image's nuisances (drawn by :func:`_photo_of` from the nuisance's seed)."""

    key: Colour  # colour of the directional key light: a colour temperature, tungsten-warm to shade-blue
    fill: Colour  # colour and level of the ambient fill light
    key_strength: float
    wrap: float  # how far light wraps around the head (soft light) instead of stopping at the terminator
    specular: float  # skin sheen
    wall: Colour
    wall_far: Colour  # the wall's brightness falls off towards this colour across the crop
    wall_angle: float
    scene_light: float  # the room behind gets this share of the light on the person (lit subject, dimmer room)
    things: tuple[_Thing, ...]
    clothes: Colour
    occluder: Colour
    softness: float  # edge width of the drawn layers (the lens blur comes on top)
    blur: float  # Gaussian lens blur sigma, template px
    exposure: float
    vignette: float
    noise: float  # sensor noise sigma, fraction of full scale
    chroma: float  # share of the noise that is per-channel colour noise
    block: float  # JPEG-like 8 x 8 block smoothing (0: none)
    quantum: float  # JPEG-like value steps in 0..255 units (0: none)
    noise_seed: int


# Colour temperatures of common lights, warm to cool, each scaled to a maximum channel of 1.
_LIGHTS = [(1.0, 0.76, 0.52), (1.0, 0.88, 0.74), (1.0, 0.97, 0.93), (0.93, 0.96, 1.0), (0.80, 0.89, 1.0)]


def _natural_colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> Colour:
    """A colour of any hue with limited saturation: walls, furniture and clothes are rarely the pure hues that
    :func:`_random_colour` gives the rendered style."""
    h, s, v = float(rng.random()), float(rng.uniform(*saturation)), float(rng.uniform(*value))
    # HSV to RGB: each channel ramps down from v by the hue's distance to it.
    rgb = []
    for offset in (0.0, 2.0 / 3.0, 1.0 / 3.0):
        d = abs(((h + offset) * 6.0) % 6.0 - 3.0)
        rgb.append(v * (1.0 - s * min(max(2.0 - d, 0.0), 1.0)))
    return (rgb[0], rgb[1], rgb[2])


def _sample_thing(rng: np.random.Generator, indoor: bool) -> _Thing:
    """One object behind the person: mostly boxes indoors, mostly round shapes (foliage) outdoors."""
    kind = _pick(rng, (0.55, 0.75, 1.0) if indoor else (0.25, 0.85, 1.0))
    bright = rng.random() < 0.15  # a window or a lamp
    colour = _natural_colour(rng, (0.0, 0.15), (0.85, 1.0)) if bright else _natural_colour(
        rng, (0.05, 0.45) if indoor else (0.2, 0.6), (0.1, 0.8))
    return _Thing(
        kind=kind,
        x=float(rng.uniform(-10.0, 122.0)),
        y=float(rng.uniform(-10.0, 100.0)),
        w=float(rng.uniform(4.0, 40.0)),
        h=float(rng.uniform(4.0, 50.0)),
        angle=float(rng.normal(0.0, 0.08)),
        edge=float(rng.uniform(1.0, 6.0)),
        colour=colour,
        stripes=float(rng.uniform(0.4, 1.5)),
    )


def _photo_of(nuisance: FaceNuisance) -> _Photo:
    """The photographic settings of one image, from the nuisance's seed (the same nuisance, the same photograph)."""
    rng = np.random.default_rng(np.random.SeedSequence([_PHOTO_TAG, nuisance.noise_seed]))
    u = rng.uniform
    indoor = rng.random() < 0.75
    key = _palette(_LIGHTS, float(u(0.0, 1.0)))
    fill_level = float(u(0.35, 0.65))
    fill = _scaled(_palette(_LIGHTS, float(u(0.0, 1.0))), fill_level)
    wall = _natural_colour(rng, (0.0, 0.3), (0.3, 0.9)) if indoor else _natural_colour(rng, (0.1, 0.4), (0.6, 1.0))
    things = tuple(_sample_thing(rng, indoor) for _ in range(int(rng.integers(2, 8))))
    jpeg = rng.random() < 0.5
    return _Photo(
        key=key,
        fill=fill,
        key_strength=float(u(0.45, 0.95)) * (1.0 - 0.5 * fill_level),
        wrap=float(u(0.1, 0.6)),
        specular=float(u(0.0, 0.18)),
        wall=wall,
        wall_far=_scaled(wall, float(u(0.45, 1.0))),
        wall_angle=float(u(0.0, 2.0 * math.pi)),
        scene_light=float(u(0.4, 0.9)) if indoor else float(u(0.75, 1.05)),
        things=things,
        clothes=_natural_colour(rng, (0.0, 0.6), (0.08, 0.85)),
        occluder=_natural_colour(rng, (0.1, 0.5), (0.2, 0.9)),
        softness=float(u(0.9, 1.5)),
        blur=float(u(0.25, 1.0)) if rng.random() < 0.85 else float(u(1.0, 1.8)),
        exposure=float(u(0.85, 1.25)),
        vignette=float(u(0.0, 0.35)),
        noise=float(u(0.004, 0.03)),
        chroma=float(u(0.2, 0.6)),
        block=float(u(0.05, 0.2)) if jpeg else 0.0,
        quantum=float(u(2.0, 7.0)) if jpeg else 0.0,
        noise_seed=int(rng.integers(0, 2**63 - 1)),
    )


def _value_noise(grid: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth noise: ``grid`` interpolated (smoothstep-bilinear) at grid coordinates ``x``, ``y``, clamped to it."""
    rows, cols = grid.shape
    x = np.clip(x, 0.0, cols - 1.001)
    y = np.clip(y, 0.0, rows - 1.001)
    # Floor in float32 first: subtracting an integer array would promote everything to float64.
    fx = np.floor(x)
    fy = np.floor(y)
    i = fy.astype(np.intp)
    i *= cols
    i += fx.astype(np.intp)
    fx = np.subtract(x, fx, out=fx)
    fy = np.subtract(y, fy, out=fy)
    # Smoothstep weights: no creases along the grid lines.
    fx = fx * fx * (3.0 - 2.0 * fx)
    fy = fy * fy * (3.0 - 2.0 * fy)
    flat = grid.ravel()
    a, b = flat[i], flat[i + 1]
    i += cols
    c, d = flat[i], flat[i + 1]
    b -= a
    b *= fx
    a += b
    d -= c
    d *= fx
    c += d
    c -= a
    c *= fy
    a += c
    return a


def _draw_scene(cv: _Canvas, photo: _Photo) -> None:
    """The room (or street) behind the person: a wall lit unevenly, then defocused objects on it."""
    img = cv.img
    img[...] = np.array(photo.wall, dtype=np.float32).reshape(3, 1, 1)
    ca, sa = math.cos(photo.wall_angle), math.sin(photo.wall_angle)
    qc = cv.q - 56.0
    t = (qc * (ca / 112.0))[None, :] + (qc * (sa / 112.0) + 0.5)[:, None]
    np.clip(t, 0.0, 1.0, out=t)
    _paint(img, t, photo.wall_far)
    for thing in photo.things:
        _draw_thing(cv, thing)


def _draw_thing(cv: _Canvas, thing: _Thing) -> None:
    """One defocused object: a soft-edged box or ellipse, a striped box with darker stripes."""
    k = cv.k
    r = max(thing.w, thing.h) * 1.5 + thing.edge
    x0, x1 = max(int((thing.x - r) * k), 0), min(int((thing.x + r) * k) + 2, cv.size)
    y0, y1 = max(int((thing.y - r) * k), 0), min(int((thing.y + r) * k) + 2, cv.size)
    if x0 >= x1 or y0 >= y1:
        return
    x, y = _turned_frame(cv, (x0, x1, y0, y1), thing.x, thing.y, thing.angle)
    if thing.kind == 1:
        d = _ellipse_distance(x, y, thing.w, thing.h)
    else:
        d = np.maximum(np.abs(x) - thing.w, np.abs(y) - thing.h)
    # The edge is at least one output pixel wide, like every drawn edge.
    alpha = _coverage(d, 1.0 / max(thing.edge, 1.0 / k))
    img = cv.img[:, y0:y1, x0:x1]
    _paint(img, alpha, thing.colour)
    if thing.kind == 2:
        stripes = _wave(y * thing.stripes)
        stripes *= 0.25
        stripes += 0.25
        alpha *= stripes
        _paint(img, alpha, _scaled(thing.colour, 0.45))


def _hair_strands(cv: _Canvas, ident: FaceIdentity, tex: _Texture) -> np.ndarray:
    """Fine strands: noise stretched down the head (long along v, a fraction of a pixel across u), swaying with v."""
    sway = _wave(cv.v * tex.wave_freq)
    sway *= tex.wave
    sway += cv.hair_u
    # Columns: strands about 0.8 / strand_freq template px apart; rows: 8 px, strands run down the head.
    sway *= ident.strand_freq / 0.8
    sway += 8.0
    rows = cv.v + 20.0
    rows *= 1.0 / 8.0
    ripple = _value_noise(tex.strands, sway, rows)
    ripple *= tex.strand_contrast
    # Strands shadow each other: hair photographs darker than its colour (as the multiplier 1 + ripple applies it).
    ripple -= tex.hair_shadow
    return ripple


def _skin_texture(cv: _Canvas, ident: FaceIdentity, tex: _Texture, face_d: np.ndarray) -> np.ndarray:
    """Blotches and grain on the face, anchored to it; returns the face's coverage (for the light's sheen)."""
    cover = _coverage(face_d, cv.inv_aa)
    sl = cv.window(_MID_X, 0.5 * (ident.face_top + ident.chin), ident.face_half_width + 2.0,
                   0.5 * (ident.chin - ident.face_top) + 2.0)
    if sl is None:
        return cover
    u, v = cv.u[sl], cv.v[sl]
    mottle = _value_noise(tex.mottle, u * 0.25, v * 0.25)
    grain = _value_noise(tex.grain, u * 0.8, v * 0.8)
    grain *= 0.6
    grain += mottle
    grain *= tex.roughness * cover[sl]
    grain += 1.0
    img = cv.view(sl)
    img *= grain
    # Blotches are redder than the skin between them: green and blue drop where the mottle is high.
    red = np.maximum(mottle, 0.0)
    red *= -tex.redness * cover[sl]
    red += 1.0
    img[1:] *= red
    return cover


def _soft_blob(cv: _Canvas, u0: float, v0: float, rx: float, ry: float, mirror: float | None = None
               ) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """A smooth bump ``(1 - r^2)^2`` on the face around (u0, v0), radii rx, ry; with ``mirror`` two, one on each side
    of u0 at that distance. Returns its window and values, None when it is off the crop."""
    sl = cv.window(u0, v0, rx + (mirror or 0.0) + 1.0, ry + 1.0)
    if sl is None:
        return None
    x = cv.u[sl] - u0
    if mirror is not None:
        np.abs(x, out=x)
        x -= mirror
    x *= 1.0 / rx
    x *= x
    y = cv.v[sl] - v0
    y *= 1.0 / ry
    y *= y
    x += y
    np.subtract(1.0, x, out=x)
    np.maximum(x, 0.0, out=x)
    x *= x
    return sl, x


def _draw_relief(cv: _Canvas, ident: FaceIdentity, face_d: np.ndarray, face: np.ndarray) -> None:
    """What a flat drawing lacks and a photograph always has: the face darkening as it turns away towards its outline,
    shadowed eye sockets, shaded sides of the nose, the shadow under it and under the lower lip, a lit nose bridge.
    ``face`` is the face's coverage: the roundness stops at its outline."""
    # Roundness: within 12 template px of the outline the face turns away from the camera and the light.
    edge = face_d * (1.0 / 12.0)
    edge += 1.0
    np.clip(edge, 0.0, 1.0, out=edge)
    edge *= edge
    edge *= face
    edge *= -0.35
    edge += 1.0
    cv.img *= edge
    tx, ty = _T[2]
    half_nose = 0.5 * ident.nose_length
    shadows = (
        (_soft_blob(cv, _EYE_MID, _EYE_Y - 3.0, ident.eye_half_width + 5.0, ident.eye_height + 7.0, _EYE_HALF), 0.45),
        (_soft_blob(cv, tx, ty - half_nose + 1.0, 2.5, half_nose + 1.0, ident.nose_width + 1.0), 0.20),
        (_soft_blob(cv, tx, ty + 2.5, ident.nose_width + 3.5, 3.0), 0.35),
        (_soft_blob(cv, _MOUTH_MID, _MOUTH_Y + ident.lower_lip + 3.5, 10.0, 2.8), 0.20),
        (_soft_blob(cv, tx, ty - half_nose, 1.8, half_nose), -0.15),
    )
    for blob, amount in shadows:
        if blob is not None:
            sl, weight = blob
            weight *= -amount
            weight += 1.0
            cv.view(sl)[...] *= weight


def _shade_hairline(cv: _Canvas, below: np.ndarray, face: np.ndarray) -> None:
    """The shadow hair casts on the forehead: darkest at the hairline, gone 6 template px below it."""
    shadow = below * (-1.0 / 6.0)
    shadow += 1.0
    np.clip(shadow, 0.0, 1.0, out=shadow)
    shadow *= shadow
    shadow *= face
    shadow *= _coverage(-below, cv.inv_aa)
    shadow *= -0.3
    shadow += 1.0
    cv.img *= shadow


def _photo_light(cv: _Canvas, n: FaceNuisance, photo: _Photo, person: np.ndarray, face: np.ndarray) -> None:
    """Key and fill light: the person is shaded by the head's normals (with wrap-around for soft light) and sheens
    where the face meets the light's half-vector; the scene behind gets the key's average."""
    lx, ly, lz = _light_direction(n)
    nx, ny, nz = _head_normals(cv)
    diffuse = nx * lx
    diffuse += ny * ly
    diffuse += nz * lz
    # Sheen: the half-vector between the light and the camera (0, 0, 1).
    hx, hy, hz = lx, ly, lz + 1.0
    norm = 1.0 / math.sqrt(hx * hx + hy * hy + hz * hz)
    sheen = nx * (hx * norm)
    sheen += ny * (hy * norm)
    sheen += nz * (hz * norm)
    np.maximum(sheen, 0.0, out=sheen)
    for _ in range(4):  # ^16
        sheen *= sheen
    sheen *= face
    sheen *= photo.specular
    diffuse += photo.wrap
    diffuse *= 1.0 / (1.0 + photo.wrap)
    np.maximum(diffuse, 0.0, out=diffuse)
    # Behind the person the key falls evenly: blend towards its mean level.
    diffuse -= 0.5
    diffuse *= person
    diffuse += 0.5
    diffuse *= photo.key_strength
    img = cv.img
    gain = np.array(photo.key, dtype=np.float32).reshape(3, 1, 1) * diffuse
    gain += np.array(photo.fill, dtype=np.float32).reshape(3, 1, 1)
    # The room is lit less (or, outdoors, about as much) as the person the photographer lit.
    room = person * (1.0 - photo.scene_light)
    room += photo.scene_light
    gain *= room
    img *= gain
    img += np.array(photo.key, dtype=np.float32).reshape(3, 1, 1) * sheen


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a planar 3 x h x w image, edges extended (the lens's defocus)."""
    radius = max(1, int(math.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32).tolist()
    h, w = img.shape[1:]
    for axis, length in ((2, w), (1, h)):
        pad = [(0, 0), (0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(img, pad, mode="edge")
        index: list[slice] = [slice(None)] * 3
        index[axis] = slice(radius, radius + length)
        img = padded[tuple(index)] * taps[radius]
        for j in range(1, radius + 1):
            index[axis] = slice(radius - j, radius - j + length)
            side = padded[tuple(index)]
            index[axis] = slice(radius + j, radius + j + length)
            side = side + padded[tuple(index)]
            side *= taps[radius + j]
            img += side
    return img


def _smooth_blocks(img: np.ndarray, amount: float) -> None:
    """JPEG-like blockiness: each whole 8 x 8 block of the planar image moves ``amount`` towards its own mean."""
    blocks = img.shape[1] // 8
    side = 8 * blocks
    part = img[:, :side, :side]
    # Sums by slices rather than .mean over axes: strided reductions are three times slower here.
    rows = part.reshape(3, side, blocks, 8)
    sums = rows[..., 0] + rows[..., 1]
    for j in range(2, 8):
        sums += rows[..., j]
    cols = sums.reshape(3, blocks, 8, blocks)
    means = cols[:, :, 0] + cols[:, :, 1]
    for j in range(2, 8):
        means += cols[:, :, j]
    means *= amount / 64.0
    tiles = part.reshape(3, blocks, 8, blocks, 8)
    tiles *= 1.0 - amount
    tiles += means[:, :, None, :, None]
    part[...] = tiles.reshape(3, side, side)


def _photo_camera(cv: _Canvas, photo: _Photo, skin: Colour) -> np.ndarray:
    """Exposure and vignetting, lens blur, sensor noise (luminance and colour), JPEG-like blocks and steps; ends in
    0..255 units offset by 0.5, as :func:`_to_uint8` expects."""
    img = cv.img
    qc = (cv.q - 56.0) * (1.0 / 80.0)
    qc *= qc
    fall = qc[None, :] + qc[:, None]
    fall *= -photo.vignette
    fall += 1.0
    # Auto-exposure: the camera meters the light that reaches the face and, in part, the face itself (dark skin is
    # exposed brighter, light skin darker, as face-priority metering does), then errs by the photo's exposure.
    light = sum(photo.fill) / 3.0 + 0.75 * photo.key_strength * sum(photo.key) / 3.0
    luma = 0.299 * skin[0] + 0.587 * skin[1] + 0.114 * skin[2]
    fall *= 255.0 * photo.exposure / light * min(max((0.55 / max(luma, 0.05)) ** 0.4, 0.85), 1.6)
    img *= fall
    if photo.blur * cv.k > 0.3:
        img = _gaussian_blur(img, photo.blur * cv.k)
    # Noise from uniform integers, as in the rendered style, for speed (a tenth of standard_normal's cost): luminance
    # grain as the sum of two (triangular, close to Gaussian), colour noise as one per channel.
    size = cv.size
    raw = np.random.default_rng(photo.noise_seed).integers(0, 1 << 16, (5, size, size), dtype=np.uint16)
    sigma = 255.0 * photo.noise
    grain = raw[0].astype(np.float32)
    grain += raw[1]
    grain *= sigma * (1.0 - photo.chroma) * math.sqrt(6.0) / 65536.0
    grain -= sigma * (1.0 - photo.chroma) * math.sqrt(6.0)
    colour = raw[2:].astype(np.float32)
    colour *= sigma * photo.chroma * math.sqrt(12.0) / 65536.0
    colour += grain - sigma * photo.chroma * math.sqrt(3.0)
    img += colour
    if photo.block > 0.0 and size >= 8:
        _smooth_blocks(img, photo.block)
    if photo.quantum > 0.0:
        img *= 1.0 / photo.quantum
        np.round(img, out=img)
        img *= photo.quantum
    img += 0.5
    return img


def _draw_photograph(identity: FaceIdentity, nuisance: FaceNuisance, size: int) -> np.ndarray:
    """The real style: the rendered style's layers (same geometry) between photographic ones; returns planar
    0..255 floats."""
    photo = _photo_of(nuisance)
    tex = _texture_of(identity)
    n = dataclasses.replace(nuisance, clothes=photo.clothes, occluder_colour=photo.occluder,
                            softness=photo.softness, light_strength=photo.key_strength)
    cv = _Canvas(identity, n, size)
    _draw_scene(cv, photo)
    body = _draw_body(cv, identity, n)
    outline = _hair_outline(cv, identity)
    strands = _hair_strands(cv, identity, tex)
    hair = _draw_hair_back(cv, identity, outline, strands)
    neck = _draw_neck(cv, identity)
    if neck is not None:  # in the chin's shadow
        cv.view(neck[0])[...] *= 1.0 - 0.3 * neck[1]
    _draw_ears(cv, identity)
    face_d = _draw_face(cv, identity)
    face = _skin_texture(cv, identity, tex, face_d)
    _draw_skin_marks(cv, identity)
    _draw_beard(cv, identity, face_d)
    _draw_nose(cv, identity, n)
    _draw_mouth(cv, identity, n)
    _draw_eyes(cv, identity, n)
    _draw_brows(cv, identity, n)
    _draw_relief(cv, identity, face_d, face)
    _shade_hairline(cv, _draw_hair_front(cv, identity, outline, strands), face)
    _draw_glasses(cv, identity)
    _draw_occluder(cv, n)
    # The person, lit as a rounded body; the rest of the crop is the scene behind.
    person = 1.0 - body
    person *= 1.0 - hair
    person *= 1.0 - _coverage(face_d, cv.inv_aa)
    if neck is not None:
        person[neck[0]] *= 1.0 - neck[1]
    np.subtract(1.0, person, out=person)
    _photo_light(cv, n, photo, person, face)
    return _photo_camera(cv, photo, identity.skin)


def check_style(style: str) -> str:
    """``style`` if it is one of :data:`STYLES`; otherwise a ValueError naming the allowed values."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(map(repr, STYLES))}, got {style!r}")
    return style


@overload
def render_face(
    identity: FaceIdentity, nuisance: FaceNuisance, size: int = ..., return_landmarks: Literal[False] = ...,
    style: str = ...,
) -> np.ndarray: ...


@overload
def render_face(
    identity: FaceIdentity, nuisance: FaceNuisance, size: int = ..., *, return_landmarks: Literal[True],
    style: str = ...,
) -> tuple[np.ndarray, np.ndarray]: ...


def render_face(
    identity: FaceIdentity, nuisance: FaceNuisance, size: int = 112, return_landmarks: bool = False,
    style: str = "rendered",
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Draw one aligned face crop (``size`` x ``size`` x 3 RGB uint8) in ``style`` (one of :data:`STYLES`).

    With ``return_landmarks`` returns ``(image, landmarks)``, the landmarks as :func:`face_landmarks` gives them (the
    same in both styles: a style changes how the face looks, never where it is).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an integer of at least 16 pixels, got {size!r}")
    size = int(size)
    draw = _draw_photograph if check_style(style) == "real" else _draw_rendering
    out = _to_uint8(draw(identity, nuisance, size))
    if return_landmarks:
        return out, face_landmarks(identity, nuisance, size)
    return out


def _draw_rendering(identity: FaceIdentity, nuisance: FaceNuisance, size: int) -> np.ndarray:
    """The rendered style: flat layers, one directional shade over everything, then exposure and uniform noise."""
    cv = _Canvas(identity, nuisance, size)
    _draw_background(cv, nuisance)
    _draw_body(cv, identity, nuisance)
    outline = _hair_outline(cv, identity)
    ripple = _hair_ripple(cv, identity)
    _draw_hair_back(cv, identity, outline, ripple)
    _draw_neck(cv, identity)
    _draw_ears(cv, identity)
    face_d = _draw_face(cv, identity)
    _draw_skin_marks(cv, identity)
    _draw_beard(cv, identity, face_d)
    _draw_nose(cv, identity, nuisance)
    _draw_mouth(cv, identity, nuisance)
    _draw_eyes(cv, identity, nuisance)
    _draw_brows(cv, identity, nuisance)
    _draw_hair_front(cv, identity, outline, ripple)
    _draw_glasses(cv, identity)
    _draw_occluder(cv, nuisance)
    _light_and_camera(cv, nuisance)
    return cv.img


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """Planar 0..255 floats (already offset by +0.5, so truncation rounds) to an interleaved uint8 image."""
    np.clip(img, 0.0, 255.0, out=img)
    size = img.shape[1]
    out = np.empty((size, size, 3), dtype=np.uint8)
    for ch in range(3):
        np.copyto(out[:, :, ch], img[ch], casting="unsafe")
    return out


def render_item(seed: int, identity: int, k: int, size: int = 112, style: str = "rendered") -> np.ndarray:
    """Image ``k`` of identity ``identity`` under ``seed``, exactly as :class:`ProceduralSource` renders it.

    Both styles draw the same person with the same nuisances: only the look differs.
    """
    check_style(style)
    ident = sample_identity(identity_rng(seed, identity))
    return render_face(ident, sample_nuisance(image_rng(seed, identity, k)), size, style=style)


# ---------------------------------------------------------------------------------------------------------------------
# The source


_ITEM_PATH = re.compile(r"(0|[1-9][0-9]*)/(0|[1-9][0-9]*)\.png")
PROCEDURAL_LIMIT_ENV = "DIGI2REAL_MAX_PROCEDURAL_IMAGES"
#: Twice DigiFace-1M's 1.2 M images; a listing of this size takes about 0.5 GB.
DEFAULT_MAX_PROCEDURAL_IMAGES = 2_400_000


def max_procedural_images() -> int:
    """The largest procedural source (identities x images), ``DIGI2REAL_MAX_PROCEDURAL_IMAGES`` or 2.4 million."""
    raw = os.environ.get(PROCEDURAL_LIMIT_ENV, "").strip()
    try:
        value = int(float(raw)) if raw else DEFAULT_MAX_PROCEDURAL_IMAGES
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{PROCEDURAL_LIMIT_ENV}={raw!r}: expected a positive whole number")
    return value


class ProceduralSource(ImageSource):
    """``identities`` rendered people with ``images_per_identity`` images each, laid out like DigiFace-1M.

    Identity names are the identity indices ``first_identity`` .. ``first_identity + identities - 1`` as text; item
    paths ``"<identity>/<k>.png"``. ``style`` is one of :data:`STYLES`; identity ``i`` is the same person in either
    style and in any source that holds it. Nothing is stored: :meth:`load` renders the image, so any item can be
    fetched in any order and always gives the same pixels.
    """

    kind = "procedural"

    def __init__(self, identities: int, images_per_identity: int, seed: int = 0, size: int = 112,
                 style: str = "rendered", first_identity: int = 0) -> None:
        """Validate the settings; nothing is rendered until an item is loaded."""
        checks = (
            ("identities", identities, 1),
            ("images_per_identity", images_per_identity, 1),
            ("seed", seed, 0),
            ("size", size, 16),
            ("first_identity", first_identity, 0),
        )
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"procedural source: {name} must be an integer >= {low}, got {value!r}")
        if style not in STYLES:
            raise ConfigError(f"procedural source: style must be one of {', '.join(map(repr, STYLES))}, got {style!r}")
        limit = max_procedural_images()
        if int(identities) * int(images_per_identity) > limit:
            raise ConfigError(f"procedural source: {identities} x {images_per_identity} images is more than the limit "
                              f"of {limit:,} (each listed image costs memory); use fewer, or raise the limit with "
                              f"{PROCEDURAL_LIMIT_ENV}={int(identities) * int(images_per_identity)}")
        self.n_identities = int(identities)
        self.images_per_identity = int(images_per_identity)
        self.seed = int(seed)
        self.size = int(size)
        self.style = str(style)
        self.first_identity = int(first_identity)
        # Items are listed identity by identity, so remembering the last identity's parameters saves re-sampling
        # them for every image. One tuple, replaced whole, so concurrent loads never see a half-updated cache.
        self._last_identity: tuple[int, FaceIdentity] | None = None

    def describe(self) -> dict:
        """Kind, counts, seed, crop size and renderer version: enough to re-render every image exactly.

        ``style`` and ``first_identity`` appear only when they differ from the defaults, so a default source describes
        itself (and fingerprints) exactly as before the real style existed.
        """
        desc = {
            "kind": self.kind,
            "identities": self.n_identities,
            "images_per_identity": self.images_per_identity,
            "seed": self.seed,
            "size": self.size,
            "renderer": RENDERER_VERSION,
        }
        if self.style != "rendered":
            desc["style"] = self.style
        if self.first_identity != 0:
            desc["first_identity"] = self.first_identity
        return desc

    def _indices(self) -> range:
        """The identity indices this source holds."""
        return range(self.first_identity, self.first_identity + self.n_identities)

    def identities(self) -> list[str]:
        """Identity names ``str(first_identity)`` .. ``str(first_identity + identities - 1)``, in order."""
        return [str(i) for i in self._indices()]

    def list_items(self, per_identity: int | None = None) -> list[SourceItem]:
        """The first identity's images ``0.png, 1.png, ...`` then the next one's, ...; at most ``per_identity`` each."""
        count = self.images_per_identity
        if per_identity is not None:
            if per_identity < 0:
                raise ValueError(f"per_identity must be >= 0, got {per_identity}")
            count = min(count, int(per_identity))
        return [SourceItem(str(i), f"{i}/{k}.png") for i in self._indices() for k in range(count)]

    def _identity(self, i: int) -> FaceIdentity:
        """Parameters of identity ``i``, reusing the last identity asked for."""
        cached = self._last_identity
        if cached is not None and cached[0] == i:
            return cached[1]
        identity = sample_identity(identity_rng(self.seed, i))
        self._last_identity = (i, identity)
        return identity

    def load(self, item: SourceItem) -> np.ndarray:
        """Render the item; an item this source does not list raises :class:`BadImageError`."""
        match = _ITEM_PATH.fullmatch(item.path)
        if match is not None and match.group(1) == item.identity:
            i, k = int(match.group(1)), int(match.group(2))
            if i in self._indices() and k < self.images_per_identity:
                nuisance = sample_nuisance(image_rng(self.seed, i, k))
                return render_face(self._identity(i), nuisance, self.size, style=self.style)
        last = self.first_identity + self.n_identities - 1
        raise BadImageError(
            f"{item.path}: not an image of the procedural source (identity {item.identity!r}; it has identities "
            f"{self.first_identity}..{last} with images 0..{self.images_per_identity - 1}.png each)"
        )


def write_procedural_tree(
    out_dir: str | Path, identities: int, images_per_identity: int, seed: int = 0, size: int = 112,
    style: str = "rendered", first_identity: int = 0,
) -> Path:
    """Render a source to PNG files laid out like unzipped DigiFace-1M: ``<out_dir>/<identity>/<k>.png``.

    Identity folders are named by index (``first_identity`` ..). Each file is written atomically, so an interrupted
    run never leaves a truncated PNG. Returns ``out_dir``.
    """
    out = Path(out_dir)
    source = ProceduralSource(identities, images_per_identity, seed=seed, size=size, style=style,
                              first_identity=first_identity)
    for item in source.list_items():
        write_image(out / item.path, source.load(item))
    return out
