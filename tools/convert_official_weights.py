#!/usr/bin/env python
"""Convert an authors' Mobile-Former checkpoint (AAboys/MobileFormer ``.pth.tar``) for this project.

    python tools/convert_official_weights.py mobile-former-508m.pth.tar mf508_d2.pth --variant mf508

The output holds ``backbone.*`` (trunk) and ``head.*`` (ImageNet classifier) keys under ``model``:
``MODEL.WEIGHTS mf508_d2.pth`` loads the backbone into MF-DETR (Detectron2 ignores the head, as it
ignores the FC layer of an ImageNet ResNet) and ``mobile_former_classifier`` loads all of it.
"""
import argparse
import sys

import torch

from mobileformer_det.checkpoint import VARIANT_KEY, load_official_checkpoint
from mobileformer_det.modeling import VARIANTS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="the reference checkpoint (.pth.tar)")
    parser.add_argument("dst", help="where to write the converted checkpoint (.pth)")
    parser.add_argument("--variant", required=True, choices=list(VARIANTS), help="the variant it must be")
    args = parser.parse_args(argv)
    try:
        state_dict = load_official_checkpoint(args.src, args.variant)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    torch.save({"model": state_dict, VARIANT_KEY: args.variant, "__author__": "AAboys/MobileFormer",
                "matching_heuristics": False}, args.dst)
    print(f"wrote {len(state_dict)} tensors of Mobile-Former {args.variant} to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
