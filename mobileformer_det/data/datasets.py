"""Datasets: COCO-format files loaded box-only, registration from the config, and the checks that
stop a run before it starts (a missing path, no box to learn from, a class count that does not fit).
"""
import contextlib
import io
import logging
import math
import os
from collections import Counter

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
    "check_training_boxes", "check_num_classes", "drop_invalid_boxes", "drop_missing_images",
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
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if (meta.get("json_file", None), meta.get("image_root", None)) != (json_file, image_root):
                raise ValueError(
                    f"DATASETS.COCO_FORMAT names a dataset {name!r}, but that name is already registered "
                    f"(json_file {meta.get('json_file', None)!r}): your {json_file!r} would not be used. "
                    f"Give the entry another name, and use that name in DATASETS.TRAIN / DATASETS.TEST")
            continue
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


def check_training_boxes(dataset_dicts, names, dropped=0):
    """Raise ``ValueError`` when the training images hold no box that training would use (crowd
    boxes are not used; ``dropped``: how many :func:`drop_invalid_boxes` removed): training would
    run on nothing but "no object" targets."""
    boxes = sum(1 for d in dataset_dicts for a in d.get("annotations", ()) if not a.get("iscrowd", 0))
    if boxes == 0:
        invalid = f"; the {dropped} it had were invalid (see the warning above)" if dropped else ""
        raise ValueError(
            f"the training set {list(names)} ({len(dataset_dicts)} images) holds no box to learn from "
            f"(crowd boxes are not used{invalid}). Check the annotation file: every object needs a 'bbox' "
            f"[x, y, w, h] in pixels inside its image, a 'category_id' among its 'categories' and 'iscrowd': 0."
        )


def _box_problem(box, mode, height, width):
    """Why a box cannot be trained on (None when it can): its reason in :func:`drop_invalid_boxes`'s log."""
    try:  # a list, a tuple or an array
        x0, y0, a, b = (float(v) for v in box)
    except (TypeError, ValueError):
        return "not 4 numbers"
    if not all(map(math.isfinite, (x0, y0, a, b))):
        return "NaN or infinite coordinate"
    x1, y1 = (x0 + a, y0 + b) if mode == BoxMode.XYWH_ABS else (a, b)
    if x1 < x0 or y1 < y0:
        return "negative width or height"
    if x1 == x0 or y1 == y0:
        return "zero width or height"
    if height is None or width is None:
        return None
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return "outside the image"
    if x0 < -width or y0 < -height or x1 > 2 * width or y1 > 2 * height:
        return "more than the image's size beyond its border"
    return None


def drop_invalid_boxes(dataset_dicts, names):
    """Remove the training boxes that would train on garbage, and say how many, by reason.

    A box (not crowd) is dropped when it is not 4 numbers, has a NaN or infinite coordinate, a
    negative or zero width or height (Detectron2 would silently flip the first into a valid box),
    lies entirely outside its image, or reaches more than the image's own size beyond its border
    (1e30: a broken export). Boxes partly outside the image are kept (the mapper clips them), as
    are crowd regions (the mapper drops them). Absolute-coordinate boxes only (XYWH_ABS, XYXY_ABS).

    Returns:
        (the dataset dicts, with those annotations removed; how many were removed)
    """
    reasons, example = Counter(), {}
    cleaned = []
    for record in dataset_dicts:
        annotations = record.get("annotations")
        if not annotations:
            cleaned.append(record)
            continue
        kept = []
        for ann in annotations:
            problem = None if ann.get("iscrowd", 0) else _box_problem(
                ann.get("bbox"), ann.get("bbox_mode", BoxMode.XYWH_ABS), record.get("height"), record.get("width"))
            if problem is None:
                kept.append(ann)
            else:
                reasons[problem] += 1
                example.setdefault(problem, f"{os.path.basename(record['file_name'])} {ann.get('bbox')}")
        cleaned.append(record if len(kept) == len(annotations) else {**record, "annotations": kept})
    dropped = sum(reasons.values())
    if dropped:
        total = sum(len(r.get("annotations", ())) for r in dataset_dicts)
        detail = "; ".join(f"{n} {reason} (e.g. {example[reason]})" for reason, n in reasons.most_common())
        logger.warning(f"training set {list(names)}: dropped {dropped} of its {total} boxes as invalid: {detail}. "
                       f"Fix them in the annotation file ('bbox' is [x, y, width, height] in pixels)")
    return cleaned, dropped


def drop_missing_images(dataset_dicts, names):
    """Leave out the images whose file does not exist, with a warning naming some; raise
    ``FileNotFoundError`` when none exists (a wrong image root).

    One directory listing per folder instead of a ``stat`` per image: a COCO-sized list (118k
    images) is checked in well under a second. Decoding is left to the mapper, which skips an
    image it cannot read (reading every file up front would take minutes on COCO).
    """
    listings = {}
    present, missing = [], []
    for record in dataset_dicts:
        path = record["file_name"]
        if "://" in path:  # a PathManager URL: not ours to list
            present.append(record)
            continue
        folder, base = os.path.split(path)
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        (present if base in listings[folder] else missing).append(record)
    if missing and not present:
        folders = sorted({os.path.dirname(r["file_name"]) for r in missing})
        raise FileNotFoundError(
            f"none of the {len(missing)} images of {list(names)} exists (e.g. {missing[0]['file_name']!r}; looked in "
            f"{', '.join(map(repr, folders[:3]))}): fix the dataset's image_root (DATASETS.COCO_FORMAT, or "
            f"$DETECTRON2_DATASETS for Detectron2's builtin datasets)")
    if missing:
        logger.warning(f"{list(names)}: {len(missing)} of {len(dataset_dicts)} images do not exist and are left out: "
                       f"{', '.join(r['file_name'] for r in missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return present


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
