#!/usr/bin/env python
"""Train or evaluate MF-DETR with Detectron2 (its standard flags: --config-file, --num-gpus,
--num-machines, --machine-rank, --dist-url, --resume, --eval-only, trailing KEY VALUE overrides).

Without CUDA, MODEL.DEVICE falls back to cpu, AMP is turned off, and --num-gpus N starts N gloo
processes on the CPU.
"""
import logging

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results

from mobileformer_det import add_mobileformer_config
from mobileformer_det.checkpoint import MobileFormerCheckpointer
from mobileformer_det.data import register_datasets_from_config
from mobileformer_det.engine import Trainer


def setup(args):
    cfg = get_cfg()
    add_mobileformer_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    fallbacks = []
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
        fallbacks.append("no CUDA device: MODEL.DEVICE set to cpu")
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        cfg.SOLVER.AMP.ENABLED = False
        fallbacks.append("SOLVER.AMP.ENABLED turned off (AMP training needs CUDA)")
    cfg.freeze()
    default_setup(cfg, args)
    for message in fallbacks:
        logging.getLogger("mobileformer_det").warning(message)
    register_datasets_from_config(cfg)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        MobileFormerCheckpointer(model, save_dir=cfg.OUTPUT_DIR, variant=cfg.MODEL.MOBILEFORMER.VARIANT).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
