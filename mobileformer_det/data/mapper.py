"""DETR's data augmentation as a Detectron2 dataset mapper."""
import copy
import logging

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

__all__ = ["DetrDatasetMapper"]

logger = logging.getLogger(__name__)


class DetrDatasetMapper:
    """Read an image, augment it as DETR does, and build ``instances``.

    Training: random horizontal flip, then with probability ``crop_prob`` a resize of the shorter
    side to one of ``crop_resize`` and a random crop of ``crop_size`` (absolute range), then a
    resize of the shorter side to one of ``min_size_train`` (longer side at most ``max_size``).
    Crowd boxes are dropped; boxes are clipped to the crop and empty ones removed. Segmentations
    and keypoints are dropped unless ``MODEL.MASK_ON`` / ``MODEL.KEYPOINT_ON`` (as Detectron2's
    ``DatasetMapper`` does): a box detector must not clip polygons, nor lose a box because its
    polygon left the crop.
    Test: the shorter side resized to ``min_size_test``.

    An image that cannot be read makes the mapper return None after a warning naming the file:
    Detectron2's loader then takes another image, so one bad file does not end a training run.
    """

    def __init__(self, cfg, is_train=True):
        self.is_train = is_train
        self.image_format = cfg.INPUT.FORMAT
        self.use_instance_mask, self.use_keypoint = cfg.MODEL.MASK_ON, cfg.MODEL.KEYPOINT_ON
        if is_train:
            resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, "choice")
            self.augmentations = [T.RandomFlip(), resize]
            crop = cfg.INPUT.DETR_CROP
            self.crop_prob = crop.PROB if crop.ENABLED else 0.0
            self.crop_augmentations = [
                T.RandomFlip(),
                T.ResizeShortestEdge(crop.RESIZE_SHORT, sample_style="choice"),
                T.RandomCrop("absolute_range", crop.SIZE),
                resize,
            ]
        else:
            self.augmentations = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
            self.crop_prob = 0.0

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        try:
            image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
            utils.check_image_size(dataset_dict, image)
        except Exception as e:  # missing, truncated or not an image
            if not self.is_train:
                raise RuntimeError(f"cannot read image {dataset_dict['file_name']!r}: {e}") from e
            logger.warning(f"skipping image {dataset_dict['file_name']!r}: {e}")
            return None

        augs = self.crop_augmentations if np.random.rand() < self.crop_prob else self.augmentations
        aug_input = T.AugInput(image)
        transforms = T.AugmentationList(augs)(aug_input)
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
