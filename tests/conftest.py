"""Fixtures shared by several test modules."""
import json
import os

import pytest
import torch

from helpers import ROOT, toy_cfg

# Fixtures that train a model: every test that uses one is slow (make test-fast leaves it out).
TRAINING_FIXTURES = {"overfit_toy"}


def pytest_configure(config):
    # make test runs two pytest-xdist workers on the two cores: each worker, and every process it
    # starts, computes on one thread, so that the workers share the cores instead of fighting for them.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_report_header(config):
    # Integer and float kernels differ by instruction set (VNNI, AVX-512, AMX): name the CPU in
    # every log, so that a failure seen on one CI host and not another can be traced to it.
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = [f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")]
    return f"cpu: {model}, {os.cpu_count()} cores, {' '.join(isa) or 'no AVX2'}"


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
    from filelock import FileLock

    from mobileformer_det.data import ensure_toy_dataset

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's workers share it: the first one to need the model trains it
    out = base / "overfit"
    root = ensure_toy_dataset(os.path.join(ROOT, "datasets", "toy_coco"))
    register_coco_instances("mfdet_toy_subset", {}, str(out / "subset.json"), os.path.join(root, "val"))
    with FileLock(str(base / "overfit.lock")):
        if not (out / "result.json").exists():
            _train_overfit(out, root)
    return {"weights": str(out / "model_final.pth"), "json": str(out / "subset.json"),
            "image_root": os.path.join(root, "val"), "result": json.loads((out / "result.json").read_text())}


def _train_overfit(out, root):
    from mobileformer_det.engine import Trainer

    out.mkdir(exist_ok=True)
    full = json.load(open(os.path.join(root, "val.json")))
    keep = sorted({a["image_id"] for a in full["annotations"]})[:4]
    subset = {"images": [im for im in full["images"] if im["id"] in keep],
              "annotations": [a for a in full["annotations"] if a["image_id"] in keep],
              "categories": full["categories"]}
    (out / "subset.json").write_text(json.dumps(subset))
    cfg = toy_cfg("DATASETS.TRAIN", ("mfdet_toy_subset",), "DATASETS.TEST", ("mfdet_toy_subset",),
                  "SOLVER.MAX_ITER", 200, "SOLVER.STEPS", (160,), "SOLVER.IMS_PER_BATCH", 4, "SOLVER.BASE_LR", 1e-3,
                  "SOLVER.WARMUP_ITERS", 20, "INPUT.MIN_SIZE_TRAIN", (128, 160), "TEST.EVAL_PERIOD", 0,
                  "SOLVER.CHECKPOINT_PERIOD", 100000, "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(out))
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.train()
    (out / "result.json").write_text(json.dumps(trainer._last_eval_results["bbox"]))
