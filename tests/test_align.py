"""5-point alignment, face picking and failures, and the `align` stage and command."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from digi2real.config import AlignConfig, DetectorConfig
from digi2real.errors import ConfigError, Digi2RealError
from digi2real.faces import align_stage, commands
from digi2real.faces.detect import BAD_IMAGE, ERROR, NO_FACE, OK, detect_and_align, pick_face, to_rgb
from digi2real.faces.mtcnn import Detections
from digi2real.faces.template import (
    ARCFACE_TEMPLATE,
    align_face,
    estimate_similarity,
    template_for,
    transform_points,
    warp_affine,
)




def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


# ------------------------------------------------------------------------------------------------------ template
def test_template_values_and_sizes():
    assert ARCFACE_TEMPLATE.shape == (5, 2)
    np.testing.assert_allclose(ARCFACE_TEMPLATE[0], [38.2946, 51.6963])
    np.testing.assert_allclose(ARCFACE_TEMPLATE[4], [70.7299, 92.2041])
    np.testing.assert_allclose(template_for(112), ARCFACE_TEMPLATE)
    np.testing.assert_allclose(template_for(224), ARCFACE_TEMPLATE * 2)
    t128 = template_for(128)  # insightface's 128 layout: same face, 8 px margin on the left
    np.testing.assert_allclose(t128[:, 0], ARCFACE_TEMPLATE[:, 0] + 8)
    np.testing.assert_allclose(t128[:, 1], ARCFACE_TEMPLATE[:, 1])
    np.testing.assert_allclose(template_for(160), ARCFACE_TEMPLATE * 160 / 112)
    with pytest.raises(ValueError):
        template_for(0)


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    for _ in range(20):
        true = _similarity(rng.uniform(-180, 180), rng.uniform(0.2, 5), *rng.uniform(-300, 300, 2))
        src = rng.uniform(0, 500, (5, 2))
        est = estimate_similarity(src, transform_points(src, true))
        np.testing.assert_allclose(est, true, atol=1e-8)


def test_similarity_is_the_least_squares_optimum_and_never_reflects():
    rng = np.random.default_rng(1)
    src = ARCFACE_TEMPLATE + rng.normal(0, 4, (5, 2))
    dst = ARCFACE_TEMPLATE
    est = estimate_similarity(src, dst)

    def cost(m):
        return float(((transform_points(src, m) - dst) ** 2).sum())

    # parametrise as (a, b, tx, ty): [[a, -b, tx], [b, a, ty]]; every small step away costs more
    a, b, tx, ty = est[0, 0], est[1, 0], est[0, 2], est[1, 2]
    assert est[0, 1] == pytest.approx(-b) and est[1, 1] == pytest.approx(a)
    best = cost(est)
    for i in range(4):
        for step in (1e-3, -1e-3):
            p = np.array([a, b, tx, ty])
            p[i] += step
            assert cost(np.array([[p[0], -p[1], p[2]], [p[1], p[0], p[3]]])) > best
    mirrored = dst * [-1, 1]  # a mirror image cannot be reached by a similarity: the result stays a rotation
    assert np.linalg.det(estimate_similarity(dst, mirrored)[:, :2]) > 0
    with pytest.raises(ValueError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), dst)


def test_warp_identity_shift_and_zero_border():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    same = warp_affine(img, [[1, 0, 0], [0, 1, 0]], (50, 40))
    np.testing.assert_array_equal(same, img)
    shifted = warp_affine(img, [[1, 0, 3], [0, 1, -2]], (50, 40))  # content moves right 3, up 2
    np.testing.assert_array_equal(shifted[:38, 3:], img[2:, :47])
    assert shifted[:, :3].max() == 0 and shifted[38:].max() == 0
    gray = warp_affine(img[..., 0], [[1, 0, 0], [0, 1, 0]], 30)
    assert gray.shape == (30, 30) and gray.dtype == np.uint8
    half = warp_affine(img.astype(np.float32), [[1, 0, 0.5], [0, 1, 0]], (50, 40))
    np.testing.assert_allclose(half[:, 1:], 0.5 * (img[:, :-1].astype(np.float32) + img[:, 1:]), atol=1e-4)


def test_numpy_and_torch_warps_agree(astronaut):
    m = _similarity(17, 0.4, 20, -30)
    ref = warp_affine(astronaut.astype(np.float32), m, 112)
    chw = torch.from_numpy(astronaut).permute(2, 0, 1).float()
    out = warp_affine(chw, m, 112).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-2)
    batch = torch.stack([chw, chw.flip(-1)])
    lms = np.stack([ARCFACE_TEMPLATE * 3 + 100, ARCFACE_TEMPLATE * 2 + 50])
    crops = align_face(batch, lms, 112)
    assert crops.shape == (2, 3, 112, 112)
    np.testing.assert_allclose(crops[1].permute(1, 2, 0).numpy(),
                               align_face(np.ascontiguousarray(astronaut[:, ::-1]).astype(np.float32), lms[1]),
                               atol=1e-2)


def test_align_puts_marked_points_on_the_template():
    """Dots drawn where a known similarity puts the template land on the template after alignment."""
    true = _similarity(-23, 2.7, 140, 60)
    points = transform_points(ARCFACE_TEMPLATE, true)  # template -> image
    img = np.zeros((500, 500), np.float64)
    yy, xx = np.mgrid[0:500, 0:500]
    for x, y in points:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0**2))
    crop = align_face(img, points, 112)
    for tx, ty in ARCFACE_TEMPLATE:
        x0, y0 = int(round(tx)), int(round(ty))
        win = crop[y0 - 4:y0 + 5, x0 - 4:x0 + 5]
        wy, wx = np.mgrid[y0 - 4:y0 + 5, x0 - 4:x0 + 5]
        cx, cy = (win * wx).sum() / win.sum(), (win * wy).sum() / win.sum()
        assert abs(cx - tx) < 0.25 and abs(cy - ty) < 0.25
    _, m = align_face(img, points, 112, return_matrix=True)
    np.testing.assert_allclose(transform_points(points, m), ARCFACE_TEMPLATE, atol=1e-6)


@pytest.mark.parametrize("which", ["astronaut", "grace"])
def test_real_photo_aligns_to_the_template(detector, which, request):
    img = request.getfixturevalue(which)
    det = detector.detect(img)
    assert len(det) == 1
    lm = det.landmarks[0].astype(np.float64)
    crop, m = align_face(img, lm, 112, return_matrix=True)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    mapped = transform_points(lm, m)
    # The crop is where the transform says: the detector run again on the crop finds the landmarks at the mapped
    # points (2 px on average, 3 px at worst: O-Net's own jitter). The 5 points of a real face are not an exact
    # similarity of the template, so the least-squares residual to the template itself is a property of the face
    # (up to ~5 px at the astronaut's mouth corners).
    again = detector.detect(np.pad(crop, ((56, 56), (56, 56), (0, 0))))
    assert len(again) == 1
    err = np.hypot(*(again.landmarks[0] - 56 - mapped).T)
    assert err.mean() < 2.0 and err.max() < 3.0, err
    np.testing.assert_allclose(mapped[:2], ARCFACE_TEMPLATE[:2], atol=3.0)  # the eyes sit on the template
    assert np.abs(mapped - ARCFACE_TEMPLATE).mean() < 4.0


def test_rotated_and_scaled_copies_align_to_the_same_crop(detector, astronaut):
    base = detect_and_align([astronaut], detector)[0]
    assert base.ok
    ref = base.crop.astype(np.float64)
    cx, cy = np.mean(base.landmarks, axis=0)

    def centre_err(crop):
        return np.abs(crop.astype(np.float64) - ref)[24:96, 24:96].mean()

    shift_2px = centre_err(np.roll(base.crop, 2, axis=1))  # what a 2-pixel misalignment costs
    for angle, scale in [(15, 1.0), (-15, 1.0), (0, 0.8), (0, 1.25), (10, 0.9)]:
        img = Image.fromarray(astronaut).rotate(angle, resample=Image.Resampling.BICUBIC, center=(cx, cy))
        if scale != 1.0:
            img = img.resize((round(512 * scale), round(512 * scale)), Image.Resampling.LANCZOS)
        res = detect_and_align([np.asarray(img)], detector)[0]
        assert res.ok, (angle, scale, res.reason)
        assert centre_err(res.crop) < shift_2px, (angle, scale)
        # the landmarks found in the copy map back onto the original's
        a = np.deg2rad(angle)
        rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])  # PIL rotates counter-clockwise
        pts = np.asarray(res.landmarks) * (512 / round(512 * scale)) - [cx, cy]
        back = pts @ rot + [cx, cy]
        np.testing.assert_allclose(back, base.landmarks, atol=3.0)


# --------------------------------------------------------------------------------------------- picking, failures
def test_pick_rules():
    det = Detections(
        boxes=np.array([[0, 0, 50, 50], [200, 200, 300, 300], [90, 90, 110, 110]], np.float32),
        scores=np.array([0.99, 0.9, 0.95], np.float32),
        landmarks=np.zeros((3, 5, 2), np.float32),
    )
    assert pick_face(det, "largest") == 1
    assert pick_face(det, "confident") == 0
    assert pick_face(det, "central", (200, 200)) == 2
    with pytest.raises(ValueError):
        pick_face(det, "central")
    with pytest.raises(ValueError):
        pick_face(Detections(), "largest")


def test_pick_on_a_two_face_photo(detector, astronaut, grace):
    canvas = np.zeros((700, 1100, 3), np.uint8)
    canvas[:512, :512] = astronaut  # face about 100 px, in the top-left
    canvas[50:650, 560:1072] = grace  # face about 200 px
    largest = detect_and_align([canvas], detector, AlignConfig())[0]
    confident = detect_and_align([canvas], detector, AlignConfig(detector=DetectorConfig(pick="confident")))[0]
    central = detect_and_align([canvas], detector, AlignConfig(detector=DetectorConfig(pick="central")))[0]
    det = detector.detect(canvas)
    assert len(det) == 2
    assert largest.ok and largest.faces == 2 and largest.box[0] > 560  # grace's face is the bigger one
    np.testing.assert_allclose(confident.box, det.boxes[int(np.argmax(det.scores))], atol=1e-3)
    centres = 0.5 * (det.boxes[:, :2] + det.boxes[:, 2:])
    nearest = int(np.argmin(np.hypot(centres[:, 0] - 550, centres[:, 1] - 350)))
    np.testing.assert_allclose(central.box, det.boxes[nearest], atol=1e-3)


def test_no_face_and_bad_images_are_reported_not_raised(detector, astronaut):
    rng = np.random.default_rng(0)
    inputs = [
        rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),  # noise
        np.full((200, 300, 3), 90, np.uint8),  # flat colour
        np.zeros((5, 5, 3), np.uint8),  # tiny
        np.zeros((15, 200, 3), np.uint8),  # smaller than the smallest face searched for
        None,
        np.full((64, 64, 3), np.nan, np.float32),
        np.zeros((64, 64, 7), np.uint8),
        Digi2RealError("photo.jpg: not a readable image"),  # a read failure passed through
        astronaut,
    ]
    res = detect_and_align(inputs, detector, AlignConfig(), names=[f"img{i}" for i in range(len(inputs))])
    assert [r.status for r in res] == [NO_FACE, NO_FACE] + [BAD_IMAGE] * 6 + [OK]
    assert "no face found" in res[0].reason and "padded" in res[0].reason
    assert "too small" in res[2].reason and "img2" in res[2].reason
    assert "min_face_size" in res[3].reason
    assert "NaN" in res[5].reason
    assert "layout" in res[6].reason
    assert res[7].reason == "photo.jpg: not a readable image"
    row = res[0].to_dict()
    assert row["status"] == NO_FACE and row["box"] is None and json.dumps(row)


def test_gray_rgba_16bit_float_inputs(detector, astronaut):
    gray = (astronaut.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    sixteen = astronaut.astype(np.uint16) * 257
    floats = astronaut.astype(np.float32) / 255.0
    pil = Image.fromarray(astronaut)
    res = detect_and_align([gray, gray[..., None], rgba, sixteen, floats, pil], detector)
    assert all(r.ok for r in res), [r.reason for r in res]
    ref = res[2]
    for r in res[3:]:
        np.testing.assert_allclose(r.landmarks, ref.landmarks, atol=0.5)
    np.testing.assert_array_equal(to_rgb(sixteen), astronaut)
    palette = Image.fromarray(astronaut).convert("P")
    np.testing.assert_array_equal(to_rgb(palette), np.asarray(palette.convert("RGB")))
    np.testing.assert_array_equal(to_rgb(rgba), astronaut)
    half = to_rgb(np.dstack([astronaut, np.full(astronaut.shape[:2], 128, np.uint8)]))
    assert abs(int(half.astype(int).mean()) - int(astronaut.mean() * 128 / 255)) <= 1  # composited on black


def test_tight_crop_needs_the_padded_retry(detector, astronaut):
    det = detector.detect(astronaut)
    x1, y1, x2, y2 = det.boxes[0]
    mx, my = 0.1 * (x2 - x1), 0.1 * (y2 - y1)
    tight = np.ascontiguousarray(astronaut[int(y1 + my):int(y2 - my), int(x1 + mx):int(x2 - mx)])
    off = np.array([int(x1 + mx), int(y1 + my)])
    assert len(detector.detect(tight)) == 0
    res = detect_and_align([tight], detector, AlignConfig())[0]
    assert res.ok and res.attempt == "padded"
    # landmarks are reported in the tight image's own pixels (less exact: the crop cut off context)
    err = np.hypot(*(np.asarray(res.landmarks) + off - det.landmarks[0]).T)
    assert err.mean() < 4.0 and err.max() < 7.0, err
    off_cfg = AlignConfig(detector=DetectorConfig(pad_retry=0))
    res = detect_and_align([tight], detector, off_cfg)[0]
    assert res.status == NO_FACE and "padded" not in res.reason


def test_one_failing_image_does_not_sink_the_batch(detector, astronaut):
    class Flaky:
        min_face_size = detector.min_face_size

        def detect(self, images):
            if isinstance(images, list):
                raise RuntimeError("batch failed")
            if images.shape[0] == 300:
                raise RuntimeError("boom")
            return detector.detect(images)

    bad = np.zeros((300, 300, 3), np.uint8)
    res = detect_and_align([astronaut, bad, astronaut], Flaky(), AlignConfig())
    assert [r.status for r in res] == [OK, ERROR, OK]
    assert "boom" in res[1].reason


def test_crop_size_option(detector, astronaut):
    res = detect_and_align([astronaut], detector, AlignConfig(size=224))[0]
    assert res.crop.shape == (224, 224, 3)
    small = detect_and_align([astronaut], detector, AlignConfig())[0].crop
    big = np.asarray(Image.fromarray(res.crop).resize((112, 112), Image.Resampling.BOX))
    assert np.abs(big.astype(int) - small.astype(int))[20:92, 20:92].mean() < 6


# ------------------------------------------------------------------------------------------------- stage and CLI
@pytest.fixture()
def photo_tree(tmp_path, astronaut, grace):
    src = tmp_path / "photos"
    (src / "id2").mkdir(parents=True)
    (src / "id10").mkdir()
    Image.fromarray(astronaut).save(src / "id2" / "a.png")
    Image.fromarray(grace).save(src / "id2" / "b.jpg", quality=95)
    Image.fromarray(astronaut[::2, ::2]).save(src / "id10" / "small.jpg")
    gray16 = (astronaut[::2, ::2].astype(np.float64) @ [0.299, 0.587, 0.114] * 257).astype(np.uint16)
    Image.fromarray(gray16).save(src / "id10" / "gray16.png")  # a 16-bit grayscale PNG
    Image.fromarray(np.full((120, 120, 3), 200, np.uint8)).save(src / "id10" / "flat.png")
    (src / "id10" / "broken.jpg").write_bytes(b"not an image")
    (src / "id10" / "notes.txt").write_text("ignored")
    return src


def test_align_folder_mirrors_reports_and_resumes(tmp_path, photo_tree, detector):
    dst = tmp_path / "aligned"
    summary = align_stage.align_folder(photo_tree, dst, AlignConfig(), progress=False, detector=detector)
    assert (summary.total, summary.ok, summary.no_face, summary.bad_image) == (6, 4, 1, 1)
    for rel in ("id2/a.png", "id2/b.png", "id10/small.png", "id10/gray16.png"):
        with Image.open(dst / rel) as img:
            assert img.size == (112, 112)
    assert not (dst / "id10" / "flat.png").exists()
    rows = [json.loads(line) for line in (dst / "align_report.jsonl").read_text().splitlines()]
    assert [r["src"] for r in rows] == ["id2/a.png", "id2/b.jpg", "id10/broken.jpg", "id10/flat.png",
                                        "id10/gray16.png", "id10/small.jpg"]
    by_src = {r["src"]: r for r in rows}
    ok = by_src["id2/a.png"]
    assert ok["status"] == OK and ok["dst"] == "id2/a.png" and ok["attempt"] == "direct"
    assert len(ok["box"]) == 4 and len(ok["landmarks"]) == 5 and ok["score"] > 0.99
    assert by_src["id10/flat.png"]["status"] == NO_FACE and by_src["id10/flat.png"]["dst"] is None
    assert by_src["id10/broken.jpg"]["status"] == BAD_IMAGE and "broken.jpg" in by_src["id10/broken.jpg"]["reason"]

    again = align_stage.align_folder(photo_tree, dst, AlignConfig(), progress=False, detector=detector)
    assert again.processed == 0 and again.skipped == 6 and again.ok == 4

    # a crash mid-write: the last row is cut short and its crop is missing -> redone, the partial line dropped
    report = dst / "align_report.jsonl"
    text = report.read_text().splitlines(keepends=True)
    last = json.loads(text[-1])
    report.write_text("".join(text[:-1]) + text[-1][:25])
    (dst / "id10" / "small.png").unlink()
    resumed = align_stage.align_folder(photo_tree, dst, AlignConfig(), progress=False, detector=detector)
    assert resumed.processed == 1 and resumed.ok == 4 and (dst / "id10" / "small.png").is_file()
    lines = report.read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[-1])["src"] == last["src"]

    with pytest.raises(ConfigError, match="size was 112, now 128"):
        align_stage.align_folder(photo_tree, dst, AlignConfig(size=128), progress=False, detector=detector)


def test_align_folder_flat_folder_and_errors(tmp_path, astronaut, detector):
    src = tmp_path / "flat"
    src.mkdir()
    Image.fromarray(astronaut).save(src / "x.png")
    Image.fromarray(astronaut).save(src / "x.jpg")
    summary = align_stage.align_folder(src, tmp_path / "out", AlignConfig(format="jpg"), progress=False,
                                       detector=detector)
    assert summary.ok == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jpg")) == ["x.jpg.jpg", "x.png.jpg"]
    with pytest.raises(Digi2RealError, match="not found"):
        align_stage.align_folder(tmp_path / "nope", tmp_path / "o2", progress=False, detector=detector)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Digi2RealError, match="no images found"):
        align_stage.align_folder(tmp_path / "empty", tmp_path / "o3", progress=False, detector=detector)
    (tmp_path / "out" / "align_report.jsonl").write_text('{"src": "x.png", "status": "ok"}\nbroken\n{"a": 1}\n')
    with pytest.raises(Digi2RealError, match="line 2"):
        align_stage.align_folder(src, tmp_path / "out", AlignConfig(format="jpg"), progress=False, detector=detector)


def test_align_command(tmp_path, photo_tree, capsys):
    parser = argparse.ArgumentParser(prog="digi2real")
    sub = parser.add_subparsers()
    commands.register(sub)
    config = tmp_path / "exp.yaml"
    config.write_text("align:\n  size: 96\n  detector:\n    factor: 0.8\n")
    dst = tmp_path / "cli_out"
    args = parser.parse_args(["align", str(photo_tree), "-o", str(dst), "--config", str(config),
                              "--thresholds", "0.6,0.7,0.9", "--format", "jpg", "--pick", "confident",
                              "--device", "cpu", "--batch-size", "2", "-q"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "aligned 4 of 6" in out and "no_face 1" in out
    with Image.open(dst / "id2" / "a.jpg") as img:
        assert img.size == (96, 96)
    settings = json.loads((dst / "align_settings.json").read_text())["settings"]
    assert settings["detector"]["thresholds"] == [0.6, 0.7, 0.9] and settings["detector"]["factor"] == 0.8
    assert settings["detector"]["pick"] == "confident" and settings["format"] == "jpg"
    with pytest.raises(SystemExit):
        parser.parse_args(["align", str(photo_tree), "-o", str(dst), "--thresholds", "0.6,0.7"])
    bad = parser.parse_args(["align", str(photo_tree), "-o", str(tmp_path / "x"), "--factor", "1.5", "-q"])
    with pytest.raises(ConfigError, match="detector.factor"):
        bad.func(bad)
    help_text = sub.choices["align"].format_help()
    for flag in ("--size", "--format", "--thresholds", "--factor", "--min-face-size", "--pick", "--pad-retry",
                 "--device", "--batch-size", "--config", "examples:"):
        assert flag in help_text
