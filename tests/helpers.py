"""Shared helpers of the test suite."""
import ast
import math
import os

import torch

DATA = os.path.join(os.path.dirname(__file__), "data")


def official_key_list(variant):
    """``[(key, shape)]`` of the reference state_dict (tests/data/official_<variant>_keys.txt)."""
    path = os.path.join(DATA, f"official_{variant[2:]}m_keys.txt")
    entries = []
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape = line.rstrip("\n").split("\t")
            entries.append((key, tuple(ast.literal_eval(shape))))
    return entries


def synthetic_official_state_dict(variant, seed=0):
    """A reference-layout state_dict with deterministic random values (BN statistics included)."""
    g = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in official_key_list(variant):
        if key.endswith("num_batches_tracked"):
            value = torch.tensor(0)
        elif key.endswith("running_var"):
            value = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean") or key.endswith("bias"):
            value = torch.randn(shape, generator=g) * 0.1
        elif key == "tokens.weight":
            value = torch.randn(shape, generator=g)
        elif len(shape) == 1:  # BatchNorm / LayerNorm scale
            value = 1 + torch.randn(shape, generator=g) * 0.1
        else:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        state_dict[key] = value
    return state_dict


def reference_input(seed=1):
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_cfg(*opts):
    """The toy recipe's config (configs/mf_detr_toy.yaml) with ``KEY VALUE`` overrides, on the CPU."""
    from mobileformer_det import setup_cfg

    return setup_cfg(os.path.join(ROOT, "configs", "mf_detr_toy.yaml"), list(opts) + ["MODEL.DEVICE", "cpu"], freeze=False)


def make_instances(boxes_xyxy, classes, image_size):
    from detectron2.structures import Boxes, Instances

    inst = Instances(image_size)
    inst.gt_boxes = Boxes(torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE of a bool ``[H, W]`` mask (column-major runs, starting with zeros)."""
    import numpy as np

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
    import json

    import numpy as np
    from PIL import Image, ImageDraw

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


def image_input(seed, h, w, **extra):
    """A Detectron2 input dict holding a random ``[3, h, w]`` uint8 image (and ``extra`` keys)."""
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), **extra}
