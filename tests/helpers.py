"""Shared helpers of the test suite."""
import ast
import math
import os

import torch

from mobileformer_det.data.coco_like import make_coco_like  # noqa: F401 (the tests' COCO-like data)

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


def image_input(seed, h, w, **extra):
    """A Detectron2 input dict holding a random ``[3, h, w]`` uint8 image (and ``extra`` keys)."""
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), **extra}


def encode(model, batched_inputs):
    """The transformer's inputs (``MFDETR.encode``) for a Detectron2 batch, as ``MFDETR.forward`` builds them."""
    images = model.preprocess_image(batched_inputs)
    return model.encode(images.tensor, model.padded_sizes(images))
