"""The embedded synthetic datasets, in COCO format, made deterministically.

``toy``: four classes (square, disk, triangle, cross) of random colour on textured backgrounds,
sizes from small (6 px) to large (half the image), 0-5 objects per image with some overlaps,
about 8% of images empty.

``crowd``, a second benchmark with other statistics: ten classes (the four above, ring, diamond,
bar, ellipse, frame, x-cross), 10-30 objects per image (5% empty), sizes from 4 px to 60% of the
image's height, aspect ratios up to 1:4 (bars, ellipses), objects hiding up to 60% of one another,
and unlabelled clutter that looks like objects (irregular polygons, line segments, open arcs)
under them.

Each is written on first use under its root and reused; a change of its version forces a rewrite.
"""
import json
import os

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw, ImageFilter

VERSION = 1
CLASSES = ["square", "disk", "triangle", "cross"]
SPLITS = {"toy_coco_train": ("train", 600, 0), "toy_coco_val": ("val", 100, 1)}
IMAGE_SIZE = (160, 128)  # (width, height): non-square on purpose

CROWD_VERSION = 1
CROWD_CLASSES = CLASSES + ["ring", "diamond", "bar", "ellipse", "frame", "x-cross"]
CROWD_SPLITS = {"toy_crowd_train": ("train", 600, 10), "toy_crowd_val": ("val", 100, 11)}
CROWD_IMAGE_SIZE = (192, 144)


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


def _toy_objects(draw, rng, width, height):
    """Draw one toy image's objects; returns their ``(class index, [x, y, w, h])``."""
    objects = []
    for _ in range(0 if rng.rand() < 0.08 else rng.randint(1, 6)):
        cat = rng.randint(len(CLASSES))
        size = int(np.exp(rng.uniform(np.log(6), np.log(min(width, height) * 0.5))))
        x0, y0 = rng.randint(0, width - size), rng.randint(0, height - size)
        color = tuple(int(c) for c in rng.randint(0, 256, size=3))
        _draw(draw, CLASSES[cat], x0, y0, size, color)
        objects.append((cat, [x0, y0, size, size]))
    return objects


def _write_split(root, split, num_images, seed, image_size, classes, draw_objects, max_covered):
    """Images ``<root>/<split>/NNNNN.png`` and ``<root>/<split>.json``: each image a textured
    background on which ``draw_objects(draw, rng, width, height)`` draws and returns its objects."""
    rng = np.random.RandomState(seed)
    width, height = image_size
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img = _background(rng, width, height)
        for cat, (x, y, w, h) in draw_objects(ImageDraw.Draw(img), rng, width, height):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat + 1,
                "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": 0,
            })
        file_name = f"{image_id:05d}.png"
        img.save(os.path.join(image_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    # Later objects are drawn over earlier ones: drop those mostly hidden so the labels stay honest.
    annotations = _drop_occluded(annotations, max_covered)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(classes)]
    with open(os.path.join(root, f"{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def _draw_crowd(draw, category, x0, y0, w, h, color):
    """Draw one crowd object filling the box (x0, y0, w, h)."""
    x1, y1 = x0 + w - 1, y0 + h - 1
    t = max(2, min(w, h) // 4)                                           # stroke width
    if category in CLASSES:
        _draw(draw, category, x0, y0, w, color)                          # square classes: w == h
    elif category == "ring":
        draw.ellipse([x0, y0, x1, y1], outline=color, width=t)
    elif category == "diamond":
        draw.polygon([(x0 + w / 2, y0), (x1, y0 + h / 2), (x0 + w / 2, y1), (x0, y0 + h / 2)], fill=color)
    elif category in ("bar", "ellipse"):
        (draw.rectangle if category == "bar" else draw.ellipse)([x0, y0, x1, y1], fill=color)
    elif category == "frame":
        draw.rectangle([x0, y0, x1, y1], outline=color, width=t)
    else:  # x-cross; the strokes are inset so that their square ends stay inside the box
        i = t / 2
        draw.line([(x0 + i, y0 + i), (x1 - i, y1 - i)], fill=color, width=t)
        draw.line([(x0 + i, y1 - i), (x1 - i, y0 + i)], fill=color, width=t)


def _clutter(draw, rng, width, height):
    """Unlabelled distractors: irregular polygons, line segments and open arcs of object-like size."""
    for _ in range(rng.randint(3, 9)):
        color = tuple(int(c) for c in rng.randint(0, 256, size=3))
        size = rng.uniform(6, 40)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        kind = rng.randint(3)
        if kind == 0:
            angles = np.sort(rng.uniform(0, 2 * np.pi, rng.randint(5, 9)))
            radii = rng.uniform(0.3, 1.0, len(angles)) * size / 2
            draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)], fill=color)
        elif kind == 1:
            a = rng.uniform(0, np.pi)
            dx, dy = np.cos(a) * size / 2, np.sin(a) * size / 2
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=color, width=int(rng.randint(1, 4)))
        else:
            start = rng.uniform(0, 360)
            draw.arc([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], start, start + rng.uniform(90, 240),
                     fill=color, width=int(rng.randint(2, 5)))


def _crowd_objects(draw, rng, width, height):
    """Draw one crowd image's clutter, then its objects; returns the objects' ``(class index, [x, y, w, h])``."""
    _clutter(draw, rng, width, height)
    objects = []
    for _ in range(0 if rng.rand() < 0.05 else rng.randint(10, 31)):
        cat = rng.randint(len(CROWD_CLASSES))
        name = CROWD_CLASSES[cat]
        size = int(np.exp(rng.uniform(np.log(4), np.log(height * 0.6))))
        w = h = size
        if name in ("bar", "ellipse"):
            long_side = int(size * rng.uniform(1.5, 4.0))
            w, h = (min(long_side, width - 1), size) if rng.rand() < 0.5 else (size, min(long_side, height - 1))
        elif name in ("ring", "diamond", "frame", "x-cross"):
            w = min(int(size * rng.uniform(0.7, 1.4)), width - 1)
        x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
        color = tuple(int(c) for c in rng.randint(0, 256, size=3))
        _draw_crowd(draw, name, x0, y0, w, h, color)
        objects.append((cat, [x0, y0, w, h]))
    return objects


def _drop_occluded(annotations, max_covered):
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


def _ensure(root, version, splits, make_split):
    stamp = os.path.join(root, "VERSION")

    def current():
        return os.path.exists(stamp) and open(stamp).read().strip() == str(version)

    if current():
        return root
    os.makedirs(root, exist_ok=True)
    # Processes started together (the ranks of a launch, parallel test workers) write it once: the
    # others wait for the stamp instead of writing the same files at the same time.
    with FileLock(os.path.join(root, ".writing.lock")):
        if not current():
            for split, num_images, seed in splits.values():
                make_split(root, split, num_images, seed)
            tmp = stamp + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(version))
            os.replace(tmp, stamp)
    return root


def ensure_toy_dataset(root):
    """Write the toy dataset under ``root`` unless this version is already there. Returns ``root``."""
    return _ensure(root, VERSION, SPLITS, lambda root, split, num, seed: _write_split(
        root, split, num, seed, IMAGE_SIZE, CLASSES, _toy_objects, max_covered=0.5))


def ensure_crowd_dataset(root):
    """Write the crowd dataset under ``root`` unless this version is already there. Returns ``root``."""
    return _ensure(root, CROWD_VERSION, CROWD_SPLITS, lambda root, split, num, seed: _write_split(
        root, split, num, seed, CROWD_IMAGE_SIZE, CROWD_CLASSES, _crowd_objects, max_covered=0.6))
