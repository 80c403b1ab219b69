"""Dataset registration from the config, and checks that name a missing path and its fix."""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .toy import SPLITS as TOY_SPLITS
from .toy import register_toy_dataset


def register_datasets_from_config(cfg):
    """Register the toy dataset (if the config uses it) and every ``DATASETS.COCO_FORMAT`` entry."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(n in TOY_SPLITS for n in names):
        register_toy_dataset(cfg.DATASETS.TOY_ROOT)
    for entry in cfg.DATASETS.COCO_FORMAT:
        if len(entry) != 3:
            raise ValueError(
                f"DATASETS.COCO_FORMAT entries are (name, json_file, image_root); got {entry!r}"
            )
        name, json_file, image_root = entry
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, json_file, image_root)
    check_datasets(names)


def check_datasets(names):
    """Raise ``FileNotFoundError`` naming the first missing annotation file or image folder."""
    for name in names:
        if name not in DatasetCatalog.list():
            raise KeyError(
                f"dataset {name!r} is not registered: use one of Detectron2's builtin names "
                f"(e.g. coco_2017_train), the toy names {sorted(TOY_SPLITS)}, or add it to DATASETS.COCO_FORMAT"
            )
        meta = MetadataCatalog.get(name)
        for attr in ("json_file", "image_root"):
            path = getattr(meta, attr, None)
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(
                    f"dataset {name!r}: {attr} {path!r} does not exist. For Detectron2's builtin COCO, "
                    f"set $DETECTRON2_DATASETS (now {os.environ.get('DETECTRON2_DATASETS', './datasets')!r}) "
                    f"to the folder holding coco/ (see datasets/README.md); for your own data, fix "
                    f"DATASETS.COCO_FORMAT."
                )
