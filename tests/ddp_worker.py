"""Started by test_training.py: two gloo processes through Detectron2's launch.

Each rank trains the toy recipe for 3 iterations through the Trainer (DDP on the CPU), then the
ranks compare weight checksums; and the criterion's box count is checked with 1 box on rank 0
and 3 on rank 1. Rank 0 writes the report to <out>/report.json.
"""
import json
import os
import sys

import torch
from detectron2.engine import launch
from detectron2.utils import comm

sys.path.insert(0, os.path.dirname(__file__))
from helpers import ROOT, toy_cfg  # noqa: E402


def worker(out_dir):
    from mobileformer_det.data import register_datasets_from_config
    from mobileformer_det.engine import Trainer
    from mobileformer_det.modeling.detr import HungarianMatcher, SetCriterion

    cfg = toy_cfg("DATASETS.TOY_ROOT", os.path.join(ROOT, "datasets", "toy_coco"), "OUTPUT_DIR", out_dir,
                  "SOLVER.IMS_PER_BATCH", 4, "SOLVER.MAX_ITER", 3, "TEST.EVAL_PERIOD", 0,
                  "DATALOADER.NUM_WORKERS", 0, "SOLVER.CHECKPOINT_PERIOD", 100000)
    register_datasets_from_config(cfg)
    trainer = Trainer(cfg)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    checksum = float(sum(p.double().sum() for p in model.parameters()))

    boxes = 1 if comm.get_rank() == 0 else 3
    target = {"labels": torch.zeros(boxes, dtype=torch.int64), "boxes": torch.rand(boxes, 4) * 0.2 + 0.3}
    seen = []
    criterion = SetCriterion(4, HungarianMatcher())
    original = criterion._losses
    criterion._losses = lambda *a: seen.append(a[-1]) or original(*a)
    criterion([(torch.randn(1, 5, 4), torch.rand(1, 5, 4) * 0.2 + 0.3)], [target])

    gathered = comm.all_gather({"checksum": checksum, "num_boxes": seen[0]})
    if comm.is_main_process():
        with open(os.path.join(out_dir, "report.json"), "w") as f:
            json.dump({"world_size": comm.get_world_size(), "checksums": [g["checksum"] for g in gathered],
                       "num_boxes": [g["num_boxes"] for g in gathered]}, f)


if __name__ == "__main__":
    launch(worker, 2, dist_url="auto", args=(sys.argv[1],))
