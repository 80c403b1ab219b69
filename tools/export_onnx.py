#!/usr/bin/env python
"""Export MF-DETR to ONNX (opset >= 17) for ONNX Runtime, OpenVINO or TensorRT.

    python tools/export_onnx.py --config-file configs/mf_detr.yaml --output mf_detr.onnx \
        [--input-size 800 1344] [--dynamic-batch] --opts MODEL.WEIGHTS output/mf_detr/model_final.pth

The graph takes ``images``: float32 ``[N, 3, H, W]``, RGB, 0-255 (normalisation is inside), H x W
fixed at export, and ``image_sizes``: int64 ``[N, 2]``, the (h, w) of each image at the top left
of its canvas; the rest is masked out as evaluation masks padding. It returns ``boxes``
``[N, K, 4]`` (xyxy, pixels), ``scores`` ``[N, K]`` and ``labels`` ``[N, K]`` (contiguous class
index; the dataset's names and ids are in its metadata), K = MODEL.MF_DETR.TEST.TOPK, after the
top-k: a runtime needs no post-processing but the score threshold and NMS. Batch norm and the neck
are folded (``MFDETR.deploy``). See docs/deploy.md for the contract.

``--input-size`` defaults to the size that holds every DATASETS.TEST image after the config's test
resize (rounded up to multiples of 32): then the graph computes evaluation's detections on each of
them. A smaller size is warned about (those images would be shrunk). ``--unmasked`` writes the
older graph without ``image_sizes``: slightly faster, approximate on images that do not fill it.
After export, ONNX Runtime runs the graph once on a random image and the largest difference to
PyTorch is printed.
"""
import argparse
import logging
import os
import sys

import numpy as np
import torch
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from mobileformer_det import setup_cfg
from mobileformer_det.data import register_datasets_from_config
from mobileformer_det.deploy import (Predictor, TensorDetector, evaluate, evaluated_input_size, export_onnx,
                                     graph_runner, load_model)
from mobileformer_det.quantize import FLOAT_PARTS, PARTS, calibration_images, quantize_graph


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                        help="the graph's fixed canvas (multiples of 32); default: the config's test images' "
                             "largest size after its test resize")
    parser.add_argument("--dynamic-batch", action="store_true", help="a batch dimension of any size")
    parser.add_argument("--unmasked", action="store_true",
                        help="no image_sizes input: the graph sees the canvas's padding (approximate unless "
                             "images fill it)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 16 for grid_sample; default 17)")
    parser.add_argument("--int8", action="store_true",
                        help="write the INT8 graph (ONNX Runtime static quantization, QDQ) at --output, and the "
                             "float graph beside it as <output>.fp32.onnx")
    parser.add_argument("--calibration", metavar="DATASET",
                        help="--int8: the registered dataset to calibrate on (default: the first of DATASETS.TRAIN)")
    parser.add_argument("--calibration-images", type=int, default=64, metavar="N",
                        help="--int8: images drawn from it (default 64)")
    parser.add_argument("--float-parts", nargs="*", default=list(FLOAT_PARTS), choices=list(PARTS), metavar="PART",
                        help=f"--int8: parts kept in float, among {', '.join(PARTS)} (default: "
                             f"{' '.join(FLOAT_PARTS) or 'none'}; docs/deploy.md has what each costs)")
    parser.add_argument("--evaluate", action="store_true",
                        help="evaluate the written graph (and with --int8 the float one) on DATASETS.TEST with "
                             "COCOEvaluator, through ONNX Runtime")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logger = setup_logger(name="export")
    setup_logger(name="mobileformer_det", abbrev_name="mfdet")
    logging.getLogger("fvcore").setLevel(logging.WARNING)
    if args.opset < 16:
        parser.error("--opset must be at least 16 (grid_sample)")
    if args.input_size and (args.input_size[0] % 32 or args.input_size[1] % 32):
        parser.error(f"--input-size {args.input_size[0]} {args.input_size[1]}: both must be multiples of 32 "
                     f"(Mobile-Former's stride)")

    cfg = setup_cfg(args.config_file, args.opts + ["MODEL.DEVICE", "cpu"])
    if cfg.MODEL.META_ARCHITECTURE != "MFDETR":
        parser.error(f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE}: this tool exports MF-DETR only. "
                     f"Detectron2's RetinaNet and Faster R-CNN export through Detectron2's own exporter "
                     f"(detectron2.export.TracingAdapter, as its tools/deploy/export_model.py --export-method tracing "
                     f"--format onnx does)")
    needed = sizes = None
    try:
        register_datasets_from_config(cfg)
        needed, sizes = evaluated_input_size(cfg)
    except (KeyError, FileNotFoundError, ValueError) as e:
        if not args.input_size:
            parser.error(f"cannot size the graph from the config's test data ({e}): pass --input-size H W")
        logger.info(f"not checking --input-size against the test data: {e}")
    height, width = args.input_size or needed
    if needed:
        test = f"{cfg.INPUT.MIN_SIZE_TEST} / {cfg.INPUT.MAX_SIZE_TEST} (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST)"
        larger = sum(h > height or w > width for h, w in sizes)
        if larger:
            logger.warning(f"--input-size {height} {width}: {larger} of the {len(sizes)} image sizes of "
                           f"{cfg.DATASETS.TEST} are larger after the test resize to {test}; deployed, they are "
                           f"shrunk to fit and detected smaller than evaluation saw them. {needed[0]} {needed[1]} "
                           f"(the default) holds them all")
        elif (height, width) != tuple(needed):
            logger.info(f"--input-size {height} {width} is larger than the {needed[0]}x{needed[1]} the test images "
                        f"need after the resize to {test}: same detections, more computation")
    if not cfg.MODEL.WEIGHTS:
        logger.warning("no MODEL.WEIGHTS given: exporting randomly initialised weights. Do not time this file: "
                       "a fresh detector's decoder layers are copies of one another, and ONNX Runtime and "
                       "OpenVINO compute their equal value projections once instead of once per layer "
                       "(tools/benchmark.py makes the weights distinct)")
    if args.int8:  # the calibration data first: nothing is exported for a dataset that is not there
        calibration = args.calibration or (cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None)
        if calibration is None:
            parser.error("--int8 needs --calibration DATASET (the config has no DATASETS.TRAIN)")
        try:
            images = calibration_images(calibration, args.calibration_images)
        except (KeyError, ValueError) as e:
            parser.error(f"--calibration {calibration}: {e}")
    fp32_path = os.path.splitext(args.output)[0] + ".fp32.onnx" if args.int8 else args.output
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    model = load_model(cfg)
    export_onnx(model, fp32_path, height, width, dynamic_batch=args.dynamic_batch, opset=args.opset,
                masked=not args.unmasked)
    n = "N" if args.dynamic_batch else 1
    inputs = f"images [{n}, 3, {height}, {width}]" + ("" if args.unmasked else f", image_sizes [{n}, 2]")
    logger.info(f"wrote {fp32_path}: {inputs} -> boxes, scores, labels (K = {cfg.MODEL.MF_DETR.TEST.TOPK}); "
                f"onnx.checker passed")

    image = torch.randint(0, 256, (1, 3, height, width)).float()
    valid = [[height - height // 4, width - width // 3]]  # a letterboxed image: padding below and to the right
    with torch.no_grad():
        expected = [t.numpy() for t in TensorDetector(model)(image, None if args.unmasked else torch.tensor(valid))]
    got = graph_runner(fp32_path, "onnxruntime", torch.get_num_threads())(image.numpy(), valid)
    logger.info(f"ONNX Runtime vs PyTorch on a random image: boxes {np.abs(got[0] - expected[0]).max():.2e} px, "
                f"scores {np.abs(got[1] - expected[1]).max():.2e}, labels equal: {bool((got[2] == expected[2]).all())}")
    if args.int8:
        quantize_graph(fp32_path, args.output, cfg, images, args.float_parts)
        logger.info(f"wrote {args.output}: INT8, calibrated on {len(images)} images of {calibration}")
    if args.evaluate:
        graphs = {"fp32": fp32_path, "int8": args.output} if args.int8 else {"fp32": args.output}
        rows = []
        for name, path in graphs.items():
            for dataset in cfg.DATASETS.TEST:
                metrics = evaluate(cfg, Predictor(cfg, "onnxruntime", onnx_path=path), dataset)
                rows.append([name, dataset, f"{metrics['AP']:.1f}", f"{metrics['AP50']:.1f}", f"{metrics['AP75']:.1f}"])
        print(tabulate(rows, ["graph", "dataset", "AP", "AP50", "AP75"], tablefmt="pipe"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
