"""The embedded toy dataset: simple shapes on textured backgrounds, in COCO format, made deterministically.

Four classes (square, disk, triangle, cross) of random colour, sizes from small (6 px) to large
(half the image), 0-5 objects per image with some overlaps, about 8% of images empty. Written on
first use and reused; ``VERSION`` changes force a rewrite.
"""
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

VERSION = 1
CLASSES = ["square", "disk", "triangle", "cross"]
SPLITS = {"toy_coco_train": ("train", 600, 0), "toy_coco_val": ("val", 100, 1)}
IMAGE_SIZE = (160, 128)  # (width, height): non-square on purpose


def _background(rng, width, height):
    """Noise plus random stripes or a gradient, blurred: [H, W, 3] uint8."""
    base = rng.uniform(40, 215, size=3)
    img = np.tile(base, (height, width, 1))
    yy, xx = np.mgrid[0:height, 0:width]
    kind = rng.randint(3)
    if kind == 0:
        period, angle = rng.uniform(6, 20), rng.uniform(0, np.pi)
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        img += stripes[..., None] * rng.uniform(10, 30, size=3)
    elif kind == 1:
        img += ((xx / width)[..., None] - 0.5) * rng.uniform(-60, 60, size=3)
    img += rng.normal(0, rng.uniform(4, 14), size=img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))
    return pil


def _draw(draw, category, x0, y0, size, color):
    x1, y1 = x0 + size, y0 + size
    if category == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color)
    elif category == "disk":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=color)
    elif category == "triangle":
        draw.polygon([(x0 + size / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=color)
    else:
        t = max(2, size // 3)
        draw.rectangle([x0 + (size - t) // 2, y0, x0 + (size + t) // 2, y1 - 1], fill=color)
        draw.rectangle([x0, y0 + (size - t) // 2, x1 - 1, y0 + (size + t) // 2], fill=color)


def _make_split(root, split, num_images, seed):
    rng = np.random.RandomState(seed)
    width, height = IMAGE_SIZE
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img = _background(rng, width, height)
        draw = ImageDraw.Draw(img)
        num_objects = 0 if rng.rand() < 0.08 else rng.randint(1, 6)
        for _ in range(num_objects):
            cat = rng.randint(len(CLASSES))
            size = int(np.exp(rng.uniform(np.log(6), np.log(min(width, height) * 0.5))))
            x0, y0 = rng.randint(0, width - size), rng.randint(0, height - size)
            color = tuple(int(c) for c in rng.randint(0, 256, size=3))
            _draw(draw, CLASSES[cat], x0, y0, size, color)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat + 1,
                "bbox": [x0, y0, size, size], "area": float(size * size), "iscrowd": 0,
            })
        file_name = f"{image_id:05d}.png"
        img.save(os.path.join(image_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    # Later objects are drawn over earlier ones: drop those mostly hidden so the labels stay honest.
    annotations = _drop_occluded(annotations)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    with open(os.path.join(root, f"{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def _drop_occluded(annotations, max_covered=0.5):
    kept = []
    by_image = {}
    for a in annotations:
        by_image.setdefault(a["image_id"], []).append(a)
    for anns in by_image.values():
        for i, a in enumerate(anns):
            x, y, w, h = a["bbox"]
            covered = np.zeros((h, w), dtype=bool)
            for b in anns[i + 1:]:
                bx, by, bw, bh = b["bbox"]
                x0, y0 = max(bx - x, 0), max(by - y, 0)
                x1, y1 = min(bx + bw - x, w), min(by + bh - y, h)
                if x1 > x0 and y1 > y0:
                    covered[y0:y1, x0:x1] = True
            if covered.mean() <= max_covered:
                kept.append(a)
    for i, a in enumerate(kept):
        a["id"] = i + 1
    return kept


def ensure_toy_dataset(root):
    """Write the toy dataset under ``root`` unless this version is already there. Returns ``root``."""
    stamp = os.path.join(root, "VERSION")
    if os.path.exists(stamp) and open(stamp).read().strip() == str(VERSION):
        return root
    os.makedirs(root, exist_ok=True)
    for split, num_images, seed in SPLITS.values():
        _make_split(root, split, num_images, seed)
    tmp = stamp + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(VERSION))
    os.replace(tmp, stamp)
    return root

