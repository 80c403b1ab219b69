#!/usr/bin/env python
"""Parameters, FLOPs (fvcore; one multiply-add = one flop) and structure of MF-DETR (or Detectron2's
RetinaNet and Faster R-CNN on Mobile-Former) and Mobile-Former.

    python tools/analyze_model.py --config-file configs/mf_detr.yaml --tasks flop parameter structure
    python tools/analyze_model.py --tasks variants          # the backbone table of the seven variants
    python tools/analyze_model.py --config-file configs/mf_detr.yaml --tasks detectors  # every variant

``flop`` counts the detector at the config's test size (shorter side ``INPUT.MIN_SIZE_TEST``,
longer side 1.52x, rounded up to a multiple of 32: 800x1216 for COCO) unless ``--input-size H W``,
split into backbone / neck / transformer (decoder, heads, optional encoder); for RetinaNet and
Faster R-CNN into backbone / fpn / their heads.
"""
import argparse
import logging
import math

import torch
from detectron2.modeling import build_model
from detectron2.utils.analysis import parameter_count_table
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from mobileformer_det import setup_cfg
from mobileformer_det.modeling import VARIANTS, MobileFormer, mobile_former_classifier
from mobileformer_det.utils.flops import detector_flops_by_module, flop_count_analysis

# The authors' implementation (github.com/AAboys/MobileFormer) counted with fvcore at 224x224, one
# multiply-add = one flop: params (M), FLOPs (M). The paper (arXiv 2108.05895) rounds them: 14.0M /
# 508M for the largest, 3.2M / 26M for the smallest.
REFERENCE = {
    "mf508": (13.977, 510.6), "mf294": (11.423, 295.4), "mf214": (9.426, 215.3), "mf151": (7.596, 152.0),
    "mf96": (4.585, 96.3), "mf52": (3.469, 51.8), "mf26": (3.233, 26.0),
}
DETECTION_SIZES = [(640, 640), (800, 1216)]


def default_input_size(cfg):
    short = cfg.INPUT.MIN_SIZE_TEST
    return short, int(math.ceil(short * 1.52 / 32) * 32)


def detector_flops(model, height, width):
    """Total and per-part GFLOPs of a detector on one ``height x width`` image: MF-DETR's backbone,
    neck and transformer; for a Detectron2 detector on an FPN, Mobile-Former, the FPN and each of
    its other parts (RetinaNet's ``head``, Faster R-CNN's ``proposal_generator`` and ``roi_heads``)."""
    total, by_module = detector_flops_by_module(model, height, width)
    if not hasattr(model.backbone, "bottom_up"):
        return total, {p: by_module.get(p, 0.0) for p in ("backbone", "neck", "transformer")}
    parts = {"backbone": by_module.get("backbone.bottom_up", 0.0),
             "fpn": by_module.get("backbone", 0.0) - by_module.get("backbone.bottom_up", 0.0)}
    parts.update({name: by_module.get(name, 0.0) for name, _ in model.named_children() if name != "backbone"})
    return total, parts


def count_params(module):
    return sum(p.numel() for p in module.parameters()) / 1e6


def variants_table():
    rows = []
    for variant, spec in VARIANTS.items():
        clf = mobile_former_classifier(variant).eval()
        params = count_params(clf)
        flops = flop_count_analysis(clf, torch.zeros(1, 3, 224, 224)).total() / 1e6
        ref_params, ref_flops = REFERENCE[variant]
        backbone = MobileFormer(spec, out_features=("res3", "res4", "res5")).eval()
        det = [flop_count_analysis(backbone, torch.zeros(1, 3, h, w)).total() / 1e9 for h, w in DETECTION_SIZES]
        rows.append([variant, f"{params:.3f}", f"{flops:.1f}", f"{ref_params:.3f}", f"{ref_flops:.1f}",
                     f"{params / ref_params:.4f}", f"{flops / ref_flops:.4f}", *(f"{g:.2f}" for g in det)])
    headers = ["variant", "params (M)", "FLOPs@224 (M)", "ref params (M)", "ref FLOPs (M)", "params ratio",
               "FLOPs ratio"] + [f"backbone GFLOPs@{h}x{w}" for h, w in DETECTION_SIZES]
    return tabulate(rows, headers, tablefmt="pipe")


def detectors_table(cfg):
    rows = []
    for variant in VARIANTS:
        c = cfg.clone()
        c.MODEL.MOBILEFORMER.VARIANT = variant
        model = build_model(c).eval()
        row = [variant, f"{count_params(model):.2f}"]
        for h, w in DETECTION_SIZES:
            total, parts = detector_flops(model, h, w)
            row += [f"{total:.2f}", " / ".join(f"{100 * v / total:.0f}%" for v in parts.values())]
        rows.append(row)
    headers = ["variant", "params (M)"]
    for h, w in DETECTION_SIZES:
        headers += [f"GFLOPs@{h}x{w}", " / ".join(parts)]
    return tabulate(rows, headers, tablefmt="pipe")


TASKS = ["flop", "parameter", "structure", "variants", "detectors"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="", metavar="FILE")
    parser.add_argument("--tasks", nargs="+", default=["flop", "parameter"], metavar="TASK",
                        help=f"any of {TASKS}")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    # nargs="+" also takes KEY VALUE pairs written right after the tasks: hand those back to opts.
    n = next((i for i, a in enumerate(args.tasks) if a not in TASKS), len(args.tasks))
    if n == 0 or (n < len(args.tasks) and not args.tasks[n].split(".")[0].isupper()):
        parser.error(f"--tasks: unknown task {args.tasks[n]!r}; choose among {TASKS}")
    args.tasks, args.opts = args.tasks[:n], args.tasks[n:] + args.opts
    setup_logger(name="fvcore", abbrev_name="fvcore")
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)

    needs_cfg = {"flop", "parameter", "structure", "detectors"} & set(args.tasks)
    if needs_cfg and not args.config_file:
        parser.error(f"tasks {sorted(needs_cfg)} need --config-file")
    cfg = setup_cfg(args.config_file, args.opts + ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""], freeze=False) \
        if needs_cfg else None
    model = build_model(cfg).eval() if {"flop", "parameter", "structure"} & set(args.tasks) else None

    for task in args.tasks:
        if task == "flop":
            h, w = args.input_size or default_input_size(cfg)
            total, parts = detector_flops(model, h, w)
            rows = [[name, f"{g:.3f}", f"{100 * g / total:.1f}%"] for name, g in parts.items()]
            rows.append(["total", f"{total:.3f}", "100%"])
            print(f"\nFLOPs of {cfg.MODEL.META_ARCHITECTURE} ({cfg.MODEL.MOBILEFORMER.VARIANT}) at {h}x{w}:")
            print(tabulate(rows, ["module", "GFLOPs", "share"], tablefmt="pipe"))
        elif task == "parameter":
            print("\nParameters:")
            print(parameter_count_table(model, max_depth=2))
        elif task == "structure":
            print(model)
        elif task == "variants":
            print("\nMobile-Former variants (classifier at 224x224; backbone to res5 at detection sizes):")
            print(variants_table())
        elif task == "detectors":
            print(f"\nMF-DETR with every backbone ({args.config_file} otherwise):")
            print(detectors_table(cfg))


if __name__ == "__main__":
    main()
