"""Checkpoints: the authors' (AAboys/MobileFormer) weights, and Detectron2's checkpointer with a variant check.

The reference state_dict is renamed key by key to this project's modules. The trunk goes under
``backbone.`` (the prefix of both :class:`MobileFormerClassifier` and the detector) and the
classifier head under ``head.``, which the detector ignores, as Detectron2 ignores the FC layer
of an ImageNet ResNet.
"""
import os
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .modeling.backbone import VARIANTS, mobile_former_classifier

__all__ = ["convert_official_state_dict", "load_official_checkpoint", "MobileFormerCheckpointer"]

VARIANT_KEY = "mobileformer_variant"

# (pattern on the reference key, replacement); the first match wins.
_STEM_RULES = [
    (r"^tokens\.weight$", "backbone.tokens"),
    (r"^stem\.0\.weight$", "backbone.stem.weight"),
    (r"^stem\.1\.", "backbone.stem.norm."),
]
_BRIDGE_RULES = [
    (r"local_global\.alpha\.0\.", "mobile_to_former.gate."),
    (r"local_global\.layer_norm\.", "mobile_to_former.norm."),
    (r"local_global\.", "mobile_to_former."),
    (r"global_block\.channel_mlp\.", "former.proj."),
    (r"global_block\.layer_norm\.", "former.norm1."),
    (r"global_block\.ffn\.0\.", "former.ffn.fc1."),
    (r"global_block\.ffn\.2\.", "former.ffn.fc2."),
    (r"global_block\.ffn_norm\.", "former.norm2."),
    (r"global_block\.q\.", "former.q."),
    (r"global_local\.proj\.", "former_to_mobile.v."),
    (r"global_local\.k\.", "former_to_mobile.k."),
]
# Convolution + BN pairs: (reference Sequential, index of conv, index of BN) -> our module.
_LITE_CONVS = {("conv", "0"): "dw", ("conv", "1"): "dw.norm", ("conv", "4"): "pw", ("conv", "5"): "pw.norm"}
_MF_CONVS = {"conv1": "expand", "conv2": "dw", "conv3": "project", "hyper1": "expand_act", "hyper2": "dw_act"}
_DOWN_CONVS = {"conv1": "dw1", "conv2": "pw1", "conv3": "dw2", "conv4": "pw2", "hyper1": "dw1_act", "hyper3": "dw2_act"}
_HEAD_RULES = [
    (r"^classifier\.conv\.1\.", "head.conv."),
    (r"^classifier\.conv\.2\.", "head.conv.norm."),
    (r"^classifier\.fc\.0\.", "head.fc."),
    (r"^classifier\.fc\.1\.", "head.fc_norm."),
    (r"^classifier\.classifier\.1\.", "head.classifier."),
]


def _rename_bridge_key(key):
    for pattern, repl in _BRIDGE_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _rename_block_key(rest, block_type):
    """``rest`` is a reference key inside ``features.<i>.``; returns our key inside ``blocks.<i>.``."""
    bridge_key = _rename_bridge_key(rest)
    if bridge_key is not None:
        return bridge_key
    seq, idx, tail = rest.split(".", 2)
    if block_type == "lite":
        return f"{_LITE_CONVS[(seq, idx)]}.{tail}"
    table = _MF_CONVS if block_type == "mf" else _DOWN_CONVS
    module = table[seq]
    if seq.startswith("hyper"):  # hyper.0 / hyper.2 are the two Linear layers of the MLP
        return f"{module}.{ {'0': 'fc1', '2': 'fc2'}[tail.split('.', 1)[0]] }.{tail.split('.', 1)[1]}"
    return f"{module}.{tail}" if idx == "0" else f"{module}.norm.{tail}"


def _rename(key, block_types):
    for pattern, repl in _STEM_RULES + _HEAD_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    if key.startswith("local_global."):  # the final Mobile->Former after the last block
        return "backbone.final_" + _rename_bridge_key(key)
    m = re.match(r"^features\.(\d+)\.(.+)$", key)
    if m is None:
        return None
    i = int(m.group(1))
    if i >= len(block_types):
        return None
    try:
        return f"backbone.blocks.{i}.{_rename_block_key(m.group(2), block_types[i])}"
    except (KeyError, ValueError):
        return None


def _unwrap(checkpoint):
    """The state_dict inside a reference ``.pth.tar`` (raw, or under state_dict_ema/state_dict/model), unprefixed."""
    state_dict = checkpoint
    if isinstance(checkpoint, dict):
        for key in ("state_dict_ema", "state_dict", "model"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                state_dict = checkpoint[key]
                break
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError("the checkpoint holds no state_dict (expected a dict of tensors)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def convert_official_state_dict(state_dict, variant):
    """Rename a reference-implementation state_dict (AAboys/MobileFormer) to this project's keys.

    Args:
        state_dict: the reference checkpoint: a raw state_dict, or a dict holding one under
            ``state_dict_ema``, ``state_dict`` or ``model``; a ``module.`` prefix is removed.
        variant: the variant it must be (``mf26`` ... ``mf508``).
    Returns:
        dict: ``backbone.*`` and ``head.*`` keys, exactly the state_dict of
        ``mobile_former_classifier(variant, num_classes)``.
    Raises:
        ValueError: naming the variant and every missing, unexpected or mis-shaped key.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown Mobile-Former variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    state_dict = _unwrap(state_dict)
    num_classes = state_dict["classifier.classifier.1.weight"].shape[0] \
        if "classifier.classifier.1.weight" in state_dict else 1000
    expected = mobile_former_classifier(variant, num_classes=num_classes).state_dict()
    block_types = [kind for kind, _, _, repeats, _, _ in VARIANTS[variant].blocks for _ in range(repeats)]

    converted, unexpected, mis_shaped = {}, [], []
    for key, value in state_dict.items():
        new_key = _rename(key, block_types)
        if new_key is None or new_key not in expected:
            unexpected.append(key)
        elif tuple(value.shape) != tuple(expected[new_key].shape):
            mis_shaped.append(f"{key}: {tuple(value.shape)} (expected {tuple(expected[new_key].shape)})")
        else:
            converted[new_key] = value
    missing = sorted(set(expected) - set(converted) - {k for k in expected if k.endswith("num_batches_tracked")})
    if unexpected or mis_shaped or missing:
        problems = []
        for label, keys in (("mis-shaped", mis_shaped), ("unexpected", unexpected), ("missing", missing)):
            if keys:
                problems.append(f"{len(keys)} {label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
        raise ValueError(
            f"this checkpoint is not a Mobile-Former {variant} of the reference implementation "
            f"(is it another variant?): " + "; ".join(problems)
        )
    return converted


def load_official_checkpoint(path, variant):
    """Read a reference ``.pth.tar`` from ``path`` and convert it (see :func:`convert_official_state_dict`)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return convert_official_state_dict(checkpoint, variant)


class MobileFormerCheckpointer(DetectionCheckpointer):
    """Detectron2's ``DetectionCheckpointer`` that

    - writes every file atomically (a temporary file renamed over the target), so a kill during a
      save never leaves a truncated checkpoint or ``last_checkpoint`` behind;
    - records the backbone variant in every checkpoint and refuses to load one recorded for another
      variant (which would otherwise load with nothing but shape warnings).
    """

    def __init__(self, model, save_dir="", *, variant=None, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.variant = variant

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        if self.variant is not None:
            data[VARIANT_KEY] = self.variant
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def _load_model(self, checkpoint):
        found = checkpoint.get(VARIANT_KEY)
        if self.variant is not None and found is not None and found != self.variant:
            raise ValueError(
                f"the checkpoint was made for Mobile-Former {found}, but MODEL.MOBILEFORMER.VARIANT is "
                f"{self.variant}: set MODEL.MOBILEFORMER.VARIANT {found} or load a {self.variant} checkpoint"
            )
        return super()._load_model(checkpoint)


def _atomic_write(path, write):
    """Call ``write(binary file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
