"""The ArcFace 5-point template and the one alignment function every stage uses.

Alignment is a least-squares similarity transform (rotation, uniform scale, translation; no reflection) from five
facial landmarks (left eye, right eye, nose tip, left mouth corner, right mouth corner) to the ArcFace template, then a
bilinear warp with a zero (black) border (FACTS 3). Generated images, real photos and IJB loose crops all go through
:func:`align_face`, so a crop made anywhere in the project is the same crop.

Coordinates are pixel coordinates with the centre of pixel ``(i, j)`` at ``x = j, y = i`` (OpenCV's convention for
``warpAffine``), and landmarks are used exactly as a detector reports them, as insightface does.

numpy images (``H x W`` or ``H x W x C``, any dtype) are warped in numpy; torch tensors (``C x H x W`` or
``N x C x H x W``, on any device) are warped with ``grid_sample`` with the same result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: ArcFace template for a 112 x 112 crop: left eye, right eye, nose tip, left mouth corner, right mouth corner (x, y).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_TEMPLATE.setflags(write=False)


def template_for(size: int = 112) -> np.ndarray:
    """The 5-point template for a ``size x size`` crop (a new 5 x 2 float64 array).

    Multiples of 112 scale the 112 template (224 doubles it). Sizes that are multiples of 128 but not of 112 follow
    insightface's convention for 128-pixel crops: the template is scaled by ``size / 128`` and shifted right by
    ``8 * size / 128``, so a 128 crop holds the same face as a 112 crop with a margin. Any other size scales the 112
    template by ``size / 112``.
    """
    size = int(size)
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    if size % 112 != 0 and size % 128 == 0:
        ratio = size / 128.0
        out = ARCFACE_TEMPLATE * ratio
        out[:, 0] += 8.0 * ratio
        return out
    return ARCFACE_TEMPLATE * (size / 112.0)


def _as_points(points: Any, name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 2:
        raise ValueError(f"{name}: expected an N x 2 array of (x, y) points with N >= 2, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: points contain NaN or infinity")
    return arr


def estimate_similarity(src_pts: Any, dst_pts: Any) -> np.ndarray:
    """Least-squares similarity transform mapping ``src_pts`` onto ``dst_pts`` (Umeyama 1991), as a 2 x 3 matrix.

    Minimises ``sum |s R p + t - q|^2`` over rotation ``R`` (no reflection), scale ``s`` and translation ``t``. The
    result maps a source point ``(x, y)`` to ``M @ (x, y, 1)``. Degenerate input (all source points equal) raises
    ``ValueError``.
    """
    src = _as_points(src_pts, "src_pts")
    dst = _as_points(dst_pts, "dst_pts")
    if src.shape != dst.shape:
        raise ValueError(f"src_pts {src.shape} and dst_pts {dst.shape} must have the same shape")
    n = src.shape[0]
    mu_src = src.mean(axis=0)
    mu_dst = dst.mean(axis=0)
    src_c = src - mu_src
    dst_c = dst - mu_dst
    var_src = float((src_c**2).sum()) / n
    if var_src <= 1e-12:
        raise ValueError("src_pts: all points coincide; a similarity transform is undefined")
    cov = dst_c.T @ src_c / n
    u, sing, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0  # the best orthogonal fit is a reflection: take the best rotation instead
    rot = u @ np.diag(d) @ vt
    scale = float((sing * d).sum()) / var_src
    trans = mu_dst - scale * rot @ mu_src
    out = np.empty((2, 3), dtype=np.float64)
    out[:, :2] = scale * rot
    out[:, 2] = trans
    return out


def invert_affine(matrix: Any) -> np.ndarray:
    """Inverse of a 2 x 3 affine matrix (as 2 x 3)."""
    m = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def transform_points(points: Any, matrix: Any) -> np.ndarray:
    """Apply a 2 x 3 affine matrix to N x 2 points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    m = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
    return pts @ m[:, :2].T + m[:, 2]


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        width, height = int(size[0]), int(size[1])
    else:
        width = height = int(size)
    if width <= 0 or height <= 0:
        raise ValueError(f"output size must be positive, got {size!r}")
    return height, width


def warp_affine(image: Any, matrix: Any, size: int | tuple[int, int] = 112) -> Any:
    """Warp ``image`` by the 2 x 3 ``matrix`` (source -> output pixel coordinates) into a ``size`` image.

    Bilinear interpolation; samples outside the source count as zero (black border), as OpenCV's
    ``warpAffine(..., borderValue=0)``. ``size`` is an int (square) or ``(width, height)``.

    numpy input (``H x W`` or ``H x W x C``) returns numpy of the same dtype (integers are rounded and clipped to
    their range). A torch tensor (``C x H x W`` or ``N x C x H x W``; ``matrix`` 2 x 3 or N x 2 x 3) returns a
    tensor on the same device and dtype.
    """
    if _is_tensor(image):
        return _warp_torch(image, matrix, size)
    return _warp_numpy(np.asarray(image), matrix, size)


def _is_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "device")


def _warp_numpy(image: np.ndarray, matrix: Any, size: int | tuple[int, int]) -> np.ndarray:
    if image.ndim not in (2, 3) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image: expected H x W or H x W x C, got shape {image.shape}")
    out_h, out_w = _size_hw(size)
    inv = invert_affine(matrix)
    squeeze = image.ndim == 2
    src = image[..., None] if squeeze else image
    h, w, c = src.shape
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0 = np.floor(sx)
    y0 = np.floor(sy)
    fx = (sx - x0)[..., None]
    fy = (sy - y0)[..., None]
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    flat = src.reshape(h * w, c).astype(np.float32, copy=False)
    acc = np.zeros((out_h, out_w, c), dtype=np.float64)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        yy = y0 + dy
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xx = x0 + dx
            valid = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
            idx = np.where(valid, yy * w + xx, 0)
            taps = flat[idx] * valid[..., None]
            acc += taps * (wy * wx)
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        out = np.clip(np.rint(acc), info.min, info.max).astype(image.dtype)
    elif image.dtype == np.bool_:
        out = acc >= 0.5
    else:
        out = acc.astype(image.dtype)
    return out[..., 0] if squeeze else out


def _warp_torch(image: "torch.Tensor", matrix: Any, size: int | tuple[int, int]) -> "torch.Tensor":
    import torch
    import torch.nn.functional as F

    single = image.dim() == 3
    batch = image.unsqueeze(0) if single else image
    if batch.dim() != 4:
        raise ValueError(f"image: expected a C x H x W or N x C x H x W tensor, got shape {tuple(image.shape)}")
    n, _, h, w = batch.shape
    mats = np.asarray(matrix.detach().cpu() if _is_tensor(matrix) else matrix, dtype=np.float64)
    mats = np.broadcast_to(mats.reshape(-1, 2, 3), (n, 2, 3)) if mats.size == 6 else mats.reshape(n, 2, 3)
    out_h, out_w = _size_hw(size)
    # Output pixel -> source pixel, then source pixel -> grid_sample's [-1, 1] (align_corners=True: -1 and 1 are the
    # centres of the first and last pixels).
    inv = np.stack([invert_affine(m) for m in mats])
    to_norm = np.array([[2.0 / max(w - 1, 1), 0.0, -1.0], [0.0, 2.0 / max(h - 1, 1), -1.0]])
    theta = np.einsum("ij,njk->nik", to_norm[:, :2], inv)
    theta[:, :, 2] += to_norm[:, 2]
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float64)
    pix = np.stack([xs, ys, np.ones_like(xs)], axis=-1)  # out_h x out_w x 3
    grid = np.einsum("hwk,nik->nhwi", pix, theta)
    work_dtype = batch.dtype if batch.dtype.is_floating_point else torch.float32
    grid_t = torch.as_tensor(grid, dtype=work_dtype, device=batch.device)
    src = batch.to(work_dtype)
    if w == 1 or h == 1:  # grid_sample cannot address a one-pixel axis with align_corners; handled by padding
        src = F.pad(src, (0, 1 if w == 1 else 0, 0, 1 if h == 1 else 0))
    out = F.grid_sample(src, grid_t, mode="bilinear", padding_mode="zeros", align_corners=True)
    if not batch.dtype.is_floating_point:
        info = torch.iinfo(batch.dtype)
        out = out.round().clamp(info.min, info.max).to(batch.dtype)
    return out[0] if single else out


def alignment_matrix(landmarks: Any, size: int = 112) -> np.ndarray:
    """The 2 x 3 matrix taking image coordinates to the ``size`` crop, fitted from 5 landmarks (5 x 2, x/y)."""
    pts = _as_points(landmarks, "landmarks")
    if pts.shape != (5, 2):
        raise ValueError(f"landmarks: expected 5 x 2 points (eyes, nose, mouth corners), got shape {pts.shape}")
    return estimate_similarity(pts, template_for(size))


def align_face(image: Any, landmarks: Any, size: int = 112, return_matrix: bool = False) -> Any:
    """THE alignment: warp ``image`` so its 5 ``landmarks`` land on the ArcFace template of a ``size`` crop.

    ``image``: numpy ``H x W x C`` / ``H x W`` (returns numpy of the same dtype) or a torch tensor ``C x H x W`` with
    ``landmarks`` 5 x 2, or ``N x C x H x W`` with ``landmarks`` N x 5 x 2 (returns a tensor on the same device).
    ``landmarks``: left eye, right eye, nose tip, left mouth corner, right mouth corner, as (x, y) pixel coordinates
    (from :class:`~digi2real.faces.mtcnn.MTCNN`, or given, as in IJB). Zero border. With ``return_matrix`` also
    returns the 2 x 3 matrix(es) used (image -> crop coordinates).
    """
    if _is_tensor(image) and image.dim() == 4:
        pts = np.asarray(landmarks.detach().cpu() if _is_tensor(landmarks) else landmarks, dtype=np.float64)
        if pts.shape != (image.shape[0], 5, 2):
            raise ValueError(f"landmarks: expected {image.shape[0]} x 5 x 2 for a batch of {image.shape[0]} images, "
                             f"got shape {pts.shape}")
        mats = np.stack([alignment_matrix(p, size) for p in pts])
        crop = _warp_torch(image, mats, size)
        return (crop, mats) if return_matrix else crop
    if _is_tensor(landmarks):
        landmarks = landmarks.detach().cpu().numpy()
    mat = alignment_matrix(landmarks, size)
    crop = warp_affine(image, mat, size)
    return (crop, mat) if return_matrix else crop
