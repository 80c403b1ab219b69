#!/usr/bin/env python
"""Run MF-DETR on images and draw its detections with Detectron2's Visualizer.

    python tools/demo.py --config-file configs/mf_detr_toy.yaml --input img.jpg dir/ "glob/*.png" \
        --output out/ --confidence-threshold 0.5 --opts MODEL.WEIGHTS model_final.pth
    python tools/demo.py --config-file configs/mf_detr_toy.yaml --input dir/ --output out/ \
        --runtime onnxruntime --onnx mf_detr_toy.onnx      # the graph of tools/export_onnx.py

For each readable input it writes ``<output>/<name>.png`` (the drawing) and ``<output>/<name>.json``
(the detections above the threshold: COCO-style ``bbox`` [x, y, w, h] in pixels, ``category_id``
(the dataset's own id, as in its json), ``category``, ``score``). An unreadable file is reported by name and skipped; the exit code is
non-zero only when no input could be processed.
"""
import argparse
import glob
import json
import logging
import os
import sys
import time

import numpy as np
import tqdm
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import _apply_exif_orientation
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from mobileformer_det import setup_cfg
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
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders or globs")
    parser.add_argument("--output", required=True, help="folder for the drawings and JSON files")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--runtime", default="torch", choices=RUNTIMES,
                        help="torch (eager), compile (torch.compile), onnxruntime or openvino (with --onnx)")
    parser.add_argument("--onnx", help="the graph of tools/export_onnx.py, for --runtime onnxruntime / openvino")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                        help="the network's input size for --runtime compile (images are letterboxed into it)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logger = setup_logger(name="demo")
    setup_logger(name="mobileformer_det", abbrev_name="mfdet")
    logging.getLogger("fvcore").setLevel(logging.WARNING)

    cfg = setup_cfg(args.config_file, args.opts)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    if cfg.DATASETS.TEST:  # class names and the dataset's category ids
        try:
            register_datasets_from_config(cfg)
            if "thing_dataset_id_to_contiguous_id" not in metadata.as_dict():
                DatasetCatalog.get(metadata.name)  # a COCO-format dataset sets them when loaded
            check_num_classes(cfg.MODEL.MF_DETR.NUM_CLASSES, metadata.name)
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

    paths = expand_inputs(args.input)
    if not paths:
        logger.error(f"no image found in {args.input}")
        return 2
    os.makedirs(args.output, exist_ok=True)
    done, failed = 0, []
    for path in tqdm.tqdm(paths, disable=len(paths) < 2):
        try:
            rgb = read_image_rgb(path)
        except Exception as e:
            logger.error(f"cannot read {path!r}: {e}; skipped")
            failed.append(path)
            continue
        start = time.perf_counter()
        instances = predictor(rgb)
        elapsed = time.perf_counter() - start
        instances = instances[instances.scores >= args.confidence_threshold]
        logger.info(f"{path}: {len(instances)} detections in {elapsed:.3f}s")
        name = os.path.splitext(os.path.basename(path))[0]
        Visualizer(rgb, metadata).draw_instance_predictions(instances).save(os.path.join(args.output, name + ".png"))
        with open(os.path.join(args.output, name + ".json"), "w") as f:
            json.dump({"file_name": path, "height": rgb.shape[0], "width": rgb.shape[1],
                       "detections": detections_to_json(instances, metadata)}, f, indent=1)
        done += 1
    logger.info(f"{done} image(s) written to {args.output}; {len(failed)} unreadable: {failed}")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
