#!/usr/bin/env python
"""Export MF-DETR to ONNX (opset >= 17) for ONNX Runtime, OpenVINO or TensorRT.

    python tools/export_onnx.py --config-file configs/mf_detr.yaml --output mf_detr.onnx \
        --input-size 800 1216 [--dynamic-batch] --opts MODEL.WEIGHTS output/mf_detr/model_final.pth

The graph takes ``images``: float32 ``[N, 3, H, W]``, RGB, 0-255 (normalisation is inside), H x W
fixed at export; it returns ``boxes`` ``[N, K, 4]`` (xyxy, input pixels), ``scores`` ``[N, K]`` and
``labels`` ``[N, K]`` (contiguous class index; the dataset's names and ids are in its metadata),
K = MODEL.MF_DETR.TEST.TOPK, after the top-k: a runtime needs no post-processing but the score
threshold and NMS. Batch norm and the neck are folded (``MFDETR.deploy``). Images of another size
are letterboxed (see mobileformer_det/deploy.py).
After export, ONNX Runtime runs the graph once on a random image and the largest difference to
PyTorch is printed.
"""
import argparse
import logging
import sys

import numpy as np
import torch
from detectron2.utils.logger import setup_logger

from mobileformer_det import setup_cfg
from mobileformer_det.deploy import TensorDetector, export_onnx, load_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--input-size", nargs=2, type=int, required=True, metavar=("H", "W"))
    parser.add_argument("--dynamic-batch", action="store_true", help="a batch dimension of any size")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 16 for grid_sample; default 17)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logger = setup_logger(name="export")
    setup_logger(name="mobileformer_det", abbrev_name="mfdet")
    logging.getLogger("fvcore").setLevel(logging.WARNING)
    if args.opset < 16:
        parser.error("--opset must be at least 16 (grid_sample)")
    height, width = args.input_size
    if height % 32 or width % 32:
        parser.error(f"--input-size {height} {width}: both must be multiples of 32 (Mobile-Former's stride)")

    cfg = setup_cfg(args.config_file, args.opts + ["MODEL.DEVICE", "cpu"])
    if not cfg.MODEL.WEIGHTS:
        logger.warning("no MODEL.WEIGHTS given: exporting randomly initialised weights. Do not time this file: "
                       "a fresh detector's decoder layers are copies of one another, and ONNX Runtime and "
                       "OpenVINO compute their equal value projections once instead of once per layer "
                       "(tools/benchmark.py makes the weights distinct)")
    model = load_model(cfg)
    export_onnx(model, args.output, height, width, dynamic_batch=args.dynamic_batch, opset=args.opset)
    logger.info(f"wrote {args.output}: images [{'N' if args.dynamic_batch else 1}, 3, {height}, {width}] -> "
                f"boxes, scores, labels (K = {cfg.MODEL.MF_DETR.TEST.TOPK}); onnx.checker passed")

    import onnxruntime as ort

    image = torch.randint(0, 256, (1, 3, height, width)).float()
    with torch.no_grad():
        expected = [t.numpy() for t in TensorDetector(model)(image)]
    got = ort.InferenceSession(args.output, providers=["CPUExecutionProvider"]).run(None, {"images": image.numpy()})
    logger.info(f"ONNX Runtime vs PyTorch on a random image: boxes {np.abs(got[0] - expected[0]).max():.2e} px, "
                f"scores {np.abs(got[1] - expected[1]).max():.2e}, labels equal: {bool((got[2] == expected[2]).all())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
