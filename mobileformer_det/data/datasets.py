"""Datasets: COCO-format files loaded box-only, registration from the config, and the checks that
stop a run before it starts (a missing path, no box to learn from, a class count that does not fit).
"""
import contextlib
import io
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import log_first_n

from .toy import CLASSES as TOY_CLASSES
from .toy import CROWD_CLASSES, CROWD_SPLITS, ensure_crowd_dataset
from .toy import SPLITS as TOY_SPLITS
from .toy import ensure_toy_dataset

__all__ = [
    "load_coco_boxes", "register_coco_boxes", "register_datasets_from_config", "check_datasets",
    "check_training_boxes", "check_num_classes",
]

logger = logging.getLogger(__name__)

# Names that exporters give to a class of "no object", which a sigmoid detector must not learn.
_BACKGROUND_NAMES = {"background", "bg", "__background__", "_background_"}


def load_coco_boxes(json_file, image_root, dataset_name=None):
    """Detectron2's dataset dicts of a COCO-format json file, boxes only.

    As ``detectron2.data.datasets.load_coco_json`` (same records, same sorted image ids, same
    ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` metadata), but ``segmentation``
    and ``keypoints`` are never read: an annotation keeps its box whatever its segmentation holds.
    (``load_coco_json`` drops every instance whose segmentation is not COCO polygons or RLE, e.g.
    polygons written as lists of point dicts, and so loses all boxes of such a file.)

    Returns:
        list of dicts: ``file_name``, ``height``, ``width``, ``image_id``, ``annotations`` (list of
        ``bbox`` [x, y, w, h], ``bbox_mode`` XYWH_ABS, ``category_id`` (contiguous), ``iscrowd``).
    """
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(PathManager.get_local_path(json_file))
    categories = coco.loadCats(sorted(coco.getCatIds()))
    id_map = {c["id"]: i for i, c in enumerate(categories)}
    if dataset_name is not None:
        MetadataCatalog.get(dataset_name).set(
            thing_classes=[c["name"] for c in categories], thing_dataset_id_to_contiguous_id=id_map)
    records = []
    for image_id in sorted(coco.imgs):
        image = coco.imgs[image_id]
        annotations = []
        for ann in coco.imgToAnns.get(image_id, []):
            if ann["category_id"] not in id_map:
                raise ValueError(
                    f"{json_file}: annotation {ann.get('id')} has category_id {ann['category_id']}, which is not "
                    f"among the file's categories {sorted(id_map)}")
            annotations.append({"bbox": list(ann["bbox"]), "bbox_mode": BoxMode.XYWH_ABS,
                                "category_id": id_map[ann["category_id"]], "iscrowd": int(ann.get("iscrowd", 0))})
        records.append({"file_name": os.path.join(image_root, image["file_name"]), "height": image["height"],
                        "width": image["width"], "image_id": image_id, "annotations": annotations})
    return records


def register_coco_boxes(name, json_file, image_root, **metadata):
    """Register a COCO-format dataset loaded by :func:`load_coco_boxes` (evaluated with COCOEvaluator)."""
    DatasetCatalog.register(name, lambda: load_coco_boxes(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata)


def register_toy_dataset(root, kind="toy"):
    """Generate (if needed) and register a synthetic dataset: ``kind`` "toy" (``toy_coco_train``,
    ``toy_coco_val``) or "crowd" (``toy_crowd_train``, ``toy_crowd_val``)."""
    ensure, splits, classes = _SYNTHETIC[kind]
    ensure(root)
    for name, (split, _, _) in splits.items():
        if name not in DatasetCatalog.list():
            register_coco_boxes(name, os.path.join(root, f"{split}.json"), os.path.join(root, split),
                                thing_classes=list(classes))


_SYNTHETIC = {"toy": (ensure_toy_dataset, TOY_SPLITS, TOY_CLASSES),
              "crowd": (ensure_crowd_dataset, CROWD_SPLITS, CROWD_CLASSES)}


def register_datasets_from_config(cfg):
    """Register the synthetic datasets the config uses and every ``DATASETS.COCO_FORMAT`` entry."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(n in TOY_SPLITS for n in names):
        register_toy_dataset(cfg.DATASETS.TOY_ROOT)
    if any(n in CROWD_SPLITS for n in names):
        register_toy_dataset(cfg.DATASETS.TOY_CROWD_ROOT, "crowd")
    for entry in cfg.DATASETS.COCO_FORMAT:
        if len(entry) != 3:
            raise ValueError(
                f"DATASETS.COCO_FORMAT entries are (name, json_file, image_root); got {entry!r}"
            )
        name, json_file, image_root = entry
        if name not in DatasetCatalog.list():
            register_coco_boxes(name, json_file, image_root)
    check_datasets(names)


def check_datasets(names):
    """Raise ``FileNotFoundError`` naming the first missing annotation file or image folder."""
    for name in names:
        if name not in DatasetCatalog.list():
            raise KeyError(
                f"dataset {name!r} is not registered: use one of Detectron2's builtin names "
                f"(e.g. coco_2017_train), the synthetic names {sorted(TOY_SPLITS) + sorted(CROWD_SPLITS)}, or add it to "
                f"DATASETS.COCO_FORMAT"
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


def check_training_boxes(dataset_dicts, names):
    """Raise ``ValueError`` when the training images hold no box that training would use (crowd
    boxes are not used): training would run on nothing but "no object" targets."""
    boxes = sum(1 for d in dataset_dicts for a in d.get("annotations", ()) if not a.get("iscrowd", 0))
    if boxes == 0:
        raise ValueError(
            f"the training set {list(names)} ({len(dataset_dicts)} images) holds no box to learn from "
            f"(crowd boxes are not used). Check the annotation file: every object needs a 'bbox' "
            f"[x, y, w, h] in pixels, a 'category_id' among its 'categories' and 'iscrowd': 0."
        )


def check_num_classes(num_classes, dataset_name, key="MODEL.MF_DETR.NUM_CLASSES"):
    """Compare the detector's class count with a loaded dataset's ``thing_classes``.

    Fewer classes than the data: ``ValueError`` naming ``key``, both numbers and the dataset (the
    class index would run out of range in the loss). More: a warning. A class named like
    "background": a warning that says how to drop it.
    """
    classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)
    if classes is None:
        return
    if num_classes < len(classes):
        raise ValueError(
            f"{key} is {num_classes}, but dataset {dataset_name!r} has {len(classes)} categories "
            f"({', '.join(map(str, classes[:8]))}{' ...' if len(classes) > 8 else ''}): set {key} {len(classes)}"
        )
    if num_classes > len(classes):
        log_first_n(logging.WARNING, f"{key} is {num_classes} but dataset {dataset_name!r} has only "
                    f"{len(classes)} categories: the extra classes are never trained", n=1, name=__name__, key="message")
    background = [c for c in classes if str(c).strip().lower() in _BACKGROUND_NAMES]
    if background:
        log_first_n(logging.WARNING, f"dataset {dataset_name!r} has a category named {background[0]!r}, which "
                    f"MF-DETR would train as an object class (it scores each class with its own sigmoid and needs "
                    f"no background class). Remove that category from the json's 'categories' (with any annotation "
                    f"using it) and set {key} {len(classes) - 1}", n=1, name=__name__, key="message")
