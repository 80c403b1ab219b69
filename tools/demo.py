#!/usr/bin/env python
"""Run MF-DETR on images, videos or a camera and draw its detections with Detectron2's visualizers.

    python tools/demo.py --config-file configs/mf_detr_toy.yaml --input img.jpg dir/ "glob/*.png" \
        --output out/ --confidence-threshold 0.5 --opts MODEL.WEIGHTS model_final.pth
    python tools/demo.py --config-file configs/mf_detr_toy.yaml --video-input clip.mp4 --output out/ \
        --opts MODEL.WEIGHTS model_final.pth
    python tools/demo.py --config-file configs/mf_detr_toy.yaml --webcam --opts MODEL.WEIGHTS model_final.pth
    python tools/demo.py --config-file configs/mf_detr_toy.yaml --input dir/ --output out/ \
        --runtime onnxruntime --onnx mf_detr_toy.onnx      # the graph of tools/export_onnx.py

For each readable image it writes ``<output>/<name>.png`` (the drawing, at most ``--max-draw-size``
pixels on its longer side) and ``<output>/<name>.json`` (the detections above the threshold, in the
image's own pixels: COCO-style ``bbox`` [x, y, w, h], ``category_id`` (the dataset's own id, as in
its json), ``category``, ``score``). Inputs that share a name (``a/x.png``, ``b/x.png``) are written
as ``x``, ``x_1``, ... (logged). An output that would replace one of the inputs (``--output`` the
input folder) is refused before anything runs. An unreadable file, or one the detector cannot take
(e.g. 5000x1 pixels), is reported by name and skipped; the exit code is non-zero only when no input
could be processed.

For a video (``--video-input``) or camera 0 (``--webcam``, until ``q`` or the end of the stream) it
writes ``<output>/<name>.mp4`` (same size and frame rate, drawn with ``VideoVisualizer``, whose
colours stay with an object from frame to frame) and ``<output>/<name>.jsonl``, one line per frame:
``{"frame": i, "time_s": t, "detections": [...]}`` (``name`` is the video's, or ``webcam``).
Without ``--output`` the frames are shown in a window (a display and OpenCV's GUI needed). A video
that cannot be opened, no camera, or an output that would replace the video, is an error (exit 2)
before the model is loaded; a frame that
cannot be decoded ends the video there: the frames before it are kept, the files are closed and
playable, and the exit code is 1.
"""
import argparse
import glob
import json
import logging
import os
import sys
import time

import cv2
import numpy as np
import tqdm
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import _apply_exif_orientation
from detectron2.structures import Boxes, Instances
from detectron2.utils.logger import setup_logger
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from mobileformer_det import setup_cfg
from mobileformer_det.config import num_classes
from mobileformer_det.data import check_num_classes, register_datasets_from_config
from mobileformer_det.deploy import RUNTIMES, Predictor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def expand_inputs(inputs):
    """Files, folders (their images, sorted) and globs -> list of paths (order kept, duplicates dropped)."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(os.path.expanduser(item)))
        else:
            found = [item]
        paths.extend(p for p in found if p not in paths)
    return paths


def plan_outputs(paths, output, logger):
    """``[(input path, output stem)]``: each input's drawing and JSON go to ``<output>/<stem>.png``
    and ``.json``. Inputs sharing a base name get ``_1``, ``_2``... (logged). Raises ``ValueError``
    when an output file would be one of the inputs."""
    taken, plan = set(), []
    inputs = {os.path.realpath(p): p for p in paths}
    for path in paths:
        name = stem = os.path.splitext(os.path.basename(path))[0]
        k = 0
        while stem.lower() in taken:
            k += 1
            stem = f"{name}_{k}"
        if stem != name:
            logger.warning(f"{path}: another input is also named {name!r}: written as {stem}.png / {stem}.json")
        taken.add(stem.lower())
        for ext in (".png", ".json"):
            target = os.path.realpath(os.path.join(output, stem + ext))
            if target in inputs:
                raise ValueError(f"--output {output!r} would overwrite the input {inputs[target]!r} with a drawing: "
                                 f"choose an output folder that is not the input folder")
        plan.append((path, stem))
    return plan


def drawable(rgb, instances, max_side):
    """The image and detections to draw: both scaled down to at most ``max_side`` pixels on the
    longer side (drawing a 12000x9000 photo at full size takes minutes and gigabytes)."""
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return rgb, instances
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    scaled = Instances(size, scores=instances.scores, pred_classes=instances.pred_classes,
                       pred_boxes=Boxes(instances.pred_boxes.tensor * scale))
    return small, scaled


def read_image_rgb(path):
    """Read any image as ``[H, W, 3]`` uint8 RGB: EXIF orientation applied, grayscale and RGBA
    converted, 16-bit and float images rescaled to 8 bits."""
    with Image.open(path) as img:
        img = _apply_exif_orientation(img)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            arr = np.asarray(img, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
            img = Image.fromarray(arr.astype(np.uint8))
        return np.asarray(img.convert("RGB"))


def detections_to_json(instances, metadata):
    """COCO-style detections: ``bbox`` [x, y, w, h], the dataset's ``category_id`` (the model's
    contiguous class index mapped back through ``thing_dataset_id_to_contiguous_id``), its name, ``score``."""
    class_names = metadata.get("thing_classes", [])
    dataset_id = {v: k for k, v in metadata.get("thing_dataset_id_to_contiguous_id", {}).items()}
    boxes = instances.pred_boxes.tensor.tolist()
    out = []
    for (x0, y0, x1, y1), cls, score in zip(boxes, instances.pred_classes.tolist(), instances.scores.tolist()):
        out.append({
            "bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": dataset_id.get(cls, cls),
            "category": class_names[cls] if cls < len(class_names) else str(cls), "score": score,
        })
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, folders or globs")
    source.add_argument("--video-input", metavar="PATH", help="a video file")
    source.add_argument("--webcam", action="store_true", help="camera 0, until q or the end of the stream")
    parser.add_argument("--output", help="folder for the drawings and JSON files (images: required; videos: "
                                         "without it the frames are shown in a window)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--max-draw-size", type=int, default=2048, metavar="PIXELS",
                        help="longer side of the drawings of larger images (their JSON stays in full-size pixels)")
    parser.add_argument("--runtime", default="torch", choices=RUNTIMES,
                        help="torch (eager), compile (torch.compile), onnxruntime or openvino (with --onnx)")
    parser.add_argument("--onnx", help="the graph of tools/export_onnx.py, for --runtime onnxruntime / openvino")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                        help="the network's input size for --runtime compile (default: what tools/export_onnx.py "
                             "picks, the test images' largest size after the test resize)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if args.input and not args.output:
        parser.error("--input needs --output DIR (the folder for the drawings and JSON files)")
    logger = setup_logger(name="demo")
    setup_logger(name="mobileformer_det", abbrev_name="mfdet")
    logging.getLogger("fvcore").setLevel(logging.WARNING)

    plan = None
    if args.input:  # the inputs and where they go first: nothing is loaded for an output that is refused
        paths = expand_inputs(args.input)
        if not paths:
            logger.error(f"no image found in {args.input}")
            return 2
        try:
            plan = plan_outputs(paths, args.output, logger)
        except ValueError as e:
            logger.error(str(e))
            return 2
    capture = None
    stream_name = os.path.splitext(os.path.basename(args.video_input))[0] if args.video_input else "webcam"
    if args.video_input and args.output:
        written = {os.path.realpath(os.path.join(args.output, stream_name + ext)) for ext in (".mp4", ".jsonl")}
        if os.path.realpath(args.video_input) in written:
            logger.error(f"--output {args.output!r} would overwrite the video {args.video_input!r} while reading it: "
                         f"choose another output folder")
            return 2
    if args.video_input or args.webcam:  # the source and the display first: no model is loaded for nothing
        problem = None if args.output else no_window_reason()
        if problem:
            logger.error(problem)
            return 2
        capture = cv2.VideoCapture(args.video_input if args.video_input else 0)
        if not capture.isOpened():
            logger.error(f"cannot open the video {args.video_input!r} (missing, or not a video OpenCV can read)"
                         if args.video_input else "cannot open camera 0: no camera on this machine, or it is in use")
            return 2

    cfg = setup_cfg(args.config_file, args.opts)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    if cfg.DATASETS.TEST:  # class names and the dataset's category ids
        try:
            register_datasets_from_config(cfg)
            if "thing_dataset_id_to_contiguous_id" not in metadata.as_dict():
                DatasetCatalog.get(metadata.name)  # a COCO-format dataset sets them when loaded
            count, key = num_classes(cfg)
            check_num_classes(count, metadata.name, key)
        except (KeyError, FileNotFoundError, ValueError) as e:
            logger.error(str(e))
            return 2
    if args.runtime in ("torch", "compile"):
        if not cfg.MODEL.WEIGHTS:
            logger.error("no weights: pass --opts MODEL.WEIGHTS path/to/model_final.pth")
            return 2
        if "://" not in cfg.MODEL.WEIGHTS and not os.path.exists(cfg.MODEL.WEIGHTS):
            logger.error(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS!r} does not exist (train first, or fix the path)")
            return 2
    try:
        predictor = Predictor(cfg, args.runtime, onnx_path=args.onnx, input_size=args.input_size)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        logger.error(str(e))
        return 2

    if capture is not None:
        return run_stream(capture, stream_name, args.video_input or "camera 0", predictor, metadata, args, logger)
    return run_images(plan, predictor, metadata, args, logger)


def run_images(plan, predictor, metadata, args, logger):
    """Detect on each ``(path, stem)`` of ``plan`` (:func:`plan_outputs`) and write its drawing and JSON."""
    os.makedirs(args.output, exist_ok=True)
    done, failed = 0, []
    for path, stem in tqdm.tqdm(plan, disable=len(plan) < 2):
        try:
            rgb = read_image_rgb(path)
        except Exception as e:
            logger.error(f"cannot read {path!r}: {e}; skipped")
            failed.append(path)
            continue
        start = time.perf_counter()
        try:
            instances = predictor(rgb)
        except Exception as e:  # e.g. an image too thin to resize to the network's input
            logger.error(f"cannot detect on {path!r} ({rgb.shape[1]}x{rgb.shape[0]} pixels): {e}; skipped")
            failed.append(path)
            continue
        elapsed = time.perf_counter() - start
        instances = instances[instances.scores >= args.confidence_threshold]
        logger.info(f"{path}: {len(instances)} detections in {elapsed:.3f}s")
        image, shown = drawable(rgb, instances, args.max_draw_size)
        Visualizer(image, metadata).draw_instance_predictions(shown).save(os.path.join(args.output, stem + ".png"))
        with open(os.path.join(args.output, stem + ".json"), "w") as f:
            json.dump({"file_name": path, "height": rgb.shape[0], "width": rgb.shape[1],
                       "detections": detections_to_json(instances, metadata)}, f, indent=1)
        done += 1
    logger.info(f"{done} image(s) written to {args.output}; {len(failed)} skipped: {failed}")
    return 0 if done else 1


def no_window_reason():
    """Why frames cannot be shown in a window here (None when they can)."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display to show the frames in: pass --output DIR to write them to a video and a JSON-lines file"
    try:
        cv2.namedWindow("MF-DETR")
    except cv2.error:
        return ("this OpenCV has no window support (opencv-python-headless): pass --output DIR, "
                "or install opencv-python to see the frames")
    return None


def run_stream(capture, name, source, predictor, metadata, args, logger):
    """Detect on every frame of an opened ``cv2.VideoCapture`` until its end (or ``q`` in the window).

    With ``args.output``: ``<name>.mp4`` (same size and frame rate) and ``<name>.jsonl`` (one line a
    frame), both closed properly whatever happens. Returns 0, or 1 when a video stopped before its
    announced frame count (a frame that cannot be decoded).
    """
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and fps > 0 else 30.0                     # cameras may not say
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))          # <= 0 for cameras and streams
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    visualizer = VideoVisualizer(metadata)
    writer = lines = None
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        video_path = os.path.join(args.output, name + ".mp4")
        writer = cv2.VideoWriter(video_path, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        if not writer.isOpened():
            logger.error(f"cannot write {video_path!r}")
            return 2
        lines = open(os.path.join(args.output, name + ".jsonl"), "w")
    frames, start = 0, time.perf_counter()
    try:
        with tqdm.tqdm(total=total if total > 0 else None, unit="frame", desc=name) as bar:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    break
                rgb = np.ascontiguousarray(bgr[:, :, ::-1])
                instances = predictor(rgb)
                instances = instances[instances.scores >= args.confidence_threshold]
                drawing = visualizer.draw_instance_predictions(rgb, instances).get_image()[:, :, ::-1]
                if writer is not None:
                    writer.write(np.ascontiguousarray(drawing))
                    lines.write(json.dumps({"frame": frames, "time_s": round(frames / fps, 6),
                                            "detections": detections_to_json(instances, metadata)}) + "\n")
                frames += 1
                bar.update(1)
                bar.set_postfix(fps=f"{frames / (time.perf_counter() - start):.2f}")
                if writer is None:
                    cv2.imshow("MF-DETR", drawing)
                    if cv2.waitKey(1) & 0xFF == ord("q"):
                        break
    finally:
        capture.release()
        if writer is not None:
            writer.release()
            lines.close()
        else:
            cv2.destroyAllWindows()
    elapsed = time.perf_counter() - start
    written = f"; written to {args.output}/{name}.mp4 and .jsonl" if writer is not None else ""
    logger.info(f"{source}: {frames} frames in {elapsed:.1f}s, {frames / max(elapsed, 1e-9):.2f} frames/s{written}")
    if 0 < total and frames < total and args.video_input:
        logger.error(f"{source}: frame {frames} of {total} could not be decoded: stopped there, the {frames} "
                     f"frames before it are kept")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
