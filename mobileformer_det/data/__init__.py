from .datasets import (
    check_datasets,
    check_num_classes,
    check_training_boxes,
    drop_invalid_boxes,
    drop_missing_images,
    load_coco_boxes,
    register_coco_boxes,
    register_datasets_from_config,
    register_toy_dataset,
)
from .mapper import DetrDatasetMapper
from .toy import ensure_crowd_dataset, ensure_toy_dataset
