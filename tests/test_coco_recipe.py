"""The COCO recipe on the paths the toy recipe never walks, without COCO: a COCO-like dataset made
here (polygon segmentations, crowd regions in RLE, images without annotations, category ids that
are not contiguous), trained with ``configs/mf_detr.yaml``'s own data and model settings (the DETR
crop on every image, FILTER_EMPTY_ANNOTATIONS False, FrozenBN from ImageNet-style weights,
denoising, 2 images per process; AMP where the device has CUDA) through ``tools/train_net.py``,
in one process and in two, then evaluated with COCOEvaluator. Only the image sizes and the
schedule are shrunk."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, make_coco_like

TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    from mobileformer_det.data.coco_like import write_imagenet_like_weights

    root = tmp_path_factory.mktemp("coco_like")
    train_json, train_images = make_coco_like(str(root), "train", 90, seed=0)
    val_json, val_images = make_coco_like(str(root), "val", 8, seed=1)
    # What tools/convert_official_weights.py writes for the authors' 508M checkpoint (random values).
    weights = write_imagenet_like_weights("mf508", str(root / "mf508_imagenet_d2.pth"))
    datasets = f"[['cl_train', '{train_json}', '{train_images}'], ['cl_val', '{val_json}', '{val_images}']]"
    return {"root": root, "weights": weights, "datasets": datasets}


def _train_net(args, timeout=900):
    result = subprocess.run([sys.executable, TRAIN_NET, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return result.returncode, result.stdout + result.stderr


def _recipe(coco_like, out, processes, *extra):
    return ["--num-gpus", processes, "--config-file", os.path.join(ROOT, "configs", "mf_detr.yaml"),
            "DATASETS.COCO_FORMAT", coco_like["datasets"], "DATASETS.TRAIN", "('cl_train',)",
            "DATASETS.TEST", "('cl_val',)", "MODEL.MF_DETR.NUM_CLASSES", 3, "MODEL.WEIGHTS", coco_like["weights"],
            "INPUT.DETR_CROP.PROB", 1.0, "INPUT.MIN_SIZE_TRAIN", "(160, 192)", "INPUT.MAX_SIZE_TRAIN", 256,
            "INPUT.MIN_SIZE_TEST", 192, "INPUT.MAX_SIZE_TEST", 256, "SOLVER.IMS_PER_BATCH", 2 * processes,
            "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 100000, "TEST.EVAL_PERIOD", 0,
            "DATALOADER.NUM_WORKERS", 1, "OUTPUT_DIR", out, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_coco_recipe_trains_and_evaluates(coco_like, tmp_path, processes):
    code, log = _train_net(_recipe(coco_like, tmp_path, processes))
    assert code == 0, log[-4000:]
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    assert "mf508_imagenet_d2.pth" in log                                   # started from the weights
    if not torch.cuda.is_available():
        assert "SOLVER.AMP.ENABLED turned off" in log
    if processes == 2:
        assert "weights identical on all 2 processes" in log
    from detectron2.config import CfgNode

    used = CfgNode.load_yaml_with_base(str(tmp_path / "config.yaml"))
    assert used["MODEL"]["MOBILEFORMER"]["NORM"] == "FrozenBN" and used["MODEL"]["MF_DETR"]["DENOISING"]["NUM_QUERIES"] > 0
    assert used["INPUT"]["DETR_CROP"]["ENABLED"] and used["DATALOADER"]["FILTER_EMPTY_ANNOTATIONS"] is False


@pytest.mark.slow
def test_frozen_batch_norm_without_weights_is_refused(coco_like, tmp_path):
    code, log = _train_net(_recipe(coco_like, tmp_path, 1, "MODEL.WEIGHTS", ""))
    assert code != 0 and "NORM is FrozenBN" in log and "MODEL.WEIGHTS is empty" in log
    assert not (tmp_path / "model_final.pth").exists()
