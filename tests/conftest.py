"""Fixtures shared by several test modules."""
import json
import os

import pytest
import torch

from helpers import ROOT, toy_cfg

# Fixtures that train a model: every test that uses one is slow (make test-fast leaves it out).
TRAINING_FIXTURES = {"overfit_toy"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def overfit_toy(tmp_path_factory):
    """MF-DETR trained on four toy validation images (200 iterations through the Trainer), at their
    own size (128x160, a size graphs can be exported at) and at the recipe's test size (160x200).

    Returns a dict: ``weights`` (model_final.pth), ``json`` and ``image_root`` of the four images
    (registered as ``mfdet_toy_subset``) and ``result`` (COCOEvaluator's bbox metrics on them).
    """
    from detectron2.data.datasets import register_coco_instances

    from mobileformer_det.data import ensure_toy_dataset
    from mobileformer_det.engine import Trainer

    out = tmp_path_factory.mktemp("overfit")
    root = ensure_toy_dataset(os.path.join(ROOT, "datasets", "toy_coco"))
    full = json.load(open(os.path.join(root, "val.json")))
    keep = sorted({a["image_id"] for a in full["annotations"]})[:4]
    subset = {"images": [im for im in full["images"] if im["id"] in keep],
              "annotations": [a for a in full["annotations"] if a["image_id"] in keep],
              "categories": full["categories"]}
    (out / "subset.json").write_text(json.dumps(subset))
    register_coco_instances("mfdet_toy_subset", {}, str(out / "subset.json"), os.path.join(root, "val"))
    cfg = toy_cfg("DATASETS.TRAIN", ("mfdet_toy_subset",), "DATASETS.TEST", ("mfdet_toy_subset",),
                  "SOLVER.MAX_ITER", 200, "SOLVER.STEPS", (160,), "SOLVER.IMS_PER_BATCH", 4, "SOLVER.BASE_LR", 1e-3,
                  "SOLVER.WARMUP_ITERS", 20, "INPUT.MIN_SIZE_TRAIN", (128, 160), "TEST.EVAL_PERIOD", 0,
                  "SOLVER.CHECKPOINT_PERIOD", 100000, "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(out))
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.train()
    return {"weights": str(out / "model_final.pth"), "json": str(out / "subset.json"),
            "image_root": os.path.join(root, "val"), "result": trainer._last_eval_results["bbox"]}
