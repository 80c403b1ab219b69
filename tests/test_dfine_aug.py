"""INPUT.DFINE_AUG (D-FINE's photometric distortion, zoom-out and IoU crop): boxes that follow their
objects pixel for pixel, what is dropped, the schedule's end, refusals. train_net.py runs it with
the mosaic in tests/test_mosaic.py."""
import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode

from helpers import toy_cfg
from mobileformer_det.data import DetrDatasetMapper

STRONG = ("INPUT.DFINE_AUG.ENABLED", True)
BACKGROUND = (90, 120, 150)
# Solid objects (XYWH boxes) in colours of their own on a plain background: every operation of the
# distortion maps a pixel's colour by a function of that colour alone (the contrast's mean is the
# image's), so an object stays one colour, and zoom-out and crop move whole pixels.
OBJECTS = [((10, 20, 30, 40), (250, 30, 30)), ((70, 8, 50, 24), (30, 220, 40)), ((100, 70, 44, 50), (20, 20, 240)),
           ((4, 100, 12, 12), (240, 240, 20))]


def _scene():
    image = np.empty((128, 160, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    annos = []
    for k, ((x, y, w, h), colour) in enumerate(OBJECTS):
        image[y:y + h, x:x + w] = colour
        annos.append({"bbox": [x, y, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": k, "iscrowd": 0})
    annos.append({"bbox": [0, 0, 160, 128], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3, "iscrowd": 1})
    return image, annos


def test_boxes_follow_their_objects_through_distortion_zoom_out_and_crop():
    """Over 40 draws: each box kept is its object's exact extent in the new image (one colour
    inside; the pixel beyond each side, where it lies in the image, is not that colour), the
    crowd box is dropped, the categories stay with their boxes, and the draws zoom out, crop and
    leave images unchanged in size."""
    mapper = DetrDatasetMapper(toy_cfg(*STRONG), is_train=True)
    image, annos = _scene()
    torch.manual_seed(0)
    sizes = set()
    for _ in range(40):
        record = {"annotations": [dict(a) for a in annos], "height": 128, "width": 160}
        out = mapper._strong(record, image)
        h, w = out.shape[:2]
        sizes.add("larger" if h > 128 else "smaller" if h < 128 else "same")
        assert (record["height"], record["width"]) == (h, w) and out.dtype == np.uint8
        assert all(a["iscrowd"] == 0 and a["bbox_mode"] == BoxMode.XYXY_ABS for a in record["annotations"])
        assert len({a["category_id"] for a in record["annotations"]}) == len(record["annotations"])
        for a in record["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            assert all(v == int(v) for v in a["bbox"]) and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, a
            x0, y0, x1, y1 = map(int, a["bbox"])
            inside = out[y0:y1, x0:x1].reshape(-1, 3)
            colour = inside[0]
            assert (inside == colour).all(), a
            beyond = [out[y0:y1, x0 - 1] if x0 > 0 else None, out[y0:y1, x1] if x1 < w else None,
                      out[y0 - 1, x0:x1] if y0 > 0 else None, out[y1, x0:x1] if y1 < h else None]
            for side in beyond:
                if side is not None:
                    assert not (side == colour).all(axis=-1).all(), a
        if h == 128 and w == 160 and len(record["annotations"]) == len(OBJECTS):  # neither zoomed nor cropped
            boxes = sorted((a["category_id"], a["bbox"]) for a in record["annotations"])
            assert boxes == [(k, [x, y, x + bw, y + bh]) for k, ((x, y, bw, bh), _) in enumerate(OBJECTS)]
    assert sizes == {"larger", "smaller", "same"}


def test_an_image_without_boxes_is_distorted_and_zoomed_but_not_cropped():
    mapper = DetrDatasetMapper(toy_cfg(*STRONG), is_train=True)
    image, _ = _scene()
    torch.manual_seed(0)
    for _ in range(10):
        record = {"annotations": [], "height": 128, "width": 160}
        out = mapper._strong(record, image)
        assert out.shape[0] >= 128 and out.shape[1] >= 160 and record["annotations"] == []


def test_the_augmentation_stops_at_its_iteration(tmp_path):
    """Past UNTIL_ITER the mapper gives what a mapper without the option gives, to the pixel;
    before it, images change size."""
    from PIL import Image

    image, annos = _scene()
    path = str(tmp_path / "scene.png")
    Image.fromarray(image).save(path)
    record = {"file_name": path, "height": 128, "width": 160, "image_id": 1, "annotations": annos}
    on = DetrDatasetMapper(toy_cfg(*STRONG, "INPUT.DFINE_AUG.UNTIL_ITER", 5), is_train=True)
    plain = DetrDatasetMapper(toy_cfg(), is_train=True)
    torch.manual_seed(0)
    assert len({tuple(on(dict(record))["image"].shape) for _ in range(10)}) > 1
    on.progress.fill_(5)
    for seed in range(5):
        np.random.seed(seed)
        a = on(dict(record))
        np.random.seed(seed)
        b = plain(dict(record))
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)


def test_refusals():
    with pytest.raises(ValueError, match="ZOOM_OUT_MAX"):
        DetrDatasetMapper(toy_cfg(*STRONG, "INPUT.DFINE_AUG.ZOOM_OUT_MAX", 0.5), is_train=True)
    with pytest.raises(ValueError, match="INPUT.DFINE_AUG moves boxes only"):
        DetrDatasetMapper(toy_cfg(*STRONG, "MODEL.MASK_ON", True), is_train=True)
    assert not DetrDatasetMapper(toy_cfg(*STRONG), is_train=False).strong   # never at test time
