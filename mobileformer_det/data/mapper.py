"""DETR's data augmentation as a Detectron2 dataset mapper."""
import copy
import logging

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

__all__ = ["DetrDatasetMapper"]

logger = logging.getLogger(__name__)


class DetrDatasetMapper:
    """Read an image, augment it as DETR does, and build ``instances``.

    Training: random flip (``INPUT.RANDOM_FLIP``: horizontal, vertical or none), then with
    probability ``crop_prob`` a resize of the shorter side to one of ``crop_resize`` and a random
    crop of ``crop_size`` (absolute range), then a resize of the shorter side to one of
    ``min_size_train`` (longer side at most ``max_size``).
    Crowd boxes are dropped; boxes are clipped to the crop and empty ones removed. Segmentations
    and keypoints are dropped unless ``MODEL.MASK_ON`` / ``MODEL.KEYPOINT_ON`` (as Detectron2's
    ``DatasetMapper`` does): a box detector must not clip polygons, nor lose a box because its
    polygon left the crop.
    Test: the shorter side resized to ``min_size_test``.

    With ``INPUT.MOSAIC`` (DEIM's dense one-to-one matching), a training image is first, with
    probability ``INPUT.MOSAIC.PROB``, made a ``[2h, 2w]`` mosaic: itself top-left and three images
    drawn from ``dataset_dicts`` in the other quadrants, each resized to its ``h x w``, their boxes
    scaled and moved with them; the augmentations above then apply to the mosaic. It stops at
    iteration ``INPUT.MOSAIC.UNTIL_ITER`` (0: never), which the mapper reads from :attr:`progress`,
    a shared one-element tensor that the trainer sets to its iteration before every step (so that
    data loader workers see it).

    With ``INPUT.DFINE_AUG`` (D-FINE's and RT-DETR's strong augmentation), a training image (or
    mosaic) then goes through torchvision's ``RandomPhotometricDistort`` (p 0.5), ``RandomZoomOut``
    (fill 0, p 0.5) and ``RandomIoUCrop`` (p 0.8; only on images with boxes), its boxes with it, and
    boxes under one pixel are dropped, until iteration ``INPUT.DFINE_AUG.UNTIL_ITER`` (0: never
    stops), read from :attr:`progress` as the mosaic's schedule is.

    An image that cannot be used (missing, truncated, not an image, another size than its json
    says, e.g. because of an EXIF rotation, or too thin to resize) is named in a warning and
    skipped, so that one bad file does not end a run: in training the mapper returns None and
    Detectron2's loader takes another image (if none of the first ``max_failures`` images could be
    read, it raises instead: the dataset's paths are wrong); in evaluation it returns the input
    marked ``unreadable`` with a blank image, which :class:`~mobileformer_det.engine.ReadableCOCOEvaluator`
    leaves out.
    """

    max_failures = 20

    def __init__(self, cfg, is_train=True, dataset_dicts=None):
        self.is_train = is_train
        self.image_format = cfg.INPUT.FORMAT
        self.use_instance_mask, self.use_keypoint = cfg.MODEL.MASK_ON, cfg.MODEL.KEYPOINT_ON
        if is_train:
            resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, "choice")
            # INPUT.RANDOM_FLIP as Detectron2's build_augmentation reads it: horizontal, vertical or none
            flip = [] if cfg.INPUT.RANDOM_FLIP == "none" else [T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal", vertical=cfg.INPUT.RANDOM_FLIP == "vertical")]
            self.augmentations = [*flip, resize]
            crop = cfg.INPUT.DETR_CROP
            self.crop_prob = crop.PROB if crop.ENABLED else 0.0
            self.crop_augmentations = [
                *flip,
                T.ResizeShortestEdge(crop.RESIZE_SHORT, sample_style="choice"),
                T.RandomCrop("absolute_range", crop.SIZE),
                resize,
            ]
        else:
            self.augmentations = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
            self.crop_prob = 0.0
        mosaic = cfg.INPUT.MOSAIC
        self.mosaic_prob = mosaic.PROB if is_train and mosaic.ENABLED else 0.0
        self.mosaic_until = mosaic.UNTIL_ITER
        strong = cfg.INPUT.DFINE_AUG
        self.strong = is_train and strong.ENABLED
        self.strong_until = strong.UNTIL_ITER
        if self.strong:
            from torchvision.transforms import v2

            if strong.ZOOM_OUT_MAX < 1:
                raise ValueError(f"INPUT.DFINE_AUG.ZOOM_OUT_MAX is the canvas's largest side as a multiple of the "
                                 f"image's: at least 1, got {strong.ZOOM_OUT_MAX}")
            self.strong_ops = [v2.RandomPhotometricDistort(p=0.5),
                               v2.RandomZoomOut(fill=0, side_range=(1.0, strong.ZOOM_OUT_MAX), p=0.5)]
            self.iou_crop, self.sanitize = v2.RandomIoUCrop(), v2.SanitizeBoundingBoxes(min_size=1)
        scheduled = self.mosaic_prob or self.strong
        self.progress = torch.zeros(1, dtype=torch.int64).share_memory_() if scheduled else None
        for name, on in (("INPUT.MOSAIC", self.mosaic_prob), ("INPUT.DFINE_AUG", self.strong)):
            if on and (self.use_instance_mask or self.use_keypoint):
                raise ValueError(f"{name} moves boxes only: turn it off with MODEL.MASK_ON or MODEL.KEYPOINT_ON")
        if self.mosaic_prob:
            if not dataset_dicts:
                raise ValueError("INPUT.MOSAIC draws its other images from the training set: pass its records "
                                 "as dataset_dicts")
        self.dataset_dicts = dataset_dicts
        self._read = self._failed = 0

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        path = dataset_dict["file_name"]
        try:
            image = utils.read_image(path, format=self.image_format)
            problem = size_problem(path, dataset_dict, image.shape[:2])
            if problem:
                raise ValueError(problem)
            dataset_dict.setdefault("height", image.shape[0])  # as utils.check_image_size does
            dataset_dict.setdefault("width", image.shape[1])
            if self.mosaic_prob and self._scheduled(self.mosaic_until) and np.random.rand() < self.mosaic_prob:
                image = self._mosaic(dataset_dict, image)
            if self.strong and self._scheduled(self.strong_until):
                image = self._strong(dataset_dict, image)
            augs = self.crop_augmentations if np.random.rand() < self.crop_prob else self.augmentations
            aug_input = T.AugInput(image)
            try:
                transforms = T.AugmentationList(augs)(aug_input)
            except Exception as e:
                raise ValueError(f"its {image.shape[1]}x{image.shape[0]} pixels cannot be resized to the network's "
                                 f"input (a side would be under 1 pixel: {e})") from e
        except Exception as e:  # missing, truncated, not an image, wrong size, too thin to resize
            return self._skip(dataset_dict, e)
        self._read += 1
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        annos = []
        for obj in dataset_dict.pop("annotations", []):
            if obj.get("iscrowd", 0):
                continue
            if not self.use_instance_mask:
                obj.pop("segmentation", None)
            if not self.use_keypoint:
                obj.pop("keypoints", None)
            annos.append(utils.transform_instance_annotations(obj, transforms, image.shape[:2]))
        instances = utils.annotations_to_instances(annos, image.shape[:2])
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict

    def _scheduled(self, until):
        """Whether an augmentation that stops at iteration ``until`` (0: never) is still on."""
        return until <= 0 or int(self.progress) < until

    def _strong(self, dataset_dict, image):
        """``image`` ``[h, w, 3]`` through D-FINE's photometric distortion, zoom-out and IoU crop
        (torchvision's, on their own random state); ``dataset_dict``'s annotations become the
        non-crowd boxes that keep at least a pixel (XYXY_ABS in the new image) and its height and
        width the new image's."""
        from torchvision import tv_tensors

        annos = [a for a in dataset_dict.get("annotations", []) if not a.get("iscrowd", 0)]
        boxes = [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]
        channels = slice(None, None, -1) if self.image_format == "BGR" else slice(None)  # the distortion's hue is RGB's
        sample = {"image": tv_tensors.Image(torch.from_numpy(np.array(image[..., channels])).permute(2, 0, 1)),
                  "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                                    format="XYXY", canvas_size=image.shape[:2]),
                  "labels": torch.arange(len(annos))}                     # which annotation each box is
        for op in self.strong_ops:
            sample = op(sample)
        if annos and torch.rand(1) < 0.8:                                 # D-FINE applies the crop with p 0.8
            sample = self.iou_crop(sample)
        sample = self.sanitize(sample)
        out = sample["image"].permute(1, 2, 0).numpy()[..., channels]
        dataset_dict["annotations"] = [
            {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": annos[k]["category_id"], "iscrowd": 0}
            for box, k in zip(sample["boxes"].tolist(), sample["labels"].tolist())]
        dataset_dict.update(height=out.shape[0], width=out.shape[1])
        return np.ascontiguousarray(out)

    def _mosaic(self, dataset_dict, image):
        """``image`` ``[h, w, 3]`` with three random training images in a ``[2h, 2w, 3]`` mosaic;
        ``dataset_dict``'s annotations become the four images' boxes (XYXY_ABS in the mosaic) and
        its height and width the mosaic's. Unchanged when one of the three cannot be read (that
        image is named when it is drawn on its own)."""
        h, w = image.shape[:2]
        records = [self.dataset_dicts[i] for i in np.random.randint(len(self.dataset_dicts), size=3)]
        tiles = [(image, dataset_dict.get("annotations", []))]
        for record in records:
            try:
                other = utils.read_image(record["file_name"], format=self.image_format)
            except Exception:
                return image
            tiles.append((other, record.get("annotations", [])))
        canvas = np.zeros((2 * h, 2 * w, image.shape[2]), dtype=image.dtype)
        annos = []
        for k, (tile, tile_annos) in enumerate(tiles):
            y, x = (k // 2) * h, (k % 2) * w
            th, tw = tile.shape[:2]
            canvas[y:y + h, x:x + w] = T.ResizeTransform(th, tw, h, w).apply_image(tile) if (th, tw) != (h, w) else tile
            scale = np.array([w / tw, h / th, w / tw, h / th])
            for obj in tile_annos:
                box = BoxMode.convert(list(obj["bbox"]), obj["bbox_mode"], BoxMode.XYXY_ABS)
                annos.append({"bbox": (np.asarray(box) * scale + [x, y, x, y]).tolist(), "bbox_mode": BoxMode.XYXY_ABS,
                              "category_id": obj["category_id"], "iscrowd": obj.get("iscrowd", 0)})
        dataset_dict.update(annotations=annos, height=2 * h, width=2 * w)
        return canvas

    def _skip(self, dataset_dict, error):
        self._failed += 1
        path = dataset_dict["file_name"]
        logger.warning(f"skipping image {path!r}: {error}")
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict["unreadable"] = str(error)
            dataset_dict["image"] = torch.zeros(3, 32, 32, dtype=torch.uint8)
            return dataset_dict
        if self._read == 0 and self._failed >= self.max_failures:
            raise RuntimeError(f"none of the first {self._failed} training images this loader tried could be read "
                               f"(the last: {path!r}: {error}): check the dataset's image_root and files")
        return None


# EXIF orientations that swap an image's width and height (rotations by 90 or 270 degrees).
_TRANSPOSING_ORIENTATIONS = {5: "transposed", 6: "rotated 90 degrees", 7: "transversed", 8: "rotated 270 degrees"}


def size_problem(path, dataset_dict, shape):
    """Why an image read as ``shape`` (h, w) does not fit its dataset dict's ``height``/``width``
    (None when it does). An EXIF orientation that swaps the sides is named as the cause: Detectron2
    applies it, so a json written with the stored size disagrees with the image training sees."""
    expected = (dataset_dict.get("height"), dataset_dict.get("width"))
    if None in expected or tuple(expected) == tuple(shape):
        return None
    h, w = shape
    message = f"it is {w}x{h} pixels, its json says {expected[1]}x{expected[0]}"
    if tuple(expected) == (w, h):
        from PIL import Image

        with Image.open(path) as img:
            orientation = img.getexif().get(0x0112)
        if orientation in _TRANSPOSING_ORIENTATIONS:
            return (f"{message}: its EXIF orientation tag ({orientation}, {_TRANSPOSING_ORIENTATIONS[orientation]}) "
                    f"swaps the stored sides, and Detectron2 applies it when reading. Write the oriented size (and "
                    f"boxes in the oriented image) into the json, or save the image without the orientation tag")
    return message + ": fix the width/height in the json (and check its boxes)"
