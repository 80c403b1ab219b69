"""A COCO-like dataset made on the spot, and ImageNet-layout backbone weights: the paths of the COCO
recipe (polygons, crowd RLE, images without annotations, non-contiguous category ids, FrozenBN
from converted weights) exercised without COCO, by the tests and by ``tools/gpu_check.py``."""
import json
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["make_coco_like", "write_imagenet_like_weights"]


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE of a bool ``[H, W]`` mask (column-major runs, starting with zeros)."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"counts": counts, "size": list(mask.shape)}


def make_coco_like(root, split, num_images, seed, size=(320, 240), classes=("car", "person", "sign")):
    """A COCO-format split written under ``root``: polygons drawn on noise with their polygon
    ``segmentation``, one crowd region (uncompressed RLE, ``iscrowd: 1``) in every fifth image,
    about 10% of images without any annotation, category ids 3, 7, 11 (not contiguous).

    Returns ``(json_path, image_dir)``.
    """
    rng = np.random.RandomState(seed)
    width, height = size
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    cat_ids = [3, 7, 11][: len(classes)]
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img = Image.fromarray(rng.randint(60, 200, (height, width, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        count = 0 if rng.rand() < 0.1 else rng.randint(4, 16)
        for _ in range(count):
            cls = rng.randint(len(classes))
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(6, 60)
            angles = np.sort(rng.uniform(0, 2 * np.pi, 3 + cls * 2))
            xs = np.clip(cx + r * np.cos(angles), 0, width - 1)
            ys = np.clip(cy + r * np.sin(angles), 0, height - 1)
            if xs.max() - xs.min() < 2 or ys.max() - ys.min() < 2:
                continue
            draw.polygon(list(zip(xs, ys)), fill=tuple(int(c) for c in rng.randint(0, 256, 3)))
            poly = np.stack([xs, ys], 1).flatten().round(2).tolist()
            x0, y0 = float(xs.min()), float(ys.min())
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[cls],
                                "segmentation": [poly], "bbox": [x0, y0, float(xs.max()) - x0, float(ys.max()) - y0],
                                "area": float((xs.max() - x0) * (ys.max() - y0)) / 2, "iscrowd": 0})
        if count and image_id % 5 == 0:
            mask = np.zeros((height, width), dtype=bool)
            mask[20:80, 30:150] = True
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[1],
                                "segmentation": _uncompressed_rle(mask), "bbox": [30.0, 20.0, 120.0, 60.0],
                                "area": 7200.0, "iscrowd": 1})
        name = f"{image_id:06d}.jpg"
        img.save(os.path.join(image_dir, name), quality=90)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    categories = [{"id": i, "name": n, "supercategory": "thing"} for i, n in zip(cat_ids, classes)]
    path = os.path.join(root, f"{split}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path, image_dir


def write_imagenet_like_weights(variant, path, seed=0):
    """Write what ``tools/convert_official_weights.py`` writes for the authors' ``variant`` checkpoint,
    with random values (batch-norm statistics included), to ``path``; returns ``path``."""
    from ..modeling import mobile_former_classifier

    torch.manual_seed(seed)
    classifier = mobile_former_classifier(variant)
    for m in classifier.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save({"model": classifier.state_dict()}, path)
    return path
