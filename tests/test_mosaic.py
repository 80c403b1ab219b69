"""INPUT.MOSAIC (DEIM's dense one-to-one matching): the mosaic against a hand computation, its
schedule in the data loader's workers, and train_net.py with it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode
from PIL import Image

from helpers import ROOT, toy_cfg
from mobileformer_det.data import DetrDatasetMapper

TOY_ROOT = os.path.join(ROOT, "datasets", "toy_coco")
# Resized to a shorter side of 256 and at most 320 wide, a 256x320 mosaic of 128x160 images keeps its size.
MOSAIC = ("INPUT.MOSAIC.ENABLED", True, "INPUT.MOSAIC.PROB", 1.0, "INPUT.MIN_SIZE_TRAIN", "(256,)",
          "INPUT.MAX_SIZE_TRAIN", 320)


def _record(tmp_path, name, colour, size, annotations):
    h, w = size
    path = str(tmp_path / f"{name}.png")
    Image.fromarray(np.full((h, w, 3), colour, dtype=np.uint8)).save(path)
    return {"file_name": path, "height": h, "width": w, "image_id": name, "annotations": annotations}


def _anno(box, cls, mode=BoxMode.XYWH_ABS, crowd=0):
    return {"bbox": box, "bbox_mode": mode, "category_id": cls, "iscrowd": crowd}


def test_mosaic_places_four_images_and_their_boxes(tmp_path):
    """The first image top-left at its own size; three drawn images (64x80, 128x160, 256x320, one
    box in XYXY) resized into the other quadrants, their boxes scaled and moved with them; the
    crowd box dropped. Checked for each quadrant by the colour found there, flipped or not."""
    first = _record(tmp_path, "a", (200, 0, 0), (128, 160), [_anno([10, 20, 30, 40], 0)])
    others = [_record(tmp_path, "b", (0, 200, 0), (64, 80), [_anno([8, 8, 24, 32], 1, BoxMode.XYXY_ABS)]),
              _record(tmp_path, "c", (0, 0, 200), (256, 320), [_anno([100, 50, 60, 40], 2)]),
              _record(tmp_path, "d", (200, 200, 200), (128, 160), [_anno([0, 0, 160, 128], 3, crowd=1),
                                                                   _anno([150, 100, 10, 28], 3)])]
    # Each record's boxes as XYXY fractions of its image.
    fractions = {(200, 0, 0): [(0, [10 / 160, 20 / 128, 40 / 160, 60 / 128])],
                 (0, 200, 0): [(1, [8 / 80, 8 / 64, 24 / 80, 32 / 64])],
                 (0, 0, 200): [(2, [100 / 320, 50 / 256, 160 / 320, 90 / 256])],
                 (200, 200, 200): [(3, [150 / 160, 100 / 128, 1.0, 1.0])]}
    mapper = DetrDatasetMapper(toy_cfg(*MOSAIC), is_train=True, dataset_dicts=others)
    np.random.seed(0)
    flips = set()
    for _ in range(12):
        out = mapper(dict(first))
        image = out["image"].permute(1, 2, 0).numpy()
        assert image.shape == (256, 320, 3) and (out["height"], out["width"]) == (256, 320)
        flipped = tuple(image[10, 10]) != (200, 0, 0)            # the first image sits top-left unless flipped
        flips.add(flipped)
        expected = []
        for k in range(4):
            y, x = (k // 2) * 128, (k % 2) * 160
            colour = tuple(int(c) for c in image[y + 64, 319 - (x + 80) if flipped else x + 80])
            for cls, (x0, y0, x1, y1) in fractions[colour]:
                box = [x + x0 * 160, y + y0 * 128, x + x1 * 160, y + y1 * 128]
                expected.append((cls, [320 - box[2], box[1], 320 - box[0], box[3]] if flipped else box))
        got = sorted(zip(out["instances"].gt_classes.tolist(), out["instances"].gt_boxes.tensor.tolist()))
        assert [c for c, _ in got] == sorted(c for c, _ in expected)
        np.testing.assert_allclose([b for _, b in got], [b for _, b in sorted(expected)], atol=1e-3)
    assert flips == {True, False}


def test_an_unreadable_drawn_image_leaves_the_image_plain(tmp_path):
    first = _record(tmp_path, "a", (200, 0, 0), (128, 160), [_anno([10, 20, 30, 40], 0)])
    missing = dict(first, file_name=str(tmp_path / "missing.png"))
    out = DetrDatasetMapper(toy_cfg(*MOSAIC), is_train=True, dataset_dicts=[missing])(dict(first))
    assert (out["height"], out["width"]) == (128, 160) and len(out["instances"]) == 1
    assert (out["image"].permute(1, 2, 0).numpy() == (200, 0, 0)).all()      # one image, resized, not a mosaic


def test_mosaic_is_refused_without_the_training_set_and_with_masks():
    with pytest.raises(ValueError, match="dataset_dicts"):
        DetrDatasetMapper(toy_cfg(*MOSAIC), is_train=True)
    with pytest.raises(ValueError, match="MODEL.MASK_ON"):
        DetrDatasetMapper(toy_cfg(*MOSAIC, "MODEL.MASK_ON", True), is_train=True, dataset_dicts=[{}])
    assert DetrDatasetMapper(toy_cfg(*MOSAIC), is_train=False).mosaic_prob == 0.0   # never at test time


def test_mosaic_stops_in_the_loader_workers_at_its_iteration():
    """The trainer's loader with a worker: every image is a mosaic (its dict says 256x320) until the
    shared progress reaches UNTIL_ITER; a few prefetched batches later every image is plain."""
    from mobileformer_det.data import register_datasets_from_config
    from mobileformer_det.engine import Trainer

    cfg = toy_cfg(*MOSAIC, "INPUT.MOSAIC.UNTIL_ITER", 5, "DATASETS.TOY_ROOT", TOY_ROOT,
                  "DATALOADER.NUM_WORKERS", 1, "SOLVER.IMS_PER_BATCH", 2)
    register_datasets_from_config(cfg)
    loader = Trainer.build_train_loader(cfg)
    batches = iter(loader)
    heights = [[d["height"] for d in next(batches)] for _ in range(3)]
    assert heights == [[256, 256]] * 3
    loader.progress.fill_(5)
    heights = [[d["height"] for d in next(batches)] for _ in range(8)]
    assert heights[-4:] == [[128, 128]] * 4, heights


@pytest.mark.slow
def test_train_net_with_mosaic_and_dfine_aug_until_an_iteration(tmp_path):
    """train_net.py with the mosaic and D-FINE's augmentation (INPUT.DFINE_AUG, as DEIM trains), a
    worker and both schedules' switches inside the run: it trains and evaluates, and its config
    keeps the options."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file",
           os.path.join(ROOT, "configs", "mf_detr_toy.yaml"), "DATASETS.TOY_ROOT", TOY_ROOT, "OUTPUT_DIR", str(tmp_path),
           "INPUT.MOSAIC.ENABLED", "True", "INPUT.MOSAIC.UNTIL_ITER", "3", "INPUT.DFINE_AUG.ENABLED", "True",
           "INPUT.DFINE_AUG.UNTIL_ITER", "4", "SOLVER.MAX_ITER", "6",
           "SOLVER.IMS_PER_BATCH", "2", "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    losses = [json.loads(line)["total_loss"] for line in open(tmp_path / "metrics.json") if "total_loss" in line]
    assert losses and all(np.isfinite(losses))
    config = open(tmp_path / "config.yaml").read()
    assert "UNTIL_ITER: 3" in config and "UNTIL_ITER: 4" in config
    assert torch.load(tmp_path / "model_final.pth", weights_only=False)["iteration"] == 5
