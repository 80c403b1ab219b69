"""Data: the toy generator, the DETR mapper, dataset registration and its errors."""
import copy
import json
import logging
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from helpers import toy_cfg
from mobileformer_det.data import DetrDatasetMapper, check_datasets, ensure_toy_dataset, register_datasets_from_config
from mobileformer_det.data.toy import CLASSES


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return ensure_toy_dataset(str(tmp_path_factory.mktemp("toy")))


@pytest.mark.slow
def test_toy_dataset_is_deterministic_and_varied(toy_root, tmp_path):
    ensure_toy_dataset(str(tmp_path))
    for split in ("train", "val"):
        a = json.load(open(os.path.join(toy_root, f"{split}.json")))
        b = json.load(open(os.path.join(tmp_path, f"{split}.json")))
        assert a == b
    assert open(os.path.join(toy_root, "val", "00007.png"), "rb").read() == \
        open(os.path.join(tmp_path, "val", "00007.png"), "rb").read()

    train = json.load(open(os.path.join(toy_root, "train.json")))
    per_image = np.bincount([a["image_id"] for a in train["annotations"]], minlength=len(train["images"]) + 1)[1:]
    sizes = np.array([a["bbox"][2] for a in train["annotations"]])
    assert (per_image == 0).mean() > 0.03 and per_image.max() >= 4          # empty images and crowded ones
    assert sizes.min() < 10 and sizes.max() > 50                            # small to large
    assert {a["category_id"] for a in train["annotations"]} == set(range(1, len(CLASSES) + 1))


def test_toy_dataset_is_reused_not_rewritten(toy_root):
    stamp = os.path.join(toy_root, "train.json")
    before = os.path.getmtime(stamp)
    ensure_toy_dataset(toy_root)
    assert os.path.getmtime(stamp) == before


def _dataset_dict(path, annotations, h=128, w=160):
    return {"file_name": path, "height": h, "width": w, "image_id": 1, "annotations": annotations}


def _anno(box, cls=0, crowd=0):
    from detectron2.structures import BoxMode
    return {"bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": cls, "iscrowd": crowd}


def test_mapper_drops_crowd_and_keeps_boxes_valid_after_crops(tmp_path):
    path = str(tmp_path / "img.png")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (128, 160, 3), dtype=np.uint8)).save(path)
    annos = [_anno([5, 5, 40, 30]), _anno([60, 40, 90, 80], 2), _anno([0, 0, 160, 128], 1, crowd=1),
             _anno([150, 120, 10, 8], 3)]
    mapper = DetrDatasetMapper(toy_cfg("INPUT.DETR_CROP.PROB", 1.0), is_train=True)
    np.random.seed(0)
    for _ in range(30):
        out = mapper(copy.deepcopy(_dataset_dict(path, annos)))
        inst, (h, w) = out["instances"], out["image"].shape[1:]
        assert 1 not in inst.gt_classes.tolist()                             # the crowd box is gone
        boxes = inst.gt_boxes.tensor
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert min(h, w) >= 96 and out["image"].dtype == torch.uint8


@pytest.mark.parametrize("flip, expected", [("none", {(5, 5, 45, 35)}), ("horizontal", {(5, 5, 45, 35), (115, 5, 155, 35)}),
                                            ("vertical", {(5, 5, 45, 35), (5, 93, 45, 123)})])
def test_mapper_flips_as_input_random_flip_says(tmp_path, flip, expected):
    """INPUT.RANDOM_FLIP, as Detectron2's own mapper reads it: over 40 draws of a 160x128 image at
    its own size, a box at (5, 5, 45, 35) stays put, or is mirrored in x, or in y."""
    path = str(tmp_path / "img.png")
    Image.fromarray(np.zeros((128, 160, 3), dtype=np.uint8)).save(path)
    mapper = DetrDatasetMapper(toy_cfg("INPUT.RANDOM_FLIP", flip, "INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MAX_SIZE_TRAIN", 160,
                                       "INPUT.DETR_CROP.ENABLED", False), is_train=True)
    np.random.seed(0)
    seen = {tuple(mapper(_dataset_dict(path, [_anno([5, 5, 40, 30])]))["instances"].gt_boxes.tensor[0].round().int().tolist())
            for _ in range(40)}
    assert seen == expected


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_mapper_reads_grayscale_rgba_palette_as_rgb(tmp_path, mode):
    path = str(tmp_path / f"img_{mode}.png")
    Image.new("RGB", (160, 128), (200, 30, 30)).convert(mode).save(path)
    out = DetrDatasetMapper(toy_cfg(), is_train=False)(_dataset_dict(path, []))
    assert out["image"].shape == (3, 160, 200)                            # the recipe tests at 1.25x


def test_mapper_skips_unusable_images_in_training_and_in_evaluation(tmp_path, caplog):
    bad = str(tmp_path / "broken.jpg")
    open(bad, "wb").write(b"not an image")
    thin = str(tmp_path / "thin.png")
    Image.new("RGB", (3000, 2)).save(thin)
    train, test = DetrDatasetMapper(toy_cfg(), is_train=True), DetrDatasetMapper(toy_cfg(), is_train=False)
    with caplog.at_level(logging.WARNING):
        assert train(_dataset_dict(bad, [])) is None
        assert train(_dataset_dict(thin, [], h=2, w=3000)) is None
    assert "broken.jpg" in caplog.text
    assert "thin.png" in caplog.text and "3000x2 pixels cannot be resized" in caplog.text
    for path, (h, w) in ((str(tmp_path / "missing.jpg"), (128, 160)), (thin, (2, 3000))):
        out = test(_dataset_dict(path, [], h=h, w=w))
        assert os.path.basename(path) in caplog.text and out["unreadable"] and out["image"].shape == (3, 32, 32)
        assert (out["height"], out["width"]) == (h, w)


def test_mapper_names_an_exif_rotation_that_contradicts_the_json(tmp_path, caplog):
    path = str(tmp_path / "rotated.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6                                                     # rotate 90 degrees on display
    Image.new("RGB", (160, 120), (90, 90, 90)).save(path, exif=exif.tobytes())
    with caplog.at_level(logging.WARNING):
        out = DetrDatasetMapper(toy_cfg(), is_train=False)(_dataset_dict(path, [], h=120, w=160))  # the stored size
    assert out["unreadable"]
    assert "it is 120x160 pixels, its json says 160x120" in caplog.text and "EXIF orientation tag (6" in caplog.text
    ok = DetrDatasetMapper(toy_cfg(), is_train=False)(_dataset_dict(path, [], h=160, w=120))  # the oriented size
    assert "unreadable" not in ok and ok["image"].shape[1:] == (200, 150)


def test_training_mapper_stops_when_no_image_can_be_read(tmp_path):
    mapper = DetrDatasetMapper(toy_cfg(), is_train=True)
    for i in range(DetrDatasetMapper.max_failures - 1):
        assert mapper(_dataset_dict(str(tmp_path / f"gone{i}.jpg"), [])) is None
    with pytest.raises(RuntimeError, match="none of the first 20 training images.*gone19.jpg.*image_root"):
        mapper(_dataset_dict(str(tmp_path / "gone19.jpg"), []))


def test_missing_dataset_paths_are_named():
    name = "mfdet_test_missing"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, "/nonexistent/annotations.json", "/nonexistent/images")
    with pytest.raises(FileNotFoundError, match="/nonexistent/annotations.json.*DETECTRON2_DATASETS"):
        check_datasets([name])
    with pytest.raises(KeyError, match="not registered"):
        check_datasets(["no_such_dataset"])


def test_coco_format_datasets_from_config(toy_root):
    cfg = toy_cfg("DATASETS.TRAIN", ("mine_train",), "DATASETS.TEST", ("mine_val",))
    cfg.DATASETS.COCO_FORMAT = [["mine_train", os.path.join(toy_root, "train.json"), os.path.join(toy_root, "train")],
                                ["mine_val", os.path.join(toy_root, "val.json"), os.path.join(toy_root, "val")]]
    register_datasets_from_config(cfg)
    assert len(DatasetCatalog.get("mine_val")) == 100
    assert MetadataCatalog.get("mine_val").thing_classes == CLASSES
    cfg.DATASETS.COCO_FORMAT = [["only_a_name"]]
    with pytest.raises(ValueError, match=r"\(name, json_file, image_root\)"):
        register_datasets_from_config(cfg)


def test_annotation_file_without_images_is_a_clear_error(tmp_path):
    from detectron2.data import get_detection_dataset_dicts

    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    register_coco_instances("mfdet_test_empty", {}, str(path), str(tmp_path))
    with pytest.raises(AssertionError, match="mfdet_test_empty' is empty"):
        get_detection_dataset_dicts(["mfdet_test_empty"])


def _json_with_segmentations(tmp_path, segmentations, categories=("a", "b", "c")):
    """One 100x80 image, one box per given segmentation."""
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1 + i % len(categories), "bbox": [10 + 5 * i, 10, 20, 15],
             "area": 300.0, "iscrowd": 0, "segmentation": seg} for i, seg in enumerate(segmentations)]
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}], "annotations": anns,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_boxes_are_loaded_whatever_the_segmentation_holds(tmp_path):
    from detectron2.data.datasets import load_coco_json

    from mobileformer_det.data import load_coco_boxes

    dict_polygon = [[{"x": 10, "y": 10}, {"x": 30, "y": 10}, {"x": 30, "y": 25}]]   # another tool's polygons
    segmentations = [dict_polygon, dict_polygon, [], [[]], [[10, 10, 30, 10, 30, 25]]]
    path = _json_with_segmentations(tmp_path, segmentations)
    (ours,) = load_coco_boxes(path, str(tmp_path), "mfdet_test_seg_boxes")
    assert [a["bbox"][0] for a in ours["annotations"]] == [10, 15, 20, 25, 30]
    assert all(set(a) == {"bbox", "bbox_mode", "category_id", "iscrowd"} for a in ours["annotations"])
    assert MetadataCatalog.get("mfdet_test_seg_boxes").thing_classes == ["a", "b", "c"]
    (theirs,) = load_coco_json(path, str(tmp_path))          # what Detectron2's loader would have trained on
    assert len(theirs["annotations"]) == 2

    cfg = toy_cfg("DATASETS.TRAIN", ("mfdet_seg_train",), "DATASETS.TEST", ())
    cfg.DATASETS.COCO_FORMAT = [["mfdet_seg_train", path, str(tmp_path)]]
    register_datasets_from_config(cfg)
    assert len(DatasetCatalog.get("mfdet_seg_train")[0]["annotations"]) == 5


def test_unknown_category_id_is_named(tmp_path):
    from mobileformer_det.data import load_coco_boxes

    path = _json_with_segmentations(tmp_path, [[]])
    data = json.load(open(path))
    data["annotations"][0]["category_id"] = 42
    open(path, "w").write(json.dumps(data))
    with pytest.raises(ValueError, match="category_id 42"):
        load_coco_boxes(path, str(tmp_path))


def _trainer_must_stop_before_the_model(monkeypatch, cfg, match):
    from mobileformer_det.engine import Trainer

    def no_model(cfg):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(Trainer, "build_model", classmethod(lambda cls, cfg: no_model(cfg)))
    with pytest.raises(ValueError, match=match):
        Trainer(cfg)


def test_a_training_set_without_boxes_stops_before_the_model(tmp_path, monkeypatch):
    path = tmp_path / "crowd_only.json"
    Image.new("RGB", (100, 80)).save(tmp_path / "a.png")
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 1}],
        "categories": [{"id": 1, "name": "a"}]}))
    cfg = toy_cfg("DATASETS.TRAIN", ("mfdet_crowd_only",), "DATASETS.TEST", (), "OUTPUT_DIR", str(tmp_path))
    cfg.DATASETS.COCO_FORMAT = [["mfdet_crowd_only", str(path), str(tmp_path)]]
    register_datasets_from_config(cfg)
    _trainer_must_stop_before_the_model(monkeypatch, cfg, r"holds no box to learn from")


def test_class_count_against_the_data(tmp_path, monkeypatch, caplog):
    from mobileformer_det.data import check_num_classes

    Image.new("RGB", (100, 80)).save(tmp_path / "a.png")
    path = _json_with_segmentations(tmp_path, [[], [], []])
    cfg = toy_cfg("DATASETS.TRAIN", ("mfdet_three",), "DATASETS.TEST", (), "MODEL.MF_DETR.NUM_CLASSES", 2,
                  "OUTPUT_DIR", str(tmp_path))
    cfg.DATASETS.COCO_FORMAT = [["mfdet_three", path, str(tmp_path)]]
    register_datasets_from_config(cfg)
    _trainer_must_stop_before_the_model(
        monkeypatch, cfg, r"MODEL.MF_DETR.NUM_CLASSES is 2, but dataset 'mfdet_three' has 3 categories.*NUM_CLASSES 3")

    with caplog.at_level(logging.WARNING):
        check_num_classes(5, "mfdet_three")
    assert "NUM_CLASSES is 5 but dataset 'mfdet_three' has only 3 categories" in caplog.text

    bg_path = tmp_path / "bg.json"
    data = json.load(open(path))
    data["categories"].insert(0, {"id": 0, "name": "background"})
    bg_path.write_text(json.dumps(data))
    register_coco_instances("mfdet_with_background", {}, str(bg_path), str(tmp_path))
    DatasetCatalog.get("mfdet_with_background")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_num_classes(4, "mfdet_with_background")
    assert "category named 'background'" in caplog.text and "NUM_CLASSES 3" in caplog.text


def test_mapper_crops_polygon_annotations_as_boxes(tmp_path):
    """The COCO recipe's crop on polygons and crowd RLE: boxes only, none lost to its polygon."""
    from helpers import make_coco_like
    from mobileformer_det.data import load_coco_boxes
    from detectron2.data.datasets import load_coco_json

    json_path, image_dir = make_coco_like(str(tmp_path), "train", 6, seed=1)
    cfg = toy_cfg("INPUT.DETR_CROP.ENABLED", True, "INPUT.DETR_CROP.PROB", 1.0, "INPUT.DETR_CROP.RESIZE_SHORT", (400, 500, 600),
                  "INPUT.DETR_CROP.SIZE", (384, 600), "INPUT.MIN_SIZE_TRAIN", (160,), "INPUT.MAX_SIZE_TRAIN", 256)
    mapper = DetrDatasetMapper(cfg, is_train=True)
    np.random.seed(0)
    for loader in (load_coco_json, load_coco_boxes):     # Detectron2's records keep the polygons
        for record in loader(json_path, image_dir):
            out = mapper(copy.deepcopy(record))
            inst = out["instances"]
            assert not inst.has("gt_masks")
            boxes = inst.gt_boxes.tensor
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert len(inst) <= sum(1 for a in record["annotations"] if not a["iscrowd"])


def test_invalid_boxes_are_dropped_by_reason_and_valid_ones_kept(caplog):
    from detectron2.structures import BoxMode

    from mobileformer_det.data import drop_invalid_boxes

    def ann(box, mode=BoxMode.XYWH_ABS, crowd=0):
        return {"bbox": box, "bbox_mode": mode, "category_id": 0, "iscrowd": crowd}

    good = [ann([10, 10, 20, 20]), ann(np.array([5.0, 5, 30, 40])), ann([90, 70, 30, 30]),   # the last partly outside
            ann([10, 10, 50, 60], BoxMode.XYXY_ABS), ann([-5, -5, 1, 1], crowd=1)]            # crowd: left to the mapper
    bad = [ann([10, 10, -5, 5]), ann([60, 10, 50, 60], BoxMode.XYXY_ABS), ann([float("nan"), 1, 2, 3]),
           ann([1, 2, 3]), ann([200, 10, 5, 5]), ann([0, 0, 1e30, 5]), ann([3, 3, 0, 4])]
    records = [{"file_name": "a.png", "height": 80, "width": 100, "annotations": good + bad},
               {"file_name": "b.png", "height": 80, "width": 100, "annotations": []}]
    with caplog.at_level(logging.WARNING):
        cleaned, dropped = drop_invalid_boxes(records, ["mine"])
    assert dropped == 7 and cleaned[0]["annotations"] == good and cleaned[1] is records[1]
    assert len(records[0]["annotations"]) == 12                                          # the input is left as it was
    assert "dropped 7 of its 12 boxes as invalid: 2 negative width or height" in caplog.text
    for reason in ("1 NaN or infinite coordinate", "1 not 4 numbers", "1 outside the image",
                   "1 more than the image's size beyond its border", "1 zero width or height"):
        assert reason in caplog.text


@pytest.mark.slow
def test_crowd_dataset_is_deterministic_crowded_and_registered(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from mobileformer_det.data import ensure_crowd_dataset, register_datasets_from_config
    from mobileformer_det.data.toy import CROWD_CLASSES, CROWD_IMAGE_SIZE

    root = ensure_crowd_dataset(str(tmp_path / "a"))
    val = json.load(open(os.path.join(root, "val.json")))
    again = ensure_crowd_dataset(str(tmp_path / "b"))
    assert json.load(open(os.path.join(again, "val.json"))) == val
    assert open(os.path.join(root, "val", "00005.png"), "rb").read() == open(os.path.join(again, "val", "00005.png"), "rb").read()

    counts = {}
    for a in val["annotations"]:
        counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= CROWD_IMAGE_SIZE[0] and y + h <= CROWD_IMAGE_SIZE[1]
    assert len(val["categories"]) == len(CROWD_CLASSES) == 10
    assert sum(counts.values()) / len(counts) >= 8 and max(counts.values()) >= 18
    assert len(counts) < len(val["images"])                                 # some empty images
    aspect = [a["bbox"][2] / a["bbox"][3] for a in val["annotations"]]
    assert max(aspect) > 2.5 and min(aspect) < 0.4                          # elongated objects both ways

    cfg = toy_cfg("DATASETS.TRAIN", ("toy_crowd_train",), "DATASETS.TEST", ("toy_crowd_val",),
                  "DATASETS.TOY_CROWD_ROOT", root)
    register_datasets_from_config(cfg)
    assert len(DatasetCatalog.get("toy_crowd_val")) == 100
    assert MetadataCatalog.get("toy_crowd_val").thing_classes == CROWD_CLASSES


def _write_slowly(root, split, num_images, seed):
    """A split writer for ``_ensure`` that takes its time and leaves a trace of each call."""
    import time

    with open(os.path.join(root, f"calls.{split}.{os.getpid()}"), "w") as f:
        f.write(str(num_images))
    time.sleep(0.5)


def _ensure_in_a_process(root):
    from mobileformer_det.data.toy import _ensure

    _ensure(root, 7, {"train": ("train", 3, 0), "val": ("val", 2, 1)}, _write_slowly)


def test_datasets_are_written_once_when_processes_start_together(tmp_path):
    """Two processes (two ranks, two test workers) ensuring the same dataset at once: one writes it,
    the other waits for it instead of writing the same files at the same time."""
    import multiprocessing

    processes = [multiprocessing.get_context("fork").Process(target=_ensure_in_a_process, args=(str(tmp_path),))
                 for _ in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(30)
    assert [p.exitcode for p in processes] == [0, 0]
    calls = sorted(f.split(".")[1] for f in os.listdir(tmp_path) if f.startswith("calls."))
    assert calls == ["train", "val"] and (tmp_path / "VERSION").read_text() == "7"
