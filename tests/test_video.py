"""tools/demo.py on videos and cameras, through its command line: frame count, size and frame rate
kept, one JSON line per frame, a frame's detections equal to the image demo's on that frame; a
damaged video keeps the frames before the damage; no camera and no display are clear errors."""
import json
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from helpers import ROOT

DEMO = os.path.join(ROOT, "tools", "demo.py")
TOY_CONFIG = os.path.join(ROOT, "configs", "mf_detr_toy.yaml")
TOY_ROOT = os.path.join(ROOT, "datasets", "toy_coco")


def _demo(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, DEMO, "--config-file", TOY_CONFIG, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _write_clip(path, frames, fps, fourcc):
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    assert writer.isOpened()
    for rgb in frames:
        writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))
    writer.release()


def _read_all(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(bgr)
    info = (capture.get(cv2.CAP_PROP_FPS), int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    capture.release()
    return frames, info


def _toy_frames(overfit_toy, count):
    from PIL import Image

    names = [im["file_name"] for im in json.load(open(overfit_toy["json"]))["images"]]
    images = [np.asarray(Image.open(os.path.join(overfit_toy["image_root"], n)).convert("RGB")) for n in names]
    return [images[i % len(images)] for i in range(count)]


@pytest.mark.slow
def test_video_keeps_every_frame_and_matches_the_image_demo(overfit_toy, tmp_path):
    clip = tmp_path / "clip.mp4"
    _write_clip(clip, _toy_frames(overfit_toy, 6), fps=5, fourcc="mp4v")
    out = tmp_path / "out"
    result = _demo("--video-input", clip, "--output", out, "--confidence-threshold", 0.2,
                   "--opts", "MODEL.WEIGHTS", overfit_toy["weights"], "DATASETS.TOY_ROOT", TOY_ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "6 frames in" in result.stdout + result.stderr and "frames/s" in result.stdout + result.stderr

    source, (fps, width, height) = _read_all(clip)
    written, written_info = _read_all(out / "clip.mp4")
    assert len(written) == len(source) == 6 and written_info == (fps, width, height) == (5.0, 160, 128)
    lines = [json.loads(line) for line in open(out / "clip.jsonl")]
    assert [line["frame"] for line in lines] == list(range(6))
    assert [line["time_s"] for line in lines] == pytest.approx([i / 5 for i in range(6)])
    assert sum(len(line["detections"]) for line in lines) >= 6

    # The image demo on frame 2 as the video demo decoded it (written losslessly as PNG).
    cv2.imwrite(str(tmp_path / "frame2.png"), source[2])
    result = _demo("--input", tmp_path / "frame2.png", "--output", tmp_path / "image", "--confidence-threshold", 0.2,
                   "--opts", "MODEL.WEIGHTS", overfit_toy["weights"], "DATASETS.TOY_ROOT", TOY_ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    image = json.load(open(tmp_path / "image" / "frame2.json"))["detections"]
    frame = lines[2]["detections"]
    assert len(image) == len(frame) > 0
    for a, b in zip(image, frame):
        assert (a["category_id"], a["category"]) == (b["category_id"], b["category"])
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-5)


@pytest.mark.slow
def test_a_damaged_video_keeps_the_frames_before_the_damage(overfit_toy, tmp_path):
    clip = tmp_path / "long.avi"
    _write_clip(clip, _toy_frames(overfit_toy, 20), fps=10, fourcc="MJPG")
    data = clip.read_bytes()
    clip.write_bytes(data[: len(data) // 2])                  # cut half-way, as a copy that died
    readable = len(_read_all(clip)[0])
    assert 0 < readable < 20
    out = tmp_path / "out"
    result = _demo("--video-input", clip, "--output", out, "--opts", "MODEL.WEIGHTS", overfit_toy["weights"],
                   "DATASETS.TOY_ROOT", TOY_ROOT)
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    assert f"frame {readable} of 20 could not be decoded" in log and "long.avi" in log
    written, (fps, width, height) = _read_all(out / "long.mp4")  # closed properly: it plays
    assert len(written) == readable and (fps, width, height) == (10.0, 160, 128)
    assert len(open(out / "long.jsonl").read().splitlines()) == readable

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(4096))
    result = _demo("--video-input", garbage, "--output", out, "--opts", "MODEL.WEIGHTS", overfit_toy["weights"])
    assert result.returncode == 2 and "cannot open the video" in result.stdout + result.stderr
    assert "garbage.mp4" in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.path.exists("/dev/video0"), reason="this machine has a camera")
def test_webcam_without_a_camera_fails_within_seconds(tmp_path):
    start = time.perf_counter()
    result = _demo("--webcam", "--output", tmp_path, timeout=120)
    assert result.returncode == 2 and "cannot open camera 0" in result.stdout + result.stderr
    assert time.perf_counter() - start < 60


@pytest.mark.slow
def test_a_video_without_output_or_display_says_to_pass_output(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = _demo("--video-input", tmp_path / "any.mp4", env=env)
    assert result.returncode == 2 and "pass --output DIR" in result.stdout + result.stderr
    images = _demo("--input", tmp_path / "a.png", env=env)
    assert images.returncode == 2 and "--input needs --output DIR" in images.stderr
